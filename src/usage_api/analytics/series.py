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
from typing import Any, Literal

from usage_api.analytics.query import UsageQuery
from usage_api.analytics.totals import (
    ENTITY_ROWS,
    KINDS,
    entity_json,
    entity_statement,
    metrics_json,
    period_json,
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


# -- the statement ------------------------------------------------------------------------
# Until quarter-hour roll-ups exist, a quarter-hour is read from the log (which holds every
# event, folded or not). Hour and day values are roll-ups plus their unfolded deltas.
# Placeholders as in `totals`: {events} and {rollups} select the entity's rows.

_TOP = {
    "day": f"""
    SELECT width_bucket((CAST(day AS timestamp) AT TIME ZONE 'UTC') + interval '12 hours',
                        CAST(:bounds AS timestamptz[])) AS bucket, {METRIC_COLUMNS}
    FROM usage_daily WHERE {{rollups}} AND day >= :top_first_day AND day < :top_end_day
    UNION ALL
    SELECT width_bucket(date_trunc('day', hour_at, 'UTC') + interval '12 hours',
                        CAST(:bounds AS timestamptz[])), {METRIC_COLUMNS}
    FROM usage_deltas WHERE {{events}} AND hour_at >= :top_start AND hour_at < :top_end""",
    "hour": f"""
    SELECT width_bucket(hour_at + interval '30 minutes', CAST(:bounds AS timestamptz[]))
        AS bucket, {METRIC_COLUMNS}
    FROM usage_hourly WHERE {{rollups}} AND hour_at >= :top_start AND hour_at < :top_end
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
_SPANS = f"""
    SELECT t.bucket, {_SIGNED}
    FROM unnest(CAST(:{{level}}_start AS timestamptz[]), CAST(:{{level}}_end AS timestamptz[]),
                CAST(:{{level}}_to AS int[]), CAST(:{{level}}_away AS int[]))
        AS s(lo, hi, to_bucket, away_bucket)
    CROSS JOIN LATERAL ({{rows}}) r
    CROSS JOIN LATERAL (VALUES (s.to_bucket, 1), (s.away_bucket, -1)) t(bucket, sign)
    WHERE t.bucket > 0"""
_HOUR_ROWS = f"""
    SELECT {METRIC_SUMS} FROM (
        SELECT {METRIC_COLUMNS} FROM usage_hourly
        WHERE {{rollups}} AND hour_at >= s.lo AND hour_at < s.hi
        UNION ALL
        SELECT {METRIC_COLUMNS} FROM usage_deltas
        WHERE {{events}} AND hour_at >= s.lo AND hour_at < s.hi) x"""
_QUARTER_ROWS = f"""
    SELECT {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= s.lo AND occurred_at < s.hi"""
_RAW = f"""
    SELECT r.* FROM unnest(CAST(:raw_start AS timestamptz[]), CAST(:raw_end AS timestamptz[]))
        AS s(lo, hi)
    CROSS JOIN LATERAL (
        SELECT width_bucket(occurred_at, CAST(:bounds AS timestamptz[])) AS bucket, {EVENT_SUMS}
        FROM usage_events WHERE {{events}} AND occurred_at >= s.lo AND occurred_at < s.hi
        GROUP BY 1) r"""

_BUCKETS = ", ".join(f"array_agg({m} ORDER BY bucket) AS {m}" for m in METRICS)
_SERIES = f"""
    SELECT array_agg(bucket ORDER BY bucket) AS buckets, {_BUCKETS} FROM (
        SELECT bucket, {METRIC_SUMS} FROM ({{parts}}) parts
        WHERE bucket BETWEEN 1 AND :buckets GROUP BY bucket) b"""


def _statement(kind: str, top: Level) -> Statement:
    parts = [_TOP[top]]
    if top != "quarter":
        parts += [
            _SPANS.format(level="hour", rows=_HOUR_ROWS),
            _SPANS.format(level="quarter", rows=_QUARTER_ROWS),
            _RAW,
        ]
    events, rollups = ENTITY_ROWS[kind]
    union = "\n    UNION ALL".join(
        f"({part.format(events=events, rollups=rollups)})" for part in parts
    )
    return compile_named(entity_statement(kind, _SERIES).replace("{parts}", union))


_STATEMENTS = {(kind, top): _statement(kind, top) for kind in KINDS for top in LEVELS}


def _params(p: Plan) -> dict[str, Any]:
    params: dict[str, Any] = {
        "bounds": p.bounds,
        "buckets": len(p.bounds) - 1,
        "top_start": p.top_start,
        "top_end": p.top_end,
        "top_first_day": p.top_start.date(),
        "top_end_day": p.top_end.date(),
        "raw_start": [r.start for r in p.raw],
        "raw_end": [r.end for r in p.raw],
    }
    for level in ("hour", "quarter"):
        spans = [s for s in p.spans if s.level == level]
        params[f"{level}_start"] = [s.start for s in spans]
        params[f"{level}_end"] = [s.end for s in spans]
        params[f"{level}_to"] = [s.to for s in spans]
        params[f"{level}_away"] = [s.away for s in spans]
    return params


async def read_series(
    reads: Reads, key_hash: bytes, query: UsageQuery
) -> tuple[str, dict[str, Any] | None]:
    """As `totals.read_usage`, with `granularity` and `buckets`; the totals are the sums
    of the buckets, read in the same statement, so they always add up."""
    assert query.granularity is not None
    kind = query.kind
    bounds = list(query.bounds)
    top = top_level(bounds, query.granularity == "hour")
    # Quarter-hours come from the log for now: as the top level they cover the range whole.
    p = plan(bounds, top) if top != "quarter" else Plan(bounds, top, bounds[0], bounds[-1])
    params = {
        "key_hash": key_hash,
        "organization_id": query.organization_id,
        "user_id": query.user_id,
        "partner_id": query.partner_id,
        **_params(p),
    }
    statement = _STATEMENTS[kind, top]
    row = await reads.fetch_row(statement.sql, *statement.args(params))
    if row is None:
        raise invalid_key()
    if row["id"] is None:
        return row["key_id"], None

    sums = {b: [0] * len(METRICS) for b in range(1, len(bounds))}
    for i, b in enumerate(row["buckets"] or ()):
        sums[b] = [int(row[m][i]) for m in METRICS]
    totals = [sum(values) for values in zip(*sums.values(), strict=True)]
    calendar = query.calendar
    usage = entity_json(kind, row)
    usage.update(metrics_json(dict(zip(METRICS, totals, strict=True))))
    usage.update(period_json(query))
    usage["granularity"] = query.granularity
    usage["buckets"] = [
        {
            "start": calendar.label(bounds[b - 1]),
            "end": calendar.label(bounds[b]),
            **metrics_json(dict(zip(METRICS, values, strict=True))),
        }
        for b, values in sums.items()
    ]
    return row["key_id"], usage


if __name__ == "__main__":
    for (kind, top), statement in _STATEMENTS.items():
        print(f"-- {kind}, top level {top}; $n: {', '.join(statement.names)}")
        print(statement.sql.strip(), end=";\n\n")
