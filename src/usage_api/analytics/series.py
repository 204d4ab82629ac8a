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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from typing import Any, Literal, NamedTuple

from usage_api.analytics.query import UsageQuery
from usage_api.analytics.totals import (
    KINDS,
    ROLLUP_ROWS,
    entity_json,
    entity_statement,
    period_json,
    sums_json,
)
from usage_api.auth import invalid_key
from usage_api.models import METRICS
from usage_api.replicas import Reads
from usage_api.sql import (
    EVENT_SUMS,
    METRIC_COLUMNS,
    METRIC_SUMS,
    Statement,
    compile_named,
)

Level = Literal["day", "hour", "quarter"]
LEVELS: tuple[Level, ...] = ("day", "hour", "quarter")
SIZE: dict[Level, timedelta] = {
    "day": timedelta(days=1),
    "hour": timedelta(hours=1),
    "quarter": timedelta(minutes=15),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_MICROSECOND = timedelta(microseconds=1)


def _us(at: datetime) -> int:
    return (at - _EPOCH) // _MICROSECOND


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


_SIZE_US = {level: SIZE[level] // _MICROSECOND for level in LEVELS}


class Span(NamedTuple):
    """The rows of `level` in `[start, end)`: added to bucket `to` and subtracted from
    bucket `away` (1-based; 0 for neither)."""

    level: Level
    start: datetime
    end: datetime
    to: int
    away: int


class RawSpan(NamedTuple):
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


# What `_refine` moves inside one row: (level, first, end, to, away), the instants in
# microseconds from the row's start, the buckets counted from the one holding that start
# (`to` None for raw events, which go to their own buckets); and the raw spans.
_Piece = tuple[Level, int, int, int | None, int]
_Refined = tuple[list[_Piece], list[tuple[int, int]]]


def _refine(
    level: Level, inside: tuple[int, ...], counted_in: int, memo: dict[Any, _Refined]
) -> _Refined:
    """Row `[0, SIZE[level])` with bounds `inside` strictly within it was counted whole
    in bucket `counted_in`: move its parts that belong elsewhere. Relative to the row, so
    every row cut the same way (each day of a zone, mostly) is worked out once."""
    key = (level, inside, counted_in)
    if (known := memo.get(key)) is not None:
        return known
    length = _SIZE_US[level]
    pieces: list[_Piece] = []
    raw: list[tuple[int, int]] = []

    def bucket(at: int) -> int:
        return bisect_right(inside, at)

    depth = LEVELS.index(level)
    if depth == len(LEVELS) - 1:
        raw.append((0, length))
        pieces.append((level, 0, length, None, counted_in))
        memo[key] = pieces, raw
        return pieces, raw
    child: Level = LEVELS[depth + 1]
    size = _SIZE_US[child]
    half = size // 2
    cut = sorted({at // size * size for at in inside if at % size})

    def owner(first: int) -> int:
        # A cut child goes where its midpoint is; on a tie, where its parent went,
        # which spares moving it.
        mid = first + half
        if mid in inside and bucket(mid - 1) == counted_in:
            return counted_in
        return bucket(mid)

    points = sorted({0, length, *inside, *cut, *(first + size for first in cut)})
    points = [p for p in points if p % size == 0]
    runs: list[tuple[int, int, int]] = []
    for run_start, run_end in pairwise(points):
        to = owner(run_start) if run_start in cut else bucket(run_start + half)
        if runs and runs[-1][2] == to and runs[-1][1] == run_start:
            runs[-1] = (runs[-1][0], run_end, to)
        else:
            runs.append((run_start, run_end, to))
    pieces += [(child, lo, hi, to, counted_in) for lo, hi, to in runs if to != counted_in]
    for first in cut:
        shift = bucket(first)
        within = tuple(at - first for at in inside if first < at < first + size)
        sub_pieces, sub_raw = _refine(child, within, owner(first) - shift, memo)
        pieces += [
            (lvl, lo + first, hi + first, None if to is None else to + shift, away + shift)
            for lvl, lo, hi, to, away in sub_pieces
        ]
        raw += [(lo + first, hi + first) for lo, hi in sub_raw]
    memo[key] = pieces, raw
    return pieces, raw


class _Moves(NamedTuple):
    """A plan in microseconds since the epoch, as the statement takes it: the rows of `top`
    in `[top_start, top_end)`, each level's spans as four columns (start, end, to,
    away), and the raw spans as two (start, end)."""

    top_start: int
    top_end: int
    spans: dict[Level, tuple[list[int], list[int], list[int], list[int]]]
    raw: tuple[list[int], list[int]]


def _moves(us: Sequence[int], top: Level) -> _Moves:
    """`plan` in integers: a bucket boundary costs a few additions, no datetime."""
    n = len(us) - 1
    spans: dict[Level, tuple[list[int], list[int], list[int], list[int]]] = {}
    raw: tuple[list[int], list[int]] = ([], [])
    memo: dict[Any, _Refined] = {}
    size = _SIZE_US[top]
    for first in sorted({at // size * size for at in us if at % size}):
        # Buckets as PostgreSQL's width_bucket: 0 before the first bound, n + 1 from the last.
        base = bisect_right(us, first)
        inside = tuple(at - first for at in us[base : bisect_left(us, first + size)])
        counted_in = bisect_right(inside, size // 2)
        known = memo.get((top, inside, counted_in))
        pieces, cut_raw = known or _refine(top, inside, counted_in, memo)
        for level, lo, hi, to, away in pieces:
            moved_to = base + to if to is not None and 1 <= base + to <= n else 0
            moved_from = base + away if 1 <= base + away <= n else 0
            if moved_to != moved_from:
                columns = spans.get(level) or spans.setdefault(level, ([], [], [], []))
                columns[0].append(first + lo)
                columns[1].append(first + hi)
                columns[2].append(moved_to)
                columns[3].append(moved_from)
        for lo, hi in cut_raw:
            raw[0].append(first + lo)
            raw[1].append(first + hi)
    return _Moves(us[0] // size * size, -(-us[-1] // size) * size, spans, raw)


def plan(bounds: Sequence[datetime], top: Level) -> Plan:
    """The reads that sum every bucket between consecutive `bounds` exactly."""
    moves = _moves([_us(b) for b in bounds], top)
    spans = [
        Span(level, _at(lo), _at(hi), to, away)
        for level, columns in moves.spans.items()
        for lo, hi, to, away in zip(*columns, strict=True)
    ]
    raw = [RawSpan(_at(lo), _at(hi)) for lo, hi in zip(*moves.raw, strict=True)]
    return Plan(list(bounds), top, _at(moves.top_start), _at(moves.top_end), spans, raw)


# -- the statement ------------------------------------------------------------------------
# Until quarter-hour roll-ups exist, a quarter-hour is read from the log (which holds every
# event, folded or not). Hour and day values are roll-ups plus their unfolded deltas.
# Placeholders as in `totals.ROLLUP_ROWS`: a partner's hours and days are its own rows.

_TOP = {
    "day": f"""
    SELECT width_bucket((CAST(day AS timestamp) AT TIME ZONE 'UTC') + interval '12 hours',
                        CAST(:bounds AS timestamptz[])) AS bucket, {METRIC_COLUMNS}
    FROM {{daily}} WHERE {{rollups}} AND day >= :top_first_day AND day < :top_end_day
    UNION ALL
    SELECT width_bucket(date_trunc('day', hour_at, 'UTC') + interval '12 hours',
                        CAST(:bounds AS timestamptz[])), {METRIC_COLUMNS}
    FROM usage_deltas WHERE {{events}} AND hour_at >= :top_start AND hour_at < :top_end""",
    "hour": f"""
    SELECT width_bucket(hour_at + interval '30 minutes', CAST(:bounds AS timestamptz[]))
        AS bucket, {METRIC_COLUMNS}
    FROM {{hourly}} WHERE {{rollups}} AND hour_at >= :top_start AND hour_at < :top_end
    UNION ALL
    SELECT width_bucket(hour_at + interval '30 minutes', CAST(:bounds AS timestamptz[])),
        {METRIC_COLUMNS}
    FROM usage_deltas WHERE {{events}} AND hour_at >= :top_start AND hour_at < :top_end""",
    # Quarter-hours as the top level: the whole range from the log.
    "quarter": f"""
    SELECT width_bucket(occurred_at, CAST(:bounds AS timestamptz[])) AS bucket, {EVENT_SUMS}
    FROM usage_events WHERE {{events}} AND occurred_at >= :top_start AND occurred_at < :top_end
    GROUP BY 1""",
}

_SIGNED = ", ".join(f"t.sign * r.{m}" for m in METRICS)


def _instant(us: str) -> str:
    """Microseconds since the epoch as a timestamptz, exactly (a float8 factor holds the
    whole seconds of any instant and the microseconds apart)."""
    return (
        f"(timestamptz 'epoch' + ({us} / 1000000) * interval '1 second'"
        f" + ({us} % 1000000) * interval '1 microsecond')"
    )


# Spans come as microseconds: asyncpg encodes a bigint in a fraction of a datetime's time.
_SPANS = f"""
    SELECT t.bucket, {_SIGNED}
    FROM (SELECT {_instant("lo")} AS lo, {_instant("hi")} AS hi, to_bucket, away_bucket
          FROM unnest(CAST(:{{level}}_start AS bigint[]), CAST(:{{level}}_end AS bigint[]),
                      CAST(:{{level}}_to AS int[]), CAST(:{{level}}_away AS int[]))
              AS u(lo, hi, to_bucket, away_bucket)) s
    CROSS JOIN LATERAL ({{rows}}) r
    CROSS JOIN LATERAL (VALUES (s.to_bucket, 1), (s.away_bucket, -1)) t(bucket, sign)
    WHERE t.bucket > 0"""
_HOUR_ROWS = f"""
    SELECT {METRIC_SUMS} FROM (
        SELECT {METRIC_COLUMNS} FROM {{hourly}}
        WHERE {{rollups}} AND hour_at >= s.lo AND hour_at < s.hi
        UNION ALL
        SELECT {METRIC_COLUMNS} FROM usage_deltas
        WHERE {{events}} AND hour_at >= s.lo AND hour_at < s.hi) x"""
_QUARTER_ROWS = f"""
    SELECT {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= s.lo AND occurred_at < s.hi"""
_RAW = f"""
    SELECT r.* FROM (
        SELECT {_instant("lo")} AS lo, {_instant("hi")} AS hi
        FROM unnest(CAST(:raw_start AS bigint[]), CAST(:raw_end AS bigint[])) AS u(lo, hi)) s
    CROSS JOIN LATERAL (
        SELECT width_bucket(occurred_at, CAST(:bounds AS timestamptz[])) AS bucket, {EVENT_SUMS}
        FROM usage_events WHERE {{events}} AND occurred_at >= s.lo AND occurred_at < s.hi
        GROUP BY 1) r"""

_BUCKETS = ", ".join(f"array_agg({m} ORDER BY bucket) AS {m}" for m in METRICS)
_SERIES = f"""
    SELECT array_agg(bucket ORDER BY bucket) AS buckets, {_BUCKETS} FROM (
        SELECT bucket, {METRIC_SUMS} FROM ({{parts}}) parts
        WHERE bucket BETWEEN 1 AND :buckets GROUP BY bucket) b"""


@cache
def _statement(kind: str, top: Level, reads: frozenset[str]) -> Statement:
    """The statement of a plan of `top` that moves rows of the levels in `reads` (of
    "hour", "quarter" and "raw"): a part for each, and none for what a plan has not, which
    PostgreSQL would plan and run for nothing on every request. Compiled once."""
    parts = [_TOP[top]]
    if "hour" in reads:
        parts.append(_SPANS.format(level="hour", rows=_HOUR_ROWS))
    if "quarter" in reads:
        parts.append(_SPANS.format(level="quarter", rows=_QUARTER_ROWS))
    if "raw" in reads:
        parts.append(_RAW)
    union = "\n    UNION ALL".join(f"({part.format(**ROLLUP_ROWS[kind])})" for part in parts)
    return compile_named(entity_statement(kind, _SERIES).replace("{parts}", union))


def _params(bounds: list[datetime], moves: _Moves) -> tuple[frozenset[str], dict[str, Any]]:
    """What the plan reads besides its top level, and the statement's parameters."""
    top_start, top_end = _at(moves.top_start), _at(moves.top_end)
    params: dict[str, Any] = {
        "bounds": bounds,
        "buckets": len(bounds) - 1,
        "top_start": top_start,
        "top_end": top_end,
        "top_first_day": top_start.date(),
        "top_end_day": top_end.date(),
    }
    reads = set()
    if moves.raw[0]:
        reads.add("raw")
        params["raw_start"], params["raw_end"] = moves.raw
    for level, columns in moves.spans.items():
        reads.add(level)
        start, end, to, away = columns
        params |= {f"{level}_start": start, f"{level}_end": end}
        params |= {f"{level}_to": to, f"{level}_away": away}
    return frozenset(reads), params


@dataclass(frozen=True)
class SeriesBuckets:
    """A series' buckets as columns: bucket i runs from `labels[i]` to `labels[i + 1]`
    and holds `columns[m][i]` of each metric m (in `METRICS` order). Columns, not an
    object per bucket: up to 1000 buckets of three nested objects each took more of a
    request's CPU than its statement (bench/NOTES.md, "Series speed")."""

    labels: list[str]
    columns: list[list[int]]

    def __iter__(self) -> Iterator[tuple[str, str, tuple[int, ...]]]:
        """Each bucket: its start, its end and its six sums."""
        labels = self.labels
        return zip(labels[:-1], labels[1:], zip(*self.columns, strict=True), strict=True)


def _columns(row: Any, n: int) -> list[list[int]]:
    """The six columns of `n` buckets from the statement's arrays, which leave out the
    buckets with nothing in them."""
    present = row["buckets"] or []
    if len(present) == n:
        return [row[m] for m in METRICS]
    columns = []
    for m in METRICS:
        column = [0] * n
        for b, value in zip(present, row[m] or [], strict=True):
            column[b - 1] = value
        columns.append(column)
    return columns


async def read_series(
    reads: Reads, key_hash: bytes, query: UsageQuery
) -> tuple[str, dict[str, Any] | None]:
    """As `totals.read_usage`, with `granularity` and `buckets`; the totals are the sums
    of the buckets, read in the same statement, so they always add up."""
    assert query.granularity is not None
    kind = query.kind
    bounds = list(query.bounds)
    top = top_level(bounds, query.granularity == "hour")
    us = [_us(b) for b in bounds]
    # Quarter-hours come from the log for now: as the top level they cover the range whole.
    moves = _moves(us, top) if top != "quarter" else _Moves(us[0], us[-1], {}, ([], []))
    reads_more, params = _params(bounds, moves)
    params |= {
        "key_hash": key_hash,
        "organization_id": query.organization_id,
        "user_id": query.user_id,
        "partner_id": query.partner_id,
    }
    statement = _statement(kind, top, reads_more)
    row = await reads.fetch_row(statement.sql, *statement.args(params))
    if row is None:
        raise invalid_key()
    if row["id"] is None:
        return row["key_id"], None

    n = len(bounds) - 1
    buckets = SeriesBuckets(query.calendar.labels(bounds), _columns(row, n))
    usage = entity_json(kind, row)
    usage.update(sums_json([sum(column) for column in buckets.columns]))
    usage.update(period_json(query))
    usage["granularity"] = query.granularity
    usage["buckets"] = buckets
    return row["key_id"], usage


if __name__ == "__main__":
    # Each kind's fullest statement of each top level; plans that move less drop parts.
    fullest: dict[Level, frozenset[str]] = {
        "day": frozenset({"hour", "quarter", "raw"}),
        "hour": frozenset({"quarter", "raw"}),
        "quarter": frozenset(),
    }
    for kind in KINDS:
        for top, reads_more in fullest.items():
            statement = _statement(kind, top, reads_more)
            print(f"-- {kind}, top level {top}; $n: {', '.join(statement.names)}")
            print(statement.sql.strip(), end=";\n\n")
