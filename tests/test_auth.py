"""API keys: their form and storage, rejection of dead keys, scopes and permissions.

The scope tests build one small world and read it through keys of every scope:

    partner P1 ── organization A ── user uA
    partner P2 ── organization B ── user uB
    (no partner)  organization C ── user uC

Whatever a key may not see must answer byte for byte like an id that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.dates import utc_now
from usage_api.db import transact
from usage_api.keys import create_key, revoke_key

USAGE = "/v1/analytics/usage"
ORGANIZATION_NOT_FOUND = b'{"success":false,"error":"organization not found"}'
START_DATE_MALFORMED = (
    b'{"success":false,"error":"start_date must be an ISO 8601 date or date-time,'
    b' e.g. 2026-02-10T00:00:00Z"}'
)
USER_NOT_FOUND = b'{"success":false,"error":"user not found"}'
INVALID_KEY = b'{"success":false,"error":"invalid API key"}'


async def new_key(engine: AsyncEngine, **options: Any) -> tuple[str, str]:
    """`(key_id, key)` of a new admin read key, or of the key `options` describe."""

    async def work(conn: Any) -> tuple[str, str]:
        return await create_key(conn, **{"scope": "admin", **options})

    return await transact(engine, work)


# Form and storage


async def test_key_has_prefix_and_at_least_128_random_bits(engine: AsyncEngine) -> None:
    _, key = await new_key(engine)
    _, other = await new_key(engine)
    assert re.fullmatch(r"usk_[A-Za-z0-9_-]+", key)
    # base64url carries 6 bits a character.
    assert (len(key) - len("usk_")) * 6 >= 128
    assert key != other


async def test_only_the_sha256_of_a_key_is_stored(engine: AsyncEngine) -> None:
    key_id, key = await new_key(engine, name="ops")
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM api_keys"))).mappings().one()
    assert row["id"] == key_id
    assert row["key_hash"] == hashlib.sha256(key.encode()).digest()
    for column, value in row.items():
        assert key not in str(value), column
        assert key.encode() not in (value if isinstance(value, bytes) else b""), column


async def test_key_is_not_logged(
    client: httpx.AsyncClient, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    key = await make_key(engine)
    with caplog.at_level(logging.DEBUG):
        await client.get(USAGE, params={"organization_id": "x"}, headers={"X-API-Key": key})
        await client.get(USAGE, params={"organization_id": "x"}, headers={"X-API-Key": key + "x"})
    # Both requests were logged (so the check below looks at something), neither key was.
    access = [r for r in caplog.records if r.name == "usage_api.access"]
    assert [(r.status, r.key_id is not None) for r in access] == [(404, True), (401, False)]
    assert key not in caplog.text


# Revoked and expired keys


async def test_revoked_and_expired_keys_are_rejected_like_unknown_ones(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    revoked_id, revoked = await new_key(engine)
    assert await transact(engine, revoke_key, revoked_id)
    _, expired = await new_key(engine, expires_at=utc_now() - timedelta(milliseconds=1))
    _, alive = await new_key(engine, expires_at=utc_now() + timedelta(hours=1))

    async def answer(key: str) -> tuple[int, bytes, str]:
        response = await client.get(
            USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
        )
        return response.status_code, response.content, response.headers["content-type"]

    unknown = await answer("usk_" + "A" * 43)
    assert unknown == (401, INVALID_KEY, "application/json")
    assert await answer(revoked) == unknown
    assert await answer(expired) == unknown
    assert (await answer(alive))[0] == 200


def whole(response: httpx.Response) -> tuple[int, bytes, list[tuple[str, str]]]:
    """Everything a client sees of an answer."""
    return response.status_code, response.content, response.headers.multi_items()


async def test_revoked_expired_and_unknown_keys_answer_byte_for_byte_alike(
    database_url: str, settings: Settings
) -> None:
    """Status, body and every header (the request id is the client's own here), whether
    the process met the key while it was live or not, before and after its next sync,
    and after the key ran past its rate limit: nothing tells a dead key from one that
    never existed, and neither is counted."""
    app = create_app(replace(settings, rate_limit=2, rate_limit_sync_ms=3_600_000), database_url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        engine: AsyncEngine = app.state.services.databases.primary
        organization_id = await make_organization(engine)

        async def answer(key: str) -> tuple[int, bytes, list[tuple[str, str]]]:
            response = await client.get(
                USAGE,
                params={"organization_id": organization_id},
                headers={"X-API-Key": key, "X-Request-ID": "same-for-all"},
            )
            return whole(response)

        async def unknown() -> tuple[int, bytes, list[tuple[str, str]]]:
            return await answer("usk_" + secrets.token_urlsafe(32))

        async def kill(revoked_id: str, expired_id: str) -> None:
            assert await transact(engine, revoke_key, revoked_id)
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE api_keys SET expires_at = now() - interval '1 ms' WHERE id = :id"),
                    {"id": expired_id},
                )

        never_existed = await unknown()
        assert never_existed[:2] == (401, INVALID_KEY)
        assert not any(name.startswith("ratelimit") for name, _ in never_existed[2])

        # Dead before this process ever met them.
        (revoked_id, revoked), (expired_id, expired) = await new_key(engine), await new_key(engine)
        await kill(revoked_id, expired_id)
        assert [await answer(revoked), await answer(expired)] == [never_existed] * 2

        # Met while live, then dead: before the next sync (the routes answer), and after
        # it (the rate limiter does).
        (revoked_id, revoked), (expired_id, expired) = await new_key(engine), await new_key(engine)
        assert [(await answer(key))[0] for key in (revoked, expired)] == [200, 200]
        await kill(revoked_id, expired_id)
        assert [await answer(revoked), await answer(expired)] == [never_existed] * 2
        await app.state.services.limiter.sync(engine)
        assert [await answer(revoked), await answer(expired)] == [never_existed] * 2
        assert await unknown() == never_existed

        # Past the limit (2), then dead: no 429 once the limiter knows.
        (revoked_id, revoked), (expired_id, expired) = await new_key(engine), await new_key(engine)
        for key in (revoked, expired):
            assert [(await answer(key))[0] for _ in range(3)] == [200, 200, 429]
        await kill(revoked_id, expired_id)
        await app.state.services.limiter.sync(engine)
        assert [await answer(revoked), await answer(expired)] == [never_existed] * 2

        # A key that expires on its own: from that instant, without waiting for a sync.
        _, expiring = await new_key(engine, expires_at=utc_now() + timedelta(seconds=1))
        assert [(await answer(expiring))[0] for _ in range(3)] == [200, 200, 429]
        await asyncio.sleep(1.1)
        assert await answer(expiring) == never_existed

        # None of the dead keys' requests is in the shared counts.
        await app.state.services.limiter.sync(engine)
        async with engine.connect() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM api_key_windows")) == 0


async def test_revoking_twice_keeps_the_first_revocation(engine: AsyncEngine) -> None:
    key_id, _ = await new_key(engine)
    assert await transact(engine, revoke_key, key_id)
    async with engine.connect() as conn:
        first = await conn.scalar(text("SELECT revoked_at FROM api_keys"))
    assert await transact(engine, revoke_key, key_id)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT revoked_at FROM api_keys")) == first
    assert not await transact(engine, revoke_key, "no-such-key")


# Scopes


@dataclass
class World:
    ids: dict[str, str]
    keys: dict[str, str]


@pytest.fixture
async def world(engine: AsyncEngine) -> World:
    p1, p2 = await make_partner(engine, "P1"), await make_partner(engine, "P2")
    ids = {"P1": p1, "P2": p2}
    for org, partner in (("A", p1), ("B", p2), ("C", None)):
        ids[org] = await make_organization(engine, org, partner)
        ids["u" + org] = await make_user(engine, ids[org], "u" + org)
    keys = {
        "admin": await make_key(engine),
        "partner P1": await make_key(engine, "partner", partner_id=p1),
        "organization A": await make_key(engine, "organization", organization_id=ids["A"]),
    }
    return World(ids, keys)


# (key, query, visible): a query names organizations and users of the world.
SCOPES = [
    ("admin", {"organization_id": "A"}, True),
    ("admin", {"organization_id": "B"}, True),
    ("admin", {"organization_id": "C"}, True),
    ("admin", {"user_id": "uB"}, True),
    ("admin", {"user_id": "uC"}, True),
    ("admin", {"user_id": "uB", "organization_id": "B"}, True),
    ("admin", {"user_id": "uB", "organization_id": "A"}, False),
    ("partner P1", {"organization_id": "A"}, True),
    ("partner P1", {"organization_id": "B"}, False),
    ("partner P1", {"organization_id": "C"}, False),
    ("partner P1", {"user_id": "uA"}, True),
    ("partner P1", {"user_id": "uB"}, False),
    ("partner P1", {"user_id": "uC"}, False),
    ("partner P1", {"user_id": "uA", "organization_id": "A"}, True),
    ("partner P1", {"user_id": "uB", "organization_id": "B"}, False),
    ("partner P1", {"user_id": "uB", "organization_id": "A"}, False),
    ("partner P1", {"user_id": "uA", "organization_id": "B"}, False),
    ("organization A", {"organization_id": "A"}, True),
    ("organization A", {"organization_id": "B"}, False),
    ("organization A", {"organization_id": "C"}, False),
    ("organization A", {"user_id": "uA"}, True),
    ("organization A", {"user_id": "uB"}, False),
    ("organization A", {"user_id": "uC"}, False),
    ("organization A", {"user_id": "uA", "organization_id": "A"}, True),
    ("organization A", {"user_id": "uC", "organization_id": "C"}, False),
    ("organization A", {"user_id": "uA", "organization_id": "C"}, False),
]


def _comparable(headers: httpx.Headers) -> dict[str, str]:
    """All headers but `RateLimit`: the key's requests left, one fewer on the second answer."""
    return {name: value for name, value in headers.items() if name != "ratelimit"}


async def test_scope_decides_what_a_key_sees(client: httpx.AsyncClient, world: World) -> None:
    """Out of scope answers byte for byte like an id that does not exist."""
    seen: dict[tuple[str, ...], tuple[Any, ...]] = {}
    expected: dict[tuple[str, ...], tuple[Any, ...]] = {}
    for key, query, visible in SCOPES:
        case = (key, *query.values())
        # The same request id for both, so that the whole answers can be compared.
        headers = {"X-API-Key": world.keys[key], "X-Request-ID": "scope-check"}
        params = {name: world.ids[value] for name, value in query.items()}
        response = await client.get(USAGE, params=params, headers=headers)
        if visible:
            usage = response.json().get("usage", {})
            name = usage.get("user_name", usage.get("organization_name"))
            seen[case] = (response.status_code, name)
            expected[case] = (200, query.get("user_id") or query["organization_id"])
        else:
            unknown = {name: "no-such-id" for name in query}
            truth = await client.get(USAGE, params=unknown, headers=headers)
            seen[case] = (response.status_code, response.content, _comparable(response.headers))
            expected[case] = (truth.status_code, truth.content, _comparable(truth.headers))
            assert truth.content == (
                USER_NOT_FOUND if "user_id" in query else ORGANIZATION_NOT_FOUND
            )
    assert seen == expected


async def test_out_of_scope_dates_are_still_checked_first(
    client: httpx.AsyncClient, world: World
) -> None:
    """Checking dates before the lookup means a bad date says nothing about the id either."""
    answers = [
        await client.get(
            USAGE,
            params={"organization_id": organization_id, "start_date": "x"},
            headers={"X-API-Key": world.keys["partner P1"]},
        )
        for organization_id in (world.ids["B"], "no-such-organization")
    ]
    out_of_scope, unknown = ((r.status_code, r.content) for r in answers)
    assert out_of_scope == unknown == (400, START_DATE_MALFORMED)


# Permissions: read keys read, write keys also write.

WRITES = [
    ("POST", "/v1/usage/events", lambda ids: {"events": [event(ids["A"])]}, 200),
    ("PUT", "/v1/partners/P3", lambda ids: {"name": "P3"}, 201),
    ("PUT", "/v1/organizations/D", lambda ids: {"name": "D"}, 201),
    (
        "PUT",
        "/v1/users/uA2",
        lambda ids: {"organization_id": ids["A"], "name": "n", "email": "n@example.com"},
        201,
    ),
]


@pytest.mark.parametrize(("method", "path", "body", "created"), WRITES)
async def test_write_routes_need_a_write_key(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    world: World,
    method: str,
    path: str,
    body: Any,
    created: int,
) -> None:
    read, write = await make_key(engine), await make_key(engine, write=True)
    response = await client.request(method, path, json=body(world.ids), headers={"X-API-Key": read})
    assert (response.status_code, response.json()) == (
        403,
        {"success": False, "error": "API key does not have write permission"},
    )
    response = await client.request(
        method, path, json=body(world.ids), headers={"X-API-Key": write}
    )
    assert response.status_code == created


async def test_write_key_also_reads(
    client: httpx.AsyncClient, world: World, engine: AsyncEngine
) -> None:
    key = await make_key(engine, "organization", organization_id=world.ids["A"], write=True)
    response = await client.get(
        USAGE, params={"organization_id": world.ids["A"]}, headers={"X-API-Key": key}
    )
    assert (response.status_code, response.json()["usage"]["organization_id"]) == (
        200,
        world.ids["A"],
    )


@pytest.mark.parametrize("target", ["B", "C", "no-such-organization"])
async def test_write_key_cannot_ingest_outside_its_scope(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World, target: str
) -> None:
    key = await make_key(engine, "partner", partner_id=world.ids["P1"], write=True)
    organization_id = world.ids.get(target, target)
    response = await client.post(
        "/v1/usage/events",
        json={"events": [event(world.ids["A"]), event(organization_id)]},
        headers={"X-API-Key": key},
    )
    assert (response.status_code, response.json()) == (
        400,
        {
            "success": False,
            "error": "invalid events",
            "details": [
                {"index": 1, "field": "organization_id", "error": "organization not found"}
            ],
        },
    )


async def test_write_key_cannot_ingest_for_a_user_outside_its_scope(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    key = await make_key(engine, "organization", organization_id=world.ids["A"], write=True)
    for user_id in (world.ids["uB"], "no-such-user"):
        response = await client.post(
            "/v1/usage/events",
            json={"events": [event(world.ids["A"], user_id=user_id)]},
            headers={"X-API-Key": key},
        )
        assert (response.status_code, response.json()) == (
            400,
            {
                "success": False,
                "error": "invalid events",
                "details": [{"index": 0, "field": "user_id", "error": "user not found"}],
            },
        )
