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
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import Pool

from tests.support.factories import make_key, make_organization
from tests.support.servers import free_port, serving
from usage_api import ratelimit
from usage_api.app import create_app
from usage_api.auth import hash_key
from usage_api.config import Settings
from usage_api.db import create_engine, transact
from usage_api.errors import ServiceUnavailable
from usage_api.keys import create_key, set_limit
from usage_api.ratelimit import RateLimiter

USAGE = "/v1/analytics/usage"
LIMIT = 10
WINDOW_START = 1_800_000_000  # a multiple of 60: a window starts here
REFUSED = b'{"success":false,"error":"rate limit exceeded"}'
INVALID_KEY = b'{"success":false,"error":"invalid API key"}'
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
    lookups = asyncio.create_task(limiter.run_lookups(engine))
    try:
        key = await make_key(engine)
        key_hash = hash_key(key)
        for _ in range(4):
            assert await limiter.admit(key_hash) is not None
        with pytest.raises(ServiceUnavailable):
            await limiter.sync(away)
        decisions = [await limiter.admit(key_hash) for _ in range(LIMIT)]
        assert [d.allowed for d in decisions if d is not None] == [True] * 6 + [False] * 4
        with pytest.raises(ServiceUnavailable):
            await limiter.sync(away)
        # Back: all ten admitted requests are counted once.
        await limiter.sync(engine)
        assert await window_of(engine) == [(datetime.fromtimestamp(WINDOW_START, UTC), LIMIT)]
    finally:
        lookups.cancel()
        await engine.dispose()
        await away.dispose()


async def test_a_key_new_to_a_process_while_the_database_is_away_gets_503(
    database_url: str, settings: Settings
) -> None:
    """It cannot be told from an unknown key, so it gets what every route answers then."""
    limiter = RateLimiter(LIMIT, 60, 3600, Clock())
    engine = create_engine(settings, database_url)
    away = create_engine(settings, f"postgresql://postgres@127.0.0.1:{free_port()}/none")
    lookups = asyncio.create_task(limiter.run_lookups(away))
    try:
        key_hash = hash_key(await make_key(engine))
        with pytest.raises(ServiceUnavailable):
            await limiter.admit(key_hash)
        # Not taken for unknown: found as soon as the database answers.
        lookups.cancel()
        lookups = asyncio.create_task(limiter.run_lookups(engine))
        decision = await limiter.admit(key_hash)
        assert decision is not None and (decision.allowed, decision.remaining) == (True, 9)
    finally:
        lookups.cancel()
        await engine.dispose()
        await away.dispose()


# Each key's own limit


async def make_limited_key(engine: AsyncEngine, rate_limit: int | None) -> tuple[str, str]:
    """`(key_id, key)` of a new admin read key with its own limit (None: the default)."""

    async def work(conn: AsyncConnection) -> tuple[str, str]:
        return await create_key(conn, scope="admin", rate_limit=rate_limit)

    return await transact(engine, work)


async def statuses_of(api: Replica, key: str, organization: str, count: int) -> list[int]:
    return [(await api.get(key, organization)).status_code for _ in range(count)]


async def test_a_key_with_a_higher_limit_passes_where_the_default_refuses(
    database_url: str, settings: Settings
) -> None:
    """The platform's pipelines: a write key of 100,000 a minute beside the default 10."""
    async with replica(database_url, settings, Clock()) as api:
        organization = await make_organization(api.engine)
        default = await make_key(api.engine)
        _, pipeline = await make_limited_key(api.engine, 100_000)

        assert await statuses_of(api, default, organization, 3 * LIMIT) == (
            [200] * LIMIT + [429] * 2 * LIMIT
        )
        for left in range(100_000 - 1, 100_000 - 1 - 3 * LIMIT, -1):
            response = await api.get(pipeline, organization)
            assert response.status_code == 200
            assert response.headers["ratelimit-policy"] == '"per-key";q=100000;w=60'
            assert response.headers["ratelimit"] == f'"per-key";r={left};t=55'
        # The same across a sync: the shared total comes back with the key's own limit.
        await api.sync()
        response = await api.get(pipeline, organization)
        assert response.headers["ratelimit"] == f'"per-key";r={100_000 - 3 * LIMIT - 1};t=55'


async def test_a_key_with_a_limit_of_zero_is_never_refused(
    database_url: str, settings: Settings
) -> None:
    async with replica(database_url, settings, Clock()) as api:
        organization = await make_organization(api.engine)
        _, unlimited = await make_limited_key(api.engine, 0)
        for _ in range(2):
            for _ in range(3 * LIMIT):
                response = await api.get(unlimited, organization)
                assert response.status_code == 200
                assert "ratelimit" not in response.headers
                assert "ratelimit-policy" not in response.headers
            await api.sync()
        # Counted all the same, for its last use and for anyone who lowers its limit.
        assert [requests for _, requests in await window_of(api.engine)] == [6 * LIMIT]
        assert (await last_use(api.engine))[0] is not None


async def test_a_new_limit_applies_in_every_process_from_its_next_sync(
    database_url: str, settings: Settings
) -> None:
    clock = Clock()
    async with (
        replica(database_url, settings, clock) as a,
        replica(database_url, settings, clock) as b,
    ):
        organization = await make_organization(a.engine)
        key_id, key = await make_limited_key(a.engine, 5)
        assert await statuses_of(a, key, organization, 6) == [200] * 5 + [429]
        await a.sync()

        assert await transact(a.engine, set_limit, key_id, 20)
        # A decides from what it knew until its next sync; B meets the key only now.
        assert (await a.get(key, organization)).status_code == 429
        response = await b.get(key, organization)
        assert response.status_code == 200
        assert response.headers["ratelimit-policy"] == '"per-key";q=20;w=60'
        assert response.headers["ratelimit"] == '"per-key";r=14;t=55'
        await a.sync()
        response = await a.get(key, organization)
        assert response.headers["ratelimit-policy"] == '"per-key";q=20;w=60'
        # Its own five (the refused one counts nothing); B's one is not synced yet.
        assert response.headers["ratelimit"] == '"per-key";r=14;t=55'
        await b.sync()
        await a.sync()
        assert (await a.get(key, organization)).headers["ratelimit"] == '"per-key";r=12;t=55'

        # Lowered below what it has made: refused everywhere after one sync each.
        assert await transact(a.engine, set_limit, key_id, 3)
        await a.sync()
        await b.sync()
        assert (await a.get(key, organization)).status_code == 429
        refused = await b.get(key, organization)
        assert refused.status_code == 429
        assert refused.headers["ratelimit-policy"] == '"per-key";q=3;w=60'

        # Back to the default (10), and unlimited.
        assert await transact(a.engine, set_limit, key_id, None)
        await b.sync()
        assert (await b.get(key, organization)).headers["ratelimit-policy"] == POLICY
        assert await transact(a.engine, set_limit, key_id, 0)
        await b.sync()
        assert await statuses_of(b, key, organization, 2 * LIMIT) == [200] * 2 * LIMIT


async def test_an_idle_process_forgets_its_keys_and_syncs_nothing(
    database_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until then each sync refreshes every key it knows; after, a key is looked up afresh
    when it comes back, with the total the others made meanwhile."""
    monkeypatch.setattr(ratelimit, "IDLE_S", 0.2)
    clock = Clock()
    async with (
        replica(database_url, settings, clock) as a,
        replica(database_url, settings, clock) as b,
    ):
        organization, key = await a.organization_and_key()
        assert await statuses_of(a, key, organization, 3) == [200] * 3
        await a.sync()
        await asyncio.sleep(0.3)
        with counting_checkouts() as checkouts:
            await a.sync()
            await a.sync()
        assert checkouts.count == 0

        assert await statuses_of(b, key, organization, 4) == [200] * 4
        await b.sync()
        assert (await a.get(key, organization)).headers["ratelimit"] == '"per-key";r=2;t=55'


# The bound: every admitted request counts somewhere, a sync in flight included


async def test_concurrent_clients_get_exactly_the_limit_while_syncs_are_in_flight(
    database_url: str, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 per 10 s, 16 clients at once on one process, syncs every 5 ms that each take
    50 ms: the requests made during a sync's round trip count as much as the others."""
    syncs = 0

    async def slow_sync(*args: Any) -> Any:
        nonlocal syncs
        syncs += 1
        await asyncio.sleep(0.05)
        return await real_sync(*args)

    real_sync = ratelimit._sync
    monkeypatch.setattr(ratelimit, "_sync", slow_sync)
    limits = {"rate_limit": 30, "rate_limit_window_s": 10, "rate_limit_sync_ms": 5}
    async with replica(database_url, settings, Clock(), **limits) as api:
        organization, key = await api.organization_and_key()

        async def client() -> list[int]:
            return [(await api.get(key, organization)).status_code for _ in range(8)]

        statuses = [
            s for answers in await asyncio.gather(*[client() for _ in range(16)]) for s in answers
        ]
        assert syncs >= 2
        assert (statuses.count(200), statuses.count(429)) == (30, 16 * 8 - 30)
        await api.sync()
        assert [requests for _, requests in await window_of(api.engine)] == [30]


# Unknown keys


class Checkouts:
    """Every connection any engine of this process takes from its pool: each is one
    transaction or one autocommit statement, which is how the service uses them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_: Any) -> None:
        self.count += 1


@contextlib.contextmanager
def counting_checkouts() -> Iterator[Checkouts]:
    checkouts = Checkouts()
    event.listen(Pool, "checkout", checkouts)
    try:
        yield checkouts
    finally:
        event.remove(Pool, "checkout", checkouts)


def random_key() -> str:
    return "usk_" + secrets.token_urlsafe(32)


@pytest.mark.slow
async def test_a_flood_of_unknown_keys_costs_a_bounded_number_of_statements(
    database_url: str, settings: Settings
) -> None:
    """16 clients sending made-up keys as fast as they can, while a good key, and a key
    made by `usage-api keys create` in another process during the flood, are served."""
    flood_size = 800
    limits = {
        "rate_limit": 100_000,
        "rate_limit_window_s": 1_000_000_000,
        "rate_limit_sync_ms": 100,
    }
    async with replica(database_url, settings, **limits) as api:
        organization, good = await api.organization_and_key()
        flood: list[httpx.Response] = []
        served: list[int] = []
        newcomer_served: list[int] = []
        done = asyncio.Event()

        async def attacker() -> None:
            while len(flood) < flood_size or not done.is_set():
                flood.append(await api.get(random_key(), organization))

        async def partner() -> None:
            while not done.is_set():
                served.append((await api.get(good, organization)).status_code)
                await asyncio.sleep(0.005)

        async def newcomer() -> None:
            env = {**os.environ, "DATABASE_URL": database_url}
            process = await asyncio.create_subprocess_exec(
                Path(sys.executable).with_name("usage-api"),
                *["keys", "create", "--scope", "admin"],
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            stdout, _ = await process.communicate()
            assert process.returncode == 0
            for _ in range(3):
                newcomer_served.append(
                    (await api.get(stdout.decode().strip(), organization)).status_code
                )
            done.set()

        with counting_checkouts() as checkouts:
            started = time.monotonic()
            await asyncio.gather(partner(), newcomer(), *[attacker() for _ in range(16)])
            elapsed = time.monotonic() - started

        assert len(flood) >= flood_size
        assert {(r.status_code, r.content) for r in flood} == {(401, INVALID_KEY)}
        assert not any("ratelimit" in r.headers for r in flood)
        assert served and served == [200] * len(served)
        assert newcomer_served == [200] * 3
        # Each served request is one read; besides those, only the syncs and the
        # lookups, one at most every LOOKUP_GAP_S whatever the flood's rate.
        bound = elapsed / ratelimit.LOOKUP_GAP_S + elapsed / 0.1 + 2
        besides_reads = checkouts.count - len(served) - len(newcomer_served)
        assert besides_reads <= bound
        assert besides_reads < len(flood) / 4
        # Never counted, never kept in the database.
        await api.sync()
        counts = sorted(requests for _, requests in await window_of(api.engine))
        assert counts == sorted([len(served), len(newcomer_served)])


async def test_an_unknown_key_seen_again_costs_nothing(
    database_url: str, settings: Settings
) -> None:
    async with replica(database_url, settings) as api:
        organization = await make_organization(api.engine)
        key = random_key()
        assert (await api.get(key, organization)).content == INVALID_KEY
        with counting_checkouts() as checkouts:
            for _ in range(50):
                response = await api.get(key, organization)
                assert (response.status_code, response.content) == (401, INVALID_KEY)
            await api.sync()
        assert checkouts.count == 0


# Two worker processes of `usage-api serve`, for real.

LIVE_LIMIT = 20
GROUP = 5
# A key of its own limit, and as many clients at once as the reproduction.
BUSY_LIMIT = 30
CLIENTS = 16


def answers_by_pid(log_path: Path, route: str) -> dict[int, list[int]]:
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    statuses: dict[int, list[int]] = {}
    for line in lines:
        if line["logger"] == "usage_api.access" and line["route"] == route:
            statuses.setdefault(line["pid"], []).append(line["status"])
    return statuses


@pytest.mark.slow
async def test_the_limit_holds_across_worker_processes(
    database_url: str, settings: Settings, tmp_path: Path
) -> None:
    engine = create_engine(settings, database_url)
    try:
        organization = await make_organization(engine)
        key = await make_key(engine)
        _, busy = await make_limited_key(engine, BUSY_LIMIT)
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

        async def client() -> list[int]:
            headers = {"X-API-Key": busy}
            return [(await http.get(USAGE, params=params, headers=headers)).status_code]

        async def clients() -> list[int]:
            answers = await asyncio.gather(*[client() for _ in range(CLIENTS)])
            return [status for statuses in answers for status in statuses]

        concurrent = [status for _ in range(8) for status in await clients()]

    admitted = statuses.count(200)
    assert statuses.count(429) == len(statuses) - admitted
    # Never refused below the limit; past it by at most what one worker admits between
    # two syncs (one group here).
    assert LIVE_LIMIT <= admitted <= LIVE_LIMIT + GROUP
    assert statuses[-GROUP:] == [429] * GROUP
    by_pid = answers_by_pid(log_path, USAGE)
    assert len(by_pid) == 2 and all(200 in answers for answers in by_pid.values())
    # 16 at once: each worker admits at most the key's own limit, so both together at
    # most twice it (the documented bound: n processes, n times the limit).
    busy_admitted = concurrent.count(200)
    assert concurrent.count(429) == len(concurrent) - busy_admitted
    assert BUSY_LIMIT <= busy_admitted <= 2 * BUSY_LIMIT
    # Every admitted request is in the shared count (the last ones synced at shutdown).
    engine = create_engine(settings, database_url)
    try:
        counts = sorted(requests for _, requests in await window_of(engine))
        assert counts == sorted([admitted, busy_admitted])
    finally:
        await engine.dispose()
