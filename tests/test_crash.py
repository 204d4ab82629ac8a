"""A live server killed with SIGKILL in the middle of ingestion.

What was acknowledged is kept, exactly once; what was not is either wholly there (the
commit happened, the answer was lost) or wholly absent, never half a batch; retrying
everything that did not get a 200 then converges on exact counters.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization, make_user
from tests.support.oracle import api_totals, assert_snapshot_consistent, log_totals, sent_totals
from tests.support.servers import LiveServer, server_env
from usage_api.analytics import rollup

pytestmark = pytest.mark.slow

CLIENTS = 6
BATCHES_PER_CLIENT = 16
EVENTS_PER_BATCH = 100
# Kill once this many batches were acknowledged: well into the run, well before its end.
KILL_AFTER = CLIENTS * BATCHES_PER_CLIENT // 4


@pytest.fixture
async def server(database_url: str, tmp_path: Path) -> AsyncIterator[LiveServer]:
    server = LiveServer(server_env(database_url), tmp_path / "server.log")
    try:
        yield server
    finally:
        await server.stop(signal.SIGKILL)


async def _wait_for_dead_sessions(engine: AsyncEngine) -> None:
    """Let PostgreSQL notice the killed server's connections and end their transactions.

    A COMMIT already on the wire when the process died still commits; waiting until no
    other session of this database is inside a transaction makes "right after the kill"
    a stable state.
    """
    deadline = time.monotonic() + 10
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        while True:
            busy = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
                    " AND state <> 'idle'"
                )
            )
            if busy == 0:
                return
            assert time.monotonic() < deadline, "the killed server's sessions did not end"
            await asyncio.sleep(0.05)


async def _stored_ids(engine: AsyncEngine) -> set[tuple[str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT organization_id, id FROM usage_events"))
        return {(row.organization_id, row.id) for row in rows}


def _ids(batch: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(e["organization_id"], e["id"]) for e in batch}


async def test_a_server_killed_mid_ingestion_keeps_every_acknowledged_event_once(
    engine: AsyncEngine, server: LiveServer
) -> None:
    organizations = [await make_organization(engine, f"Org {i}") for i in range(2)]
    users = {
        o: [await make_user(engine, o, f"U{i}", f"u{i}@example.com") for i in range(2)]
        for o in organizations
    }
    targets = [(o, "") for o in organizations] + [(o, u) for o in organizations for u in users[o]]
    key = await make_key(engine, write=True)
    headers = {"X-API-Key": key}

    def make_batch(number: int) -> list[dict[str, Any]]:
        batch = []
        for i in range(EVENTS_PER_BATCH):
            organization_id = organizations[(number + i) % 2]
            batch.append(
                event(
                    organization_id,
                    f"b{number}-e{i}",
                    type=("sms", "mms", "voice")[i % 3],
                    direction=("outbound", "inbound")[number % 2],
                    quantity=1 + (number * 7 + i) % 50,
                    knowledge_base=(i % 2 == 0) if i % 3 == 2 else None,
                    user_id=[*users[organization_id], None][i % 3],
                    occurred_at=f"2026-02-{1 + number % 28:02}T{i % 24:02}:{number % 60:02}:00Z",
                )
            )
        return batch

    batches = [make_batch(n) for n in range(CLIENTS * BATCHES_PER_CLIENT)]
    acknowledged: set[int] = set()
    in_flight: set[int] = set()
    enough_acknowledged = asyncio.Event()

    # --- phase 1: clients post until the server dies under them --------------------------
    await server.start()

    async def client(numbers: list[int]) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            for number in numbers:
                in_flight.add(number)
                try:
                    response = await http.post(
                        "/v1/usage/events", json={"events": batches[number]}, headers=headers
                    )
                except httpx.TransportError:
                    return  # the server is gone; everything from here on is retried later
                finally:
                    in_flight.discard(number)
                assert response.status_code == 200, response.text
                assert response.json() == {
                    "success": True,
                    "accepted": EVENTS_PER_BATCH,
                    "duplicates": 0,
                    "conflicts": [],
                }
                acknowledged.add(number)
                if len(acknowledged) >= KILL_AFTER:
                    enough_acknowledged.set()

    async def killer() -> set[int]:
        await enough_acknowledged.wait()
        caught = set(in_flight)
        await server.stop(signal.SIGKILL)
        return caught

    kill = asyncio.create_task(killer())
    await asyncio.gather(*(client(list(range(c, len(batches), CLIENTS))) for c in range(CLIENTS)))
    caught_in_flight = await kill
    assert caught_in_flight, "no request was in flight when the server was killed"
    assert KILL_AFTER <= len(acknowledged) < len(batches)

    # --- right after the kill: every batch is all there or not there at all --------------
    await _wait_for_dead_sessions(engine)
    stored = await _stored_ids(engine)
    landed: set[int] = set()
    for number, batch in enumerate(batches):
        present = len(_ids(batch) & stored)
        assert present in (0, EVENTS_PER_BATCH), f"batch {number} is half-written: {present}"
        if present:
            landed.add(number)
    assert acknowledged <= landed
    assert landed - acknowledged <= caught_in_flight  # committed, but the answer was lost
    await assert_snapshot_consistent(engine)

    # --- phase 2: restart on the same database; retry what was not acknowledged ----------
    await server.start()
    retries = [n for n in range(len(batches)) if n not in acknowledged]
    resends = sorted(acknowledged)[::5]

    async def retry(numbers: list[int]) -> None:
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            for number in numbers:
                response = await http.post(
                    "/v1/usage/events", json={"events": batches[number]}, headers=headers
                )
                assert response.status_code == 200, response.text
                again = number in landed
                assert response.json() == {
                    "success": True,
                    "accepted": 0 if again else EVENTS_PER_BATCH,
                    "duplicates": EVENTS_PER_BATCH if again else 0,
                    "conflicts": [],
                }

    work = retries + resends
    await asyncio.gather(*(retry(work[c::CLIENTS]) for c in range(CLIENTS)))

    everything = [e for batch in batches for e in batch]
    expected = sent_totals(everything)
    assert await _stored_ids(engine) == _ids(everything)
    async with engine.connect() as conn:
        assert await log_totals(conn) == expected
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
        assert await api_totals(http, key, targets) == expected

    # The server's own folder ran all along (every 50 ms); after a clean stop, the deltas
    # its last interval did not reach fold here.
    await server.stop(signal.SIGTERM)
    await assert_snapshot_consistent(engine)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM usage_counters")) > 0
    await rollup.fold_all(engine)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM usage_deltas")) == 0
    await assert_snapshot_consistent(engine)
