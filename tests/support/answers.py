"""The exact answers the contract promises, and the assertion that compares with them.

Each builder is the JSON body of one kind of answer, so a test states what it expects in
the contract's own shape.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

DATE_MESSAGE = "{} must be an ISO 8601 date or date-time, e.g. 2026-02-10T00:00:00Z"


def error(message: str) -> dict[str, Any]:
    """Any error answer without details: `{"success": false, "error": message}`."""
    return {"success": False, "error": message}


def bad_date(name: str) -> dict[str, Any]:
    """The 400 of a malformed `start_date` or `end_date`."""
    return error(DATE_MESSAGE.format(name))


def usage_answer(usage: dict[str, Any], powered_by: str = "Teli") -> dict[str, Any]:
    """The 200 of GET /v1/analytics/usage around its `usage` object."""
    return {"success": True, "usage": usage, "powered_by": powered_by}


def ingest_answer(
    accepted: int, duplicates: int = 0, conflicts: list[str] | None = None
) -> dict[str, Any]:
    """The 200 of POST /v1/usage/events."""
    return {
        "success": True,
        "accepted": accepted,
        "duplicates": duplicates,
        "conflicts": conflicts or [],
    }


def assert_json(response: httpx.Response, status: int, expected: dict[str, Any]) -> None:
    """The exact body, and the exact key order at every level."""
    assert (response.status_code, response.json()) == (status, expected)
    assert json.dumps(response.json()) == json.dumps(expected)


# The public docs' two example responses, which the demo reproduces exactly.
SEED_ORGANIZATION: dict[str, Any] = {
    "success": True,
    "usage": {
        "organization_id": "1767623610019x414651971228139500",
        "organization_name": "Acme Corp",
        "sms": {"outbound": 12450, "inbound": 3821, "total": 16271},
        "mms": {"outbound": 245, "inbound": 67, "total": 312},
        "voice": {"seconds": 45678, "kb_seconds": 12345, "total_seconds": 58023},
        "period": "all_time",
    },
    "powered_by": "Teli",
}

SEED_USER: dict[str, Any] = {
    "success": True,
    "usage": {
        "user_id": "1768236789852x707565875153419434",
        "user_name": "John Smith",
        "user_email": "john@example.com",
        "sms": {"outbound": 1234, "inbound": 567, "total": 1801},
        "mms": {"outbound": 89, "inbound": 12, "total": 101},
        "voice": {"seconds": 5678, "kb_seconds": 1234, "total_seconds": 6912},
        "period": "all_time",
    },
    "powered_by": "Teli",
}
