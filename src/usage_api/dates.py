"""The contract's date and date-time forms, and the ranges they denote."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_INSTANT = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})"
    r"(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?"
    r"(?P<offset>Z|[+-]\d{2}:\d{2})?)?",
    re.ASCII,
)
# The form nearly every event arrives in, which the C parser `fromisoformat` reads at a
# fraction of the general path's cost; the pattern admits only what that path accepts.
_COMMON = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?P<fraction>\.\d{1,6})?"
    r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?",
    re.ASCII,
)
_SECOND = timedelta(seconds=1)


def utc_now() -> datetime:
    return datetime.now(UTC)


# Earliest and latest instants a query reaches; an open side stands for these. No event
# lies past MAX_INSTANT (ingestion takes none from the future), so clamping a bound to it
# changes no sum, and whole days up to it never overflow a datetime.
MIN_INSTANT = datetime(1, 1, 1, tzinfo=UTC)
MAX_INSTANT = datetime(9999, 12, 31, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Instant:
    """A parsed date or date-time and the unit of its finest field."""

    at: datetime
    unit: timedelta | None  # None when fractional seconds make it an exact instant

    @property
    def has_fraction(self) -> bool:
        return self.unit is None


def parse_instant(value: str, *, require_time: bool = False) -> Instant | None:
    """Parse one of the contract's forms; None when `value` is not one of them."""
    common = _COMMON.fullmatch(value)
    if common is not None:
        try:
            at = datetime.fromisoformat(value)
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        except (ValueError, OverflowError):
            return None
        return Instant(at, None if common["fraction"] else _SECOND)
    match = _INSTANT.fullmatch(value)
    if match is None or (require_time and match["hour"] is None):
        return None
    try:
        year, month, day = (int(part) for part in match["date"].split("-"))
        if match["hour"] is None:
            return Instant(datetime(year, month, day, tzinfo=UTC), timedelta(days=1))
        fraction = match["fraction"]
        # Time is kept in microseconds: finer digits are truncated, for events and bounds alike.
        micro = int(fraction[:6].ljust(6, "0")) if fraction else 0
        local = datetime(
            year,
            month,
            day,
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"] or 0),
            micro,
            tzinfo=UTC,
        )
        offset = match["offset"]
        if offset and offset != "Z":
            sign = 1 if offset[0] == "+" else -1
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            if hours > 23 or minutes > 59:
                return None
            local -= sign * timedelta(hours=hours, minutes=minutes)
    except (ValueError, OverflowError):
        return None
    if fraction:
        unit = None
    elif match["second"] is not None:
        unit = timedelta(seconds=1)
    else:
        unit = timedelta(minutes=1)
    return Instant(local, unit)


@dataclass(frozen=True)
class DateRange:
    """`start <= occurred_at < end_exclusive`, with what to echo back for each side."""

    start: datetime
    end_exclusive: datetime
    start_echo: str | None
    end_echo: str | None


def _echo(at: datetime, with_fraction: bool) -> str:
    # isoformat, not strftime: %Y does not pad years before 1000 on every platform.
    timespec = "microseconds" if with_fraction else "seconds"
    return at.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def make_range(start: Instant | None, end: Instant | None) -> DateRange | None:
    """The range two bounds denote; None when it is empty."""
    lower = min(start.at, MAX_INSTANT) if start else MIN_INSTANT
    upper = MAX_INSTANT
    end_echo = None
    if end is not None:
        # An end with a fraction covers exactly its instant: up to the next microsecond.
        unit = end.unit or _MICROSECOND
        # A difference, unlike `end.at + unit`, cannot overflow near the end of year 9999.
        if start is not None and start.at - end.at >= unit:
            return None
        if end.at < MAX_INSTANT - unit:
            upper = end.at + unit
        # A bound without a fraction lies on its unit, so its last second is representable.
        last = end.at if end.unit is None else end.at + (end.unit - timedelta(seconds=1))
        end_echo = _echo(last, end.unit is None)
    return DateRange(
        start=lower,
        end_exclusive=upper,
        start_echo=_echo(start.at, start.has_fraction) if start else None,
        end_echo=end_echo,
    )
