"""The SQL of breakdowns, partner totals and the fold alone, timed on the benchmark's
dataset: the statements of the checkout this runs from, so two checkouts can be compared
on one database (run it from each). Nothing is changed: the fold runs in a transaction
that is rolled back (then `usage_deltas` is vacuumed).

    BENCH_DATABASE_URL=postgresql://... uv run python -m bench.breakdown_sql [--explain CASE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg

from usage_api.analytics import breakdown, rollup, totals
from usage_api.analytics.query import parse_usage_query
from usage_api.analytics.ranges import range_params

RUNS = 9
# Deltas as ingest leaves them: users of organizations all over the directory, over the
# hours of one day.
_DELTAS = """
INSERT INTO usage_deltas (organization_id, user_id, hour_at, sms_outbound, voice_seconds)
SELECT u.organization_id, u.id, timestamptz '2025-12-30' + (u.n % 24) * interval '1 hour', 1, 2
FROM (SELECT organization_id, id, row_number() OVER () AS n FROM users) u
WHERE u.n % (SELECT greatest(count(*) / $1, 1) FROM users) = 0
LIMIT $1
"""


async def _cases(conn: asyncpg.Connection) -> dict[str, tuple[str, list[Any]]]:
    key_hash = await conn.fetchval(
        "SELECT key_hash FROM api_keys WHERE scope = 'admin' AND revoked_at IS NULL LIMIT 1"
    )
    wide = await conn.fetchval(
        "SELECT organization_id FROM users GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
    )
    large = await conn.fetchval(
        "SELECT partner_id FROM organizations WHERE partner_id IS NOT NULL"
        " GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
    )
    cases = {}
    for name, params in (
        (
            "breakdown, 10,000-user org, 30 days",
            {"organization_id": wide, "start_date": "2025-06-01", "end_date": "2025-06-30"},
        ),
        (
            "breakdown, 500-org partner, 365 days",
            {"partner_id": large, "start_date": "2025-01-01", "end_date": "2025-12-31"},
        ),
    ):
        query = breakdown.parse_breakdown_query(params | {"sort": "-sms.total"})
        kind = "partner" if query.group_by == "organization" else "organization"
        statement = breakdown._statement(kind, True, query.sort, query.descending)
        cut = getattr(breakdown, "_range_params", range_params)
        assert query.usage.span is not None
        values = {
            "key_hash": key_hash,
            "partner_id": query.usage.partner_id,
            "organization_id": query.usage.organization_id,
            "has_cursor": False,
            "after_value": None,
            "after_id": "",
            "limit": query.limit + 1,
            **cut(query.usage.span),
        }
        cases[name] = (statement.sql, statement.args(values))
    usage = parse_usage_query(
        {"partner_id": large, "start_date": "2025-01-01", "end_date": "2025-12-31"}
    )
    assert usage.span is not None
    statement = totals._STATEMENTS["partner", True]
    values = {"key_hash": key_hash, "organization_id": None, "user_id": None}
    values |= {"partner_id": large, **range_params(usage.span)}
    cases["total, 500-org partner, 365 days"] = (statement.sql, statement.args(values))
    return cases


async def _time(conn: asyncpg.Connection, sql: str, args: list[Any]) -> float:
    for _ in range(2):
        await conn.fetch(sql, *args)
    samples = []
    for _ in range(RUNS):
        began = time.perf_counter()
        await conn.fetch(sql, *args)
        samples.append((time.perf_counter() - began) * 1000)
    return statistics.median(samples)


async def _fold(conn: asyncpg.Connection, deltas: int) -> float:
    samples = []
    for _ in range(3):
        transaction = conn.transaction()
        await transaction.start()
        try:
            await conn.execute(_DELTAS, deltas)
            began = time.perf_counter()
            await conn.fetchval(rollup._FOLD.sql, *rollup._FOLD.args({"limit": deltas}))
            samples.append((time.perf_counter() - began) * 1000)
        finally:
            await transaction.rollback()
    # The rolled-back deltas are dead rows that every read of deltas would step over.
    await conn.execute("VACUUM usage_deltas")
    return statistics.median(samples)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--explain", metavar="CASE", help="print EXPLAIN (ANALYZE, BUFFERS)")
    parser.add_argument("--fold-deltas", type=int, default=20_000)
    args = parser.parse_args()
    conn = await asyncpg.connect(os.environ["BENCH_DATABASE_URL"])
    try:
        cases = await _cases(conn)
        if args.explain:
            sql, values = next(v for k, v in cases.items() if k.startswith(args.explain))
            for row in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *values):
                print(row[0])
            return
        for name, (sql, values) in cases.items():
            print(f"{name}: p50 {await _time(conn, sql, values):.2f} ms")
        fold = await _fold(conn, args.fold_deltas)
        print(f"fold of {args.fold_deltas:,} deltas: p50 {fold:.0f} ms (of 3, rolled back)")
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
