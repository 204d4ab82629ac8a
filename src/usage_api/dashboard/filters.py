"""A view's filters, read from and written back to its URL: period, granularity, time zone,
the table's sort and position (the breakdown's cursor), live refresh. Periods are whole
local days of the time zone."""

from __future__ import annotations

import functools
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

PERIODS = {
    "today": "Today",
    "7d": "Last 7 days",
    "this-month": "This month",
    "last-month": "Last month",
    "12m": "Last 12 months",
    "custom": "Custom range",
}
GRANULARITIES = ("hour", "day", "week", "month")
DEFAULT_PERIOD = "7d"
_DEFAULT_GRANULARITY = {
    "today": "hour",
    "7d": "day",
    "this-month": "day",
    "last-month": "day",
    "12m": "month",
    "custom": "day",
}
# (query name, column heading, path in a usage object)
METRIC_COLUMNS = (
    ("sms.outbound", "SMS out", ("sms", "outbound")),
    ("sms.inbound", "SMS in", ("sms", "inbound")),
    ("sms.total", "SMS total", ("sms", "total")),
    ("mms.outbound", "MMS out", ("mms", "outbound")),
    ("mms.inbound", "MMS in", ("mms", "inbound")),
    ("mms.total", "MMS total", ("mms", "total")),
    ("voice.seconds", "Voice s", ("voice", "seconds")),
    ("voice.kb_seconds", "Voice KB s", ("voice", "kb_seconds")),
    ("voice.total_seconds", "Voice total s", ("voice", "total_seconds")),
)
SORTS = ("id", "name", *(name for name, _, _ in METRIC_COLUMNS))
# Biggest users first: what a usage table is read for.
DEFAULT_SORT = "-sms.total"
PAGE_SIZE = 25


class FilterError(Exception):
    """A filter the page cannot show, said in words."""


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def zone_of(name: str) -> zoneinfo.ZoneInfo:
    if name != "UTC" and name not in _zones():
        raise FilterError(f"Unknown time zone {name!r}: use an IANA name such as Europe/Berlin.")
    return zoneinfo.ZoneInfo(name)


@dataclass(frozen=True)
class Filters:
    period: str
    first_day: date  # local, inclusive
    last_day: date  # local, inclusive
    granularity: str
    tz: str
    sort: str
    # Where the table's page starts: the breakdown's `next_cursor` of the page before, None
    # for the first page; `page` only numbers it for the reader.
    cursor: str | None
    page: int
    live: bool

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.tz)

    def params(self, **changes: Any) -> dict[str, str]:
        """The URL's query for these filters, with `changes` applied."""
        filters = replace(self, **changes)
        query = {"period": filters.period}
        if filters.period == "custom":
            query["start"] = filters.first_day.isoformat()
            query["end"] = filters.last_day.isoformat()
        query["granularity"] = filters.granularity
        query["tz"] = filters.tz
        query["sort"] = filters.sort
        if filters.cursor is not None:
            query["cursor"] = filters.cursor
            query["page"] = str(filters.page)
        if filters.live:
            query["live"] = "1"
        return query

    def query(self, **changes: Any) -> str:
        return urlencode(self.params(**changes))


def _month_start(day: date, months_back: int = 0) -> date:
    index = day.year * 12 + day.month - 1 - months_back
    return date(index // 12, index % 12 + 1, 1)


def _next_month(day: date) -> date:
    return _month_start(_month_start(day, -1))


def period_days(period: str, today: date) -> tuple[date, date]:
    """First and last local day of a preset period containing `today`."""
    if period == "today":
        return today, today
    if period == "7d":
        return today - timedelta(days=6), today
    if period == "this-month":
        return _month_start(today), _next_month(today) - timedelta(days=1)
    if period == "last-month":
        first = _month_start(today, 1)
        return first, _month_start(today) - timedelta(days=1)
    if period == "12m":
        return _month_start(today, 11), _next_month(today) - timedelta(days=1)
    raise FilterError(f"Unknown period {period!r}.")


def _day(value: str | None, what: str) -> date:
    try:
        return date.fromisoformat(value or "")
    except ValueError:
        raise FilterError(f"The {what} date must be a date such as 2026-02-10.") from None


def parse_filters(params: Mapping[str, str], tz: str, now: datetime) -> Filters:
    """The filters of a view's URL; `tz` is already known to be present."""
    zone_of(tz)
    today = now.astimezone(zoneinfo.ZoneInfo(tz)).date()
    period = params.get("period") or DEFAULT_PERIOD
    if period not in PERIODS:
        raise FilterError(f"Unknown period {period!r}.")
    if period == "custom":
        first, last = _day(params.get("start"), "start"), _day(params.get("end"), "end")
        if first > last:
            raise FilterError("The start date must not be after the end date.")
        if last >= date.max:
            raise FilterError("The end date must be before 9999-12-31.")
    else:
        first, last = period_days(period, today)
    granularity = params.get("granularity") or _DEFAULT_GRANULARITY[period]
    if granularity not in GRANULARITIES:
        raise FilterError("Granularity must be one of hour, day, week, month.")
    sort = params.get("sort") or DEFAULT_SORT
    if sort.removeprefix("-") not in SORTS:
        raise FilterError(f"Unknown sort {sort!r}.")
    cursor = params.get("cursor") or None
    page_text = params.get("page") or "1"
    if not page_text.isdigit() or not 1 <= int(page_text) <= 1_000_000:
        raise FilterError("The page must be a whole number from 1.")
    return Filters(
        period=period,
        first_day=first,
        last_day=last,
        granularity=granularity,
        tz=tz,
        sort=sort,
        cursor=cursor,
        page=int(page_text) if cursor is not None else 1,
        live=params.get("live") == "1",
    )
