"""The parameters of an analytics read, checked in the contract's order: ids, then dates,
time zone and granularity."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from usage_api.analytics.calendar import (
    Calendar,
    Granularity,
    local_range,
    parse_granularity,
    parse_timezone,
    read_bound,
)
from usage_api.dates import DateRange, make_range, parse_instant, utc_now
from usage_api.errors import bad_request
from usage_api.http.params import checked_id

_UTC = ZoneInfo("UTC")


@dataclass(frozen=True)
class UsageQuery:
    organization_id: str | None
    user_id: str | None
    span: DateRange | None
    # The zone's name as the request gave it; None without `timezone`.
    timezone: str | None = None
    granularity: Granularity | None = None
    # With `granularity`: every bucket boundary, from the range's start to its end.
    bounds: tuple[datetime, ...] = ()
    partner_id: str | None = None

    @property
    def kind(self) -> str:
        """Whose usage: the user's wins, then the organization's, then the partner's."""
        if self.user_id is not None:
            return "user"
        return "organization" if self.organization_id is not None else "partner"

    @property
    def calendar(self) -> Calendar:
        assert self.granularity is not None
        return Calendar(ZoneInfo(self.timezone) if self.timezone else _UTC, self.granularity)


def parse_usage_query(params: Mapping[str, str]) -> UsageQuery:
    """The usage read's query; 400 with the contract's message for the first thing wrong."""
    # A blank parameter (`?start_date=`) counts as absent, as forms send them. A plain dict:
    # a Starlette QueryParams' `get` is two Python calls, and this reads seven.
    given = {name: value for name, value in params.items() if value}
    organization_id = checked_id(given.get("organization_id"), "organization_id")
    user_id = checked_id(given.get("user_id"), "user_id")
    partner_id = checked_id(given.get("partner_id"), "partner_id")
    if organization_id is None and user_id is None and partner_id is None:
        raise bad_request("organization_id or user_id is required")
    start_date = given.get("start_date")
    end_date = given.get("end_date")
    bounds = []
    for name, raw in (("start_date", start_date), ("end_date", end_date)):
        instant = parse_instant(raw) if raw is not None else None
        if raw is not None and instant is None:
            raise bad_request(
                f"{name} must be an ISO 8601 date or date-time, e.g. 2026-02-10T00:00:00Z"
            )
        bounds.append(instant)
    timezone = given.get("timezone")
    zone = parse_timezone(timezone) if timezone is not None else None
    granularity_name = given.get("granularity")
    granularity = parse_granularity(granularity_name) if granularity_name is not None else None
    if granularity is not None and start_date is None:
        raise bad_request("start_date is required with granularity")

    span = None
    if start_date is not None or end_date is not None:
        if zone is None:
            span = make_range(bounds[0], bounds[1])
        else:
            span = local_range(
                read_bound(start_date, zone) if start_date is not None else None,
                read_bound(end_date, zone) if end_date is not None else None,
            )
        if span is not None and granularity is not None and end_date is None:
            span = _through_present_bucket(span, Calendar(zone or _UTC, granularity))
        if span is None:
            raise bad_request("start_date must not be after end_date")
    query = UsageQuery(organization_id, user_id, span, timezone, granularity, partner_id=partner_id)
    if granularity is None or span is None:
        return query
    cut = query.calendar.buckets(span.start, span.end_exclusive)
    return replace(query, bounds=(cut[0][0], *(end for _, end in cut)))


def _through_present_bucket(span: DateRange, calendar: Calendar) -> DateRange | None:
    """A series without `end_date` runs through the end of the bucket holding now; its
    echoed `end_date` is the last second of that bucket."""
    end = calendar.following(utc_now())
    if span.start >= end:
        return None
    last = (end - timedelta(seconds=1)).astimezone(UTC).replace(tzinfo=None)
    return DateRange(span.start, end, span.start_echo, last.isoformat(timespec="seconds") + "Z")
