"""What single-event ingestion waits on, and how much WAL an event costs.

    uv run python -m bench.ingest_waits api|floor

Starts the API (`usage-api serve --workers 2`) or the floor app on the benchmark's embedded
server and dataset (`python -m bench` makes them), sends single new events from 32
clients for 6 s, samples pg_stat_activity every 10 ms (the average number of active
backends per wait event), and divides the WAL written (until the fold has caught up, for
the API) by the events inserted. With USAGE_API_ROLLUP_INTERVAL_MS=0 the API runs without
its fold (the deltas stay; the next `python -m bench` restores the dataset).
"""

from __future__ import annotations

import asyncio
import collections
import os
import sys
import time
from pathlib import Path

import asyncpg

from bench import dataset
from bench.floor_app import FLOOR_TABLES
from bench.run import _make_keys
from bench.scenarios import wait_for_fold
from bench.servers import ServerSpec, database, load, serving

DATA = Path(__file__).resolve().parent / "data"


async def measure(url: str, which: str) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    _, write_key = await _make_keys(url)
    orgs = dataset.organizations(dataset.Params(events=100_000))
    async with pool.acquire() as conn:
        await dataset.mark_dirty(pool)
        await conn.execute("DROP TABLE IF EXISTS floor_events, floor_deltas")
        await conn.execute(FLOOR_TABLES)
        # As in the ingest scenario: a table of the API's size, and a fresh checkpoint.
        await conn.execute("INSERT INTO floor_events SELECT * FROM usage_events")
        await conn.execute("VACUUM ANALYZE floor_events")
        await conn.execute("CHECKPOINT")
    api = which == "api"
    async with serving(ServerSpec(which, 2, 10, url), DATA / "logs") as server:
        async with pool.acquire() as conn:
            wal_from = await conn.fetchval("SELECT pg_current_wal_lsn()")
        spec = {
            "host": "127.0.0.1",
            "port": server.port,
            "warmup_s": 1,
            "duration_s": 6,
            "connections": 32,
            "headers": {"X-API-Key": write_key} if api else {},
            "ingest": {
                "batch": 1,
                "targets": [[o.id, list(o.users)] for o in orgs],
                "id_prefix": f"waits-{which}-{int(time.time())}",
                "path": "/v1/usage/events" if api else "/floor/events",
            },
        }
        task = asyncio.create_task(load(spec))
        waits: collections.Counter[tuple[str, str]] = collections.Counter()
        samples = 0
        await asyncio.sleep(1.5)
        async with pool.acquire() as conn:
            while not task.done():
                rows = await conn.fetch(
                    "SELECT coalesce(wait_event_type, '-') || ':' || coalesce(wait_event, '-'),"
                    " left(regexp_replace(query, '\\s+', ' ', 'g'), 24)"
                    " FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
                    " AND backend_type = 'client backend' AND state = 'active'"
                )
                waits.update((row[0], row[1]) for row in rows)
                samples += 1
                await asyncio.sleep(0.01)
        result = await task
        if api and os.environ.get("USAGE_API_ROLLUP_INTERVAL_MS") != "0":
            await wait_for_fold(pool)
        async with pool.acquire() as conn:
            wal = await conn.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", wal_from)
    events = int(result["statuses"].get("200", 0))
    print(
        f"{which}: {result['total']['rps']:,.0f} events/s, {float(wal) / events:,.0f} WAL bytes"
        f" per event; active backends by wait event ({samples} samples):"
    )
    for (wait, query), count in waits.most_common(8):
        print(f"  {count / samples:5.2f}  {wait:24} {query}")
    await pool.close()


if __name__ == "__main__":
    with database(DATA) as (url, _):
        asyncio.run(measure(url, sys.argv[1]))
