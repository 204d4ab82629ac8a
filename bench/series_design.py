"""How to sum series and partner ranges: the measurements behind docs/series.md.

`BENCH_DATABASE_URL=... uv run python -m bench.series_design` on a database the benchmark
generated (`python -m bench --events N --scenarios ,`). It adds scratch tables in schema
`series_design` (quarter-hour and monthly roll-ups built from the log, a 500-organization
partner and its partner-level roll-ups), then times, per question, each way of answering
it in SQL (median of repeated runs, one connection, no HTTP) and checks each answer
against the naive GROUP BY over the raw log.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from bench.dataset import event_sums
from usage_api.analytics.calendar import Calendar, Granularity
from usage_api.analytics.series import Plan, plan, top_level
from usage_api.models import METRICS

COLUMNS = ", ".join(METRICS)
SUMS = ", ".join(f"coalesce(sum({m}), 0)::bigint AS {m}" for m in METRICS)
SIGNED = ", ".join(f"sum(t.sign * r.{m})::bigint AS {m}" for m in METRICS)
REPEAT = int(os.environ.get("SERIES_DESIGN_REPEAT", "15"))

SCRATCH = f"""
CREATE SCHEMA IF NOT EXISTS series_design;
-- As the dataset's hourly roll-ups: per user, and per organization (user_id '').
CREATE TABLE IF NOT EXISTS series_design.quarter AS
    SELECT organization_id, CASE WHEN grouping(user_id) = 1 THEN '' ELSE user_id END AS user_id,
           quarter_at, {event_sums()}
    FROM (SELECT *, date_bin('15 minutes', occurred_at, TIMESTAMPTZ '2000-01-01Z') AS quarter_at
          FROM usage_events) e
    GROUP BY organization_id, quarter_at, GROUPING SETS ((user_id), ())
    HAVING grouping(user_id) = 1 OR user_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS series_design.monthly AS
    SELECT organization_id, user_id, date_trunc('month', day)::date AS month,
           {", ".join(f"sum({m})::bigint AS {m}" for m in METRICS)}
    FROM usage_daily GROUP BY 1, 2, 3;
CREATE TABLE IF NOT EXISTS series_design.partner_orgs AS
    SELECT 'P500'::text AS partner_id, id AS organization_id
    FROM bench.organization_index WHERE idx < 500;
CREATE TABLE IF NOT EXISTS series_design.partner_daily AS
    SELECT p.partner_id, d.day, {", ".join(f"sum(d.{m})::bigint AS {m}" for m in METRICS)}
    FROM usage_daily d JOIN series_design.partner_orgs p USING (organization_id)
    WHERE d.user_id = '' GROUP BY 1, 2;
"""
INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS quarter_pk
    ON series_design.quarter (organization_id, user_id, quarter_at);
CREATE UNIQUE INDEX IF NOT EXISTS monthly_pk
    ON series_design.monthly (organization_id, user_id, month);
CREATE UNIQUE INDEX IF NOT EXISTS partner_daily_pk ON series_design.partner_daily (partner_id, day);
"""


def _planned_sql(p: Plan, quarters_from_log: bool = False) -> tuple[str, list[Any]]:
    """The plan as one statement: top rows by midpoint, signed spans, raw edges. With
    `quarters_from_log`, quarter-hours are summed from the log (no quarter roll-ups)."""
    if quarters_from_log and p.top == "quarter":
        return NAIVE.replace("$3", "$2[1]").replace("$4", "$2[array_length($2, 1)]"), [p.bounds]
    top = {
        "day": f"SELECT width_bucket((day::timestamp + interval '12 hours') AT TIME ZONE 'UTC',"
        f" $2), {COLUMNS} FROM usage_daily WHERE organization_id = $1 AND user_id = ''"
        f" AND day >= $3::date AND day < $4::date",
        "hour": f"SELECT width_bucket(hour_at + interval '30 minutes', $2), {COLUMNS}"
        f" FROM usage_hourly WHERE organization_id = $1 AND user_id = ''"
        f" AND hour_at >= $3 AND hour_at < $4",
        "quarter": f"SELECT width_bucket(quarter_at + interval '450 seconds', $2), {COLUMNS}"
        f" FROM series_design.quarter WHERE organization_id = $1 AND user_id = ''"
        f" AND quarter_at >= $3 AND quarter_at < $4",
    }[p.top]
    spans = {level: [s for s in p.spans if s.level == level] for level in ("hour", "quarter")}
    tables = {
        "hour": ("usage_hourly", "hour_at"),
        "quarter": ("series_design.quarter", "quarter_at"),
    }
    parts = [top]
    args: list[Any] = [p.bounds, p.top_start, p.top_end]
    for level, level_spans in spans.items():
        if not level_spans:
            continue
        table, column = tables[level]
        n = len(args) + 2
        rows = (
            f"SELECT {event_sums()} FROM usage_events WHERE organization_id = $1"
            f" AND occurred_at >= s.lo AND occurred_at < s.hi"
            if quarters_from_log and level == "quarter"
            else f"SELECT {SUMS} FROM {table} WHERE organization_id = $1"
            f" AND user_id = '' AND {column} >= s.lo AND {column} < s.hi"
        )
        args += [
            [s.start for s in level_spans],
            [s.end for s in level_spans],
            [s.to for s in level_spans],
            [s.away for s in level_spans],
        ]
        parts.append(
            f"SELECT t.bucket, {SIGNED.replace('::bigint AS', ' AS').replace('sum(', '(')}"
            f" FROM unnest(${n}::timestamptz[], ${n + 1}::timestamptz[], ${n + 2}::int[],"
            f" ${n + 3}::int[]) s(lo, hi, to_b, away_b)"
            f" CROSS JOIN LATERAL ({rows}) r"
            f" CROSS JOIN LATERAL (VALUES (s.to_b, 1), (s.away_b, -1)) t(bucket, sign)"
            f" WHERE t.bucket > 0"
        )
    if p.raw:
        n = len(args) + 2
        args += [[r.start for r in p.raw], [r.end for r in p.raw]]
        parts.append(
            f"SELECT r.* FROM unnest(${n}::timestamptz[], ${n + 1}::timestamptz[]) s(lo, hi)"
            f" CROSS JOIN LATERAL (SELECT width_bucket(e.occurred_at, $2), {event_sums()}"
            f" FROM usage_events e WHERE e.organization_id = $1"
            f" AND e.occurred_at >= s.lo AND e.occurred_at < s.hi GROUP BY 1) r"
        )
    union = "\nUNION ALL\n".join(f"({part})" for part in parts)
    sql = (
        f"SELECT b, {', '.join(f'sum({m})::bigint' for m in METRICS)}"
        f" FROM ({union}) x(b, {COLUMNS}) WHERE b BETWEEN 1 AND {len(p.bounds) - 1}"
        f" GROUP BY b ORDER BY b"
    )
    return sql, args


HOURLY_AND_SLIVERS = f"""
SELECT b, {", ".join(f"sum({m})::bigint" for m in METRICS)} FROM (
    SELECT width_bucket(hour_at, $2) b, {COLUMNS} FROM usage_hourly
    WHERE organization_id = $1 AND user_id = '' AND hour_at >= $3 AND hour_at < $4
      AND hour_at <> ALL($5)
    UNION ALL
    SELECT r.* FROM unnest($5::timestamptz[]) s(h) CROSS JOIN LATERAL (
        SELECT width_bucket(occurred_at, $2), {event_sums()} FROM usage_events e
        WHERE e.organization_id = $1 AND e.occurred_at >= s.h
          AND e.occurred_at < s.h + interval '1 hour'
        GROUP BY 1) r
) x WHERE b BETWEEN 1 AND $6 GROUP BY b ORDER BY b
"""
NAIVE = f"""
SELECT width_bucket(occurred_at, $2) b, {event_sums()} FROM usage_events
WHERE organization_id = $1 AND occurred_at >= $3 AND occurred_at < $4 GROUP BY 1 ORDER BY 1
"""


def _hourly_and_slivers_args(org: str, bounds: Sequence[datetime]) -> list[Any]:
    hour = timedelta(hours=1)

    def floor(at: datetime) -> datetime:
        return at.replace(minute=0, second=0, microsecond=0)

    cut = sorted({floor(b) for b in bounds if floor(b) != b})
    end = floor(bounds[-1]) + (hour if floor(bounds[-1]) != bounds[-1] else timedelta(0))
    return [org, list(bounds), floor(bounds[0]), end, cut, len(bounds) - 1]


async def _time(
    conn: asyncpg.Connection, sql: str, args: Sequence[Any], repeat: int
) -> tuple[float, Any]:
    rows = await conn.fetch(sql, *args)
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = await conn.fetch(sql, *args)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), rows


def _by_bucket(rows: Sequence[Any]) -> dict[int, tuple[int, ...]]:
    return {r[0]: tuple(r[1:]) for r in rows if any(r[1:])}


SERIES: list[tuple[str, str, Granularity, str, str]] = [
    ("365-day daily", "UTC", "day", "2025-01-01", "2026-01-01"),
    ("365-day daily", "America/New_York", "day", "2025-01-01", "2026-01-01"),
    ("365-day daily", "Asia/Kolkata", "day", "2025-01-01", "2026-01-01"),
    ("365-day daily", "Asia/Kathmandu", "day", "2025-01-01", "2026-01-01"),
    ("365-day daily", "Australia/Lord_Howe", "day", "2025-01-01", "2026-01-01"),
    ("31-day hourly", "Europe/Berlin", "hour", "2025-03-10", "2025-04-10"),
    ("31-day hourly", "Asia/Kolkata", "hour", "2025-03-10", "2025-04-10"),
    ("52 weeks", "America/New_York", "week", "2025-01-06", "2026-01-05"),
    ("12 months", "America/New_York", "month", "2025-01-01", "2026-01-01"),
    ("12 months", "Asia/Kolkata", "month", "2025-01-01", "2026-01-01"),
]


async def series(conn: asyncpg.Connection, org: str) -> None:
    print(
        "| series | zone | buckets | rows read (plan) | plan ms | plan, quarters from the log ms"
        " | hourly + raw slivers ms | naive ms | all exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    only = os.environ.get("SERIES_DESIGN_ONLY")
    for name, zone, unit, first, last in SERIES:
        if only and only not in f"{name} {zone}":
            continue
        calendar = Calendar(ZoneInfo(zone), unit)
        start = datetime.fromisoformat(first).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
        end = datetime.fromisoformat(last).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
        # A range that starts and ends at an odd instant, as real ones do.
        start += timedelta(minutes=7, microseconds=3)
        end -= timedelta(minutes=11)
        cut = calendar.buckets(start, end)
        bounds = [cut[0][0], *(b for _, b in cut)]
        started = time.perf_counter()
        p = plan(bounds, top_level(bounds, unit == "hour"))
        plan_ms = (time.perf_counter() - started) * 1000
        sql, args = _planned_sql(p)
        planned_ms, planned = await _time(conn, sql, [org, *args], REPEAT)
        if os.environ.get("SERIES_DESIGN_EXPLAIN"):
            for line in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, org, *args):
                print(line[0])
        logged_sql, logged_args = _planned_sql(p, quarters_from_log=True)
        logged_ms, logged = await _time(conn, logged_sql, [org, *logged_args], REPEAT)
        sliver_ms, slivers = await _time(
            conn, HOURLY_AND_SLIVERS, _hourly_and_slivers_args(org, bounds), max(3, REPEAT // 3)
        )
        naive_ms, naive = await _time(conn, NAIVE, [org, bounds, start, end], 3)
        naive_rows = _by_bucket([r for r in naive if 1 <= r[0] <= len(cut)])
        exact = all(
            _by_bucket([r for r in rows if 1 <= r[0] <= len(cut)]) == naive_rows
            for rows in (planned, logged, slivers)
        )
        rows = ", ".join(f"{level} {count}" for level, count in p.rows().items() if count)
        print(
            f"| {name} | {zone} | {len(cut)} | {rows} | {planned_ms:.2f} (+{plan_ms:.1f} plan) |"
            f" {logged_ms:.2f} | {sliver_ms:.2f} | {naive_ms:.1f} | {exact} |"
        )


PARTNER_DAILY = f"""
SELECT {SUMS} FROM usage_daily d JOIN series_design.partner_orgs p USING (organization_id)
WHERE p.partner_id = 'P500' AND d.user_id = '' AND d.day >= $1 AND d.day < $2
"""
PARTNER_MONTHLY = f"""
SELECT {SUMS} FROM (
    SELECT {COLUMNS} FROM series_design.monthly m
    JOIN series_design.partner_orgs p USING (organization_id)
    WHERE p.partner_id = 'P500' AND m.user_id = '' AND m.month >= $3 AND m.month < $4
    UNION ALL
    SELECT {COLUMNS} FROM usage_daily d JOIN series_design.partner_orgs p USING (organization_id)
    WHERE p.partner_id = 'P500' AND d.user_id = ''
      AND ((d.day >= $1 AND d.day < $3) OR (d.day >= $4 AND d.day < $2))
) x
"""
PARTNER_ROLLUP = f"""
SELECT {SUMS} FROM series_design.partner_daily WHERE partner_id = 'P500' AND day >= $1 AND day < $2
"""
PARTNER_NAIVE = f"""
SELECT {event_sums()} FROM usage_events e JOIN series_design.partner_orgs p USING (organization_id)
WHERE p.partner_id = 'P500' AND e.occurred_at >= $1 AND e.occurred_at < $2
"""


async def partner(conn: asyncpg.Connection) -> None:
    first, last = datetime(2025, 1, 17).date(), datetime(2025, 12, 9).date()
    month_first, month_last = datetime(2025, 2, 1).date(), datetime(2025, 12, 1).date()
    print("\n| partner of 500 organizations, days 2025-01-17 to 2025-12-08 | ms | exact |")
    print("|---|---|---|")
    _, naive = await _time(
        conn,
        PARTNER_NAIVE,
        [datetime(2025, 1, 17, tzinfo=UTC), datetime(2025, 12, 9, tzinfo=UTC)],
        1,
    )
    for name, sql, args in [
        ("daily rows of every organization", PARTNER_DAILY, [first, last]),
        (
            "monthly rows of every organization + daily edges",
            PARTNER_MONTHLY,
            [first, last, month_first, month_last],
        ),
        ("daily rows of the partner", PARTNER_ROLLUP, [first, last]),
    ]:
        ms, rows = await _time(conn, sql, args, REPEAT)
        print(f"| {name} | {ms:.2f} | {tuple(rows[0]) == tuple(naive[0])} |")


async def main() -> None:
    url = os.environ.get("BENCH_DATABASE_URL")
    if not url:
        sys.exit("BENCH_DATABASE_URL is required: the database `python -m bench` generated")
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT to_regclass('series_design.quarter') IS NULL"):
            print("building scratch roll-ups ...", file=sys.stderr)
            await conn.execute(SCRATCH)
            await conn.execute(INDEXES)
            await conn.execute("ANALYZE series_design.quarter, series_design.monthly")
        org = await conn.fetchval("SELECT id FROM bench.organization_index WHERE idx = 0")
        events = await conn.fetchval(
            "SELECT count(*) FROM usage_events WHERE organization_id = $1", org
        )
        print(f"busy organization: {events:,} events\n")
        await series(conn, org)
        await partner(conn)
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
