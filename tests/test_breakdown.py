"""`GET /v1/analytics/usage/breakdown` (contract 6): every member, zeros included, rows that
add up to the parent's total, sorted and paged by an opaque cursor bound to its query."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from tests.test_series import metrics_json, post_events
from usage_api.analytics import rollup

URL = "/v1/analytics/usage/breakdown"
SORTS = [
    "id",
    "name",
    "sms.outbound",
    "sms.total",
    "mms.inbound",
    "voice.total_seconds",
    "voice.kb_seconds",
]


def metric_of(row: dict[str, Any], path: str) -> Any:
    group, name = path.split(".")
    return row[group][name]


async def walk(client: httpx.AsyncClient, key: str, **params: str) -> list[dict[str, Any]]:
    """Every page to the end; each page's totals are the parent's."""
    rows: list[dict[str, Any]] = []
    cursor = None
    parent = None
    while True:
        asked = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(URL, params=asked, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        breakdown = response.json()["breakdown"]
        head = {k: breakdown[k] for k in ("sms", "mms", "voice")}
        assert parent is None or head == parent
        parent = head
        rows += breakdown["rows"]
        cursor = breakdown["next_cursor"]
        if cursor is None:
            return rows


def total_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    values = [0] * 6
    for row in rows:
        s, m, v = row["sms"], row["mms"], row["voice"]
        for i, x in enumerate(
            [
                s["outbound"],
                s["inbound"],
                m["outbound"],
                m["inbound"],
                v["seconds"],
                v["kb_seconds"],
            ]
        ):
            values[i] += x
    return metrics_json(values)


async def test_an_organizations_users_are_all_listed_and_add_up(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(6)
    organization_id = await make_organization(engine, "Acme")
    users = [
        await make_user(engine, organization_id, f"User {i % 4}", f"u{i}@example.com")
        for i in range(13)
    ]
    key = await make_key(engine, "admin", write=True)
    bodies = []
    for _ in range(300):
        user = rng.choice([None, *users[:9]])  # four users never use anything
        kind = rng.choice(["sms", "mms", "voice"])
        bodies.append(
            event(
                organization_id,
                type=kind,
                quantity=rng.randint(1, 5),
                direction=rng.choice(["outbound", "inbound"]),
                user_id=user,
                knowledge_base=rng.random() < 0.5 if kind == "voice" else None,
                occurred_at=f"2026-03-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:17:00Z",
            )
        )
    await post_events(client, key, bodies[:150])
    await rollup.fold_all(engine)
    await post_events(client, key, bodies[150:])
    usage = await client.get(
        "/v1/analytics/usage",
        headers={"X-API-Key": key},
        params={"organization_id": organization_id},
    )
    for params in [
        {},
        {"start_date": "2026-03-05T10:30", "end_date": "2026-03-20", "timezone": "Asia/Kolkata"},
    ]:
        plain = await client.get(
            "/v1/analytics/usage",
            headers={"X-API-Key": key},
            params={"organization_id": organization_id, **params},
        )
        for sort in SORTS:
            for descending in (False, True):
                rows = await walk(
                    client,
                    key,
                    organization_id=organization_id,
                    limit="4",
                    sort=("-" if descending else "") + sort,
                    **params,
                )
                # Each member once: every user, and the usage without a user.
                assert sorted(r["user_id"] or "" for r in rows) == sorted(["", *users])
                expected = {k: plain.json()["usage"][k] for k in ("sms", "mms", "voice")}
                assert total_of(rows) == expected
                if sort in ("id", "name"):
                    keys = [(r[f"user_{sort}"] or "") for r in rows]
                else:
                    keys = [metric_of(r, sort) for r in rows]
                ids = [r["user_id"] or "" for r in rows]
                # Sorted by the key, ties by id ascending.
                for (key_a, id_a), (key_b, id_b) in zip(
                    zip(keys, ids, strict=True),
                    list(zip(keys, ids, strict=True))[1:],
                    strict=False,
                ):
                    ahead = key_a > key_b if descending else key_a < key_b
                    assert ahead or (key_a == key_b and id_a < id_b)
    assert usage.status_code == 200
    # The row without a user, exactly.
    rows = await walk(client, key, organization_id=organization_id)
    no_user = next(r for r in rows if r["user_id"] is None)
    assert (no_user["user_name"], no_user["user_email"]) == (None, None)
    assert list(rows[0]) == ["user_id", "user_name", "user_email", "sms", "mms", "voice"]


async def test_a_partners_organizations_zeros_included_and_the_answers_shape(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine, "Agency")
    busy = await make_organization(engine, "Busy", partner_id)
    idle = await make_organization(engine, "Idle", partner_id)
    await make_organization(engine, "Elsewhere")
    key = await make_key(engine, "admin", write=True)
    await post_events(client, key, [event(busy, quantity=7, occurred_at="2026-03-01T10:00:00Z")])
    response = await client.get(
        URL,
        headers={"X-API-Key": key},
        params={"partner_id": partner_id, "sort": "-sms.outbound", "start_date": "2026-03-01"},
    )
    assert response.json() == {
        "success": True,
        "breakdown": {
            "partner_id": partner_id,
            "partner_name": "Agency",
            **metrics_json((7, 0, 0, 0, 0, 0)),
            "period": "custom",
            "start_date": "2026-03-01T00:00:00Z",
            "end_date": None,
            "group_by": "organization",
            "rows": [
                {
                    "organization_id": busy,
                    "organization_name": "Busy",
                    **metrics_json((7, 0, 0, 0, 0, 0)),
                },
                {"organization_id": idle, "organization_name": "Idle", **metrics_json((0,) * 6)},
            ],
            "next_cursor": None,
        },
        "powered_by": "Teli",
    }
    etag = response.headers["etag"]
    again = await client.get(
        URL,
        headers={"X-API-Key": key, "If-None-Match": etag},
        params={"partner_id": partner_id, "sort": "-sms.outbound", "start_date": "2026-03-01"},
    )
    assert (again.status_code, again.content) == (304, b"")
    csv = await client.get(
        URL,
        headers={"X-API-Key": key, "Accept": "text/csv"},
        params={"partner_id": partner_id, "sort": "name"},
    )
    assert csv.text.splitlines()[1:] == [
        f"{busy},Busy,7,0,7,0,0,0,0,0,0",
        f"{idle},Idle,0,0,0,0,0,0,0,0,0",
    ]


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({}, "partner_id or organization_id is required"),
        ({"organization_id": "a b"}, "invalid organization_id"),
        (
            {"group_by": "organization", "organization_id": "X"},
            "invalid group_by: user with organization_id, organization with partner_id alone",
        ),
        (
            {"sort": "volume", "organization_id": "X"},
            "invalid sort: one of id, name, sms.outbound, sms.inbound, sms.total, mms.outbound,"
            " mms.inbound, mms.total, voice.seconds, voice.kb_seconds, voice.total_seconds,"
            " with - for descending",
        ),
        ({"limit": "0", "organization_id": "X"}, "invalid limit: an integer from 1 to 1000"),
        ({"limit": "1001", "organization_id": "X"}, "invalid limit: an integer from 1 to 1000"),
        (
            {"cursor": "garbage", "organization_id": "X"},
            "invalid cursor: pass back the next_cursor of the previous page",
        ),
        (
            {"timezone": "Nowhere/Land", "organization_id": "X"},
            "timezone must be an IANA time zone name, e.g. Europe/Berlin",
        ),
    ],
)
async def test_each_bad_parameter_is_its_own_400(
    client: httpx.AsyncClient, engine: AsyncEngine, params: dict[str, str], error: str
) -> None:
    key = await make_key(engine, "admin")
    response = await client.get(URL, headers={"X-API-Key": key}, params=params)
    assert (response.status_code, response.json()) == (400, {"success": False, "error": error})


async def test_scope_out_of_scope_reads_as_unknown_and_a_cursor_stays_in_its_query(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine, "Agency")
    mine = await make_organization(engine, "Mine", partner_id)
    theirs = await make_organization(engine, "Theirs")
    for organization_id in (mine, theirs):
        for i in range(3):
            await make_user(engine, organization_id, f"U{i}")
    admin = await make_key(engine, "admin")
    partner_key = await make_key(engine, "partner", partner_id=partner_id)
    organization_key = await make_key(engine, "organization", organization_id=mine)

    async def get(key: str, **params: str) -> httpx.Response:
        return await client.get(URL, headers={"X-API-Key": key}, params=params)

    unknown_org = await get(admin, organization_id="nope")
    unknown_partner = await get(admin, partner_id="nope")
    assert unknown_org.json()["error"] == "organization not found"
    assert unknown_partner.json()["error"] == "partner not found"
    for key, params, unknown in [
        (partner_key, {"organization_id": theirs}, unknown_org),
        (organization_key, {"organization_id": theirs}, unknown_org),
        (organization_key, {"partner_id": partner_id}, unknown_partner),
        (partner_key, {"partner_id": partner_id, "organization_id": theirs}, unknown_org),
    ]:
        hidden = await get(key, **params)
        assert (hidden.status_code, hidden.content) == (404, unknown.content)
    assert (await get(partner_key, partner_id=partner_id)).status_code == 200
    assert (await get(organization_key, organization_id=mine)).status_code == 200

    first = (await get(admin, organization_id=mine, limit="1")).json()["breakdown"]
    cursor = first["next_cursor"]
    assert cursor is not None
    assert (await get(admin, organization_id=mine, limit="1", cursor=cursor)).status_code == 200
    for other in [
        {"organization_id": theirs},
        {"organization_id": mine, "sort": "name"},
        {"organization_id": mine, "start_date": "2026-01-01"},
    ]:
        refused = await get(admin, cursor=cursor, **other)
        assert (refused.status_code, refused.json()["error"]) == (
            400,
            "invalid cursor: pass back the next_cursor of the previous page",
        )
