"""Counters and the log never disagree: under concurrent writers, retries and folds, and
when a fold dies half-way.

"The log" is `usage_events`, summed here by brute force, independently of the service's
own SQL. The roll-ups (`usage_counters`, `usage_hourly`, `usage_daily`) plus the deltas
not yet folded must equal it in every snapshot, and the API must answer the same.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.support.factories import ADMIN, event, make_key, make_organization, make_user
from tests.support.oracle import (
    ZERO,
    Key,
    Metrics,
    api_totals,
    assert_snapshot_consistent,
    log_totals,
    sent_totals,
)
from usage_api.analytics import rollup
from usage_api.config import Settings
from usage_api.dates import utc_now
from usage_api.db import create_engine, transact
from usage_api.ingest import ingest, parse_events


async def count(engine: AsyncEngine, table: str) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text(f"SELECT count(*) FROM {table}")) or 0)


def random_event(
    rng: random.Random, organization_id: str, users: list[str], n: int
) -> dict[str, Any]:
    """An event somewhere in the last ten days, so that it spans many hours and days."""
    at = utc_now() - timedelta(
        seconds=rng.randrange(10 * 24 * 3600), microseconds=rng.randrange(10**6)
    )
    type_ = rng.choice(["sms", "sms", "mms", "voice"])
    return event(
        organization_id,
        f"ev-{n}:{rng.randrange(10**9)}",
        type=type_,
        direction=rng.choice(["outbound", "inbound"]),
        quantity=rng.randrange(0 if type_ == "voice" else 1, 400),
        knowledge_base=rng.choice([None, False, True]) if type_ == "voice" else None,
        user_id=rng.choice([*users, None]),
        occurred_at=at.isoformat().replace("+00:00", "Z"),
    )


# --- many writers, retries and folds at once ------------------------------------------

WRITERS = 8
ROUNDS = 4
BATCHES_PER_ROUND = 4


@pytest.mark.slow
async def test_concurrent_writers_retries_and_folds_keep_counters_equal_to_the_log(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(20260210)
    organizations = [await make_organization(engine, f"Org {i}") for i in range(3)]
    users = {
        o: [await make_user(engine, o, f"User {i}", f"u{i}@example.com") for i in range(3)]
        for o in organizations
    }
    targets = [(o, "") for o in organizations] + [(o, u) for o in organizations for u in users[o]]
    key = await make_key(engine, write=True)
    universe = [random_event(rng, o, users[o], n) for o in organizations for n in range(300)]
    rng.shuffle(universe)
    sent: list[dict[str, Any]] = []  # every event of every batch that got a 200
    batches: list[list[dict[str, Any]]] = []  # every batch sent, for exact retries
    accepted = 0
    stop = asyncio.Event()
    checks = {"snapshots": 0, "reads": 0, "folded": 0}

    async def writer(client: httpx.AsyncClient, round_: int, seed: int) -> None:
        nonlocal accepted
        rng = random.Random(seed)
        # Each round brings new events, and old ones again.
        known = universe[: len(universe) * (round_ + 1) // ROUNDS]
        for _ in range(BATCHES_PER_ROUND):
            if batches and rng.random() < 0.25:
                batch = rng.choice(batches)  # an exact retry of an earlier batch
            else:
                # Sampled from one shared universe: other writers send the same ids.
                batch = rng.sample(known, rng.randrange(1, 120))
                if rng.random() < 0.2:
                    batch.append(batch[0])  # the same event twice in one batch
                batches.append(batch)
            response = await client.post(
                "/v1/usage/events", json={"events": batch}, headers={"X-API-Key": key}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["conflicts"] == []
            assert body["accepted"] + body["duplicates"] == len(batch)
            accepted += body["accepted"]
            sent.extend(batch)

    async def folder() -> None:
        while not stop.is_set():
            # Small folds: many fold transactions interleave with the writers.
            checks["folded"] += await rollup.fold_all(engine, limit=rng.randrange(1, 40))
            await asyncio.sleep(0.002)

    async def snapshot_checker() -> None:
        while not stop.is_set():
            await assert_snapshot_consistent(engine)
            checks["snapshots"] += 1
            await asyncio.sleep(0.03)

    async def monotonic_reader() -> None:
        """Counters only grow: a fold never makes a read drop or jump back."""
        last: dict[Key, Metrics] = {}
        while not stop.is_set():
            now = await api_totals(client, key, targets)
            for target, metrics in now.items():
                before = last.get(target, ZERO)
                assert all(a >= b for a, b in zip(metrics, before, strict=True)), target
            last = now
            checks["reads"] += 1

    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        for _ in range(WRITERS)
    ]
    background = [
        asyncio.create_task(task()) for task in (folder, snapshot_checker, monotonic_reader)
    ]
    try:
        for round_ in range(ROUNDS):
            await asyncio.gather(
                *(writer(c, round_, round_ * WRITERS + i) for i, c in enumerate(clients))
            )
            # Writers are quiet (folds are not): the API, the log and what was sent agree.
            expected = sent_totals(sent)
            async with engine.connect() as conn:
                assert await log_totals(conn) == expected
            assert await api_totals(client, key, targets) == expected
            assert accepted == len({(e["organization_id"], e["id"]) for e in sent})
    finally:
        stop.set()
        await asyncio.gather(*background)
        for c in clients:
            await c.aclose()

    assert checks["snapshots"] > 0 and checks["reads"] > 0 and checks["folded"] > 0
    expected = sent_totals(sent)
    assert accepted == await count(engine, "usage_events")
    await rollup.fold_all(engine)
    assert await count(engine, "usage_deltas") == 0
    await assert_snapshot_consistent(engine)
    assert await api_totals(client, key, targets) == expected
    # Ranges read the hourly and daily roll-ups: a range over everything is all time too.
    everything = {"start_date": "2000-01-01", "end_date": "2100-01-01"}
    assert await api_totals(client, key, targets, **everything) == expected


async def test_writers_racing_on_one_id_apply_it_exactly_once(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    key = await make_key(engine, write=True)
    quantities = [1, 2, 3] * 4
    clients = [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
        for _ in quantities
    ]
    try:
        for round_ in range(5):
            event_id = f"contested-{round_}"
            responses = await asyncio.gather(
                *(
                    c.post(
                        "/v1/usage/events",
                        json={"events": [event(organization_id, event_id, quantity=q)]},
                        headers={"X-API-Key": key},
                    )
                    for c, q in zip(clients, quantities, strict=True)
                )
            )
            async with engine.connect() as conn:
                kept = await conn.scalar(
                    text("SELECT segments FROM usage_events WHERE id = :id"), {"id": event_id}
                )
            answers = [r.json() for r in responses]
            winners = [q for q, a in zip(quantities, answers, strict=True) if a["accepted"]]
            assert winners == [kept]
            for q, answer in zip(quantities, answers, strict=True):
                if answer["accepted"]:
                    continue
                assert answer == {
                    "success": True,
                    "accepted": 0,
                    "duplicates": 1 if q == kept else 0,
                    "conflicts": [] if q == kept else [event_id],
                }
    finally:
        for c in clients:
            await c.aclose()
    await assert_snapshot_consistent(engine)
    async with engine.connect() as conn:
        log = await log_totals(conn)
    assert await api_totals(client, key, [(organization_id, "")]) == log


# --- folds that die, and folds that meet ----------------------------------------------


async def _ingest_some(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> tuple[str, list[Key], dict[Key, Metrics]]:
    rng = random.Random(7)
    organization_id = await make_organization(engine)
    users = [
        await make_user(engine, organization_id, f"U{i}", f"u{i}@example.com") for i in range(2)
    ]
    key = await make_key(engine, write=True)
    events = [random_event(rng, organization_id, users, n) for n in range(200)]
    for start in range(0, len(events), 50):
        response = await client.post(
            "/v1/usage/events",
            json={"events": events[start : start + 50]},
            headers={"X-API-Key": key},
        )
        assert response.json()["accepted"] == 50
    targets = [(organization_id, ""), *((organization_id, u) for u in users)]
    return key, targets, sent_totals(events)


async def _tables(engine: AsyncEngine) -> dict[str, list[Any]]:
    """Every row of the deltas and roll-ups, to show a rolled-back fold left no trace."""
    state = {}
    async with engine.connect() as conn:
        for table in ("usage_deltas", "usage_counters", "usage_hourly", "usage_daily"):
            rows = await conn.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2, 3"))
            state[table] = [tuple(row) for row in rows]
    return state


async def test_a_fold_rolled_back_changes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key, targets, expected = await _ingest_some(client, engine)
    before = await _tables(engine)
    assert len(before["usage_deltas"]) > 0 and before["usage_counters"] == []

    async with engine.connect() as conn:
        transaction = await conn.begin()
        assert await rollup.fold(conn) == len(before["usage_deltas"])
        assert await conn.scalar(text("SELECT count(*) FROM usage_deltas")) == 0
        await transaction.rollback()  # as if the process died before COMMIT

    assert await _tables(engine) == before
    assert await api_totals(client, key, targets) == expected
    assert await rollup.fold_all(engine) == len(before["usage_deltas"])
    assert await count(engine, "usage_deltas") == 0
    await assert_snapshot_consistent(engine)
    assert await api_totals(client, key, targets) == expected


async def test_a_folder_whose_connection_dies_leaves_no_trace_and_no_lock(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key, targets, expected = await _ingest_some(client, engine)
    before = await _tables(engine)

    with pytest.raises(DBAPIError):
        async with engine.connect() as conn:
            transaction = await conn.begin()
            pid = await conn.scalar(text("SELECT pg_backend_pid()"))
            assert await rollup.fold(conn) == len(before["usage_deltas"])
            async with engine.connect() as killer:
                await killer.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            await transaction.commit()

    assert await _tables(engine) == before
    assert await api_totals(client, key, targets) == expected
    # The advisory lock went with the session: the next fold runs.
    assert await rollup.fold_all(engine) == len(before["usage_deltas"])
    await assert_snapshot_consistent(engine)
    assert await api_totals(client, key, targets) == expected


async def test_a_second_fold_stands_aside_while_one_runs(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key, targets, expected = await _ingest_some(client, engine)
    deltas = await count(engine, "usage_deltas")

    async with engine.connect() as first, engine.connect() as second:
        first_transaction = await first.begin()
        assert await rollup.fold(first, limit=10) == 10
        second_transaction = await second.begin()
        assert await rollup.fold(second) is None
        assert await rollup.fold_all(engine) == 0
        await first_transaction.commit()
        # Its turn now, in the same transaction: it sees what the first one folded (each
        # fold statement takes its snapshot after the lock) and takes only the rest.
        assert await rollup.fold(second) == deltas - 10
        await second_transaction.rollback()

    assert await count(engine, "usage_deltas") == deltas - 10
    await assert_snapshot_consistent(engine)
    assert await rollup.fold_all(engine) == deltas - 10
    assert await rollup.fold_all(engine) == 0
    await assert_snapshot_consistent(engine)
    assert await api_totals(client, key, targets) == expected


async def test_folds_racing_each_other_apply_every_delta_once(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key, targets, expected = await _ingest_some(client, engine)
    deltas = await count(engine, "usage_deltas")

    folded = await asyncio.gather(*(rollup.fold_all(engine, limit=3) for _ in range(6)))

    assert sum(folded) + await rollup.fold_all(engine) == deltas
    await assert_snapshot_consistent(engine)
    assert await api_totals(client, key, targets) == expected


async def test_a_fold_leaves_a_batch_still_being_written_for_later(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key, targets, expected = await _ingest_some(client, engine)
    organization_id, user_id = targets[1]
    batch = [
        event(organization_id, "late-1", quantity=5, user_id=user_id),
        event(organization_id, "late-2", type="voice", quantity=30, knowledge_base=True),
    ]

    async with engine.connect() as writer:
        transaction = await writer.begin()
        assert (await ingest(writer, ADMIN, parse_events(batch))).accepted == 2
        await rollup.fold_all(engine)
        await assert_snapshot_consistent(engine)
        assert await api_totals(client, key, targets) == expected
        await transaction.commit()

    assert await count(engine, "usage_deltas") == 1 + 1  # one per (user, hour) of the batch
    assert await rollup.fold_all(engine) == 2
    await assert_snapshot_consistent(engine)
    async with engine.connect() as conn:
        log = await log_totals(conn)
    assert log[organization_id, ""][0] == expected[organization_id, ""][0] + 5
    assert log[organization_id, ""][5] == expected[organization_id, ""][5] + 30
    assert await api_totals(client, key, targets) == log


async def test_a_fold_during_a_long_ingest_transaction_is_exact(engine: AsyncEngine) -> None:
    """Writers and the folder never wait on each other: they touch different rows."""
    organization_id = await make_organization(engine)
    events = [event(organization_id, f"e{i}", quantity=1) for i in range(100)]

    async def write(conn: AsyncConnection) -> int:
        result = await ingest(conn, ADMIN, parse_events(events))
        # While this transaction is open, a fold elsewhere completes without waiting.
        await asyncio.wait_for(rollup.fold_all(engine), timeout=2)
        return result.accepted

    assert await transact(engine, write) == 100
    await rollup.fold_all(engine)
    await assert_snapshot_consistent(engine)


async def test_a_fold_is_not_cut_short_by_the_timeouts_of_requests(
    engine: AsyncEngine, database_url: str, settings: Settings
) -> None:
    """Folding is background work: a fold may run longer than any request and still
    complete, cut neither by the server's statement_timeout nor by the client's own."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO usage_deltas (organization_id, user_id, hour_at, sms_outbound)"
                " SELECT 'o' || n % 100, 'u' || n,"
                " timestamptz '2026-01-01' + n * interval '1 hour', 1"
                " FROM generate_series(1, 3000) AS n"
            )
        )
        await conn.execute(
            text("INSERT INTO usage_counters (organization_id, user_id) VALUES ('o1', '')")
        )
    # Requests give up after 200 ms on the server and 1.2 s on the client; the fold
    # waits 2 s for a counter row another transaction holds.
    hurried = create_engine(replace(settings, statement_timeout_ms=200), database_url)
    try:
        async with engine.connect() as holder:
            await holder.execute(
                text("SELECT 1 FROM usage_counters WHERE organization_id = 'o1' FOR UPDATE")
            )
            folding = asyncio.create_task(rollup.fold_all(hurried, limit=3000))
            await asyncio.sleep(2.0)
            assert not folding.done()
            await holder.commit()
        assert await folding == 3000
    finally:
        await hurried.dispose()
    async with engine.connect() as conn:
        organizations = text("SELECT sum(sms_outbound) FROM usage_counters WHERE user_id = ''")
        assert await conn.scalar(organizations) == 3000
    assert await count(engine, "usage_deltas") == 0
