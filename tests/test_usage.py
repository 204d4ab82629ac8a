"""`GET /v1/analytics/usage`: which usage, all-time counters, date ranges (contract 2.1-2.3).

Every answer is compared with the exact JSON the contract promises, key order included.
The last tests are the exactness property: thousands of random events, folded and not,
against hundreds of random ranges, compared with sums computed here from what was sent.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.support.answers import SEED_ORGANIZATION, SEED_USER, assert_json, bad_date, usage_answer
from tests.support.factories import (
    Tenant,
    event,
    make_key,
    make_organization,
    make_tenant,
    make_user,
)
from tests.support.oracle import ZERO, Metrics, event_metrics
from usage_api import demo
from usage_api.analytics import rollup
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.db import transact

URL = "/v1/analytics/usage"
ORGANIZATION_KEYS = ["organization_id", "organization_name", "sms", "mms", "voice", "period"]
USER_KEYS = ["user_id", "user_name", "user_email", "sms", "mms", "voice", "period"]
RANGE_KEYS = ["period", "start_date", "end_date"]
IDS_REQUIRED = {"success": False, "error": "organization_id or user_id is required"}
EMPTY_RANGE = {"success": False, "error": "start_date must not be after end_date"}
ORGANIZATION_NOT_FOUND = {"success": False, "error": "organization not found"}
USER_NOT_FOUND = {"success": False, "error": "user not found"}


def metrics(totals: Metrics = ZERO) -> dict[str, Any]:
    sms_out, sms_in, mms_out, mms_in, seconds, kb_seconds = totals
    return {
        "sms": {"outbound": sms_out, "inbound": sms_in, "total": sms_out + sms_in},
        "mms": {"outbound": mms_out, "inbound": mms_in, "total": mms_out + mms_in},
        "voice": {
            "seconds": seconds,
            "kb_seconds": kb_seconds,
            "total_seconds": seconds + kb_seconds,
        },
    }


def period(start_date: str | None = None, end_date: str | None = None) -> dict[str, Any]:
    """The tail of `usage`: all time without bounds, else the custom range's echo."""
    if start_date is None and end_date is None:
        return {"period": "all_time"}
    return {"period": "custom", "start_date": start_date, "end_date": end_date}


def organization_usage(
    tenant: Tenant,
    totals: Metrics = ZERO,
    *,
    start_date: str | None = None,
    end_date: str | None = None,
) -> dict[str, Any]:
    return {
        "organization_id": tenant.organization_id,
        "organization_name": "Acme Corp",
        **metrics(totals),
        **period(start_date, end_date),
    }


def user_usage(
    tenant: Tenant,
    totals: Metrics = ZERO,
    *,
    start_date: str | None = None,
    end_date: str | None = None,
) -> dict[str, Any]:
    return {
        "user_id": tenant.user_id,
        "user_name": "John Smith",
        "user_email": "john@example.com",
        **metrics(totals),
        **period(start_date, end_date),
    }


async def get(client: httpx.AsyncClient, key: str, **params: str) -> httpx.Response:
    return await client.get(URL, params=params, headers={"X-API-Key": key})


async def post_events(
    client: httpx.AsyncClient, key: str, events: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    response = await client.post(
        "/v1/usage/events", json={"events": events}, headers={"X-API-Key": key}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def fold_everything(engine: AsyncEngine) -> None:
    await rollup.fold_all(engine)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM usage_deltas")) == 0


# 2.1 Which usage


async def test_organization_id_alone_gives_the_organizations_usage(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    await post_events(
        client,
        tenant.key,
        [
            event(tenant.organization_id, quantity=3),
            event(tenant.organization_id, quantity=4, user_id=tenant.user_id),
            event(tenant.organization_id, type="mms", direction="inbound", quantity=2),
            event(tenant.organization_id, type="voice", quantity=60),
            event(tenant.organization_id, type="voice", quantity=7, knowledge_base=True),
        ],
    )

    response = await get(client, tenant.key, organization_id=tenant.organization_id)

    assert_json(response, 200, usage_answer(organization_usage(tenant, (7, 0, 0, 2, 60, 7))))
    assert list(response.json()["usage"]) == ORGANIZATION_KEYS


async def test_head_answers_like_get_without_a_body(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    params = {"organization_id": tenant.organization_id}
    headers = {"X-API-Key": tenant.key}
    got = await client.get("/v1/analytics/usage", params=params, headers=headers)
    head = await client.head("/v1/analytics/usage", params=params, headers=headers)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == got.headers["content-length"]
    missing = await client.head("/v1/analytics/usage", params={"organization_id": "no"})
    assert (missing.status_code, missing.content) == (401, b"")


async def test_user_id_alone_gives_only_that_users_usage(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    colleague = await make_user(engine, tenant.organization_id, "Jane Doe", "jane@example.com")
    await post_events(
        client,
        tenant.key,
        [
            event(tenant.organization_id, quantity=3),
            event(tenant.organization_id, quantity=4, user_id=tenant.user_id),
            event(tenant.organization_id, direction="inbound", quantity=5, user_id=colleague),
            event(tenant.organization_id, type="mms", quantity=6, user_id=tenant.user_id),
            event(tenant.organization_id, type="voice", quantity=70, user_id=tenant.user_id),
            event(tenant.organization_id, type="voice", quantity=80, user_id=colleague),
            event(
                tenant.organization_id,
                type="voice",
                direction="inbound",
                quantity=9,
                knowledge_base=True,
                user_id=tenant.user_id,
            ),
        ],
    )

    response = await get(client, tenant.key, user_id=tenant.user_id)

    assert_json(response, 200, usage_answer(user_usage(tenant, (4, 0, 6, 0, 70, 9))))
    assert list(response.json()["usage"]) == USER_KEYS


async def test_both_ids_give_the_users_usage_when_the_user_belongs_to_the_organization(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    await post_events(
        client,
        tenant.key,
        [
            event(tenant.organization_id, quantity=3),
            event(tenant.organization_id, quantity=4, user_id=tenant.user_id),
        ],
    )

    response = await get(
        client, tenant.key, organization_id=tenant.organization_id, user_id=tenant.user_id
    )

    assert_json(response, 200, usage_answer(user_usage(tenant, (4, 0, 0, 0, 0, 0))))


async def test_both_ids_are_user_not_found_when_the_user_belongs_to_another_organization(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    other_organization = await make_organization(engine, "Other")
    stranger = await make_user(engine, other_organization)

    for organization_id, user_id in [
        (tenant.organization_id, stranger),
        (other_organization, tenant.user_id),
        ("no-such-organization", tenant.user_id),
    ]:
        response = await get(client, tenant.key, organization_id=organization_id, user_id=user_id)
        assert_json(response, 404, USER_NOT_FOUND)


async def test_unknown_ids_are_not_found(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await make_key(engine)

    assert_json(await get(client, key, organization_id="nope"), 404, ORGANIZATION_NOT_FOUND)
    assert_json(await get(client, key, user_id="nope"), 404, USER_NOT_FOUND)
    assert_json(
        await get(client, key, user_id="nope", start_date="2026-01-01"), 404, USER_NOT_FOUND
    )


async def test_ids_outside_the_keys_scope_answer_exactly_like_unknown_ones(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    own_organization = await make_organization(engine, "Mine")
    key = await make_key(engine, "organization", organization_id=own_organization)

    hidden = await get(client, key, organization_id=tenant.organization_id)
    unknown = await get(client, key, organization_id="no-such-organization")
    assert (hidden.status_code, hidden.content) == (unknown.status_code, unknown.content)
    assert_json(hidden, 404, ORGANIZATION_NOT_FOUND)

    hidden = await get(client, key, user_id=tenant.user_id)
    unknown = await get(client, key, user_id="no-such-user")
    assert (hidden.status_code, hidden.content) == (unknown.status_code, unknown.content)
    assert_json(hidden, 404, USER_NOT_FOUND)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"organization_id": ""},
        {"user_id": ""},
        {"organization_id": "", "user_id": ""},
        {"start_date": "2026-01-01", "end_date": "2026-01-31"},
        {"organization": "x", "user": "y"},
    ],
    ids=["none", "empty-organization", "empty-user", "both-empty", "dates-only", "misspelt"],
)
async def test_neither_id_or_only_empty_ids_is_a_400(
    client: httpx.AsyncClient, engine: AsyncEngine, params: dict[str, str]
) -> None:
    key = await make_key(engine)

    assert_json(await get(client, key, **params), 400, IDS_REQUIRED)


async def test_an_empty_id_next_to_a_real_one_counts_as_absent(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)

    response = await get(client, tenant.key, organization_id="", user_id=tenant.user_id)
    assert_json(response, 200, usage_answer(user_usage(tenant)))
    response = await get(client, tenant.key, organization_id=tenant.organization_id, user_id="")
    assert_json(response, 200, usage_answer(organization_usage(tenant)))


@pytest.mark.parametrize("value", ["has space", "x" * 129, "caf\u00e9", "tab\there"])
async def test_malformed_ids_are_a_400(
    client: httpx.AsyncClient, engine: AsyncEngine, value: str
) -> None:
    key = await make_key(engine)

    response = await get(client, key, organization_id=value)
    assert_json(response, 400, {"success": False, "error": "invalid organization_id"})
    response = await get(client, key, user_id=value)
    assert_json(response, 400, {"success": False, "error": "invalid user_id"})


async def test_unknown_parameters_are_ignored(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)

    response = await get(
        client, tenant.key, organization_id=tenant.organization_id, period="month", limit="1"
    )

    assert_json(response, 200, usage_answer(organization_usage(tenant)))


async def test_checks_run_in_order_key_ids_dates_lookup(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key = await make_key(engine)
    unknown = "no-such-organization"

    response = await client.get(URL, params={"start_date": "bad"})
    assert_json(response, 401, {"success": False, "error": "X-API-Key header is required"})
    response = await get(client, "usk_not-a-key", organization_id="a b", start_date="bad")
    assert_json(response, 401, {"success": False, "error": "invalid API key"})
    response = await get(client, key, organization_id="a b", start_date="bad")
    assert_json(response, 400, {"success": False, "error": "invalid organization_id"})
    assert_json(await get(client, key, start_date="bad"), 400, IDS_REQUIRED)
    response = await get(client, key, organization_id=unknown, start_date="bad")
    assert_json(response, 400, bad_date("start_date"))
    response = await get(client, key, organization_id=unknown, start_date="b", end_date="b")
    assert_json(response, 400, bad_date("start_date"))
    response = await get(
        client, key, organization_id=unknown, start_date="2026-03-02", end_date="2026-03-01"
    )
    assert_json(response, 400, EMPTY_RANGE)


# 2.2 All-time counters


async def test_a_new_organization_and_a_new_user_report_exact_zeros(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)

    response = await get(client, tenant.key, organization_id=tenant.organization_id)
    assert_json(
        response,
        200,
        {
            "success": True,
            "usage": {
                "organization_id": tenant.organization_id,
                "organization_name": "Acme Corp",
                "sms": {"outbound": 0, "inbound": 0, "total": 0},
                "mms": {"outbound": 0, "inbound": 0, "total": 0},
                "voice": {"seconds": 0, "kb_seconds": 0, "total_seconds": 0},
                "period": "all_time",
            },
            "powered_by": "Teli",
        },
    )
    response = await get(client, tenant.key, user_id=tenant.user_id)
    assert_json(
        response,
        200,
        {
            "success": True,
            "usage": {
                "user_id": tenant.user_id,
                "user_name": "John Smith",
                "user_email": "john@example.com",
                "sms": {"outbound": 0, "inbound": 0, "total": 0},
                "mms": {"outbound": 0, "inbound": 0, "total": 0},
                "voice": {"seconds": 0, "kb_seconds": 0, "total_seconds": 0},
                "period": "all_time",
            },
            "powered_by": "Teli",
        },
    )


async def test_counters_are_real_time_and_unchanged_by_folding(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    first = [
        event(tenant.organization_id, quantity=2, user_id=tenant.user_id),
        event(tenant.organization_id, type="voice", quantity=30, knowledge_base=True),
    ]
    await post_events(client, tenant.key, first)
    expected_organization = usage_answer(organization_usage(tenant, (2, 0, 0, 0, 0, 30)))
    expected_user = usage_answer(user_usage(tenant, (2, 0, 0, 0, 0, 0)))

    # Not folded yet: the answer already includes the events.
    assert_json(
        await get(client, tenant.key, organization_id=tenant.organization_id),
        200,
        expected_organization,
    )
    assert_json(await get(client, tenant.key, user_id=tenant.user_id), 200, expected_user)

    await fold_everything(engine)
    assert_json(
        await get(client, tenant.key, organization_id=tenant.organization_id),
        200,
        expected_organization,
    )
    assert_json(await get(client, tenant.key, user_id=tenant.user_id), 200, expected_user)

    # A retry of the same events, after the fold, counts nothing twice; new events add.
    assert (await post_events(client, tenant.key, first))["duplicates"] == 2
    await post_events(
        client,
        tenant.key,
        [event(tenant.organization_id, direction="inbound", quantity=5, user_id=tenant.user_id)],
    )
    response = await get(client, tenant.key, organization_id=tenant.organization_id)
    assert_json(response, 200, usage_answer(organization_usage(tenant, (2, 5, 0, 0, 0, 30))))
    response = await get(client, tenant.key, user_id=tenant.user_id)
    assert_json(response, 200, usage_answer(user_usage(tenant, (2, 5, 0, 0, 0, 0))))


def test_powered_by_defaults_to_teli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("USAGE_API_POWERED_BY", raising=False)

    assert Settings.from_env().powered_by == "Teli"


async def test_powered_by_comes_from_configuration(
    database_url: str, settings: Settings, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    app = create_app(replace(settings, powered_by="Acme Analytics"), database_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await get(client, tenant.key, organization_id=tenant.organization_id)
            assert_json(response, 200, usage_answer(organization_usage(tenant), "Acme Analytics"))
            response = await get(client, tenant.key, organization_id="nope")
            assert_json(response, 404, ORGANIZATION_NOT_FOUND)


async def test_the_demo_answers_the_seeds_two_example_responses(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await demo.load_demo(engine)
    key = await transact(engine, demo.demo_key)

    response = await get(client, key, organization_id=demo.ORGANIZATION_ID)
    assert_json(response, 200, SEED_ORGANIZATION)
    response = await get(client, key, user_id=demo.USER_ID)
    assert_json(response, 200, SEED_USER)

    # Its events lie in its history: a range from the day before holds them all.
    since = (demo.history_start(datetime.now(UTC)) - timedelta(days=1)).date().isoformat()
    response = await get(client, key, organization_id=demo.ORGANIZATION_ID, start_date=since)
    custom = {"period": "custom", "start_date": f"{since}T00:00:00Z", "end_date": None}
    assert_json(
        response, 200, {**SEED_ORGANIZATION, "usage": {**SEED_ORGANIZATION["usage"], **custom}}
    )


async def test_loading_the_demo_twice_keeps_its_totals(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    await demo.load_demo(engine)
    await demo.load_demo(engine)
    key = await transact(engine, demo.demo_key)

    assert_json(
        await get(client, key, organization_id=demo.ORGANIZATION_ID), 200, SEED_ORGANIZATION
    )
    assert_json(await get(client, key, user_id=demo.USER_ID), 200, SEED_USER)


# 2.3 Date ranges


# Fourteen events whose sms segments are distinct powers of two: a range's sms total
# names exactly the events it contains.
async def ingest_marked(
    client: httpx.AsyncClient, tenant: Tenant, instants: Iterable[str]
) -> list[str]:
    marked = list(instants)
    assert len(marked) <= 14
    events = [
        event(tenant.organization_id, quantity=2**n, occurred_at=at, user_id=tenant.user_id)
        for n, at in enumerate(marked)
    ]
    assert (await post_events(client, tenant.key, events))["accepted"] == len(events)
    return marked


def sms_of(marked: list[str], included: Iterable[str]) -> Metrics:
    chosen = set(included)
    return (sum(2**n for n, at in enumerate(marked) if at in chosen), 0, 0, 0, 0, 0)


async def test_the_seeds_range_covers_its_end_day_through_the_last_microsecond(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    marked = await ingest_marked(
        client,
        tenant,
        [
            "2026-02-09T23:59:59.999999Z",
            "2026-02-10T00:00:00Z",
            "2026-02-20T12:00:00Z",
            "2026-03-12T23:59:59.999999Z",
            "2026-03-13T00:00:00Z",
        ],
    )

    for fold in (False, True):
        if fold:
            await fold_everything(engine)
        response = await get(
            client,
            tenant.key,
            organization_id=tenant.organization_id,
            start_date="2026-02-10T00:00:00Z",
            end_date="2026-03-12T23:59:59Z",
        )
        expected = organization_usage(
            tenant,
            sms_of(marked, marked[1:4]),
            start_date="2026-02-10T00:00:00Z",
            end_date="2026-03-12T23:59:59Z",
        )
        assert_json(response, 200, usage_answer(expected))
        assert list(response.json()["usage"]) == ORGANIZATION_KEYS + RANGE_KEYS[1:]


async def test_a_date_alone_as_end_covers_that_whole_day_and_is_echoed_as_its_last_second(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    marked = await ingest_marked(
        client,
        tenant,
        [
            "2026-03-11T23:59:59.999999Z",
            "2026-03-12T00:00:00Z",
            "2026-03-12T23:59:59.999999Z",
            "2026-03-13T00:00:00Z",
        ],
    )

    response = await get(
        client, tenant.key, user_id=tenant.user_id, start_date="2026-03-12", end_date="2026-03-12"
    )

    expected = user_usage(
        tenant,
        sms_of(marked, marked[1:3]),
        start_date="2026-03-12T00:00:00Z",
        end_date="2026-03-12T23:59:59Z",
    )
    assert_json(response, 200, usage_answer(expected))
    assert list(response.json()["usage"]) == USER_KEYS + RANGE_KEYS[1:]


DAY, MINUTE, SECOND = timedelta(days=1), timedelta(minutes=1), timedelta(seconds=1)
MICROSECOND = timedelta(microseconds=1)

# (value sent, its start echo = the UTC instant it denotes, its unit, its end echo); the
# unit is None for an exact instant (a fraction was given).
FORMS: list[tuple[str, str, timedelta | None, str]] = [
    ("2026-03-12", "2026-03-12T00:00:00Z", DAY, "2026-03-12T23:59:59Z"),
    ("2026-03-12T10:15", "2026-03-12T10:15:00Z", MINUTE, "2026-03-12T10:15:59Z"),
    ("2026-03-12T10:15Z", "2026-03-12T10:15:00Z", MINUTE, "2026-03-12T10:15:59Z"),
    ("2026-03-13T00:15+02:00", "2026-03-12T22:15:00Z", MINUTE, "2026-03-12T22:15:59Z"),
    ("2026-03-12T10:15:30", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T10:15:30Z", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T12:15:30+02:00", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T05:15:30-05:00", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T15:45:30+05:30", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-11T23:15:30-11:00", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T10:15:30+00:00", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T10:15:30-00:00", "2026-03-12T10:15:30Z", SECOND, "2026-03-12T10:15:30Z"),
    ("2026-03-12T10:15:30.25Z", "2026-03-12T10:15:30.250000Z", None, "2026-03-12T10:15:30.250000Z"),
    ("2026-03-12T10:15:30.5", "2026-03-12T10:15:30.500000Z", None, "2026-03-12T10:15:30.500000Z"),
    (
        "2026-03-12T10:15:30.000Z",
        "2026-03-12T10:15:30.000000Z",
        None,
        "2026-03-12T10:15:30.000000Z",
    ),
    (
        "2026-03-12T10:15:30.123456789Z",
        "2026-03-12T10:15:30.123456Z",
        None,
        "2026-03-12T10:15:30.123456Z",
    ),
    (
        "2026-03-12T10:15:30.999999999999Z",
        "2026-03-12T10:15:30.999999Z",
        None,
        "2026-03-12T10:15:30.999999Z",
    ),
    (
        "2026-03-13T01:15:30.000001+15:00",
        "2026-03-12T10:15:30.000001Z",
        None,
        "2026-03-12T10:15:30.000001Z",
    ),
]


def _z(at: datetime) -> str:
    return at.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@pytest.mark.parametrize(
    ("value", "start_echo", "unit", "end_echo"), FORMS, ids=[f[0] for f in FORMS]
)
async def test_every_accepted_form_bounds_a_range_on_its_own_unit(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    value: str,
    start_echo: str,
    unit: timedelta | None,
    end_echo: str,
) -> None:
    """As start: from the instant it denotes. As end: through the end of its finest unit."""
    tenant = await make_tenant(engine)
    at = datetime.fromisoformat(start_echo)
    after = at + (unit or MICROSECOND)
    before, first, last, beyond = _z(at - MICROSECOND), _z(at), _z(after - MICROSECOND), _z(after)
    marked = await ingest_marked(client, tenant, [before, first, last, beyond])

    for params in ({"organization_id": tenant.organization_id}, {"user_id": tenant.user_id}):
        usage = organization_usage if "organization_id" in params else user_usage
        response = await get(client, tenant.key, **params, start_date=value)
        expected = usage(
            tenant, sms_of(marked, [first, last, beyond]), start_date=start_echo, end_date=None
        )
        assert_json(response, 200, usage_answer(expected))

        response = await get(client, tenant.key, **params, end_date=value)
        expected = usage(
            tenant, sms_of(marked, [before, first, last]), start_date=None, end_date=end_echo
        )
        assert_json(response, 200, usage_answer(expected))

        # Both sides the same value: exactly the one unit it names.
        response = await get(client, tenant.key, **params, start_date=value, end_date=value)
        expected = usage(
            tenant, sms_of(marked, [first, last]), start_date=start_echo, end_date=end_echo
        )
        assert_json(response, 200, usage_answer(expected))


async def test_ranges_with_partial_days_at_their_edges_are_exact_for_users_and_organizations(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Partial hours come from the log, whole hours and days from roll-ups (or deltas not
    yet folded): every event counts once, before and after folding."""
    tenant = await make_tenant(engine)
    marked = await ingest_marked(
        client,
        tenant,
        [
            "2026-02-10T11:59:59.999999Z",
            "2026-02-10T12:00:00Z",
            "2026-02-10T23:59:59.999999Z",
            "2026-02-11T00:00:00Z",
            "2026-02-11T01:30:00Z",
            "2026-02-12T23:59:59.999999Z",
            "2026-02-13T00:00:00Z",
            "2026-02-13T05:59:59.999999Z",
            "2026-02-13T06:00:00Z",
        ],
    )
    # (start_date, end_date, their echoes, the events inside)
    ranges = [
        # Partial days at both ends, two whole days between them.
        ("2026-02-10T12:00:00Z", "2026-02-13T05:59:59Z", None, None, marked[1:8]),
        # Whole days only.
        ("2026-02-11", "2026-02-12", "2026-02-11T00:00:00Z", "2026-02-12T23:59:59Z", marked[3:6]),
        # Inside one day, across whole hours.
        ("2026-02-11T00:00:00Z", "2026-02-11T01:59:59Z", None, None, marked[3:5]),
        # A partial day, then a whole one.
        ("2026-02-10T23:59:59.999999Z", "2026-02-12", None, "2026-02-12T23:59:59Z", marked[2:6]),
    ]
    for fold in (False, True):
        if fold:
            await fold_everything(engine)
        for start, end, start_echo, end_echo, included in ranges:
            for params, usage in (
                ({"organization_id": tenant.organization_id}, organization_usage),
                ({"user_id": tenant.user_id}, user_usage),
            ):
                response = await get(client, tenant.key, **params, start_date=start, end_date=end)
                expected = usage(
                    tenant,
                    sms_of(marked, included),
                    start_date=start_echo or start,
                    end_date=end_echo or end,
                )
                assert_json(response, 200, usage_answer(expected))


async def test_open_sides_reach_the_first_and_the_last_event(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    now = datetime.now(UTC).replace(microsecond=0)
    marked = await ingest_marked(
        client,
        tenant,
        [
            "0001-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "2026-03-12T00:00:00Z",
            _z(now + timedelta(minutes=4)),
        ],
    )
    await fold_everything(engine)

    response = await get(client, tenant.key, user_id=tenant.user_id, end_date="2026-03-11")
    expected = user_usage(
        tenant, sms_of(marked, marked[:2]), start_date=None, end_date="2026-03-11T23:59:59Z"
    )
    assert_json(response, 200, usage_answer(expected))
    response = await get(client, tenant.key, user_id=tenant.user_id, start_date="2026-03-12")
    expected = user_usage(
        tenant, sms_of(marked, marked[2:]), start_date="2026-03-12T00:00:00Z", end_date=None
    )
    assert_json(response, 200, usage_answer(expected))
    response = await get(
        client, tenant.key, user_id=tenant.user_id, start_date="0001-01-01", end_date="9999-12-31"
    )
    expected = user_usage(
        tenant,
        sms_of(marked, marked),
        start_date="0001-01-01T00:00:00Z",
        end_date="9999-12-31T23:59:59Z",
    )
    assert_json(response, 200, usage_answer(expected))


async def test_ranges_at_the_edges_of_the_calendar_answer_zeros_not_errors(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    await ingest_marked(client, tenant, ["2026-03-12T00:00:00Z"])
    organization_id = tenant.organization_id

    cases = [
        ({"start_date": "9999-12-31"}, "9999-12-31T00:00:00Z", None),
        ({"start_date": "9999-12-31T23:59:59.999999Z"}, "9999-12-31T23:59:59.999999Z", None),
        (
            {"start_date": "9999-12-31", "end_date": "9999-12-31"},
            "9999-12-31T00:00:00Z",
            "9999-12-31T23:59:59Z",
        ),
        (
            {"start_date": "9999-12-31T23:59", "end_date": "9999-12-31T23:59"},
            "9999-12-31T23:59:00Z",
            "9999-12-31T23:59:59Z",
        ),
        ({"end_date": "0001-01-01T00:00:00.000000Z"}, None, "0001-01-01T00:00:00.000000Z"),
    ]
    for params, start_echo, end_echo in cases:
        response = await get(client, tenant.key, organization_id=organization_id, **params)
        assert_json(
            response,
            200,
            usage_answer(organization_usage(tenant, start_date=start_echo, end_date=end_echo)),
        )


async def test_a_new_organization_and_user_report_zeros_over_a_range(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    start, end = "2026-02-10T00:00:00Z", "2026-03-12T23:59:59Z"

    response = await get(
        client, tenant.key, organization_id=tenant.organization_id, start_date=start, end_date=end
    )
    assert_json(
        response, 200, usage_answer(organization_usage(tenant, start_date=start, end_date=end))
    )
    response = await get(client, tenant.key, user_id=tenant.user_id, start_date=start, end_date=end)
    assert_json(response, 200, usage_answer(user_usage(tenant, start_date=start, end_date=end)))


async def test_an_end_before_the_start_but_inside_its_unit_still_covers_the_rest_of_the_unit(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """The range is empty only when start is not before the *exclusive* end."""
    tenant = await make_tenant(engine)
    marked = await ingest_marked(
        client,
        tenant,
        [
            "2026-03-12T12:00:29Z",
            "2026-03-12T12:00:30Z",
            "2026-03-12T12:00:59.999999Z",
            "2026-03-12T12:01:00Z",
        ],
    )

    response = await get(
        client,
        tenant.key,
        organization_id=tenant.organization_id,
        start_date="2026-03-12T12:00:30Z",
        end_date="2026-03-12T12:00",
    )

    expected = organization_usage(
        tenant,
        sms_of(marked, marked[1:3]),
        start_date="2026-03-12T12:00:30Z",
        end_date="2026-03-12T12:00:59Z",
    )
    assert_json(response, 200, usage_answer(expected))


@pytest.mark.parametrize(
    ("start_date", "end_date"),
    [
        ("2026-03-13", "2026-03-12"),
        ("2026-03-13T00:00:00Z", "2026-03-12"),
        ("2026-03-12T12:01", "2026-03-12T12:00"),
        ("2026-03-12T12:00:01Z", "2026-03-12T12:00:00Z"),
        ("2026-03-12T12:00:00.000001Z", "2026-03-12T12:00:00.000000Z"),
        ("2026-03-12T14:00:00+02:00", "2026-03-12T11:59:59Z"),
        ("2026-03-12T12:00:00Z", "2026-03-12T13:59:59.999999+02:00"),
    ],
)
async def test_an_empty_range_is_a_400(
    client: httpx.AsyncClient, engine: AsyncEngine, start_date: str, end_date: str
) -> None:
    tenant = await make_tenant(engine)

    for params in ({"organization_id": tenant.organization_id}, {"user_id": tenant.user_id}):
        response = await get(client, tenant.key, **params, start_date=start_date, end_date=end_date)
        assert_json(response, 400, EMPTY_RANGE)


async def test_the_same_instant_with_a_fraction_on_both_sides_is_that_one_microsecond(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    marked = await ingest_marked(
        client,
        tenant,
        ["2026-03-12T11:59:59.999999Z", "2026-03-12T12:00:00Z", "2026-03-12T12:00:00.000001Z"],
    )

    response = await get(
        client,
        tenant.key,
        organization_id=tenant.organization_id,
        start_date="2026-03-12T12:00:00.0Z",
        end_date="2026-03-12T14:00:00.000+02:00",
    )

    expected = organization_usage(
        tenant,
        sms_of(marked, marked[1:2]),
        start_date="2026-03-12T12:00:00.000000Z",
        end_date="2026-03-12T12:00:00.000000Z",
    )
    assert_json(response, 200, usage_answer(expected))


MALFORMED_DATES = [
    "2026-13-01",
    "2026-02-30",
    "2026-00-10",
    "yesterday",
    "2026-02-10T25:00",
    "2026-02-10T24:00",
    "2026-02-10T12:60",
    "2026-02-10T12:00:60",
    "2026-02-10 12:00",
    "2026-02-10t12:00",
    "2026-02-10T12",
    "2026-02-10T1200",
    "2026-02-10T12:00:00.Z",
    "2026-02-10T12:00:00+24:00",
    "2026-02-10T12:00:00-25:00",
    "2026-02-10T12:00:00+02:60",
    "2026-02-10T12:00:00+0200",
    "2026-02-10T12:00:00+02",
    "2026-02-10T12:00:00z",
    "2026-02-10Z",
    "2026-02-10+02:00",
    "2026-02-10T12:00:00Zjunk",
    "2026-02-10T12:00:00Z ",
    " 2026-02-10",
    "2026-02-10\n",
    "2026-2-10",
    "20260210",
    "1770681600",
    "2026-W07",
    "\uff12\uff10\uff12\uff16-02-10",  # fullwidth digits
    # An unencoded "+" in a query string arrives as a space: not one of the forms.
    "2026-02-10T12:00:00 02:00",
]


async def test_a_malformed_date_is_a_400_naming_the_parameter(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    tenant = await make_tenant(engine)
    organization_id = tenant.organization_id

    # One test for the whole list: a request each is cheap, an app per value is not.
    for value in MALFORMED_DATES:
        answers = [
            await get(client, tenant.key, organization_id=organization_id, start_date=value),
            await get(client, tenant.key, organization_id=organization_id, end_date=value),
            await get(
                client, tenant.key, user_id=tenant.user_id, start_date="2026-01-01", end_date=value
            ),
        ]
        expected = [bad_date("start_date"), bad_date("end_date"), bad_date("end_date")]
        assert [(r.status_code, r.json()) for r in answers] == [(400, e) for e in expected], value


@pytest.mark.parametrize("value", ["0001-01-01T00:30+01:00", "9999-12-31T23:30-01:00"])
async def test_a_date_whose_offset_leaves_the_years_1_to_9999_in_utc_is_a_400(
    client: httpx.AsyncClient, engine: AsyncEngine, value: str
) -> None:
    tenant = await make_tenant(engine)

    response = await get(
        client, tenant.key, organization_id=tenant.organization_id, start_date=value
    )
    assert_json(response, 400, bad_date("start_date"))
    response = await get(client, tenant.key, organization_id=tenant.organization_id, end_date=value)
    assert_json(response, 400, bad_date("end_date"))


async def test_an_empty_date_counts_as_absent_like_an_empty_id(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """`?start_date=&end_date=...` is what an HTML form or a URL template sends for a
    field left blank: that side is open, as "only one given" in the contract says."""
    tenant = await make_tenant(engine)
    marked = await ingest_marked(client, tenant, ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"])
    organization_id = tenant.organization_id

    response = await get(
        client, tenant.key, organization_id=organization_id, start_date="", end_date="2026-01-01"
    )
    expected = organization_usage(
        tenant, sms_of(marked, marked[:1]), start_date=None, end_date="2026-01-01T23:59:59Z"
    )
    assert_json(response, 200, usage_answer(expected))
    response = await get(
        client, tenant.key, organization_id=organization_id, start_date="2026-01-02", end_date=""
    )
    expected = organization_usage(
        tenant, sms_of(marked, marked[1:]), start_date="2026-01-02T00:00:00Z", end_date=None
    )
    assert_json(response, 200, usage_answer(expected))
    response = await get(client, tenant.key, user_id=tenant.user_id, start_date="", end_date="")
    assert_json(response, 200, usage_answer(user_usage(tenant, sms_of(marked, marked))))


# Exactness: random events against random ranges, compared with sums of what was sent.

WINDOW_START = datetime(2025, 11, 3, tzinfo=UTC)
WINDOW_DAYS = 60
OFFSETS = [
    timedelta(0),
    timedelta(hours=2),
    timedelta(hours=-5),
    timedelta(hours=5, minutes=30),
    timedelta(hours=-9, minutes=-30),
    timedelta(hours=14),
    timedelta(hours=-12),
    timedelta(hours=23, minutes=59),
]


@dataclass(frozen=True)
class Sent:
    id: str
    organization_id: str
    user_id: str | None
    totals: Metrics
    occurred_at: datetime


def _offset_text(offset: timedelta) -> str:
    minutes = int(offset.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    hours, minutes = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{minutes:02d}"


def random_instant(rng: random.Random) -> datetime:
    """Mostly near hour and day boundaries, where a range is cut into its parts."""
    day = WINDOW_START + timedelta(days=rng.randrange(WINDOW_DAYS))
    roll = rng.random()
    if roll < 0.35:
        hour = day + timedelta(hours=rng.randrange(24))
        jitter = rng.choice([0, 1, 999, 1_000_000, 59_999_999, rng.randrange(3_600_000_000)])
        return hour + rng.choice([1, -1]) * jitter * MICROSECOND
    if roll < 0.55:
        jitter = rng.choice([0, 1, 1_000_000, rng.randrange(7_200_000_000)])
        return day + rng.choice([1, -1]) * jitter * MICROSECOND
    if roll < 0.7:
        return day + timedelta(seconds=rng.randrange(86_400))
    return day + rng.randrange(86_400_000_000) * MICROSECOND


def occurred_at_text(rng: random.Random, at: datetime) -> str:
    """`at` as a client might write it: any offset, with or without a fraction."""
    offset = rng.choice(OFFSETS)
    local = (at + offset).replace(tzinfo=None)
    text_ = local.strftime("%Y-%m-%dT%H:%M:%S")
    if local.microsecond or rng.random() < 0.2:
        text_ += f".{local.microsecond:06d}" + "0" * rng.randrange(3)
    if offset:
        return text_ + _offset_text(offset)
    return text_ + rng.choice(["Z", "", "+00:00", "-00:00"])


def random_event(
    rng: random.Random, organization_id: str, users: Sequence[str | None], number: int
) -> tuple[Sent, dict[str, Any]]:
    user_id = rng.choice(users)
    at = random_instant(rng)
    kind = rng.choice(["sms", "sms", "mms", "voice", "voice"])
    direction = rng.choice(["outbound", "inbound"])
    quantity = rng.choice([1, 1, 2, 3, 7, 10_000]) if kind != "voice" else rng.randrange(0, 3_600)
    knowledge_base = rng.choice([None, False, True]) if kind == "voice" else None
    totals = event_metrics(kind, direction, bool(knowledge_base), quantity)
    body = event(
        organization_id,
        f"ev-{number}",
        type=kind,
        direction=direction,
        quantity=quantity,
        knowledge_base=knowledge_base,
        user_id=user_id,
        occurred_at=occurred_at_text(rng, at),
    )
    sent = Sent(f"ev-{number}", organization_id, user_id, as_totals(totals), at)
    return sent, body


def as_totals(values: Sequence[int]) -> Metrics:
    sms_out, sms_in, mms_out, mms_in, seconds, kb_seconds = values
    return sms_out, sms_in, mms_out, mms_in, seconds, kb_seconds


def add(totals: Iterable[Metrics]) -> Metrics:
    sums = [0] * 6
    for row in totals:
        for i, value in enumerate(row):
            sums[i] += value
    return as_totals(sums)


@dataclass(frozen=True)
class Bound:
    value: str
    at: datetime  # the UTC instant the value denotes
    unit: timedelta | None  # None: an exact instant (a fraction was given)

    @property
    def end_exclusive(self) -> datetime:
        return self.at + (self.unit or MICROSECOND)


def random_bound(rng: random.Random, near: datetime) -> Bound:
    """A bound in one of the accepted forms, denoting an instant at or just before `near`."""
    form = rng.choice(["date", "minute", "second", "fraction", "fraction"])
    if form == "date":
        at = near.replace(hour=0, minute=0, second=0, microsecond=0)
        return Bound(at.strftime("%Y-%m-%d"), at, DAY)
    offset = rng.choice([*OFFSETS, None])  # None: no offset at all
    local = (near + (offset or timedelta(0))).replace(tzinfo=None)
    if form == "minute":
        local, unit, value = local.replace(second=0, microsecond=0), MINUTE, ""
    elif form == "second":
        local, unit, value = local.replace(microsecond=0), SECOND, ""
    else:
        digits = rng.randrange(1, 13)
        if digits < 6:
            kept = 10 ** (6 - digits)
            local = local.replace(microsecond=local.microsecond // kept * kept)
        fraction = f"{local.microsecond:06d}"[:digits] + "".join(
            rng.choice("0123456789") for _ in range(digits - 6)
        )
        unit, value = None, "." + fraction
    time_format = "%Y-%m-%dT%H:%M" if form == "minute" else "%Y-%m-%dT%H:%M:%S"
    value = local.strftime(time_format) + value
    if offset is None:
        pass
    elif offset:
        value += _offset_text(offset)
    else:
        value += rng.choice(["Z", "+00:00", "-00:00"])
    at = local.replace(tzinfo=UTC) - (offset or timedelta(0))
    return Bound(value, at, unit)


def random_range(rng: random.Random, sent: Sequence[Sent]) -> tuple[Bound | None, Bound | None]:
    def anchor() -> datetime:
        # An event's own instant, or next to it: bounds that hit events exactly.
        at = rng.choice(sent).occurred_at
        return at + rng.choice([0, 0, 1, -1, rng.randrange(-(10**9), 10**9)]) * MICROSECOND

    shape = rng.choice(["inside-hour", "across-day", "many-days", "open", "same", "any"])
    if shape == "inside-hour":
        hour = anchor().replace(minute=0, second=0, microsecond=0)
        a, b = sorted(hour + rng.randrange(3_600_000_000) * MICROSECOND for _ in range(2))
        return random_bound(rng, a), random_bound(rng, b)
    if shape == "across-day":
        day = anchor().replace(hour=0, minute=0, second=0, microsecond=0)
        before = rng.randrange(1, 30 * 3_600_000_000) * MICROSECOND
        after = rng.randrange(1, 30 * 3_600_000_000) * MICROSECOND
        return random_bound(rng, day - before), random_bound(rng, day + after)
    if shape == "many-days":
        a, b = sorted([anchor(), anchor()])
        return random_bound(rng, a), random_bound(rng, b)
    if shape == "open":
        bound = random_bound(rng, anchor())
        return (bound, None) if rng.random() < 0.5 else (None, bound)
    if shape == "same":
        bound = random_bound(rng, anchor())
        return bound, bound
    return random_bound(rng, anchor()), random_bound(rng, anchor())


def _echo(at: datetime, fraction: bool) -> str:
    return (
        at.replace(tzinfo=None).isoformat(timespec="microseconds" if fraction else "seconds") + "Z"
    )


def expected_answer(
    head: dict[str, Any], events: Sequence[Sent], start: Bound | None, end: Bound | None
) -> tuple[int, dict[str, Any]]:
    """The contract's answer, from the events sent: `start <= occurred_at < end_exclusive`."""
    low = start.at if start else None
    high = end.end_exclusive if end else None
    if low is not None and high is not None and low >= high:
        return 400, EMPTY_RANGE
    totals = add(
        e.totals
        for e in events
        if (low is None or low <= e.occurred_at) and (high is None or e.occurred_at < high)
    )
    start_echo = _echo(start.at, start.unit is None) if start else None
    if end is None:
        end_echo = None
    elif end.unit is None:
        end_echo = _echo(end.at, True)
    else:
        end_echo = _echo(end.end_exclusive - SECOND, False)
    usage = {**head, **metrics(totals), **period(start_date=start_echo, end_date=end_echo)}
    return 200, usage_answer(usage)


async def _stored_events(conn: AsyncConnection, organization_id: str) -> dict[str, Any]:
    rows = await conn.execute(
        text("SELECT id, user_id, occurred_at FROM usage_events WHERE organization_id = :o"),
        {"o": organization_id},
    )
    return {row.id: (row.user_id, row.occurred_at) for row in rows}


@pytest.mark.slow
async def test_every_range_and_all_time_equal_the_sums_of_the_events_sent(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(20260210)
    key = await make_key(engine, write=True)
    organization_id = await make_organization(engine, "Acme Corp")
    users = [
        await make_user(engine, organization_id, f"User {n}", f"user{n}@example.com")
        for n in range(3)
    ]
    neighbour = await make_organization(engine, "Neighbour")
    neighbour_user = await make_user(engine, neighbour, "Neighbour", "n@example.com")

    owners: list[str | None] = [*users, None]
    generated = [random_event(rng, organization_id, owners, n) for n in range(3000)]
    generated += [
        random_event(rng, neighbour, [neighbour_user, None], 10_000 + n) for n in range(300)
    ]
    rng.shuffle(generated)  # arrival order has nothing to do with occurred_at
    sent = [s for s, _ in generated if s.organization_id == organization_id]
    bodies = [b for _, b in generated]

    heads: dict[str, tuple[dict[str, str], dict[str, Any], list[Sent]]] = {
        "organization": (
            {"organization_id": organization_id},
            {"organization_id": organization_id, "organization_name": "Acme Corp"},
            sent,
        )
    }
    for n, user_id in enumerate(users):
        heads[f"user {n}"] = (
            {"user_id": user_id},
            {"user_id": user_id, "user_name": f"User {n}", "user_email": f"user{n}@example.com"},
            [s for s in sent if s.user_id == user_id],
        )

    arrived: set[str] = set()

    async def send(batch: list[dict[str, Any]]) -> dict[str, Any]:
        answer = await post_events(client, key, batch)
        arrived.update(body["id"] for body in batch)
        return answer

    async def check_all_time() -> None:
        for params, head, events in heads.values():
            totals = add(e.totals for e in events if e.id in arrived)
            response = await get(client, key, **params)
            assert_json(response, 200, usage_answer({**head, **metrics(totals), **period()}))

    # Some usage arrives, is folded, then more arrives late (any occurred_at, any order),
    # retries included, and only part of it is folded: roll-ups and deltas overlap.
    split = 2000
    for begin in range(0, split, 1000):
        assert (await send(bodies[begin : begin + 1000]))["accepted"] == 1000
    await check_all_time()
    await fold_everything(engine)
    await check_all_time()
    for begin in range(split, len(bodies), 1000):
        await send(bodies[begin : begin + 1000])
    retried = await send(rng.sample(bodies, 500))
    assert (retried["accepted"], retried["duplicates"], retried["conflicts"]) == (0, 500, [])
    assert await transact(engine, rollup.fold, 150) == 150
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM usage_deltas")) > 0
        # The log holds exactly what was sent, instants as this test reads them.
        stored = await _stored_events(conn, organization_id)
    assert stored == {s.id: (s.user_id, s.occurred_at) for s in sent}
    await check_all_time()

    ranges = [random_range(rng, sent) for _ in range(300)]
    semaphore = asyncio.Semaphore(8)

    async def ask(params: dict[str, str], start: Bound | None, end: Bound | None) -> httpx.Response:
        if start:
            params = {**params, "start_date": start.value}
        if end:
            params = {**params, "end_date": end.value}
        async with semaphore:
            return await get(client, key, **params)

    async def answers() -> list[tuple[str, Bound | None, Bound | None, httpx.Response]]:
        asked = [
            (name, start, end, ask(params, start, end))
            for start, end in ranges
            for name, (params, _, _) in heads.items()
        ]
        responses = await asyncio.gather(*(request for *_, request in asked))
        return [(name, s, e, r) for (name, s, e, _), r in zip(asked, responses, strict=True)]

    unfolded = await answers()
    for name, start, end, response in unfolded:
        _, head, events = heads[name]
        status, expected = expected_answer(head, events, start, end)
        assert (response.status_code, response.json()) == (status, expected), (
            name,
            start and start.value,
            end and end.value,
        )
    empty = sum(r.status_code == 400 for *_, r in unfolded)
    assert 0 < empty < len(unfolded) // 5  # mostly real ranges, some empty ones

    await fold_everything(engine)
    await check_all_time()
    folded = await answers()
    assert [r.content for *_, r in folded] == [r.content for *_, r in unfolded]
