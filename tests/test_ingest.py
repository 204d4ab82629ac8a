"""Recording usage: `POST /v1/usage/events`.

Every event is applied exactly once per (organization, id); a batch is all-or-nothing
when it is invalid; an accepted batch is visible to the very next read.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import product
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import error, ingest_answer
from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from usage_api.dates import utc_now
from usage_api.schemas import UsageEventIn

URL = "/v1/usage/events"
ONE_MIB = 1024 * 1024
ZERO_USAGE = {
    "sms": {"outbound": 0, "inbound": 0, "total": 0},
    "mms": {"outbound": 0, "inbound": 0, "total": 0},
    "voice": {"seconds": 0, "kb_seconds": 0, "total_seconds": 0},
}


async def post(client: httpx.AsyncClient, key: str, events: list[Any]) -> httpx.Response:
    return await client.post(URL, json={"events": events}, headers={"X-API-Key": key})


def invalid(*details: tuple[int, str, str]) -> dict[str, Any]:
    return {
        "success": False,
        "error": "invalid events",
        "details": [{"index": i, "field": f, "error": e} for i, f, e in details],
    }


async def usage_metrics(
    client: httpx.AsyncClient, key: str, **params: str
) -> dict[str, dict[str, int]]:
    """The sms/mms/voice part of an all-time read."""
    response = await client.get("/v1/analytics/usage", params=params, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    body = response.json()["usage"]
    return {kind: body[kind] for kind in ("sms", "mms", "voice")}


async def stored(engine: AsyncEngine) -> tuple[int, int]:
    """(log rows, delta rows): both stay 0 when a batch is rejected."""
    async with engine.connect() as conn:
        events = await conn.scalar(text("SELECT count(*) FROM usage_events"))
        deltas = await conn.scalar(text("SELECT count(*) FROM usage_deltas"))
    return int(events or 0), int(deltas or 0)


@dataclass(frozen=True)
class World:
    """An organization with one user, and a write key and a read key for it."""

    organization_id: str
    user_id: str
    key: str
    read_key: str


@pytest.fixture
async def world(engine: AsyncEngine) -> World:
    organization_id = await make_organization(engine, "Acme Corp")
    return World(
        organization_id,
        await make_user(engine, organization_id, "John Smith", "john@example.com"),
        await make_key(engine, write=True),
        await make_key(engine),
    )


# --- exactly once ---------------------------------------------------------------------


async def test_a_batch_is_accepted_and_counted(client: httpx.AsyncClient, world: World) -> None:
    org = world.organization_id
    response = await post(
        client,
        world.key,
        [
            event(org, "m1", quantity=2, user_id=world.user_id),
            event(org, "m2", direction="inbound", quantity=3),
            event(org, "p1", type="mms", quantity=4),
            event(org, "c1", type="voice", quantity=125, knowledge_base=True),
            event(org, "c2", type="voice", quantity=60),
        ],
    )
    assert response.status_code == 200
    assert response.json() == ingest_answer(5)
    assert await usage_metrics(client, world.key, organization_id=org) == {
        "sms": {"outbound": 2, "inbound": 3, "total": 5},
        "mms": {"outbound": 4, "inbound": 0, "total": 4},
        "voice": {"seconds": 60, "kb_seconds": 125, "total_seconds": 185},
    }


async def test_a_retried_batch_is_all_duplicates(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    org = world.organization_id
    batch = [event(org, f"e{i}", quantity=i + 1, user_id=world.user_id) for i in range(5)]
    assert (await post(client, world.key, batch)).json() == ingest_answer(5)

    response = await post(client, world.key, batch)

    assert response.status_code == 200
    assert response.json() == ingest_answer(0, duplicates=5)
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"]["outbound"] == 15
    assert (await stored(engine))[0] == 5


async def test_same_id_with_other_content_is_a_conflict_and_the_rest_applies(
    client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    await post(client, world.key, [event(org, "call_77a1", type="voice", quantity=100)])

    response = await post(
        client,
        world.key,
        [
            event(org, "msg_8f2c:part1", quantity=2),
            event(org, "call_77a1", type="voice", quantity=125, knowledge_base=True),
        ],
    )

    assert response.status_code == 200
    assert response.json() == ingest_answer(1, conflicts=["call_77a1"])
    # The conflicting event changed nothing: the first recording stands.
    assert await usage_metrics(client, world.key, organization_id=org) == {
        "sms": {"outbound": 2, "inbound": 0, "total": 2},
        "mms": {"outbound": 0, "inbound": 0, "total": 0},
        "voice": {"seconds": 100, "kb_seconds": 0, "total_seconds": 100},
    }


async def test_duplicates_and_conflicts_in_one_answer(
    client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    await post(client, world.key, [event(org, "a"), event(org, "b"), event(org, "c")])

    response = await post(
        client,
        world.key,
        [
            event(org, "c", quantity=9),
            event(org, "new"),
            event(org, "a"),
            event(org, "b", direction="inbound"),
        ],
    )

    assert response.json() == ingest_answer(1, duplicates=1, conflicts=["c", "b"])


async def test_conflicts_are_listed_in_the_order_they_were_sent(
    client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    await post(client, world.key, [event(org, "b")])

    response = await post(
        client,
        world.key,
        [event(org, "a", quantity=1), event(org, "a", quantity=2), event(org, "b", quantity=3)],
    )

    assert response.json() == ingest_answer(1, conflicts=["a", "b"])


async def test_identical_event_twice_in_one_batch_is_one_accepted_and_one_duplicate(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    org = world.organization_id
    twice = event(org, "x", quantity=7)

    response = await post(client, world.key, [twice, event(org, "y"), twice])

    assert response.json() == ingest_answer(2, duplicates=1)
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"]["outbound"] == 8
    assert (await stored(engine))[0] == 2


@pytest.mark.parametrize("first, second", [(7, 8), (8, 7)])
async def test_same_id_with_other_content_in_one_batch_keeps_the_first_and_is_a_conflict(
    client: httpx.AsyncClient, world: World, first: int, second: int
) -> None:
    """The first of two events with one id is kept, whatever their content."""
    org = world.organization_id

    response = await post(
        client, world.key, [event(org, "x", quantity=first), event(org, "x", quantity=second)]
    )

    assert response.json() == ingest_answer(1, conflicts=["x"])
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"]["outbound"] == first


async def test_a_batch_all_new_but_one_retry_names_only_that_one(
    client: httpx.AsyncClient, world: World
) -> None:
    """Duplicates and conflicts are looked for only when fewer events went in than were
    sent; then the events this batch inserted must not count as either."""
    org = world.organization_id
    await post(client, world.key, [event(org, "old", quantity=1)])
    batch = [event(org, f"new{i}", quantity=1, user_id=world.user_id) for i in range(300)]

    response = await post(
        client, world.key, [*batch[:150], event(org, "old", quantity=2), *batch[150:]]
    )

    assert response.json() == ingest_answer(300, conflicts=["old"])
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"]["outbound"] == 301


async def test_a_repeat_listed_before_its_conflicting_twin_counts_once(
    client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    await post(client, world.key, [event(org, "x", quantity=7)])

    response = await post(
        client,
        world.key,
        [event(org, "x", quantity=8), event(org, "x", quantity=9), event(org, "x", quantity=7)],
    )

    assert response.json() == ingest_answer(0, duplicates=1, conflicts=["x"])
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"]["outbound"] == 7


async def test_same_id_in_two_organizations_is_two_events(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    other = await make_organization(engine, "Other")

    response = await post(
        client,
        world.key,
        [event(world.organization_id, "shared", quantity=2), event(other, "shared", quantity=5)],
    )

    assert response.json() == ingest_answer(2)
    assert (
        await post(client, world.key, [event(other, "shared", quantity=5)])
    ).json() == ingest_answer(0, duplicates=1)
    assert (await usage_metrics(client, world.key, organization_id=world.organization_id))["sms"][
        "outbound"
    ] == 2
    assert (await usage_metrics(client, world.key, organization_id=other))["sms"]["outbound"] == 5


async def test_ids_are_any_1_to_255_visible_ascii_characters(
    client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    ids = ["x", "y" * 255, "".join(chr(c) for c in range(0x21, 0x7F)), 'say "hi" \\o/']
    batch = [event(org, i.replace(" ", "_")) for i in ids]

    assert (await post(client, world.key, batch)).json() == ingest_answer(4)
    assert (await post(client, world.key, batch)).json() == ingest_answer(0, duplicates=4)


@pytest.mark.parametrize(
    ("occurred_at", "stored_at"),
    [
        ("2026-02-10T12:00Z", datetime(2026, 2, 10, 12, tzinfo=UTC)),
        ("2026-02-10T12:00:00", datetime(2026, 2, 10, 12, tzinfo=UTC)),
        ("2026-02-10T12:00:00.123456789Z", datetime(2026, 2, 10, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2026-02-10T12:00:00-08:00", datetime(2026, 2, 10, 20, tzinfo=UTC)),
        ("2026-02-10T12:00:00+05:30", datetime(2026, 2, 10, 6, 30, tzinfo=UTC)),
    ],
)
async def test_occurred_at_takes_any_iso_8601_date_time(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    world: World,
    occurred_at: str,
    stored_at: datetime,
) -> None:
    response = await post(
        client, world.key, [event(world.organization_id, occurred_at=occurred_at)]
    )

    assert response.json() == ingest_answer(1)
    async with engine.connect() as conn:
        assert await conn.scalar(text("SELECT occurred_at FROM usage_events")) == stored_at


@pytest.mark.parametrize(
    ("first", "again"),
    [
        ({"occurred_at": "2026-02-10T12:00:00Z"}, {"occurred_at": "2026-02-10T13:00:00+01:00"}),
        ({"occurred_at": "2026-02-10T12:00:00Z"}, {"occurred_at": "2026-02-10T12:00:00"}),
        ({"occurred_at": "2026-02-10T12:00:00Z"}, {"occurred_at": "2026-02-10T12:00:00.000Z"}),
        ({"type": "voice", "seconds": 5}, {"type": "voice", "seconds": 5, "knowledge_base": False}),
        ({"user_id": None}, {}),
    ],
    ids=["offset", "no-offset", "zero-fraction", "knowledge_base-default", "null-user"],
)
async def test_the_same_content_written_differently_is_a_duplicate(
    client: httpx.AsyncClient, world: World, first: dict[str, Any], again: dict[str, Any]
) -> None:
    base = event(world.organization_id, "e")

    def variant(patch: dict[str, Any]) -> dict[str, Any]:
        body = {**base, **patch}
        if body["type"] == "voice":
            body.pop("segments")
        return body

    assert (await post(client, world.key, [variant(first)])).json() == ingest_answer(1)
    assert (await post(client, world.key, [variant(again)])).json() == ingest_answer(
        0, duplicates=1
    )


@pytest.mark.parametrize(
    "patch",
    [
        {"segments": 2},
        {"direction": "inbound"},
        {"type": "mms"},
        {"occurred_at": "2026-02-10T12:00:00.001Z"},
        {"user_id": "USER"},
        {"type": "voice", "seconds": 1},
    ],
    ids=["segments", "direction", "type", "occurred_at", "user_id", "voice"],
)
async def test_any_difference_in_content_is_a_conflict(
    client: httpx.AsyncClient, world: World, patch: dict[str, Any]
) -> None:
    original = event(world.organization_id, "e")
    changed = {**original, **patch}
    if changed.get("user_id") == "USER":
        changed["user_id"] = world.user_id
    if changed["type"] == "voice":
        changed.pop("segments")
    await post(client, world.key, [original])

    assert (await post(client, world.key, [changed])).json() == ingest_answer(0, conflicts=["e"])


# --- validation: the whole batch is rejected and nothing is written -------------------

NOW = "2026-02-10T12:00:00Z"
SEGMENTS_ONLY = "is only allowed for sms and mms events"
VOICE_ONLY = "is only allowed for voice events"
BAD_ID = "must be 1 to 255 visible ASCII characters"
BAD_INSTANT = "must be an ISO 8601 date-time, e.g. 2026-02-10T12:00:00Z"

# (change to a valid sms event, field, error); a value of None removes the field.
INVALID_EVENTS: list[tuple[dict[str, Any], str, str]] = [
    ({"segments": "2"}, "segments", "Input should be a valid integer"),
    ({"segments": True}, "segments", "Input should be a valid integer"),
    ({"segments": 2.0}, "segments", "Input should be a valid integer"),
    ({"segments": 0}, "segments", "Input should be greater than or equal to 1"),
    ({"segments": 10_001}, "segments", "Input should be less than or equal to 10000"),
    ({"segments": None}, "segments", "is required for sms events"),
    (
        {"segments": None, "type": "voice", "seconds": -1},
        "seconds",
        "Input should be greater than or equal to 0",
    ),
    (
        {"segments": None, "type": "voice", "seconds": 1_000_001},
        "seconds",
        "Input should be less than or equal to 1000000",
    ),
    (
        {"segments": None, "type": "voice", "seconds": 1, "knowledge_base": "true"},
        "knowledge_base",
        "Input should be a valid boolean",
    ),
    ({"segments": None, "type": "voice"}, "seconds", "is required for voice events"),
    ({"type": "voice", "seconds": 1}, "segments", SEGMENTS_ONLY),
    ({"seconds": 1}, "seconds", VOICE_ONLY),
    ({"knowledge_base": True}, "knowledge_base", VOICE_ONLY),
    ({"knowledge_base": False}, "knowledge_base", VOICE_ONLY),
    ({"type": "fax"}, "type", "Input should be 'sms', 'mms' or 'voice'"),
    ({"direction": "sideways"}, "direction", "Input should be 'outbound' or 'inbound'"),
    ({"occurred_at": None}, "occurred_at", "Field required"),
    ({"occurred_at": "2026-02-10"}, "occurred_at", BAD_INSTANT),
    ({"occurred_at": "2026-02-10 12:00:00"}, "occurred_at", BAD_INSTANT),
    ({"occurred_at": "2026-02-30T12:00:00Z"}, "occurred_at", BAD_INSTANT),
    ({"occurred_at": "yesterday"}, "occurred_at", BAD_INSTANT),
    ({"occurred_at": 1770724800}, "occurred_at", "Input should be a valid datetime"),
    ({"colour": "red"}, "colour", "Extra inputs are not permitted"),
    ({"id": ""}, "id", BAD_ID),
    ({"id": "x" * 256}, "id", BAD_ID),
    ({"id": "msg 1"}, "id", BAD_ID),
    ({"id": "msg\t1"}, "id", BAD_ID),
    ({"id": "msg_é"}, "id", BAD_ID),
    ({"id": 17}, "id", "Input should be a valid string"),
    ({"id": None}, "id", "Field required"),
    ({"user_id": "u" * 129}, "user_id", "must be 1 to 128 visible ASCII characters"),
    ({"organization_id": ""}, "organization_id", "must be 1 to 128 visible ASCII characters"),
]


async def test_an_explicit_null_is_refused_where_leaving_the_field_out_is_fine(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    org = world.organization_id
    voice = event(org, "v", type="voice", quantity=60)
    batch = [
        voice | {"knowledge_base": None},
        event(org, "s") | {"seconds": None},
        event(org, "m", type="mms") | {"knowledge_base": None},
        voice | {"id": "v2", "segments": None},
    ]
    response = await post(client, world.key, batch)
    assert (response.status_code, response.json()) == (
        400,
        {
            "success": False,
            "error": "invalid events",
            "details": [
                {"index": 0, "field": "knowledge_base", "error": "must not be null"},
                {"index": 1, "field": "seconds", "error": "must not be null"},
                {"index": 2, "field": "knowledge_base", "error": "must not be null"},
                {"index": 3, "field": "segments", "error": "must not be null"},
            ],
        },
    )
    assert await stored(engine) == (0, 0)


@pytest.mark.parametrize(
    ("patch", "field", "error"),
    INVALID_EVENTS,
    ids=[f"{field}={json.dumps(patch)[:40]}" for patch, field, _ in INVALID_EVENTS],
)
async def test_an_invalid_event_rejects_the_whole_batch(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    world: World,
    patch: dict[str, Any],
    field: str,
    error: str,
) -> None:
    org = world.organization_id
    bad = event(org, "bad", occurred_at=NOW)
    for name, value in patch.items():
        if value is None:
            bad.pop(name, None)
        else:
            bad[name] = value

    response = await post(client, world.key, [event(org, "good"), bad, event(org, "good2")])

    assert response.status_code == 400
    assert response.json() == invalid((1, field, error))
    assert await stored(engine) == (0, 0)
    assert await usage_metrics(client, world.key, organization_id=org) == ZERO_USAGE


async def test_every_bad_event_is_named(client: httpx.AsyncClient, world: World) -> None:
    org = world.organization_id
    response = await post(
        client,
        world.key,
        [
            {**event(org, "a"), "segments": 0},
            event(org, "fine"),
            "not an event",
            {"id": "c", "organization_id": org, "type": "voice", "direction": "inbound"},
        ],
    )

    assert response.status_code == 400
    assert response.json() == invalid(
        (0, "segments", "Input should be greater than or equal to 1"),
        (2, "event", "must be an object"),
        # Whether the quantity fits the type is judged once the fields themselves are valid.
        (3, "occurred_at", "Field required"),
    )


async def test_an_event_too_far_in_the_future_is_rejected(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    org = world.organization_id
    soon = (utc_now() + timedelta(minutes=4)).isoformat()
    too_late = (utc_now() + timedelta(minutes=6)).isoformat()

    response = await post(
        client,
        world.key,
        [event(org, "soon", occurred_at=soon), event(org, "late", occurred_at=too_late)],
    )

    assert response.status_code == 400
    assert response.json() == invalid(
        (1, "occurred_at", "must not be more than 5 minutes in the future")
    )
    assert await stored(engine) == (0, 0)
    assert (
        await post(client, world.key, [event(org, "soon", occurred_at=soon)])
    ).json() == ingest_answer(1)


async def test_an_unknown_organization_rejects_the_batch(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    response = await post(
        client, world.key, [event(world.organization_id, "a"), event("no-such-org", "b")]
    )

    assert response.status_code == 400
    assert response.json() == invalid((1, "organization_id", "organization not found"))
    assert await stored(engine) == (0, 0)


async def test_an_organization_outside_the_keys_scope_reads_as_unknown(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    mine, theirs = await make_partner(engine, "Mine"), await make_partner(engine, "Theirs")
    my_org = await make_organization(engine, "Mine", partner_id=mine)
    their_org = await make_organization(engine, "Theirs", partner_id=theirs)
    lone_org = await make_organization(engine, "No partner")
    partner_key = await make_key(engine, "partner", partner_id=mine, write=True)
    org_key = await make_key(engine, "organization", organization_id=my_org, write=True)

    unknown = await post(client, partner_key, [event(my_org, "a"), event("no-such-org", "b")])
    for key, organization_id in (
        (partner_key, their_org),
        (partner_key, lone_org),
        (org_key, their_org),
        (org_key, lone_org),
    ):
        response = await post(client, key, [event(my_org, "a"), event(organization_id, "b")])
        assert response.status_code == 400
        assert response.content == unknown.content
    assert unknown.json() == invalid((1, "organization_id", "organization not found"))
    assert await stored(engine) == (0, 0)
    assert (await post(client, partner_key, [event(my_org, "a")])).json() == ingest_answer(1)
    assert (await post(client, org_key, [event(my_org, "b")])).json() == ingest_answer(1)


async def test_a_user_of_another_organization_or_unknown_rejects_the_batch(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    other = await make_organization(engine, "Other")
    stranger = await make_user(engine, other, "Jane", "jane@example.com")
    org = world.organization_id

    response = await post(
        client,
        world.key,
        [
            event(org, "a", user_id=world.user_id),
            event(org, "b", user_id=stranger),
            event(org, "c", user_id="no-such-user"),
            event("no-such-org", "d", user_id=world.user_id),
        ],
    )

    assert response.status_code == 400
    assert response.json() == invalid(
        (1, "user_id", "user not found"),
        (2, "user_id", "user not found"),
        (3, "organization_id", "organization not found"),
    )
    assert await stored(engine) == (0, 0)


# --- the request as a whole -----------------------------------------------------------

EVENTS_LIMIT = "events must be a list of 1 to 1000 events"
ONLY_EVENTS = "request body must be a JSON object with only an events list"


async def test_a_batch_of_1000_events_is_accepted(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    org = world.organization_id
    batch = [event(org, f"e{i:04}", quantity=1 + i % 7) for i in range(1000)]

    response = await post(client, world.key, batch)

    assert response.json() == ingest_answer(1000)
    expected = sum(1 + i % 7 for i in range(1000))
    assert (await usage_metrics(client, world.key, organization_id=org))["sms"][
        "outbound"
    ] == expected
    assert (await post(client, world.key, batch)).json() == ingest_answer(0, duplicates=1000)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"events": []}, EVENTS_LIMIT),
        ({"events": "x"}, EVENTS_LIMIT),
        ({"events": {"id": "a"}}, EVENTS_LIMIT),
        ({"events": None}, EVENTS_LIMIT),
        ({"events": [], "extra": 1}, ONLY_EVENTS),
        ({"event": []}, ONLY_EVENTS),
        ({}, ONLY_EVENTS),
        ([], ONLY_EVENTS),
        ("events", ONLY_EVENTS),
    ],
)
async def test_a_malformed_body_is_rejected(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World, body: Any, message: str
) -> None:
    response = await client.post(URL, json=body, headers={"X-API-Key": world.key})

    assert response.status_code == 400
    assert response.json() == error(message)
    assert await stored(engine) == (0, 0)


async def test_more_than_1000_events_is_rejected(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    batch = [event(world.organization_id, f"e{i}") for i in range(1001)]

    response = await post(client, world.key, batch)

    assert response.status_code == 400
    assert response.json() == error(EVENTS_LIMIT)
    assert await stored(engine) == (0, 0)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"not json",
        b'{"events": [}',
        b"\xff\xfe",
        b'{"events": [1,]}',
        b'{"events": [NaN]}',
        b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ],
    ids=["empty", "open", "words", "broken", "not-utf8", "trailing-comma", "nan", "deep"],
)
async def test_a_body_that_is_not_json_is_rejected(
    client: httpx.AsyncClient, world: World, content: bytes
) -> None:
    response = await client.post(
        URL,
        content=content,
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
    )

    assert response.status_code == 400
    assert response.json() == error("request body must be valid JSON")


def padded(size: int, events: list[dict[str, Any]]) -> bytes:
    """A JSON body of exactly `size` bytes: the batch, then whitespace."""
    body = json.dumps({"events": events}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def test_a_body_of_exactly_1_mib_is_read(client: httpx.AsyncClient, world: World) -> None:
    response = await client.post(
        URL,
        content=padded(ONE_MIB, [event(world.organization_id, "a")]),
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
    )

    assert response.json() == ingest_answer(1)


async def test_a_body_over_1_mib_is_413(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    response = await client.post(
        URL,
        content=padded(ONE_MIB + 1, [event(world.organization_id, "a")]),
        headers={"X-API-Key": world.key, "Content-Type": "application/json"},
    )

    assert response.status_code == 413
    assert response.json() == {"success": False, "error": "request body too large"}
    assert await stored(engine) == (0, 0)


async def test_a_streamed_body_over_1_mib_is_413(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    body = padded(ONE_MIB + 1, [event(world.organization_id, "a")])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await client.post(
        URL, content=chunks(), headers={"X-API-Key": world.key, "Content-Type": "application/json"}
    )

    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert response.json() == {"success": False, "error": "request body too large"}
    assert await stored(engine) == (0, 0)


async def test_a_streamed_body_under_1_mib_is_read(client: httpx.AsyncClient, world: World) -> None:
    body = padded(ONE_MIB, [event(world.organization_id, "a")])

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    response = await client.post(
        URL, content=chunks(), headers={"X-API-Key": world.key, "Content-Type": "application/json"}
    )

    assert response.json() == ingest_answer(1)


# --- keys -----------------------------------------------------------------------------


async def test_a_read_key_may_not_write(
    client: httpx.AsyncClient, engine: AsyncEngine, world: World
) -> None:
    response = await post(client, world.read_key, [event(world.organization_id)])

    assert response.status_code == 403
    assert response.json() == {"success": False, "error": "API key does not have write permission"}
    assert await stored(engine) == (0, 0)


async def test_no_key_is_401(client: httpx.AsyncClient, engine: AsyncEngine, world: World) -> None:
    response = await client.post(URL, json={"events": [event(world.organization_id)]})

    assert response.status_code == 401
    assert response.json() == {"success": False, "error": "X-API-Key header is required"}
    assert await stored(engine) == (0, 0)


async def test_an_unknown_key_is_401(client: httpx.AsyncClient, world: World) -> None:
    response = await post(client, "usk_not-a-key", [event(world.organization_id)])

    assert response.status_code == 401
    assert response.json() == {"success": False, "error": "invalid API key"}


# --- real time ------------------------------------------------------------------------


async def test_an_accepted_batch_is_in_the_very_next_read(
    client: httpx.AsyncClient, world: World
) -> None:
    org, user = world.organization_id, world.user_id
    batch = [
        event(org, "s1", quantity=3, user_id=user),
        event(org, "s2", direction="inbound", quantity=4),
        event(org, "m1", type="mms", direction="inbound", quantity=5, user_id=user),
        event(org, "v1", type="voice", quantity=60, user_id=user),
        event(org, "v2", type="voice", quantity=30, knowledge_base=True),
    ]
    for round_ in range(3):
        assert (await post(client, world.key, batch)).json() == (
            ingest_answer(5) if round_ == 0 else ingest_answer(0, duplicates=5)
        )
        organization = await client.get(
            "/v1/analytics/usage",
            params={"organization_id": org},
            headers={"X-API-Key": world.read_key},
        )
        assert organization.json() == {
            "success": True,
            "usage": {
                "organization_id": org,
                "organization_name": "Acme Corp",
                "sms": {"outbound": 3, "inbound": 4, "total": 7},
                "mms": {"outbound": 0, "inbound": 5, "total": 5},
                "voice": {"seconds": 60, "kb_seconds": 30, "total_seconds": 90},
                "period": "all_time",
            },
            "powered_by": "Teli",
        }
        person = await client.get(
            "/v1/analytics/usage",
            params={"user_id": user},
            headers={"X-API-Key": world.read_key},
        )
        assert person.json() == {
            "success": True,
            "usage": {
                "user_id": user,
                "user_name": "John Smith",
                "user_email": "john@example.com",
                "sms": {"outbound": 3, "inbound": 0, "total": 3},
                "mms": {"outbound": 0, "inbound": 5, "total": 5},
                "voice": {"seconds": 60, "kb_seconds": 0, "total_seconds": 60},
                "period": "all_time",
            },
            "powered_by": "Teli",
        }


_ABSENT = object()


@pytest.mark.parametrize("kind", ["sms", "mms", "voice"])
def test_the_fast_type_check_agrees_with_the_errors_it_stands_in_for(kind: str) -> None:
    """Batches ask `fits_its_type` of every event and build `quantity_errors` only when it
    says no: the two must agree on every way the quantities can be given."""
    values = {"segments": (_ABSENT, None, 2), "seconds": (_ABSENT, None, 30)}
    values["knowledge_base"] = (_ABSENT, None, True, False)
    disagreements = []
    for combination in product(*values.values()):
        body: dict[str, Any] = {
            "id": "e1",
            "organization_id": "o1",
            "type": kind,
            "direction": "outbound",
            "occurred_at": "2026-11-01T00:00:00Z",
        }
        body |= {k: v for k, v in zip(values, combination, strict=True) if v is not _ABSENT}
        parsed = UsageEventIn.model_validate(body)
        if parsed.fits_its_type() != (not parsed.quantity_errors()):
            disagreements.append(body)
    assert disagreements == []
