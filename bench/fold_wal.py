"""WAL and time per delta of the fold, by fold statement, roll-up fillfactor and fold size.

    uv run python -m bench.fold_wal [--baseline-root DIR] [--fillfactor] [--rounds 2]
        [--deltas 10000] [--sizes 500,5000]

On the benchmark's embedded server and dataset (`python -m bench` makes them). Each case,
in alternating order over the rounds: a CHECKPOINT, then `--deltas` deltas as single-event
ingestion leaves them (one per event, over the dataset's organizations and users, 10 %
without a user, in the current hour), added and folded `size` at a time (the events of
one fold interval) by this tree's fold statement or, with --baseline-root, that tree's.

It prints WAL bytes per delta (pg_current_wal_lsn() around each fold), the same without
full-page images (pg_walinspect: the images are written once per page per checkpoint, so
a short run after a CHECKPOINT is mostly images; between checkpoints of a long load the
records are what grows with every delta), the time of the fold transactions per delta
(client-side, commit included), the share of roll-up updates that were HOT (from the WAL
records, so no statistics lag) and the largest record kinds.

`--fillfactor` runs each case with the roll-ups at fillfactor 100 and at the values of the
migration `rollup_fillfactor`, rewriting them (VACUUM FULL) first so both start packed as
a fresh dataset is; the dataset is left with the migration's values.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from bench import dataset
from bench.servers import database

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
ROLLUPS = (
    "usage_counters",
    "usage_hourly",
    "usage_daily",
    "organization_monthly",
    "partner_hourly",
    "partner_daily",
)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _migration_fillfactors() -> dict[str, int]:
    versions = ROOT / "src/usage_api/migrations/versions"
    return dict(_load(next(versions.glob("*-rollup_fillfactor.py")), "ff").FILLFACTOR)


async def _set_fillfactor(conn: asyncpg.Connection, fillfactors: dict[str, int]) -> None:
    for table in ROLLUPS:
        await conn.execute(f"ALTER TABLE {table} SET (fillfactor = {fillfactors.get(table, 100)})")
        await conn.execute(f"VACUUM FULL ANALYZE {table}")


async def _add_deltas(
    conn: asyncpg.Connection, rng: random.Random, n: int, targets: list[tuple[str, list[str]]]
) -> None:
    rows = []
    for _ in range(n):
        organization_id, users = rng.choice(targets)
        user = rng.choice(users) if users and rng.random() >= 0.1 else ""
        rows.append((organization_id, user, rng.randint(1, 4), rng.randint(0, 300)))
    await conn.executemany(
        "INSERT INTO usage_deltas (organization_id, user_id, hour_at, sms_outbound,"
        " voice_seconds) VALUES ($1, $2, date_trunc('hour', now(), 'UTC'), $3, $4)",
        rows,
    )


async def case(
    conn: asyncpg.Connection,
    fold: ModuleType,
    deltas: int,
    size: int,
    targets: list[tuple[str, list[str]]],
    seed: int,
) -> dict[str, Any]:
    rng = random.Random(seed)
    await conn.execute("CHECKPOINT")
    wal = 0.0
    fold_s = 0.0
    # kind -> [records, bytes of records, bytes of full-page images], over the folds only.
    by_kind: dict[str, list[int]] = {}
    for _ in range(deltas // size):
        await _add_deltas(conn, rng, size, targets)
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()")
        began = time.perf_counter()
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", fold._FOLD_LOCK)
            folded = await conn.fetchval(fold._FOLD.sql, *fold._FOLD.args({"limit": size}))
        fold_s += time.perf_counter() - began
        assert folded == size, folded
        wal += float(await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn))
        for row in await conn.fetch(
            'SELECT "resource_manager/record_type", count, record_size, fpi_size'
            " FROM pg_get_wal_stats($1, pg_current_wal_lsn(), true) WHERE count > 0",
            lsn,
        ):
            sums = by_kind.setdefault(row[0], [0, 0, 0])
            for i in range(3):
                sums[i] += int(row[i + 1])
    hot_n = by_kind.get("Heap/HOT_UPDATE", [0])[0]
    cold_n = by_kind.get("Heap/UPDATE", [0])[0]
    n = deltas // size * size
    largest = sorted(by_kind.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))[:6]
    return {
        "wal": wal / n,
        "records": sum(v[1] for v in by_kind.values()) / n,
        "us": fold_s / n * 1e6,
        "hot": hot_n / max(1, hot_n + cold_n),
        "kinds": "; ".join(
            f"{kind} {c:,} ({r // 1024:,} kB + images {f // 1024:,} kB)"
            for kind, (c, r, f) in largest
        ),
    }


def _line(got: dict[str, Any]) -> str:
    return (
        f"{got['wal']:6,.0f} WAL bytes/delta ({got['records']:5,.0f} without page images),"
        f" {got['us']:5.1f} us/delta, HOT {got['hot']:4.0%}"
    )


async def main(url: str, args: argparse.Namespace) -> None:
    conn = await asyncpg.connect(url, command_timeout=None)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        await dataset.mark_dirty(pool)
        await pool.close()
        orgs = dataset.organizations(dataset.Params(events=args.events))
        targets = [(o.id, list(o.users)) for o in orgs]
        from usage_api.analytics import rollup

        folds = {"this": rollup}
        if args.baseline_root:
            folds["base"] = _load(args.baseline_root / "src/usage_api/analytics/rollup.py", "b")
        fills = {"ff100": {}, "ffmig": _migration_fillfactors()} if args.fillfactor else {"": {}}
        cases = [(f, fill, size) for f in folds for fill in fills for size in args.sizes]
        results: dict[tuple[str, str, int], list[dict[str, Any]]] = {c: [] for c in cases}
        for r in range(args.rounds):
            for which, fill, size in cases if r % 2 == 0 else cases[::-1]:
                if args.fillfactor:
                    await _set_fillfactor(conn, fills[fill])
                got = await case(conn, folds[which], args.deltas, size, targets, 1000 * r + size)
                results[(which, fill, size)].append(got)
                print(f"round {r + 1} {which:4} {fill:5} fold of {size:6,}: {_line(got)}")
                print(f"    {got['kinds']}", flush=True)
        if args.fillfactor:
            await _set_fillfactor(conn, fills["ffmig"])
        print("medians:")
        for (which, fill, size), runs in results.items():
            median = {
                k: statistics.median(g[k] for g in runs) for k in ("wal", "records", "us", "hot")
            }
            print(f"  {which:4} {fill:5} fold of {size:6,}: {_line(median)}")
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline-root", type=Path, help="a tree whose fold to measure too")
    parser.add_argument("--fillfactor", action="store_true", help="100 and the migration's")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--deltas", type=int, default=10_000, help="deltas per case")
    parser.add_argument("--sizes", default="500,5000", help="deltas per fold")
    parser.add_argument("--events", type=int, default=100_000, help="the dataset's --events")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    with database(DATA) as (url, _):
        asyncio.run(main(url, args))
