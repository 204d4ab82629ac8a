"""Ways to hand PostgreSQL a 1000-event batch, compared on the same server, alternated.

    uv run python -m bench.write_paths [--batches 40] [--rounds 3]

Uses the benchmark's embedded server and dataset (`python -m bench` makes them; or
BENCH_DATABASE_URL) and the floor's tables and statement (bench/floor_app.py), so that
only the way the rows arrive differs:

- `unnest`: one statement over nine column arrays (what the API and the floor do);
- `copy`: binary COPY into a temporary staging table, then the same statement over it,
  in one transaction (BEGIN, COPY, INSERT ... SELECT, COMMIT; the table is emptied on
  commit).

Each batch is new events over the dataset's organizations and users, built before the
clock starts. Prints events/s of one connection and PostgreSQL's CPU per event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bench import dataset
from bench.floor_app import _INSERT, FLOOR_TABLES, floor_insert
from bench.servers import CpuMeter, database, postmaster_pid
from usage_api.sql import EVENT_COLUMNS

_STAGED = floor_insert("staging AS input")
_STAGING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS staging"
    " (LIKE floor_events INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)


def _batch(orgs: list[dataset.Organization], tag: str, size: int = 1000) -> list[list[Any]]:
    now = datetime.now(UTC)
    rows = []
    for n in range(size):
        org = orgs[(n * 7919) % len(orgs)]
        user = org.users[n % len(org.users)] if n % 10 else None
        voice = n % 5 == 0
        rows.append(
            [
                org.id,
                f"{tag}-{n}",
                user,
                "voice" if voice else "sms",
                "outbound" if n % 3 else "inbound",
                None if voice else 1 + n % 3,
                n % 300 if voice else None,
                voice and n % 4 == 0,
                now - timedelta(seconds=n),
            ]
        )
    return rows


async def _unnest(conn: asyncpg.Connection, rows: list[list[Any]]) -> None:
    await conn.fetchval(_INSERT, *(list(column) for column in zip(*rows, strict=True)))


async def _copy(conn: asyncpg.Connection, rows: list[list[Any]]) -> None:
    async with conn.transaction():
        await conn.copy_records_to_table("staging", records=rows, columns=list(EVENT_COLUMNS))
        await conn.fetchval(_STAGED)


async def compare(url: str, batches: int, rounds: int, data_dir: Path) -> None:
    cpu = CpuMeter(None if os.environ.get("BENCH_DATABASE_URL") else postmaster_pid(data_dir))
    conn = await asyncpg.connect(url)
    try:
        orgs = dataset.organizations(dataset.Params(events=100_000))
        known = set(await conn.fetchval("SELECT array_agg(id) FROM organizations"))
        orgs = [o for o in orgs if o.id in known]
        await conn.execute("DROP TABLE IF EXISTS floor_events, floor_deltas")
        await conn.execute(FLOOR_TABLES)
        await conn.execute(_STAGING)
        figures: dict[str, list[tuple[float, float, float]]] = {"unnest": [], "copy": []}
        for round_ in range(rounds):
            order = ("unnest", "copy") if round_ % 2 == 0 else ("copy", "unnest")
            for name in order:
                work = [_batch(orgs, f"{name}-{round_}-{b}") for b in range(batches)]
                write = _unnest if name == "unnest" else _copy
                await write(conn, _batch(orgs, f"{name}-{round_}-warm"))
                since = cpu.sample()
                began = time.perf_counter()
                for rows in work:
                    await write(conn, rows)
                elapsed = time.perf_counter() - began
                used = cpu.usage(since)
                events = batches * 1000
                figures[name].append(
                    (events / elapsed, used["postgres_s"] * 1e6 / events, used["others"])
                )
                print(
                    f"round {round_ + 1} {name:6}: {events / elapsed:8,.0f} events/s,"
                    f" PG {used['postgres_s'] * 1e6 / events:5.1f} us/event,"
                    f" others {used['others']:.0%}",
                    flush=True,
                )
        for name, runs in figures.items():
            rate = statistics.median(r[0] for r in runs)
            pg = statistics.median(r[1] for r in runs)
            print(f"median {name:6}: {rate:8,.0f} events/s, PG {pg:5.1f} us/event")
        await conn.execute("DROP TABLE floor_events, floor_deltas")
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).parent / "data")
    args = parser.parse_args()
    with database(args.data_dir) as (url, _):
        asyncio.run(compare(url, args.batches, args.rounds, args.data_dir))
