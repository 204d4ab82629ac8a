"""The database goes away and comes back, a statement runs too long, the server is stopped.

A live server runs on an embedded PostgreSQL of this module's own (tests/support/faults.py),
which the tests stop, kill and start again on the same port, with writers and readers on
it all along. While the database is away every answer is a quick 503 with Retry-After,
`/healthz` stays 200 and `/readyz` is 503; once it is back the service answers 200 again
within moments, by itself; and once clients have retried every batch that did not get a
200, with the same ids, the log holds every event exactly once and the counters equal it.

`scripts/fault-run` runs the restart scenario at a heavier load and prints its figures:
`python -m tests.support.faultrun --help`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from tests.support.factories import event, make_key, make_organization
from tests.support.faults import (
    CLIENT_TIMEOUT_S,
    UNAVAILABLE,
    Database,
    Load,
    Servers,
    connected,
    ride_out_restarts,
)
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.errors import is_unavailable

# A database of their own, and new tenants each: conftest's clean slate does not apply.
pytestmark = pytest.mark.own_database


@pytest.fixture(scope="module")
def database() -> Iterator[Database]:
    # Not under pytest's 0700 directories: as root the server runs as another account.
    with tempfile.TemporaryDirectory(prefix="usage-api-faults-") as tmp:
        os.chmod(tmp, 0o755)
        db = Database(Path(tmp) / "pgdata")
        try:
            yield db
        finally:
            db.close()


@pytest.fixture(scope="module")
async def servers(
    database: Database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Servers]:
    servers = Servers(database, tmp_path_factory.mktemp("servers"))
    try:
        yield servers
    finally:
        await servers.close()


@pytest.mark.slow
async def test_the_service_rides_out_database_restarts_exactly_once(
    database: Database, servers: Servers
) -> None:
    server = await servers.running()
    run = await ride_out_restarts(database, server, Load())
    print(run.report())
    assert run.problems() == [], run.report()
    # The outages were felt: writes were refused and retried, /readyz said so.
    assert run.retried > 0 and run.count(503, kinds=("readyz",)) > 0


# --- a restart while nobody is looking -------------------------------------------------


@pytest.mark.slow
async def test_a_restart_while_idle_costs_no_request(database: Database) -> None:
    """Pooled connections that died with the old server are replaced, not handed out.

    In-process, with no background fold: nothing but these requests touches the pool.
    """
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine)
    settings = replace(Settings.from_env(), rollup_interval_ms=0, pool_size=10)
    app = create_app(settings, database.url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def burst() -> list[int]:
            answers = await asyncio.gather(
                *(
                    http.get(
                        "/v1/analytics/usage",
                        params={"organization_id": organization_id},
                        headers={"X-API-Key": key},
                    )
                    for _ in range(10)
                )
            )
            return [a.status_code for a in answers]

        assert await burst() == [200] * 10
        assert app.state.services.databases.primary.pool.checkedin() == 10
        for how in ("stop", "kill"):
            await asyncio.to_thread(database.kill if how == "kill" else database.stop)
            await asyncio.to_thread(database.start)
            assert await burst() == [200] * 10, how


# --- a database that stops answering ---------------------------------------------------


@pytest.mark.slow
async def test_a_database_that_stops_answering_is_a_503_soon_after_the_statement_timeout(
    database: Database,
) -> None:
    """Frozen, nothing fails and nothing ends by itself: our own timeouts must answer."""
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine)
    settings = replace(
        Settings.from_env(), rollup_interval_ms=0, pool_size=10, statement_timeout_ms=500
    )
    app = create_app(settings, database.url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def burst() -> list[httpx.Response]:
            return await asyncio.gather(
                *(
                    http.get(
                        "/v1/analytics/usage",
                        params={"organization_id": organization_id},
                        headers={"X-API-Key": key},
                    )
                    for _ in range(10)
                )
            )

        assert [r.status_code for r in await burst()] == [200] * 10
        with database.frozen():
            started = time.monotonic()
            # In-process, no client timeout applies: this one turns a hang into a failure.
            answers = await asyncio.wait_for(burst(), timeout=CLIENT_TIMEOUT_S)
            took = time.monotonic() - started
            assert [(r.status_code, r.json()) for r in answers] == [(503, UNAVAILABLE)] * 10
            assert all(int(r.headers["retry-after"]) > 0 for r in answers)
            # statement_timeout (0.5 s) + 1 s of grace, and not the 2 s more SQLAlchemy
            # would spend closing each connection politely.
            print(f"frozen database, statement_timeout 500 ms: 10 x 503 after {took:.2f} s")
            assert 1.5 <= took < 2.5, took
            assert (await http.get("/healthz")).status_code == 200
        # The connections that timed out were dropped, not put back into the pool.
        assert [r.status_code for r in await burst()] == [200] * 10


# --- which errors mean "the database is away" -----------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InterfaceError("cannot call fetch(): the underlying connection is closed"),
        # The server's error reached the connection, its close not yet.
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        PoolTimeoutError("QueuePool limit of size 10 overflow 10 reached"),
    ],
    ids=repr,
)  # fmt: skip
def test_errors_of_an_absent_database_are_unavailable(error: Exception) -> None:
    assert is_unavailable(error)
    # As SQLAlchemy wraps them once connected: the driver's error is `orig`, or its cause.
    assert is_unavailable(DBAPIError("SELECT 1", None, error))
    wrapper = Exception(str(error))
    wrapper.__cause__ = error
    assert is_unavailable(DBAPIError("SELECT 1", None, wrapper))


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.PostgresSyntaxError("syntax error at or near"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("a bug"),
        KeyError("a bug"),
    ],
    ids=repr,
)
def test_errors_of_a_wrong_request_or_a_bug_are_not_unavailable(error: Exception) -> None:
    assert not is_unavailable(error)
    assert not is_unavailable(DBAPIError("SELECT 1", None, error))


# --- statement timeout -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def locked(url: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """`table` locked ACCESS EXCLUSIVE by another session until the block ends."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def _waiting_on_locks(conn: asyncpg.Connection) -> int:
    # Inside a transaction, statistics views keep showing their first snapshot.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'usage-api' AND wait_event_type = 'Lock'"
    )
    return count


@pytest.mark.slow
async def test_a_statement_past_the_timeout_is_cut_and_answered_503(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine, write=True)
    settings = replace(Settings.from_env(), rollup_interval_ms=0, statement_timeout_ms=300)
    app = create_app(settings, database.url)
    batch = [event(organization_id, f"slow-{i}", quantity=i + 1) for i in range(50)]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"X-API-Key": key},
        ) as http,
    ):
        async with locked(database.url, "usage_events") as lock:
            started = time.monotonic()
            response = await http.post("/v1/usage/events", json={"events": batch})
            took = time.monotonic() - started
            assert (response.status_code, response.json()) == (503, UNAVAILABLE)
            assert int(response.headers["retry-after"]) > 0
            print(f"statement_timeout 300 ms: 503 after {took * 1000:.0f} ms")
            assert 0.3 <= took < 1.3, took  # the server's timeout, not our 1 s of grace
            # Cut by the server, not abandoned: no session of the service still waits.
            assert await _waiting_on_locks(lock) == 0
            # A range reads the log at its edges: cut too. All time reads only roll-ups.
            ranged = await http.get(
                "/v1/analytics/usage",
                params={"organization_id": organization_id, "start_date": "2026-02-10T12:30"},
            )
            assert (ranged.status_code, ranged.json()) == (503, UNAVAILABLE)
            all_time = await http.get(
                "/v1/analytics/usage", params={"organization_id": organization_id}
            )
            assert all_time.status_code == 200
            assert all_time.json()["usage"]["sms"] == {"outbound": 0, "inbound": 0, "total": 0}

        # Nothing of the batch was written, not even its deltas.
        async with connected(database.url) as engine, engine.connect() as conn:
            for table in ("usage_events", "usage_deltas", "usage_counters"):
                written = await conn.scalar(
                    text(f"SELECT count(*) FROM {table} WHERE organization_id = :o"),
                    {"o": organization_id},
                )
                assert written == 0, table

        response = await http.post("/v1/usage/events", json={"events": batch})
        assert response.json() == {
            "success": True,
            "accepted": 50,
            "duplicates": 0,
            "conflicts": [],
        }
    # A warning at most (the database is unavailable), never an unhandled error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- graceful shutdown -----------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_lets_requests_in_flight_finish(database: Database, servers: Servers) -> None:
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine, write=True)
    server = await servers.running()
    assert server.process is not None
    headers = {"X-API-Key": key}
    batches = [[event(organization_id, f"term-{b}-{i}") for i in range(20)] for b in range(4)]
    async with httpx.AsyncClient(
        base_url=server.base_url, trust_env=False, timeout=CLIENT_TIMEOUT_S, headers=headers
    ) as http:
        async with locked(database.url, "usage_events") as lock:
            posts = [
                asyncio.create_task(http.post("/v1/usage/events", json={"events": b}))
                for b in batches
            ]
            # Batches that arrive together are written together (ingest.Writer): at least
            # one statement waits at the lock, the batches not in it wait for a statement.
            deadline = time.monotonic() + 5
            while await _waiting_on_locks(lock) < 1:
                assert time.monotonic() < deadline, "the writes never reached the lock"
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert server.process.returncode is None  # still serving what it holds
            with pytest.raises(httpx.ConnectError):  # but takes nothing new
                await http.get("/healthz")
        # The lock is gone: the writes go through.
        responses = await asyncio.gather(*posts)
    for response in responses:
        assert response.json() == {
            "success": True,
            "accepted": 20,
            "duplicates": 0,
            "conflicts": [],
        }
    # It exits by itself once they are answered: by the signal it was sent, re-raised after
    # the graceful shutdown, as uvicorn does since 0.29 (encode/uvicorn#1600), so that a
    # supervisor sees "terminated by SIGTERM" (exit status 143 in a shell), not a crash.
    answered_at = time.monotonic()
    returncode = await asyncio.wait_for(server.process.wait(), timeout=10)
    print(
        f"SIGTERM with 4 writes in flight: 4 x 200, exit status {returncode}"
        f" {(time.monotonic() - answered_at) * 1000:.0f} ms after the last answer"
    )
    async with connected(database.url) as engine, engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT count(*) FROM usage_events WHERE organization_id = :o"),
            {"o": organization_id},
        )
    assert stored == 80
    assert returncode == -signal.SIGTERM, server.log()
    assert "unhandled error" not in server.log()
