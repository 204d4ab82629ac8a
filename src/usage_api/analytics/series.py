"""How a series is summed exactly from the roll-ups, whatever the zone (docs/series.md).

Roll-ups are aligned to UTC: days, hours and quarter-hours. A series' buckets are not: a
day in New York starts at 05:00 UTC, one in Kolkata at 18:30, and a range may start at
any microsecond. `plan` cuts the sum of each bucket into rows it can read:

- every row of the coarsest level (days, or hours for an hourly series) in the range is
  counted whole in the bucket that holds its **midpoint**;
- where a bucket boundary falls strictly inside a row, the finer rows of that row that
  lie in another bucket are moved there: added to their own bucket and subtracted from
  the one their parent was counted in (`Span`s with a sign);
- inside a quarter-hour that a boundary cuts (only a range's own edges can: every offset
  in use is a whole number of quarter-hours), the raw events are summed exactly.

So each bucket boundary costs at most half a row of each level (< 12 hours, < 2
quarters) plus, at the range's two edges, one quarter-hour of raw events: the cost
depends on the number of buckets, not on how much happened or how long ago.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Literal

Level = Literal["day", "hour", "quarter"]
LEVELS: tuple[Level, ...] = ("day", "hour", "quarter")
SIZE: dict[Level, timedelta] = {
    "day": timedelta(days=1),
    "hour": timedelta(hours=1),
    "quarter": timedelta(minutes=15),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


_SIZE_US = {level: SIZE[level] // timedelta(microseconds=1) for level in LEVELS}


@dataclass(frozen=True)
class Span:
    """The rows of `level` in `[start, end)`: added to bucket `to` and subtracted from
    bucket `away` (1-based; 0 for neither)."""

    level: Level
    start: datetime
    end: datetime
    to: int
    away: int


@dataclass(frozen=True)
class RawSpan:
    """The raw events of `[start, end)` (a cut quarter-hour), each into its own bucket."""

    start: datetime
    end: datetime


@dataclass
class Plan:
    """What to read for buckets `bounds[i-1] <= t < bounds[i]`, i = 1..n."""

    bounds: list[datetime]
    top: Level
    # Rows of `top` in `[top_start, top_end)`, each in the bucket of its midpoint.
    top_start: datetime
    top_end: datetime
    spans: list[Span] = field(default_factory=list)
    raw: list[RawSpan] = field(default_factory=list)

    def rows(self) -> dict[Level | Literal["raw"], int]:
        """Upper bounds of the rows each level reads (for measuring)."""
        counts: dict[Level | Literal["raw"], int] = {"raw": len(self.raw)}
        counts[self.top] = (self.top_end - self.top_start) // SIZE[self.top]
        for span in self.spans:
            counts[span.level] = (
                counts.get(span.level, 0) + (span.end - span.start) // SIZE[span.level]
            )
        return counts


def top_level(bounds: Sequence[datetime], hourly: bool) -> Level:
    """Days for buckets of a day or more; for hours, hourly rows unless the zone's hours
    are not UTC hours (+05:30, +05:45), where quarter-hours are read whole instead."""
    if not hourly:
        return "day"
    inner = bounds[1:-1]
    aligned = all(b.minute == b.second == b.microsecond == 0 for b in inner)
    return "hour" if aligned else "quarter"


def plan(bounds: Sequence[datetime], top: Level) -> Plan:
    """The reads that sum every bucket between consecutive `bounds` exactly."""
    us = [_us(b) for b in bounds]
    n = len(us) - 1

    def bucket(at: int) -> int:
        # As PostgreSQL's width_bucket: 0 before the first bound, n + 1 from the last.
        return bisect_right(us, at)

    spans: list[Span] = []
    raw: list[RawSpan] = []

    def emit(level: Level, start: int, end: int, to: int, away: int) -> None:
        to, away = (to if 1 <= to <= n else 0), (away if 1 <= away <= n else 0)
        if start < end and to != away:
            spans.append(Span(level, _at(start), _at(end), to, away))

    def refine(level: Level, start: int, end: int, counted_in: int) -> None:
        """Row `[start, end)` of `level` was counted whole in `counted_in`; a bound lies
        strictly inside it. Move its parts that belong elsewhere."""
        depth = LEVELS.index(level)
        inside = us[bisect_right(us, start) : bisect_left(us, end)]
        if depth == len(LEVELS) - 1:
            raw.append(RawSpan(_at(start), _at(end)))
            emit(level, start, end, 0, counted_in)
            return
        child: Level = LEVELS[depth + 1]
        size = _SIZE_US[child]
        half = size // 2
        cut = sorted({start + (at - start) // size * size for at in inside if (at - start) % size})

        def owner(first: int) -> int:
            # A cut child goes where its midpoint is; on a tie, where its parent went,
            # which spares moving it.
            mid = first + half
            if mid in inside and bucket(mid - 1) == counted_in:
                return counted_in
            return bucket(mid)

        points = sorted({start, end, *inside, *cut, *(first + size for first in cut)})
        points = [p for p in points if (p - start) % size == 0]
        runs: list[tuple[int, int, int]] = []
        for run_start, run_end in pairwise(points):
            to = owner(run_start) if run_start in cut else bucket(run_start + half)
            if runs and runs[-1][2] == to and runs[-1][1] == run_start:
                runs[-1] = (runs[-1][0], run_end, to)
            else:
                runs.append((run_start, run_end, to))
        for run_start, run_end, to in runs:
            emit(child, run_start, run_end, to, counted_in)
        for first in cut:
            refine(child, first, first + size, owner(first))

    size = _SIZE_US[top]
    top_start = us[0] // size * size
    top_end = -(-us[-1] // size) * size
    rows_cut = sorted({at // size * size for at in us if at % size})
    for first in rows_cut:
        if top == LEVELS[-1]:  # the finest level: its cut rows are read raw
            raw.append(RawSpan(_at(first), _at(first + size)))
            emit(top, first, first + size, 0, bucket(first + size // 2))
        else:
            refine(top, first, first + size, bucket(first + size // 2))
    return Plan(list(bounds), top, _at(top_start), _at(top_end), spans, raw)
