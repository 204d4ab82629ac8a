"""Read replicas: what the never-stale fence costs, and what the alternative would.

    uv run python -m bench.replicas            # ~2 minutes on 2 cores
    uv run python -m bench.replicas --quick    # a look while developing

One run, one machine: a durable embedded primary (fsync and synchronous_commit on) and a
hot standby of it (tests/support/replica.py), a small dataset (one organization, a year of
events, folded), and two apps in this process, one reading the primary only, the other
with `DATABASE_READ_URLS` set to the standby. Requests go through the whole ASGI app
(httpx.ASGITransport), alternating between the two apps round by round: counters, a
365-day range and 365-day daily series (UTC and America/New_York). Prints Markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from alembic import command
from fastapi import FastAPI
from tests.support.database import alembic_config
from tests.support.factories import event, make_key, make_organization
from tests.support.replica import Standby, psql, replicated_postgres

from usage_api.analytics.rollup import fold_all
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.replicas import Fence, Reads

YEAR = datetime(2025, 1, 1, tzinfo=UTC)
RANGE = {"start_date": "2025-01-01T10:17:00Z", "end_date": "2025-12-31T15:43:00Z"}
# The reads of section 1: what a dashboard polls. The series are the year by day, 365
# buckets, in UTC and in a zone whose days are not UTC's (and change offset twice).
READS: dict[str, dict[str, str]] = {
    "counter": {},
    "365 days": RANGE,
    "365-day series by day, UTC": {
        "start_date": "2025-01-01",
        "end_date": "2025-12-31",
        "granularity": "day",
    },
    "365-day series by day, America/New_York": {
        "start_date": "2025-01-01",
        "end_date": "2025-12-31",
        "granularity": "day",
        "timezone": "America/New_York",
    },
}


async def no_fence() -> int:
    return 0


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{statistics.median(values) * 1000:.2f} / {p99 * 1000:.2f}"


@asynccontextmanager
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as http:
            yield http


async def timed(call: Callable[[], Awaitable[httpx.Response]], count: int) -> list[float]:
    times = []
    for _ in range(count):
        began = time.perf_counter()
        response = await call()
        times.append(time.perf_counter() - began)
        assert response.status_code == 200, response.text
    return times


async def load_dataset(http: httpx.AsyncClient, organization_id: str, key: str, n: int) -> None:
    minutes = 365 * 24 * 60
    for first in range(0, n, 1000):
        batch = [
            event(
                organization_id,
                quantity=1 + i % 3,
                type=("sms", "mms", "voice")[i % 3],
                occurred_at=(YEAR + timedelta(minutes=(i * 7919) % minutes)).isoformat(),
            )
            for i in range(first, min(first + 1000, n))
        ]
        response = await http.post(
            "/v1/usage/events", json={"events": batch}, headers={"X-API-Key": key}
        )
        assert response.status_code == 200, response.text


def main(args: argparse.Namespace) -> None:
    rounds, per_round = (2, 100) if args.quick else (5, 400)
    settings = replace(Settings.from_env(), rollup_interval_ms=0, rate_limit=0)
    with (
        tempfile.TemporaryDirectory(prefix="usage-api-bench-replicas-") as tmp,
        replicated_postgres(Path(tmp), fast=False) as (primary_url, standby),
    ):
        command.upgrade(alembic_config(primary_url), "head")
        version = psql(primary_url, "SHOW server_version")
        print(f"PostgreSQL {version}, primary and standby on this machine\n")
        asyncio.run(run(primary_url, standby, settings, rounds, per_round, args))


async def run(
    primary_url: str,
    standby: Standby,
    settings: Settings,
    rounds: int,
    per_round: int,
    args: argparse.Namespace,
) -> None:
    alone = create_app(settings, primary_url)
    with_replica = replace(settings, database_read_urls=(standby.url,))
    replicated = create_app(with_replica, primary_url)
    impatient = create_app(replace(with_replica, replica_wait_ms=0), primary_url)
    unfenced = create_app(with_replica, primary_url)
    async with (
        client(alone) as on_primary,
        client(replicated) as on_replica,
        client(impatient) as on_replica_no_wait,
        client(unfenced) as on_replica_unfenced,
    ):
        # For comparison only: reads on the replica with no fence at all (they could be
        # stale), to tell the fence's cost from the replica server's own speed.
        unfenced.state.services.databases.read.fence = Fence(no_fence)
        engine = alone.state.services.databases.primary
        organization_id = await make_organization(engine, "Bench")
        read_key = await make_key(engine, "organization", organization_id=organization_id)
        write_key = await make_key(
            engine, "organization", organization_id=organization_id, write=True
        )
        await load_dataset(on_primary, organization_id, write_key, 5_000 if args.quick else 50_000)
        await fold_all(engine)
        await asyncio.to_thread(standby.catch_up)
        reads: Reads = replicated.state.services.databases.read
        headers = {"X-API-Key": read_key}

        def counter(http: httpx.AsyncClient) -> Callable[[], Awaitable[httpx.Response]]:
            return lambda: http.get(
                "/v1/analytics/usage", params={"organization_id": organization_id}, headers=headers
            )

        def read(
            http: httpx.AsyncClient, params: dict[str, str]
        ) -> Callable[[], Awaitable[httpx.Response]]:
            return lambda: http.get(
                "/v1/analytics/usage",
                params={"organization_id": organization_id, **params},
                headers=headers,
            )

        # The same answer from each app: a replica never serves another (staler) one.
        for params in READS.values():
            answers = [(await read(http, params)()).json() for http in (on_primary, on_replica)]
            assert answers[0] == answers[1], params

        def ingest(http: httpx.AsyncClient) -> Callable[[], Awaitable[httpx.Response]]:
            return lambda: http.post(
                "/v1/usage/events",
                json={"events": [event(organization_id, occurred_at="2025-06-01T12:00:00Z")]},
                headers={"X-API-Key": write_key},
            )

        # 1. One read at a time, no writes: the fence is one primary round trip per read;
        # the replica check is skipped while the connection has seen the fence replayed.
        results: dict[str, list[float]] = {}
        # CPU seconds this process (the API, not PostgreSQL) spent per read: unlike wall
        # time, it does not grow with what the rest of the machine is doing.
        cpu: dict[str, float] = {}
        for _ in range(rounds):
            for name, http in (
                ("primary alone", on_primary),
                ("via replica", on_replica),
                ("unfenced", on_replica_unfenced),
            ):
                for kind, params in READS.items():
                    began_cpu = time.process_time()
                    results.setdefault(f"{kind}, {name}", []).extend(
                        await timed(read(http, params), per_round)
                    )
                    spent = (time.process_time() - began_cpu) / (rounds * per_round)
                    cpu[f"{kind}, {name}"] = cpu.get(f"{kind}, {name}", 0.0) + spent
        print("## One read at a time, no concurrent writes (ms, median / p99)\n")
        print("| read | primary alone | via the replica, fenced | on the replica, no fence |")
        print("| --- | --- | --- | --- |")
        for kind in READS:
            cells = [
                ms(results[f"{kind}, {name}"])
                for name in ("primary alone", "via replica", "unfenced")
            ]
            print(f"| {kind} | {' | '.join(cells)} |")
        for kind in READS:
            cells = [
                f"{cpu[f'{kind}, {name}'] * 1000:.2f}"
                for name in ("primary alone", "via replica", "unfenced")
            ]
            print(f"| {kind}: API CPU ms a read | {' | '.join(cells)} |")
        print(f"\nserved by the replica: {reads.replicas[0].reads}, fallbacks: {reads.fallbacks}\n")

        # 2. The fence's parts on their own.
        fence_times, check_times = [], []
        replica_engine = reads.replicas[0].engine
        for _ in range(rounds * per_round):
            began = time.perf_counter()
            await reads.fence.position()
            fence_times.append(time.perf_counter() - began)
            began = time.perf_counter()
            pooled = await replica_engine.raw_connection()
            await pooled.driver_connection.fetchval("SELECT pg_last_wal_replay_lsn()")  # type: ignore[union-attr]
            pooled.close()
            check_times.append(time.perf_counter() - began)
        print("## The fence's parts (ms, median / p99)\n")
        print(f"- fence (`pg_current_wal_flush_lsn()` on the primary): {ms(fence_times)}")
        print(f"- replay check (`pg_last_wal_replay_lsn()` on the replica): {ms(check_times)}\n")

        # 3. Reads with a write between each: every read needs a fresh fence and check.
        mixed: dict[str, list[float]] = {}
        apps = {
            "primary alone": (on_primary, None),
            f"via the replica, waiting up to {with_replica.replica_wait_ms} ms": (
                on_replica,
                reads,
            ),
            "via the replica, not waiting": (
                on_replica_no_wait,
                impatient.state.services.databases.read,
            ),
        }
        before = {
            name: (r.replicas[0].reads, r.fallbacks["behind"]) for name, (_, r) in apps.items() if r
        }
        for _ in range(rounds):
            for name, (http, _) in apps.items():
                for _ in range(per_round // 4):
                    await ingest(http)()
                    mixed.setdefault(name, []).extend(await timed(counter(http), 1))
        print("## A counter read right after each write (ms, median / p99)\n")
        print("| read | latency | served by the replica | fell back: behind the fence |")
        print("| --- | --- | --- | --- |")
        for name, (_, r) in apps.items():
            served_by, fell_back = "", ""
            if r is not None:
                served_by = str(r.replicas[0].reads - before[name][0])
                fell_back = str(r.fallbacks["behind"] - before[name][1])
            print(f"| {name} | {ms(mixed[name])} | {served_by} | {fell_back} |")
        print()

        # 4. Concurrency: 32 readers for a few seconds; the fence is shared.
        print("## 32 concurrent counter readers, 3 s each (one process, all on this machine)\n")
        for name, http in (("primary alone", on_primary), ("via replica", on_replica)):
            fetches, served = reads.fence.fetches, reads.replicas[0].reads
            done = 0
            deadline = time.perf_counter() + (1.5 if args.quick else 3.0)

            async def reader(http: httpx.AsyncClient = http, deadline: float = deadline) -> None:
                nonlocal done
                call = counter(http)
                while time.perf_counter() < deadline:
                    assert (await call()).status_code == 200
                    done += 1

            began = time.perf_counter()
            await asyncio.gather(*(reader() for _ in range(32)))
            rate = done / (time.perf_counter() - began)
            extra = ""
            if name == "via replica":
                extra = (
                    f", {reads.fence.fetches - fetches} fence fetches for {done} reads"
                    f" ({(reads.fence.fetches - fetches) / max(done, 1):.2f} a read),"
                    f" {reads.replicas[0].reads - served} served by the replica"
                )
            print(f"- {name}: {rate:.0f} reads/s{extra}")
        print()

        # 5. The alternative: synchronous_commit = remote_apply (commits wait for the standby).
        ingest_times: dict[str, list[float]] = {}
        for mode in ("on", "remote_apply"):
            psql(primary_url, f"ALTER SYSTEM SET synchronous_commit = '{mode}'")
            psql(
                primary_url,
                "ALTER SYSTEM SET synchronous_standby_names = '*'"
                if mode != "on"
                else "ALTER SYSTEM RESET synchronous_standby_names",
            )
            psql(primary_url, "SELECT pg_reload_conf()")
            # Pooled sessions keep their setting: a fresh app for each mode.
            async with client(create_app(settings, primary_url)) as http:
                ingest_times[mode] = await timed(ingest(http), rounds * per_round // 4)
        print("## Ingest latency, one event a request (ms, median / p99)\n")
        print(f"- synchronous_commit = on: {ms(ingest_times['on'])}")
        print(f"- remote_apply, the standby synchronous: {ms(ingest_times['remote_apply'])}")
        await asyncio.to_thread(standby.stop)
        async with client(create_app(settings, primary_url)) as http:
            began = time.perf_counter()
            response = await ingest(http)()
            print(
                f"- remote_apply with the standby stopped: {response.status_code} after"
                f" {time.perf_counter() - began:.1f} s"
                f" (statement_timeout {settings.statement_timeout_ms} ms)"
            )
        psql(primary_url, "ALTER SYSTEM RESET synchronous_commit")
        psql(primary_url, "ALTER SYSTEM RESET synchronous_standby_names")
        psql(primary_url, "SELECT pg_reload_conf()")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args())
