"""Cutting a range into the pieces the roll-ups answer exactly.

A range `[start, end)` is whole UTC days (daily roll-ups), whole UTC hours on either side of
them (hourly roll-ups and the deltas not yet folded) and partial hours at its edges (raw
log rows): its cost depends on the range's shape, not on how much usage there is.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from usage_api.dates import DateRange

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


def _floor(at: datetime, unit: timedelta) -> datetime:
    if unit == DAY:
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(minute=0, second=0, microsecond=0)


def _ceil(at: datetime, unit: timedelta) -> datetime:
    floor = _floor(at, unit)
    return floor if floor == at else floor + unit


def range_params(span: DateRange) -> dict[str, Any]:
    """Cut `[start, end)` into raw edges, whole hours and whole days (all UTC)."""
    start, end = span.start, span.end_exclusive
    first_hour, last_hour = _ceil(start, HOUR), _floor(end, HOUR)
    if first_hour >= last_hour:  # no whole hour: all of it is raw rows
        first_hour = last_hour = end
    first_day, last_day = _ceil(first_hour, DAY), _floor(last_hour, DAY)
    if first_day >= last_day:  # no whole day: all whole hours come from hourly roll-ups
        first_day = last_day = last_hour
    return {
        "start": start,
        "end": end,
        "first_hour": first_hour,
        "last_hour": last_hour,
        "first_day_at": first_day,
        "last_day_at": last_day,
        "first_day": first_day.date(),
        "last_day": last_day.date(),
    }
