"""Directory reads (contract 4): one partner, organization or user, and lists of them by
id in pages, always inside the key's scope (out of scope reads exactly as unknown)."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import make_key, make_organization, make_partner, make_user


async def get(client: httpx.AsyncClient, key: str, path: str, **params: str) -> httpx.Response:
    return await client.get(path, params=params, headers={"X-API-Key": key})


async def walk(
    client: httpx.AsyncClient, key: str, path: str, kinds: str, **params: str
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await get(client, key, path, **params, **({"cursor": cursor} if cursor else {}))
        assert response.status_code == 200, response.text
        body = response.json()
        assert list(body) == ["success", kinds, "next_cursor"]
        rows += body[kinds]
        cursor = body["next_cursor"]
        if cursor is None:
            return rows


async def test_one_of_each_reads_as_its_upsert_answers_it(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine, "Agency")
    organization_id = await make_organization(engine, "Acme", partner_id)
    user_id = await make_user(engine, organization_id, "Ann", "ann@example.com")
    admin = await make_key(engine, "admin")
    assert (await get(client, admin, f"/v1/partners/{partner_id}")).json() == {
        "success": True,
        "partner": {"id": partner_id, "name": "Agency"},
    }
    assert (await get(client, admin, f"/v1/organizations/{organization_id}")).json() == {
        "success": True,
        "organization": {"id": organization_id, "name": "Acme", "partner_id": partner_id},
    }
    assert (await get(client, admin, f"/v1/users/{user_id}")).json() == {
        "success": True,
        "user": {
            "id": user_id,
            "organization_id": organization_id,
            "name": "Ann",
            "email": "ann@example.com",
        },
    }


async def test_lists_page_by_id_and_stay_inside_the_scope(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine, "Agency")
    other_partner = await make_partner(engine, "Other")
    ours = [await make_organization(engine, f"O{i}", partner_id) for i in range(5)]
    theirs = [
        await make_organization(engine, "T", other_partner),
        await make_organization(engine, "N"),
    ]
    users = [await make_user(engine, ours[0], f"U{i}") for i in range(7)]
    foreign_user = await make_user(engine, theirs[0], "F")
    admin = await make_key(engine, "admin")
    partner_key = await make_key(engine, "partner", partner_id=partner_id)
    organization_key = await make_key(engine, "organization", organization_id=ours[0])

    everything = await walk(client, admin, "/v1/organizations", "organizations", limit="2")
    assert [o["id"] for o in everything] == sorted([*ours, *theirs])
    narrowed = await walk(
        client, admin, "/v1/organizations", "organizations", partner_id=partner_id, limit="3"
    )
    assert [o["id"] for o in narrowed] == sorted(ours)
    assert [
        o["id"]
        for o in await walk(client, partner_key, "/v1/organizations", "organizations", limit="1")
    ] == sorted(ours)
    assert [
        o["id"] for o in await walk(client, organization_key, "/v1/organizations", "organizations")
    ] == [ours[0]]
    assert [
        u["id"] for u in await walk(client, partner_key, "/v1/users", "users", limit="3")
    ] == sorted(users)
    assert [
        u["id"]
        for u in await walk(client, admin, "/v1/users", "users", organization_id=ours[0], limit="4")
    ] == sorted(users)

    # Out of scope reads exactly as unknown: one entity, or a list's filter.
    for kind, path, hidden_path, key in [
        ("partner", "/v1/partners/nope", f"/v1/partners/{other_partner}", partner_key),
        ("partner", "/v1/partners/nope", f"/v1/partners/{partner_id}", organization_key),
        ("organization", "/v1/organizations/nope", f"/v1/organizations/{theirs[0]}", partner_key),
        ("user", "/v1/users/nope", f"/v1/users/{foreign_user}", organization_key),
    ]:
        unknown = await get(client, admin, path)
        assert unknown.json() == {"success": False, "error": f"{kind} not found"}
        hidden = await get(client, key, hidden_path)
        assert (hidden.status_code, hidden.content) == (404, unknown.content)
    unknown = await get(client, admin, "/v1/organizations", partner_id="nope")
    hidden = await get(client, partner_key, "/v1/organizations", partner_id=other_partner)
    assert (hidden.status_code, hidden.content) == (404, unknown.content)
    unknown = await get(client, admin, "/v1/users", organization_id="nope")
    hidden = await get(client, organization_key, "/v1/users", organization_id=theirs[0])
    assert (hidden.status_code, hidden.content) == (404, unknown.content)

    # A cursor belongs to its list.
    cursor = (await get(client, admin, "/v1/organizations", limit="1")).json()["next_cursor"]
    refused = await get(client, admin, "/v1/organizations", partner_id=partner_id, cursor=cursor)
    assert (refused.status_code, refused.json()["error"]) == (
        400,
        "invalid cursor: pass back the next_cursor of the previous page",
    )
    for bad in ["0", "1001", "ten"]:
        response = await get(client, admin, "/v1/users", limit=bad)
        assert (response.status_code, response.json()["error"]) == (
            400,
            "invalid limit: an integer from 1 to 1000",
        )
