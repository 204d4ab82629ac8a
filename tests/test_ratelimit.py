"""The per-key rate limit, shared by every process through PostgreSQL, and the record of
each key's last use, written at most once a minute.

The replicas here are separate apps on the same database, each with its own limiter, as
separate processes would be. Their syncs are run by hand (the background sync waits an
hour) and their clocks are fixed, so every figure is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.factories import free_port, make_key, make_organization, serving
from usage_api.app import create_app
from usage_api.auth import hash_key
from usage_api.config import Settings
from usage_api.db import create_engine
from usage_api.errors import ServiceUnavailable
from usage_api.ratelimit import RateLimiter

USAGE = "/v1/analytics/usage"
LIMIT = 10
WINDOW_START = 1_800_000_000  # a multiple of 60: a window starts here
REFUSED = b'{"success":false,"error":"rate limit exceeded"}'
POLICY = '"per-key";q=10;w=60'


class Clock:
    def __init__(self) -> None:
        self.now = WINDOW_START + 5.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Replica:
    app: FastAPI
    client: httpx.AsyncClient

    async def get(self, key: str, organization_id: str) -> httpx.Response:
        params = {"organization_id": organization_id}
        return await self.client.get(USAGE, params=params, headers={"X-API-Key": key})

    @property
    def engine(self) -> AsyncEngine:
        engine: AsyncEngine = self.app.state.services.databases.primary
        return engine

    async def organization_and_key(self) -> tuple[str, str]:
        """A new organization, and a new key that can read it."""
        return await make_organization(self.engine), await make_key(self.engine)

    async def sync(self) -> None:
        await self.app.state.services.limiter.sync(self.engine)


@contextlib.asynccontextmanager
async def replica(
    database_url: str, settings: Settings, clock: Clock | None = None, **overrides: Any
) -> AsyncIterator[Replica]:
    options = {
        "rate_limit": LIMIT,
        "rate_limit_window_s": 60,
        "rate_limit_sync_ms": 3_600_000,
        **overrides,
    }
    app = create_app(replace(settings, **options), database_url)
    if clock is not None:
        app.state.services.limiter.clock = clock
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Replica(app, client)


async def window_of(engine: AsyncEngine) -> list[tuple[datetime, int]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT window_start, requests FROM api_key_windows"))
        return [(row.window_start, row.requests) for row in rows]


async def last_use(engine: AsyncEngine) -> tuple[datetime | None, str]:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT last_used_at, xmin::text FROM api_keys"))).one()
        return row.last_used_at, row.xmin


async def test_a_key_past_its_limit_is_refused_until_the_window_ends(
    database_url: str, settings: Settings
) -> None:
    clock = Clock()
    async with replica(database_url, settings, clock) as api:
        engine = api.engine
        organization, key = await api.organization_and_key()
        other_key = await make_key(engine)

        for left in range(LIMIT - 1, -1, -1):
            response = await api.get(key, organization)
            assert response.status_code == 200
            assert response.headers["ratelimit-policy"] == POLICY
            assert response.headers["ratelimit"] == f'"per-key";r={left};t=55'

        refused = await api.get(key, organization)
        assert refused.status_code == 429
        assert refused.content == REFUSED
        assert refused.headers["retry-after"] == "55"
        assert refused.headers["ratelimit"] == '"per-key";r=0;t=55'
        assert refused.headers["ratelimit-policy"] == POLICY

        # Another key has its own window.
        assert (
            (await api.get(other_key, organization))
            .headers["ratelimit"]
            .startswith('"per-key";r=9;')
        )

        clock.now += 30
        assert (await api.get(key, organization)).headers["retry-after"] == "25"
        clock.now = WINDOW_START + 60
        response = await api.get(key, organization)
        assert response.status_code == 200
        assert response.headers["ratelimit"] == '"per-key";r=9;t=60'


async def test_the_limit_holds_across_replicas(database_url: str, settings: Settings) -> None:
    clock = Clock()
    async with (
        replica(database_url, settings, clock) as a,
        replica(database_url, settings, clock) as b,
    ):
        engine = a.engine
        organization, key = await a.organization_and_key()

        assert [(await a.get(key, organization)).status_code for _ in range(6)] == [200] * 6
        await a.sync()
        # B has not synced yet: it sees only its own requests.
        assert [(await b.get(key, organization)).status_code for _ in range(4)] == [200] * 4
        await b.sync()
        assert (await b.get(key, organization)).status_code == 429
        # A last synced before B's four: it admits one more (the documented overshoot of
        # one sync), learns the total at its next sync, and refuses from then on.
        assert (await a.get(key, organization)).status_code == 200
        await a.sync()
        assert (await a.get(key, organization)).status_code == 429
        assert await window_of(engine) == [(datetime.fromtimestamp(WINDOW_START, UTC), LIMIT + 1)]

        # The next window starts over, for both.
        clock.now = WINDOW_START + 65
        assert (await a.get(key, organization)).status_code == 200
        await a.sync()
        assert (await b.get(key, organization)).headers["ratelimit"] == '"per-key";r=9;t=55'
        await b.sync()
        assert (await b.get(key, organization)).headers["ratelimit"] == '"per-key";r=7;t=55'
        await b.sync()
        assert await window_of(engine) == [(datetime.fromtimestamp(WINDOW_START + 60, UTC), 3)]


async def test_unknown_keys_are_not_counted(database_url: str, settings: Settings) -> None:
    async with replica(database_url, settings) as api:
        for _ in range(3):
            assert (await api.get("usk_unknown", "org")).status_code == 401
        await api.sync()
        assert await window_of(api.engine) == []


async def test_a_limit_of_zero_turns_the_limit_off(database_url: str, settings: Settings) -> None:
    async with replica(database_url, settings, rate_limit=0) as api:
        engine = api.engine
        organization, key = await api.organization_and_key()
        for _ in range(LIMIT * 2):
            response = await api.get(key, organization)
            assert response.status_code == 200
            assert "ratelimit" not in response.headers
        await api.sync()
        # Still recorded as used.
        assert (await last_use(engine))[0] is not None


async def test_last_use_is_written_at_most_once_a_minute(
    database_url: str, settings: Settings
) -> None:
    async with replica(database_url, settings) as api:
        engine = api.engine
        organization, key = await api.organization_and_key()
        assert (await last_use(engine))[0] is None

        for _ in range(3):
            await api.get(key, organization)
        await api.sync()
        first, version = await last_use(engine)
        assert first is not None

        # Within the minute: more requests and syncs, and not a single write to the row.
        for _ in range(3):
            await api.get(key, organization)
            await api.sync()
        assert await last_use(engine) == (first, version)

        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE api_keys SET last_used_at = last_used_at - interval '61 seconds'")
            )
        await api.get(key, organization)
        await api.sync()
        latest, _ = await last_use(engine)
        assert latest is not None and latest > first


async def test_the_last_requests_are_recorded_at_shutdown(
    database_url: str, settings: Settings
) -> None:
    async with replica(database_url, settings) as api:
        organization, key = await api.organization_and_key()
        await api.get(key, organization)
        # No sync before the app stops: its lifespan syncs once more on the way out.
    async with replica(database_url, settings) as api:
        assert (await last_use(api.engine))[0] is not None
        assert [requests for _, requests in await window_of(api.engine)] == [1]


async def test_the_sync_never_takes_a_connection_meant_for_requests(
    database_url: str, settings: Settings
) -> None:
    """Background work has its own connections: with the pool full of requests, or the
    database hanging, a sync must not keep a request waiting for a connection."""
    limits = {"rate_limit": 1000, "rate_limit_sync_ms": 1}
    async with replica(database_url, settings, Clock(), **limits) as api:
        engine = api.engine
        organization, key = await api.organization_and_key()
        checked_out = []
        for _ in range(200):
            assert (await api.get(key, organization)).status_code == 200
            await asyncio.sleep(0.001)  # a sync runs about now
            checked_out.append(engine.pool.checkedout())
        assert checked_out == [0] * 200
        await api.sync()
        assert [requests for _, requests in await window_of(engine)] == [200]


async def test_the_limit_holds_while_the_database_is_away_and_nothing_is_lost(
    database_url: str, settings: Settings
) -> None:
    """A sync that cannot reach the database keeps its counts for the next one; meanwhile
    the process goes on deciding from what it knows."""
    clock = Clock()
    limiter = RateLimiter(LIMIT, 60, 3600, clock)
    engine = create_engine(settings, database_url)
    # Nothing listens on this port: every sync fails at once, as with a stopped server.
    away = create_engine(settings, f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    try:
        key = await make_key(engine)
        key_hash = hash_key(key)
        for _ in range(4):
            assert limiter.take(key_hash) is not None
        with pytest.raises(ServiceUnavailable):
            await limiter.sync(away)
        decisions = [limiter.take(key_hash) for _ in range(LIMIT)]
        assert [d.allowed for d in decisions if d is not None] == [True] * 6 + [False] * 4
        with pytest.raises(ServiceUnavailable):
            await limiter.sync(away)
        # Back: all ten admitted requests are counted once.
        await limiter.sync(engine)
        assert await window_of(engine) == [(datetime.fromtimestamp(WINDOW_START, UTC), LIMIT)]
    finally:
        await engine.dispose()
        await away.dispose()


# Two worker processes of `usage-api serve`, for real.

LIVE_LIMIT = 20
GROUP = 5


def answers_by_pid(log_path: Path, route: str) -> dict[int, list[int]]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    statuses: dict[int, list[int]] = {}
    for line in lines:
        if line["logger"] == "usage_api.access" and line["route"] == route:
            statuses.setdefault(line["pid"], []).append(line["status"])
    return statuses


async def test_the_limit_holds_across_worker_processes(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    engine = create_engine(settings, database_url)
    try:
        organization = await make_organization(engine)
        key = await make_key(engine)
    finally:
        await engine.dispose()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "USAGE_API_POOL_SIZE": "3",
        "USAGE_API_RATE_LIMIT": str(LIVE_LIMIT),
        # Windows start at multiples of this since the epoch (2001, 2033): none ends
        # during the test, whenever it runs.
        "USAGE_API_RATE_LIMIT_WINDOW_S": "1000000000",
    }
    log_path = tmp_path / "stderr.log"
    statuses = []
    async with serving(env, log_path) as (process, http):
        deadline = time.monotonic() + 60
        while len(answers_by_pid(log_path, "/healthz")) < 2:
            assert process.returncode is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                await http.get("/healthz", timeout=1)
            await asyncio.sleep(0.05)
        params = {"organization_id": organization}
        for _ in range(2 * LIVE_LIMIT // GROUP):
            for _ in range(GROUP):
                response = await http.get(USAGE, params=params, headers={"X-API-Key": key})
                statuses.append(response.status_code)
            # Long enough for both workers to sync (every 100 ms), on a busy machine too.
            await asyncio.sleep(0.5)

    admitted = statuses.count(200)
    assert statuses.count(429) == len(statuses) - admitted
    # Never refused below the limit; past it by at most what one worker admits between
    # two syncs (one group here).
    assert LIVE_LIMIT <= admitted <= LIVE_LIMIT + GROUP
    assert statuses[-GROUP:] == [429] * GROUP
    by_pid = answers_by_pid(log_path, USAGE)
    assert len(by_pid) == 2 and all(200 in answers for answers in by_pid.values())
    # Every admitted request is in the shared count (the last ones synced at shutdown).
    engine = create_engine(settings, database_url)
    try:
        assert [requests for _, requests in await window_of(engine)] == [admitted]
    finally:
        await engine.dispose()
