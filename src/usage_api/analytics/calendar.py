"""Local calendar units: the one definition that both cuts a range and labels its buckets.

A unit (hour, day, week, month) of an IANA zone is a run of instants; its start is a
**boundary**, an instant in UTC. Ranges, buckets and labels all come from `floor` and
`following` below, so a day that cuts a range is exactly the day a bucket shows.

- Days, ISO weeks (Monday) and months start at local midnight, read by the `compatible`
  rule (RFC 9557): a midnight inside a gap is read with the offset before the change, so
  the day starts at its first instant; a midnight that occurs twice is the earlier one.
  A local date that has no instant at all (a zone skipping a whole day) has no bucket.
- Hours are local wall-clock hours *at one offset*: every instant where the wall clock
  reads HH:00:00, and every change of offset. So a repeated hour is two buckets with their
  two offsets, and where an offset changes by 30 minutes (Lord Howe) the hour around the
  change is cut into its two parts. Days start on such hour boundaries too.

Every date a request gives without an offset is a wall time in the request's zone,
resolved by the same `compatible` rule; the end of a range is the end of the unit its
finest field names (a local day ends at the next local midnight, 23 or 25 hours later).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from usage_api.dates import MAX_INSTANT, MIN_INSTANT, DateRange, Instant, parse_instant
from usage_api.errors import ApiError, bad_request

Granularity = Literal["hour", "day", "week", "month"]
GRANULARITIES: tuple[Granularity, ...] = get_args(Granularity)
MAX_BUCKETS = 1000

TIMEZONE_ERROR = "timezone must be an IANA time zone name, e.g. Europe/Berlin"
GRANULARITY_ERROR = "granularity must be one of hour, day, week, month"
TOO_MANY_BUCKETS = (
    f"too many buckets: at most {MAX_BUCKETS} (use a coarser granularity or a shorter range)"
)

_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)
_SECOND = timedelta(seconds=1)
_MICROSECOND = timedelta(microseconds=1)
# What an IANA name looks like; anything else never reaches the file system.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+\-]+(?:/[A-Za-z0-9_+\-]+)*", re.ASCII)
_OFFSET = re.compile(r"T.*(?:Z|[+-]\d{2}:\d{2})\Z", re.ASCII)


def parse_timezone(value: str) -> ZoneInfo:
    """The zone an IANA name names, else the contract's 400."""
    if len(value) > 255 or not _ZONE_NAME.fullmatch(value) or ".." in value:
        raise bad_request(TIMEZONE_ERROR)
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise bad_request(TIMEZONE_ERROR) from None


def parse_granularity(value: str) -> Granularity:
    for granularity in GRANULARITIES:
        if value == granularity:
            return granularity
    raise bad_request(GRANULARITY_ERROR)


def too_many_buckets() -> ApiError:
    return bad_request(TOO_MANY_BUCKETS)


def resolve(wall: datetime, zone: ZoneInfo) -> datetime:
    """The instant of a naive wall time in `zone` by the `compatible` rule (`fold=0`:
    a gap is read with the offset before it, a repeated time is the earlier one)."""
    try:
        return wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    except OverflowError:  # beyond what a datetime holds: nothing lies out there
        return MIN_INSTANT if wall.year == 1 else MAX_INSTANT


def _local(at: datetime, zone: ZoneInfo) -> datetime:
    return at.astimezone(zone)


def _offset(at: datetime, zone: ZoneInfo) -> timedelta:
    offset = _local(at, zone).utcoffset()
    assert offset is not None
    return offset


def _first_change(zone: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The first instant in `(before, after]` whose offset differs from `before`'s, when
    `after`'s does: a bisection to the microsecond (offsets change at most once an hour)."""
    offset = _offset(before, zone)
    while after - before > _MICROSECOND:
        middle = before + (after - before) // 2
        if _offset(middle, zone) == offset:
            before = middle
        else:
            after = middle
    return after


def _wall_floor(wall: datetime, unit: Granularity) -> datetime:
    if unit == "hour":
        return wall.replace(minute=0, second=0, microsecond=0)
    day = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "week":
        return day - timedelta(days=day.weekday())
    if unit == "month":
        return day.replace(day=1)
    return day


def _wall_step(wall: datetime, unit: Granularity, steps: int) -> datetime:
    if unit == "month":
        months = wall.year * 12 + wall.month - 1 + steps
        return wall.replace(year=months // 12, month=months % 12 + 1)
    size = {"hour": _HOUR, "day": _DAY, "week": 7 * _DAY}[unit]
    return wall + steps * size


def _following_hour(zone: ZoneInfo, at: datetime, local: datetime) -> tuple[datetime, datetime]:
    """The next local hour after `at` (`local` in the zone), or the next change of offset
    if one comes first; and that instant in the zone. The offset is compared at the next
    hour itself, which is the next step's `local` too: a change exactly there is found
    by `_first_change` as that very instant."""
    if local.minute or local.second or local.microsecond:
        next_hour = at - (local - _wall_floor(local, "hour")) + _HOUR
    else:  # on the hour, as every boundary but a range's start or a change of offset
        next_hour = at + _HOUR
    next_local = _local(next_hour, zone)
    if next_local.utcoffset() != local.utcoffset():
        change = _first_change(zone, at, next_hour)
        return change, _local(change, zone) if change != next_hour else next_local
    return next_hour, next_local


@dataclass(frozen=True)
class Calendar:
    """The units of one granularity in one zone."""

    zone: ZoneInfo
    unit: Granularity

    def floor(self, at: datetime) -> datetime:
        """The start of the unit that holds `at`: the last boundary at or before it."""
        if self.unit == "hour":
            local = _local(at, self.zone)
            on_the_hour = at - (local - _wall_floor(local, "hour"))
            if _offset(on_the_hour, self.zone) == local.utcoffset():
                return on_the_hour
            return _first_change(self.zone, on_the_hour, at)
        wall = _wall_floor(_local(at, self.zone).replace(tzinfo=None), self.unit)
        # A midnight read by `compatible` may lie after instants of its own wall date
        # (a repeated hour across midnight): step back, then forward, to the last one.
        while resolve(wall, self.zone) > at:
            wall = _wall_step(wall, self.unit, -1)
        while resolve(_wall_step(wall, self.unit, 1), self.zone) <= at:
            wall = _wall_step(wall, self.unit, 1)
        return resolve(wall, self.zone)

    def following(self, at: datetime) -> datetime:
        """The first boundary after `at` (MAX_INSTANT past the end of time)."""
        try:
            return self._following(at)
        except OverflowError:
            return MAX_INSTANT

    def _following(self, at: datetime) -> datetime:
        if self.unit == "hour":
            return _following_hour(self.zone, at, _local(at, self.zone))[0]
        wall = _wall_floor(_local(at, self.zone).replace(tzinfo=None), self.unit)
        wall = _wall_step(wall, self.unit, -1)
        while (boundary := resolve(wall, self.zone)) <= at:
            wall = _wall_step(wall, self.unit, 1)
        return boundary

    def buckets(self, start: datetime, end: datetime) -> list[tuple[datetime, datetime]]:
        """`[start, end)` cut at every boundary: contiguous, in order, the first and the
        last clipped to the range; the contract's 400 beyond MAX_BUCKETS."""
        cut: list[tuple[datetime, datetime]] = []
        for bucket in self._cut(start, end):
            if len(cut) == MAX_BUCKETS:
                raise too_many_buckets()
            cut.append(bucket)
        return cut

    def _cut(self, start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime]]:
        at = start
        for boundary in self._boundaries(start):
            if boundary >= end:
                break
            yield at, boundary
            at = boundary
        yield at, end

    def _boundaries(self, start: datetime) -> Iterator[datetime]:
        """`following(start)`, then `following` of that, and so on, to MAX_INSTANT."""
        zone = self.zone
        if self.unit == "hour":
            at, local = start, _local(start, zone)
            try:
                while at < MAX_INSTANT:
                    at, local = _following_hour(zone, at, local)
                    yield at
            except OverflowError:
                yield MAX_INSTANT
            return
        # Local midnights a day, a week or a month apart are never resolved out of order
        # (no offset changes by more than a day), so the boundaries after `start` are
        # those midnights resolved one after the other, equal ones once: one `resolve`
        # a bucket, where `following` would search from the unit's floor again. And
        # `resolve` as arithmetic: the wall time is carried in a UTC datetime and the
        # zone's offset for it (`fold=0`, as `resolve` reads it) is taken away, which
        # spares building a datetime in the zone for each bucket.
        unit = self.unit
        step = {"day": _DAY, "week": 7 * _DAY}.get(unit)
        try:
            # fold=0 as `resolve` reads it: a start in a repeated hour has fold=1, which
            # `utcoffset` below would carry to every later wall time of the range.
            wall = _wall_floor(_local(start, zone).replace(tzinfo=None, fold=0), unit)
            wall = _wall_step(wall, unit, -1).replace(tzinfo=UTC)
            last = start
            while last < MAX_INSTANT:
                offset = zone.utcoffset(wall)
                assert offset is not None
                try:
                    boundary = wall - offset
                except OverflowError:  # an edge of time, which `resolve` clamps
                    boundary = resolve(wall.replace(tzinfo=None), zone)
                if boundary > last:
                    yield boundary
                    last = boundary
                wall = wall + step if step is not None else _wall_step(wall, unit, 1)
        except (OverflowError, ValueError):  # past the last date a datetime holds
            yield MAX_INSTANT

    def label(self, at: datetime) -> str:
        """ISO 8601 with the zone's own offset at that instant."""
        return _local(at, self.zone).isoformat()

    def labels(self, instants: Iterable[datetime]) -> list[str]:
        """`label` of each instant."""
        zone = self.zone
        return [at.astimezone(zone).isoformat() for at in instants]


@dataclass(frozen=True)
class Bound:
    """A date or date-time of a request, resolved in its zone."""

    at: datetime
    # The end of the unit its finest field names (a day: the next local midnight).
    unit_end: datetime
    has_fraction: bool


def read_bound(value: str, zone: ZoneInfo) -> Bound | None:
    """A `start_date`/`end_date` in `zone`: without an offset it is a wall time there;
    with `Z` or an offset it is that instant. None when it is none of the contract's forms."""
    instant = parse_instant(value)
    if instant is None:
        return None
    if _OFFSET.search(value):
        return _exact(instant)
    # `parse_instant` read the wall time as UTC: read it again in the zone.
    wall = instant.at.replace(tzinfo=None)
    at = resolve(wall, zone)
    if instant.unit == _DAY:
        return Bound(at, Calendar(zone, "day").following(at), False)
    return _exact(Instant(at, instant.unit))


def _exact(instant: Instant) -> Bound:
    unit = instant.unit or _MICROSECOND
    unit_end = instant.at + unit if instant.at < MAX_INSTANT - unit else MAX_INSTANT
    return Bound(instant.at, unit_end, instant.has_fraction)


def _echo(at: datetime, with_fraction: bool) -> str:
    timespec = "microseconds" if with_fraction else "seconds"
    return at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def local_range(start: Bound | None, end: Bound | None) -> DateRange | None:
    """`start <= occurred_at < end`'s unit end, echoed in UTC as `dates.make_range` does;
    None when it is empty."""
    lower = min(start.at, MAX_INSTANT) if start else MIN_INSTANT
    upper = end.unit_end if end else MAX_INSTANT
    if start is not None and end is not None and start.at >= upper:
        return None
    end_echo = None
    if end is not None:
        last = end.at if end.has_fraction else end.unit_end - _SECOND
        end_echo = _echo(last, end.has_fraction)
    return DateRange(
        start=lower,
        end_exclusive=upper,
        start_echo=_echo(start.at, start.has_fraction) if start else None,
        end_echo=end_echo,
    )
