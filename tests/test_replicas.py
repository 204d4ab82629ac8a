"""Read replicas against real streaming replication: a hot standby of an embedded primary.

The promise under test (contract 2.2 and 8): once a write has committed, every later read
includes it, whichever replica it is sent to; a replica that is behind, paused or down
serves nothing, the primary answers instead, and the replica comes back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic import command
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.conftest import TABLES
from tests.support.database import ROOT, alembic_config
from tests.support.factories import event, make_key, make_organization
from tests.support.replica import Standby, psql, replicated_postgres
from tests.support.servers import serving
from usage_api.app import create_app
from usage_api.auth import hash_key
from usage_api.config import Settings
from usage_api.db import PrimaryEngine, ReadEngine, create_engine, transact
from usage_api.replicas import FENCE_SQL, Fence, Reads, Replica, replica_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[str, Standby]]:
    """A migrated primary and a standby streaming from it, for this module."""
    with (
        tempfile.TemporaryDirectory(prefix="usage-api-replicas-") as tmp,
        replicated_postgres(Path(tmp)) as (primary_url, standby),
    ):
        command.upgrade(alembic_config(primary_url), "head")
        psql(primary_url, "CREATE TABLE replica_probe (n int NOT NULL)")
        yield primary_url, standby


@pytest.fixture
def standby(pair: tuple[str, Standby]) -> Iterator[Standby]:
    standby = pair[1]
    yield standby
    # Leave it as the next test expects it: running, replaying, caught up.
    if not standby.running:
        standby.start()
    if psql(standby.url, "SELECT pg_get_wal_replay_pause_state()") != "not paused":
        standby.resume_replay()
    psql(pair[0], "TRUNCATE replica_probe")
    standby.catch_up()


@pytest.fixture
async def reads(
    pair: tuple[str, Standby], settings: Settings, standby: Standby
) -> AsyncIterator[Reads]:
    small = replace(settings, pool_size=4)
    primary = PrimaryEngine(create_engine(small, pair[0]))
    replica = Replica(replica_name(standby.url), ReadEngine(create_engine(small, standby.url)))
    reads = Reads(primary, [replica], check_interval_s=0.1, max_backoff_s=0.2)
    await reads.probe_all()
    try:
        yield reads
    finally:
        await reads.dispose()
        await primary.dispose()


async def write(reads: Reads, n: int) -> None:
    async with reads.primary.begin() as conn:
        await conn.execute(text("INSERT INTO replica_probe VALUES (:n)"), {"n": n})


async def until_up(replica: Replica, timeout_s: float = 10.0) -> None:
    """Wait for the background probes to find `replica` serving again."""
    for _ in range(int(timeout_s / 0.05)):
        if replica.serving:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"replica still {replica.state}")


COUNT = "SELECT count(*) AS rows FROM replica_probe"


async def count_rows(conn: AsyncConnection) -> int:
    rows: int = await conn.scalar(text(COUNT))
    return rows


async def test_a_caught_up_replica_serves_reads(reads: Reads, standby: Standby) -> None:
    await write(reads, 1)
    await asyncio.to_thread(standby.catch_up)
    assert (await reads.fetch_row(COUNT))["rows"] == 1
    assert await reads.run(count_rows) == 1
    assert reads.replicas[0].reads == 2
    assert reads.fallbacks == {"unavailable": 0, "behind": 0, "failed": 0, "no_fence": 0}


async def test_with_replay_paused_a_read_after_a_write_sees_it_on_the_primary(
    reads: Reads, standby: Standby
) -> None:
    await asyncio.to_thread(standby.pause_replay)
    await write(reads, 1)
    assert (await reads.fetch_row(COUNT))["rows"] == 1
    assert await reads.run(count_rows) == 1
    assert reads.fallbacks["behind"] == 2
    assert reads.replicas[0].reads == 0
    # The replica itself does not have the row: it was skipped, not lucky.
    assert psql(standby.url, "SELECT count(*) FROM replica_probe") == "0"


async def test_a_paused_replica_is_reported_and_skipped(reads: Reads, standby: Standby) -> None:
    await asyncio.to_thread(standby.pause_replay)
    await reads.probe(reads.replicas[0])
    assert reads.describe()[0]["state"] == "paused"
    assert (await reads.fetch_row(COUNT))["rows"] == 0
    assert reads.fallbacks["unavailable"] == 1


async def test_a_stopped_replica_is_skipped_and_used_again_once_restarted(
    reads: Reads, standby: Standby
) -> None:
    watcher = asyncio.create_task(reads.watch())
    try:
        await write(reads, 1)
        await asyncio.to_thread(standby.stop)
        # The first read finds it gone and reads the primary; the next ones skip it.
        for _ in range(3):
            assert (await reads.fetch_row(COUNT))["rows"] == 1
        assert reads.replicas[0].state == "down"
        assert reads.fallbacks["failed"] + reads.fallbacks["unavailable"] == 3
        await asyncio.to_thread(standby.start)
        await asyncio.to_thread(standby.catch_up)
        await until_up(reads.replicas[0])
        assert (await reads.fetch_row(COUNT))["rows"] == 1
        assert reads.replicas[0].reads == 1
    finally:
        watcher.cancel()


async def test_a_fence_fetched_before_a_read_began_is_not_used_by_it(
    reads: Reads, pair: tuple[str, Standby]
) -> None:
    """A fetch already answered by the primary, but not yet returned, may predate a
    write that a read beginning now must see: that read waits for the next fetch."""
    primary: AsyncEngine = reads.primary
    answered, release = asyncio.Event(), asyncio.Event()
    started = 0

    async def slow_fetch() -> int:
        nonlocal started
        started += 1
        async with primary.connect() as conn:
            position: int = await conn.scalar(text(FENCE_SQL))
        if started == 1:
            answered.set()
            await release.wait()
        return position

    fence = Fence(slow_fetch)
    first = asyncio.create_task(fence.position())
    await answered.wait()
    await write(reads, 1)
    async with primary.connect() as conn:
        after_write: int = await conn.scalar(text(FENCE_SQL))
    second = asyncio.create_task(fence.position())
    third = asyncio.create_task(fence.position())
    await asyncio.sleep(0.01)
    release.set()
    positions = await asyncio.gather(first, second, third)
    assert positions[0] < after_write
    assert positions[1] == positions[2] >= after_write
    # The two later readers shared one fetch.
    assert started == 2


# Through the API: DATABASE_READ_URLS names the standby.


@pytest.fixture
async def replicated_app(
    pair: tuple[str, Standby], settings: Settings, standby: Standby
) -> AsyncIterator[FastAPI]:
    # A generous wait: on a busy machine a replica may take more than the default 10 ms
    # to replay the rate limit's bookkeeping, and these tests want to see it serve.
    replicated = replace(settings, database_read_urls=(standby.url,), replica_wait_ms=1000)
    app = create_app(replicated, pair[0])
    async with app.router.lifespan_context(app):
        yield app
    engine = create_engine(settings, pair[0])
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {TABLES}"))
    finally:
        await engine.dispose()


@pytest.fixture
async def http(replicated_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=replicated_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@dataclass
class Tenant:
    organization_id: str
    read_key: str
    write_key: str


@pytest.fixture
async def tenant(replicated_app: FastAPI, standby: Standby) -> Tenant:
    primary: AsyncEngine = replicated_app.state.services.databases.primary
    organization_id = await make_organization(primary, "Replicated")
    tenant = Tenant(
        organization_id,
        await make_key(primary, "organization", organization_id=organization_id),
        await make_key(primary, "organization", organization_id=organization_id, write=True),
    )
    await asyncio.to_thread(standby.catch_up)
    return tenant


def sms(usage: dict[str, Any]) -> int:
    total: int = usage["usage"]["sms"]["outbound"]
    return total


async def read(http: httpx.AsyncClient, tenant: Tenant) -> httpx.Response:
    return await http.get(
        "/v1/analytics/usage",
        params={"organization_id": tenant.organization_id},
        headers={"X-API-Key": tenant.read_key},
    )


async def send(http: httpx.AsyncClient, tenant: Tenant, segments: int) -> httpx.Response:
    return await http.post(
        "/v1/usage/events",
        json={"events": [event(tenant.organization_id, quantity=segments)]},
        headers={"X-API-Key": tenant.write_key},
    )


def metric(text_: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus exposition `text_`."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in text_.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{wanted} not in /metrics")


async def test_reads_go_to_the_replica_and_answer_what_the_primary_would(
    http: httpx.AsyncClient, tenant: Tenant, standby: Standby
) -> None:
    assert (await send(http, tenant, 7)).status_code == 200
    await asyncio.to_thread(standby.catch_up)
    response = await read(http, tenant)
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "usage": {
            "organization_id": tenant.organization_id,
            "organization_name": "Replicated",
            "sms": {"outbound": 7, "inbound": 0, "total": 7},
            "mms": {"outbound": 0, "inbound": 0, "total": 0},
            "voice": {"seconds": 0, "kb_seconds": 0, "total_seconds": 0},
            "period": "all_time",
        },
        "powered_by": "Teli",
    }
    exposition = (await http.get("/metrics")).text
    name = replica_name(standby.url)
    assert metric(exposition, "usage_api_replica_reads_total", replica=name) == 1
    assert metric(exposition, "usage_api_replica_up", replica=name) == 1
    ready = (await http.get("/readyz")).json()
    assert ready["replicas"][0] | {"lag_bytes": 0, "lag_seconds": 0} == {
        "name": name,
        "state": "up",
        "lag_bytes": 0,
        "lag_seconds": 0,
        "reads": 1,
    }


async def test_with_replay_paused_an_ingested_event_is_read_back_at_once(
    http: httpx.AsyncClient, tenant: Tenant, standby: Standby
) -> None:
    await asyncio.to_thread(standby.pause_replay)
    assert (await send(http, tenant, 3)).status_code == 200
    response = await read(http, tenant)
    assert (response.status_code, sms(response.json())) == (200, 3)
    exposition = (await http.get("/metrics")).text
    assert metric(exposition, "usage_api_read_fallbacks_total", reason="behind") == 1
    assert (
        metric(exposition, "usage_api_replica_reads_total", replica=replica_name(standby.url)) == 0
    )


async def test_a_replica_stopped_under_load_costs_no_request_and_serves_again_once_back(
    http: httpx.AsyncClient, tenant: Tenant, standby: Standby, replicated_app: FastAPI
) -> None:
    sent = 0  # events whose ingestion has returned 200
    statuses: list[int] = []
    stale: list[tuple[int, int]] = []
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal sent
        while not stop.is_set():
            response = await send(http, tenant, 1)
            statuses.append(response.status_code)
            if response.status_code == 200:
                sent += 1

    async def reader() -> None:
        while not stop.is_set():
            at_least = sent
            response = await read(http, tenant)
            statuses.append(response.status_code)
            if response.status_code == 200 and sms(response.json()) < at_least:
                stale.append((sms(response.json()), at_least))

    load = [asyncio.create_task(writer()), *(asyncio.create_task(reader()) for _ in range(4))]
    reads: Reads = replicated_app.state.services.databases.read
    for _ in range(200):  # until the replica has served a few of them
        if reads.replicas[0].reads >= 5:
            break
        await asyncio.sleep(0.05)
    served_before_stop = reads.replicas[0].reads
    await asyncio.to_thread(standby.stop)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*load)
    assert set(statuses) == {200}
    assert stale == []
    assert sent > 0
    assert served_before_stop > 0
    assert reads.replicas[0].state == "down"
    ready = (await http.get("/readyz")).json()
    assert (ready["status"], ready["replicas"][0]["state"]) == ("ready", "down")

    await asyncio.to_thread(standby.start)
    await asyncio.to_thread(standby.catch_up)
    await until_up(reads.replicas[0], timeout_s=15)
    served = reads.replicas[0].reads
    response = await read(http, tenant)
    assert (response.status_code, sms(response.json())) == (200, sent)
    assert reads.replicas[0].reads == served + 1


async def test_a_url_that_is_no_standby_of_the_primary_never_serves(
    pair: tuple[str, Standby], settings: Settings, database_url: str
) -> None:
    """The primary itself, or a server of another cluster (the suite's own database),
    named as a replica by mistake: both are skipped, whatever their WAL position."""
    primary = PrimaryEngine(create_engine(settings, pair[0]))
    itself = Replica("itself", ReadEngine(create_engine(settings, pair[0])))
    stranger = Replica("stranger", ReadEngine(create_engine(settings, database_url)))
    reads = Reads(primary, [itself, stranger])
    try:
        await reads.probe_all()
        assert [r["state"] for r in reads.describe()] == ["not_standby", "other_cluster"]
        assert (await reads.fetch_row("SELECT 1 AS one"))["one"] == 1
        assert reads.fallbacks["unavailable"] == 1
    finally:
        await reads.dispose()
        await primary.dispose()


async def test_a_key_revoked_before_a_read_is_refused_though_the_replica_lags(
    http: httpx.AsyncClient, tenant: Tenant, standby: Standby, replicated_app: FastAPI
) -> None:
    await asyncio.to_thread(standby.pause_replay)

    async def revoke_read_key(conn: AsyncConnection) -> None:
        await conn.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h"),
            {"h": hash_key(tenant.read_key)},
        )

    await transact(replicated_app.state.services.databases.primary, revoke_read_key)
    response = await read(http, tenant)
    assert (response.status_code, response.json()) == (
        401,
        {"success": False, "error": "invalid API key"},
    )


async def test_serve_with_workers_reads_every_ingested_event_with_replay_paused(
    pair: tuple[str, Standby], standby: Standby, settings: Settings, tmp_path: Path
) -> None:
    """Two worker processes, a connection per request: whichever worker ingested, the
    other's read includes it, and the fallbacks of both are summed in /metrics."""
    primary = create_engine(settings, pair[0])
    try:
        organization_id = await make_organization(primary, "Served")
        read_key = await make_key(primary, "organization", organization_id=organization_id)
        write_key = await make_key(
            primary, "organization", organization_id=organization_id, write=True
        )
    finally:
        await primary.dispose()
    await asyncio.to_thread(standby.catch_up)
    env = {
        **os.environ,
        "DATABASE_URL": pair[0],
        "DATABASE_READ_URLS": standby.url,
        "TMPDIR": str(tmp_path),
        "USAGE_API_POOL_SIZE": "3",
        "USAGE_API_ROLLUP_INTERVAL_MS": "0",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "stderr.log"
    async with serving(env, log_path) as (process, client):
        for _ in range(600):
            assert process.returncode is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                ready = (await client.get("/readyz", timeout=1)).json()
                if ready["replicas"][0]["state"] == "up":
                    break
            await asyncio.sleep(0.1)
        await asyncio.to_thread(standby.pause_replay)
        for segments in range(1, 11):
            sent = await client.post(
                "/v1/usage/events",
                json={"events": [event(organization_id, quantity=segments)]},
                headers={"X-API-Key": write_key},
            )
            assert sent.status_code == 200
            response = await client.get(
                "/v1/analytics/usage",
                params={"organization_id": organization_id},
                headers={"X-API-Key": read_key},
            )
            assert response.status_code == 200
            assert sms(response.json()) == segments * (segments + 1) // 2
        exposition = (await client.get("/metrics")).text
        # Each read fell back: behind the fence while the probes still saw it replaying,
        # unavailable once a probe found replay paused.
        fell_back = sum(
            metric(exposition, "usage_api_read_fallbacks_total", reason=reason)
            for reason in ("behind", "unavailable")
        )
        assert fell_back == 10
    psql(pair[0], f"TRUNCATE {TABLES}")


WRITE_THROUGH_A_READ_ENGINE = """
from typing import Any

from usage_api.db import Databases, transact


async def work(conn: Any) -> None: ...


async def write(databases: Databases) -> None:
    await transact(databases.primary, work)
    await transact(databases.read, work)
    await transact(databases.read.replicas[0].engine, work)
"""


def test_the_types_forbid_a_transaction_on_anything_but_the_primary(tmp_path: Path) -> None:
    from mypy import api

    snippet = tmp_path / "snippet.py"
    snippet.write_text(WRITE_THROUGH_A_READ_ENGINE)
    out, _, status = api.run(
        [
            "--strict",
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ]
    )
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1
    # The primary is fine; the router and a replica engine are each refused.
    refused = [
        str(number)
        for number, line in enumerate(WRITE_THROUGH_A_READ_ENGINE.splitlines(), 1)
        if "transact(databases.read" in line
    ]
    assert [line.split(":")[1] for line in errors] == refused, out
    assert all("incompatible type" in line and '"PrimaryEngine"' in line for line in errors), out
