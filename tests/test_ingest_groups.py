"""Batches written together: requests that arrive while every ingestion statement of a
process is in flight wait, then go in one statement (`ingest.Writer`).

Each request keeps its own answer, its own all-or-nothing and its own key's scope; one
request's failure is not its neighbours'. A statement is held open here by a lock on
`usage_deltas` taken from another connection, so that the requests after it queue up.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import error, ingest_answer
from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from usage_api.analytics.rollup import fold_all
from usage_api.app import create_app
from usage_api.config import Settings

URL = "/v1/usage/events"


@pytest.fixture
async def app(database_url: str, settings: Settings) -> AsyncIterator[FastAPI]:
    """The app with one ingestion statement at a time."""
    app = create_app(replace(settings, write_statements=1), database_url)
    async with app.router.lifespan_context(app):
        yield app


def post(client: httpx.AsyncClient, key: str, events: list[Any]) -> Awaitable[httpx.Response]:
    return client.post(URL, json={"events": events}, headers={"X-API-Key": key})


async def written_together(
    app: FastAPI,
    engine: AsyncEngine,
    first: Callable[[], Awaitable[httpx.Response]],
    *queued: Callable[[], Awaitable[httpx.Response]],
) -> tuple[httpx.Response, list[httpx.Response]]:
    """`first` sent while `usage_deltas` is locked (its statement waits), then `queued`;
    the lock is let go once every one of those waits for the statement."""
    writer = app.state.services.writer
    async with engine.connect() as blocker:
        await blocker.execute(text("LOCK TABLE usage_deltas IN SHARE MODE"))
        holder = await blocker.scalar(text("SELECT pg_backend_pid()"))
        head = asyncio.ensure_future(first())
        await _until(lambda: _waits_for(engine, holder))
        rest = [asyncio.ensure_future(send()) for send in queued]

        async def all_queued() -> bool:
            # Answered without a write is queued no more: an unknown key is the rate
            # limiter's 401.
            return writer.waiting == sum(not request.done() for request in rest)

        await _until(all_queued)
        await blocker.rollback()
    return await head, list(await asyncio.gather(*rest))


async def _until(condition: Callable[[], Awaitable[bool]], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not await condition():  # noqa: ASYNC110 (a state of the database, no event)
            await asyncio.sleep(0.01)


async def _waits_for(engine: AsyncEngine, holder: int) -> bool:
    """Whether a statement waits for a lock that backend `holder` holds."""
    async with engine.connect() as conn:
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE :holder = ANY(pg_blocking_pids(pid))"
            ),
            {"holder": holder},
        )
    return bool(waiting)


async def transactions_of(engine: AsyncEngine, ids: list[str]) -> int:
    """How many transactions inserted the events with `ids`."""
    async with engine.connect() as conn:
        found = await conn.scalar(
            text("SELECT count(DISTINCT xmin::text) FROM usage_events WHERE id = ANY(:ids)"),
            {"ids": ids},
        )
    return int(found or 0)


async def test_each_request_of_a_shared_statement_gets_its_own_answer(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner = await make_partner(engine, "Mine")
    org = await make_organization(engine, "Acme", partner_id=partner)
    other = await make_organization(engine, "Other")
    user = await make_user(engine, org, "John", "john@example.com")
    stranger = await make_user(engine, other, "Jane", "jane@example.com")
    admin = await make_key(engine, write=True)
    partner_key = await make_key(engine, "partner", partner_id=partner, write=True)
    read_key = await make_key(engine)
    stored = event(org, "stored", quantity=7)
    assert (await post(client, admin, [stored])).json() == ingest_answer(1)

    head, answers = await written_together(
        app,
        engine,
        lambda: post(client, admin, [event(org, "head", quantity=1)]),
        # Accepted whole, one with a user.
        lambda: post(client, admin, [event(org, "a1", quantity=2), event(org, "a2", user_id=user)]),
        # A retry, a conflict and a new event.
        lambda: post(
            client, admin, [stored, {**stored, "segments": 8}, event(org, "b1", quantity=3)]
        ),
        # Unknown targets: nothing of these is written, the others' are.
        lambda: post(client, admin, [event(org, "c1"), event("no-such-org", "c2")]),
        lambda: post(client, admin, [event(org, "d1"), event(org, "d2", user_id=stranger)]),
        # Within its key's scope, and outside it.
        lambda: post(client, partner_key, [event(org, "e1", quantity=4)]),
        lambda: post(client, partner_key, [event(other, "f1")]),
        # Keys that may not write.
        lambda: post(client, read_key, [event(org, "g1")]),
        lambda: post(client, "usk_not-a-key", [event(org, "h1")]),
        # The same new event in two requests: the first sent gets it, the other is a retry.
        lambda: post(client, admin, [event(org, "twice", quantity=5)]),
        lambda: post(client, partner_key, [event(org, "twice", quantity=5)]),
    )

    assert (head.status_code, head.json()) == (200, ingest_answer(1))
    assert [(answer.status_code, answer.json()) for answer in answers] == [
        (200, ingest_answer(2)),
        (200, ingest_answer(1, duplicates=1, conflicts=["stored"])),
        (400, invalid(1, "organization_id", "organization not found")),
        (400, invalid(1, "user_id", "user not found")),
        (200, ingest_answer(1)),
        (400, invalid(0, "organization_id", "organization not found")),
        (403, error("API key does not have write permission")),
        (401, error("invalid API key")),
        (200, ingest_answer(1)),
        (200, ingest_answer(0, duplicates=1)),
    ]
    # The queued requests were one statement, the held one another.
    assert await transactions_of(engine, ["a1", "a2", "b1", "e1", "twice"]) == 1
    assert await transactions_of(engine, ["head", "a1"]) == 2
    async with engine.connect() as conn:
        ids = (await conn.scalars(text("SELECT id FROM usage_events ORDER BY id"))).all()
    assert ids == ["a1", "a2", "b1", "e1", "head", "stored", "twice"]

    await fold_all(engine)
    usage = (
        await client.get(
            "/v1/analytics/usage", params={"organization_id": org}, headers={"X-API-Key": admin}
        )
    ).json()["usage"]
    assert usage["sms"] == {"outbound": 7 + 1 + 2 + 1 + 3 + 4 + 5, "inbound": 0, "total": 23}
    user_usage = (
        await client.get(
            "/v1/analytics/usage", params={"user_id": user}, headers={"X-API-Key": admin}
        )
    ).json()["usage"]
    assert user_usage["sms"]["outbound"] == 1


async def test_a_request_that_fails_its_statement_fails_alone(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    org = await make_organization(engine, "Acme")
    key = await make_key(engine, write=True)
    # An event the database refuses though it is valid: the rarest of failures, a 500.
    async with engine.begin() as conn:
        await conn.execute(
            text("ALTER TABLE usage_events ADD CONSTRAINT poison CHECK (id <> 'poison')")
        )
    try:
        _, answers = await written_together(
            app,
            engine,
            lambda: post(client, key, [event(org, "head")]),
            lambda: post(client, key, [event(org, "before")]),
            lambda: post(client, key, [event(org, "poison")]),
            lambda: post(client, key, [event(org, "after")]),
        )
    finally:
        async with engine.begin() as conn:
            await conn.execute(text("ALTER TABLE usage_events DROP CONSTRAINT poison"))

    assert [(answer.status_code, answer.json()) for answer in answers] == [
        (200, ingest_answer(1)),
        (500, error("internal error")),
        (200, ingest_answer(1)),
    ]
    async with engine.connect() as conn:
        ids = (await conn.scalars(text("SELECT id FROM usage_events ORDER BY id"))).all()
        deltas = await conn.scalar(text("SELECT count(*) FROM usage_deltas"))
    assert (ids, deltas) == (["after", "before", "head"], 3)


async def test_no_more_than_1000_events_go_in_one_statement(
    app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    org = await make_organization(engine, "Acme")
    key = await make_key(engine, write=True)

    def batch(name: str, size: int) -> Callable[[], Awaitable[httpx.Response]]:
        return lambda: post(client, key, [event(org, f"{name}-{i}") for i in range(size)])

    _, answers = await written_together(
        app, engine, batch("head", 1), batch("a", 600), batch("b", 400), batch("c", 1)
    )

    assert [answer.json() for answer in answers] == [
        ingest_answer(600),
        ingest_answer(400),
        ingest_answer(1),
    ]
    assert await transactions_of(engine, ["a-0", "b-0"]) == 1
    assert await transactions_of(engine, ["a-0", "c-0"]) == 2


def invalid(index: int, field: str, message: str) -> dict[str, Any]:
    return {
        "success": False,
        "error": "invalid events",
        "details": [{"index": index, "field": field, "error": message}],
    }
