"""`scripts/fault-run`: the database-restart scenario at a heavier load, with its figures.

`python -m tests.support.faultrun --help`; by default 8 writers x 5,000 events and 4
readers while the database restarts 5 times. Exits 1 if anything was lost, counted
twice, answered 500 or too slowly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.faults import Database, Load, Servers, ride_out_restarts
from usage_api import db
from usage_api.config import Settings
from usage_api.db import create_engine


def _memory_gib() -> float:
    return int(Path("/proc/meminfo").read_text().split()[1]) / 2**20


async def _main(database: Database, load: Load, directory: Path) -> int:
    servers = Servers(database, directory)
    try:
        conn = await asyncpg.connect(database.url)
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        run = await ride_out_restarts(database, await servers.running(), load)
    finally:
        await servers.close()
    print(
        f"machine: {os.cpu_count()} CPUs, {_memory_gib():.0f} GiB, PostgreSQL {version}"
        " (embedded, fsync on), one server process"
    )
    print(run.report())
    problems = run.problems()
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


async def _compare_pool_checks(database: Database) -> int:
    """Why no pool_pre_ping: what a checkout costs, and how many of 10 requests fail right
    after a restart, with no check, with pre-ping, and with the closed-connection check."""
    names = ("no check", "pool_pre_ping", "closed check (shipped)")
    settings = replace(Settings.from_env(), pool_size=10, rollup_interval_ms=0)
    engines = {name: create_engine(settings, database.url) for name in names}
    for name, engine in engines.items():
        if name != "closed check (shipped)":
            sqlalchemy.event.remove(engine.sync_engine, "checkout", db._drop_closed)
        engine.sync_engine.pool._pre_ping = name == "pool_pre_ping"

    async def select_1(engine: AsyncEngine) -> Any:
        async def work(conn: Any) -> Any:
            return await conn.scalar(text("SELECT 1"))

        return await db.run_autocommit(engine, work)

    async def fill(engine: AsyncEngine) -> None:
        await asyncio.gather(*(select_1(engine) for _ in range(10)))

    costs: dict[str, list[float]] = {name: [] for name in names}
    for engine in engines.values():
        await fill(engine)
    for _ in range(20):  # interleaved, against noise
        for name, engine in engines.items():
            started = time.perf_counter()
            for _ in range(300):
                await select_1(engine)
            costs[name].append((time.perf_counter() - started) / 300)
    failed: dict[str, int] = dict.fromkeys(names, 0)
    trials = 6
    for trial in range(trials):
        for engine in engines.values():
            await fill(engine)
        await asyncio.to_thread(database.kill if trial % 2 else database.stop)
        await asyncio.to_thread(database.start)
        for name, engine in engines.items():
            answers = await asyncio.gather(
                *(select_1(engine) for _ in range(10)), return_exceptions=True
            )
            failed[name] += sum(isinstance(a, Exception) for a in answers)
    for engine in engines.values():
        await engine.dispose()
    for name in names:
        print(
            f"{name:24} {statistics.median(costs[name]) * 1e6:5.0f} us per checkout + SELECT 1"
            f" (median of 20 x 300); after {trials} restarts (3 stops, 3 SIGKILLs):"
            f" {failed[name]} of {trials * 10} requests failed"
        )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="The restart scenario at a heavier load.")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--events", type=int, default=5000, help="events per writer")
    parser.add_argument("--resend", type=float, default=0.2, help="share of batches re-sent")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--down", type=float, default=2.0, help="seconds down per restart")
    parser.add_argument("--up", type=float, default=2.0, help="seconds up between restarts")
    parser.add_argument(
        "--compare-pool-checks",
        action="store_true",
        help="instead: the cost of pool_pre_ping and of the closed-connection check",
    )
    args = parser.parse_args()
    load = Load(
        writers=args.writers,
        events_per_writer=args.events,
        resend_fraction=args.resend,
        readers=args.readers,
        restarts=args.restarts,
        down_s=args.down,
        up_s=args.up,
    )
    with tempfile.TemporaryDirectory(prefix="usage-api-faults-") as tmp:
        os.chmod(tmp, 0o755)  # as root the server runs as another account
        # Migrating runs an event loop of its own: before ours.
        database = Database(Path(tmp) / "pgdata")
        try:
            if args.compare_pool_checks:
                status = asyncio.run(_compare_pool_checks(database))
            else:
                status = asyncio.run(_main(database, load, Path(tmp)))
        finally:
            database.close()
    sys.exit(status)


if __name__ == "__main__":
    main()
