"""The parameters of an analytics read, checked in the contract's order: ids, then dates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from usage_api.dates import DateRange, make_range, parse_instant
from usage_api.errors import bad_request
from usage_api.http.params import blank_as_none, checked_id


@dataclass(frozen=True)
class UsageQuery:
    organization_id: str | None
    user_id: str | None
    span: DateRange | None


def parse_usage_query(params: Mapping[str, str]) -> UsageQuery:
    """The usage read's query; 400 with the contract's message for the first thing wrong."""
    organization_id = checked_id(blank_as_none(params.get("organization_id")), "organization_id")
    user_id = checked_id(blank_as_none(params.get("user_id")), "user_id")
    if organization_id is None and user_id is None:
        raise bad_request("organization_id or user_id is required")
    start_date = blank_as_none(params.get("start_date"))
    end_date = blank_as_none(params.get("end_date"))
    bounds = []
    for name, raw in (("start_date", start_date), ("end_date", end_date)):
        instant = parse_instant(raw) if raw is not None else None
        if raw is not None and instant is None:
            raise bad_request(
                f"{name} must be an ISO 8601 date or date-time, e.g. 2026-02-10T00:00:00Z"
            )
        bounds.append(instant)
    span = None
    if start_date is not None or end_date is not None:
        span = make_range(bounds[0], bounds[1])
        if span is None:
            raise bad_request("start_date must not be after end_date")
    return UsageQuery(organization_id, user_id, span)
