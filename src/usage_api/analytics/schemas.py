"""The documented shapes of the analytics answers and parameters (the OpenAPI schema's; the
routes build their JSON by hand, in the contract's key order, and these only describe it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from usage_api.schemas import (
    EXAMPLE_ORGANIZATION_ID,
    EXAMPLE_USER_ID,
    ClosedModel,
    date_json_schema,
    id_json_schema,
)

# The query parameters of `GET /v1/analytics/usage`, which the route reads itself and
# checks in order (key, ids, dates) with the contract's messages: documented here only.
_USAGE_QUERY = (
    (
        "organization_id",
        "The organization whose usage to read.",
        id_json_schema(example=EXAMPLE_ORGANIZATION_ID),
    ),
    (
        "user_id",
        "The user whose usage to read; with `organization_id`, one of its users.",
        id_json_schema(example=EXAMPLE_USER_ID),
    ),
    (
        "start_date",
        "Inclusive start: a date (00:00 UTC) or a date-time (no offset: UTC).",
        date_json_schema("2026-02-10T00:00:00Z"),
    ),
    (
        "end_date",
        "Inclusive end, through the unit of its finest field: `2026-03-12` covers the whole"
        " day, `2026-03-12T23:59` the whole minute; with a fraction, that instant.",
        date_json_schema("2026-03-12"),
    ),
)


def usage_parameters() -> dict[str, Any]:
    """`openapi_extra` documenting the usage read's key and optional query parameters."""
    return {
        "security": [{"ApiKey": []}],
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": {**schema, "title": name.replace("_", " ").title()},
                "description": description,
            }
            for name, description, schema in _USAGE_QUERY
        ],
    }


class Counts(ClosedModel):
    outbound: int = Field(ge=0)
    inbound: int = Field(ge=0)
    total: int = Field(ge=0, description="outbound + inbound")


class VoiceSeconds(ClosedModel):
    seconds: int = Field(ge=0, description="Calls without knowledge-base retrieval.")
    kb_seconds: int = Field(ge=0, description="Calls with knowledge-base retrieval.")
    total_seconds: int = Field(ge=0, description="seconds + kb_seconds")


_START_ECHO = "With `custom`: the start in UTC, null when open."
_END_ECHO = "With `custom`: the last instant covered, in UTC; null when open."
Period = Literal["all_time", "custom"]


class OrganizationUsage(ClosedModel):
    organization_id: str
    organization_name: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)


class UserUsage(ClosedModel):
    user_id: str
    user_name: str
    user_email: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)


class UsageResponse(ClosedModel):
    success: Literal[True]
    usage: OrganizationUsage | UserUsage
    powered_by: str
