"""Series (contract 2.6): how buckets are summed from the roll-ups.

`series.plan` is checked against sums computed directly from random events: the roll-ups
of every level are built here from those events, and the plan's reads are evaluated the
way the SQL evaluates them (rows of the top level in the bucket of their midpoint, signed
spans of finer rows, raw events of cut quarter-hours in their own bucket).
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from tests.test_calendar import MICROSECOND, changes
from usage_api.analytics import rollup
from usage_api.analytics.calendar import GRANULARITIES, Calendar
from usage_api.analytics.series import LEVELS, SIZE, Level, Plan, plan

START = datetime(2026, 1, 1, tzinfo=UTC)
ZONES = ("UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe")


def floor(at: datetime, level: Level) -> datetime:
    size = SIZE[level]
    return START + (at - START) // size * size


def evaluate(p: Plan, events: Sequence[tuple[datetime, int]]) -> list[int]:
    rows: dict[Level, dict[datetime, int]] = {level: defaultdict(int) for level in LEVELS}
    for at, value in events:
        for level in LEVELS:
            rows[level][floor(at, level)] += value
    n = len(p.bounds) - 1
    totals = [0] * (n + 2)
    for at, value in rows[p.top].items():
        if p.top_start <= at < p.top_end:
            totals[bisect_right(p.bounds, at + SIZE[p.top] / 2)] += value
    for span in p.spans:
        for at, value in rows[span.level].items():
            if span.start <= at < span.end:
                totals[span.to] += value
                totals[span.away] -= value
    for raw in p.raw:
        for at, value in events:
            if raw.start <= at < raw.end:
                totals[bisect_right(p.bounds, at)] += value
    return totals[1 : n + 1]


def direct(bounds: Sequence[datetime], events: Sequence[tuple[datetime, int]]) -> list[int]:
    totals = [0] * (len(bounds) - 1)
    for at, value in events:
        if bounds[0] <= at < bounds[-1]:
            totals[bisect_right(bounds, at) - 1] += value
    return totals


instants = st.builds(
    lambda quarters, micro: START + quarters * SIZE["quarter"] + timedelta(microseconds=micro),
    st.integers(0, 8 * 96),
    st.sampled_from([0, 0, 1, -1, 450_000_000]) | st.integers(0, 900_000_000 - 1),
)


@st.composite
def bounds(draw: st.DrawFn) -> list[datetime]:
    if draw(st.booleans()):  # a series' own buckets, between two random instants
        start, end = sorted(draw(st.lists(instants, min_size=2, max_size=2, unique=True)))
        calendar = Calendar(
            ZoneInfo(draw(st.sampled_from(ZONES))), draw(st.sampled_from(GRANULARITIES))
        )
        cut = calendar.buckets(start, end)
        return [cut[0][0], *(b for _, b in cut)]
    return sorted(draw(st.lists(instants, min_size=2, max_size=40, unique=True)))


@settings(max_examples=400, deadline=None)
@given(
    bounds(),
    st.lists(st.tuples(instants, st.integers(1, 1000)), max_size=60),
    st.sampled_from(LEVELS),
)
def test_a_plan_sums_every_bucket_exactly(
    cuts: list[datetime], events: list[tuple[datetime, int]], top: Level
) -> None:
    # Events exactly on, and one microsecond before, every bound too.
    events = events + [(b, 7) for b in cuts] + [(b - timedelta(microseconds=1), 3) for b in cuts]
    assert evaluate(plan(cuts, top), events) == direct(cuts, events)


def test_a_boundary_costs_less_than_half_a_row_of_each_level() -> None:
    new_york = Calendar(ZoneInfo("America/New_York"), "day")
    cut = new_york.buckets(datetime(2025, 1, 1, 5, tzinfo=UTC), datetime(2026, 1, 1, 5, tzinfo=UTC))
    p = plan([cut[0][0], *(b for _, b in cut)], "day")
    assert p.rows()["day"] == 366 and p.rows()["hour"] <= 366 * 5 and "quarter" not in p.rows()
    kolkata = Calendar(ZoneInfo("Asia/Kolkata"), "day")
    cut = kolkata.buckets(
        datetime(2024, 12, 31, 18, 30, tzinfo=UTC), datetime(2025, 12, 31, 18, 30, tzinfo=UTC)
    )
    p = plan([cut[0][0], *(b for _, b in cut)], "day")
    assert p.rows() == {"raw": 0, "day": 366, "hour": 366 * 5, "quarter": 366 * 2}


def test_each_day_a_zone_cuts_alike_moves_the_same_hours() -> None:
    # New York's days start at 05:00Z: each UTC day counts in the local day of its noon,
    # and its first five hours move to the local day before (out of the range: bucket 0).
    utc = [datetime(2025, 1, day, 5, tzinfo=UTC) for day in (1, 2, 3, 4)]
    p = plan(utc, "day")
    assert (p.top_start, p.top_end) == (utc[0] - timedelta(hours=5), utc[-1] + timedelta(hours=19))
    assert [(s.level, s.start, s.end, s.to, s.away) for s in p.spans] == [
        ("hour", at - timedelta(hours=5), at, to, away)
        for at, to, away in zip(utc, (0, 1, 2, 3), (1, 2, 3, 0), strict=True)
    ]
    assert p.raw == []


# -- through HTTP, against real PostgreSQL -------------------------------------------------

URL = "/v1/analytics/usage"
METRIC_NAMES = ("sms_outbound", "sms_inbound", "mms_outbound", "mms_inbound", "voice", "kb")
HTTP_ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Havana",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
)
# The events lie in this window; every DST change of the zones above in 2026 is inside.
WINDOW = (datetime(2026, 2, 20, tzinfo=UTC), datetime(2026, 11, 20, tzinfo=UTC))


@dataclass(frozen=True)
class Sent:
    at: datetime
    user_id: str | None
    values: tuple[int, int, int, int, int, int]


def metrics_json(values: Sequence[int]) -> dict[str, Any]:
    so, si, mo, mi, v, kb = values
    return {
        "sms": {"outbound": so, "inbound": si, "total": so + si},
        "mms": {"outbound": mo, "inbound": mi, "total": mo + mi},
        "voice": {"seconds": v, "kb_seconds": kb, "total_seconds": v + kb},
    }


def body_of(sent: Sent, organization_id: str) -> dict[str, Any]:
    kind = next(i for i, v in enumerate(sent.values) if v)
    type_, direction = [
        ("sms", "outbound"),
        ("sms", "inbound"),
        ("mms", "outbound"),
        ("mms", "inbound"),
        ("voice", "outbound"),
        ("voice", "inbound"),
    ][kind]
    body = event(
        organization_id,
        type=type_,
        direction=direction,
        quantity=sent.values[kind],
        user_id=sent.user_id,
        occurred_at=sent.at.isoformat().replace("+00:00", "Z"),
    )
    if type_ == "voice":
        body["knowledge_base"] = kind == 5
    return body


def random_values(rng: random.Random) -> tuple[int, int, int, int, int, int]:
    values = [0] * 6
    values[rng.randrange(6)] = rng.randint(1, 9) if rng.random() < 0.8 else rng.randint(10, 900)
    return (values[0], values[1], values[2], values[3], values[4], values[5])


def edge_instants() -> list[datetime]:
    """Every local midnight and hour start around each zone's changes, and 1 us before."""
    instants = []
    for name in HTTP_ZONES:
        zone = ZoneInfo(name)
        for at in changes(name) if name != "UTC" else (datetime(2026, 3, 29, tzinfo=UTC),):
            if not WINDOW[0] <= at < WINDOW[1]:
                continue
            for unit in ("hour", "day"):
                calendar = Calendar(zone, unit)  # type: ignore[arg-type]
                b = calendar.floor(at - timedelta(hours=3))
                for _ in range(8 if unit == "hour" else 3):
                    instants += [b, b - timedelta(microseconds=1)]
                    b = calendar.following(b)
    return instants


async def post_events(client: httpx.AsyncClient, key: str, bodies: list[dict[str, Any]]) -> None:
    for begin in range(0, len(bodies), 1000):
        response = await client.post(
            "/v1/usage/events",
            json={"events": bodies[begin : begin + 1000]},
            headers={"X-API-Key": key},
        )
        assert response.status_code == 200, response.text
        assert response.json()["accepted"] == len(bodies[begin : begin + 1000])


def expected_sums(sent: Sequence[Sent], start: datetime, end: datetime) -> list[int]:
    totals = [0] * 6
    for s in sent:
        if start <= s.at < end:
            totals = [a + b for a, b in zip(totals, s.values, strict=True)]
    return totals


def random_local(rng: random.Random) -> str:
    """A bound in one of the contract's forms, mostly without an offset (local)."""
    at = WINDOW[0] + (WINDOW[1] - WINDOW[0]) * rng.random()
    at = at.replace(microsecond=rng.choice([0, 0, rng.randrange(10**6)]))
    form = rng.choice(["date", "minute", "second", "fraction", "offset"])
    if form == "date":
        return at.date().isoformat()
    if form == "minute":
        return at.strftime("%Y-%m-%dT%H:%M")
    if form == "second":
        return at.strftime("%Y-%m-%dT%H:%M:%S")
    if form == "fraction":
        return at.strftime("%Y-%m-%dT%H:%M:%S.%f")
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


MAX_SPAN = {
    "hour": timedelta(days=40),
    "day": timedelta(days=300),
    "week": timedelta(days=300),
    "month": timedelta(days=300),
}


async def check_series(
    client: httpx.AsyncClient,
    key: str,
    rng: random.Random,
    sent: Sequence[Sent],
    organization_id: str,
    user_id: str,
    asked: int,
) -> None:
    """`asked` random series, of the organization or a user, each bucket against the sum
    of the events sent; most must be answered (not refused as empty or too long)."""
    answered = 0
    for _ in range(asked):
        zone_name = rng.choice(HTTP_ZONES)
        granularity = rng.choice(GRANULARITIES)
        start, end = sorted([random_local(rng), random_local(rng)])
        params = {"start_date": start, "end_date": end, "timezone": zone_name}
        as_user = rng.random() < 0.3
        params.update({"user_id": user_id} if as_user else {"organization_id": organization_id})
        plain = await client.get(URL, params=params, headers={"X-API-Key": key})
        if plain.status_code == 400:  # an empty range: the same with granularity
            assert plain.json()["error"] == "start_date must not be after end_date"
            continue
        assert plain.status_code == 200, plain.text
        usage = plain.json()["usage"]
        range_start = datetime.fromisoformat(usage["start_date"])
        range_end = datetime.fromisoformat(usage["end_date"])
        range_end += timedelta(seconds=1) if "." not in usage["end_date"] else MICROSECOND
        response = await client.get(
            URL, params={**params, "granularity": granularity}, headers={"X-API-Key": key}
        )
        if response.status_code == 400:
            assert response.json()["error"].startswith("too many buckets")
            assert range_end - range_start > MAX_SPAN[granularity] / 300
            continue
        assert response.status_code == 200, response.text
        series = response.json()["usage"]
        # The range answer, then granularity and buckets; totals as without granularity.
        assert {k: v for k, v in series.items() if k not in ("granularity", "buckets")} == usage
        assert list(series)[-3:] == ["timezone", "granularity", "buckets"]
        buckets = series["buckets"]
        zone = ZoneInfo(zone_name)
        starts = [datetime.fromisoformat(b["start"]) for b in buckets]
        ends = [datetime.fromisoformat(b["end"]) for b in buckets]
        assert starts[0] == range_start and ends[-1] == range_end
        assert starts[1:] == ends[:-1]
        assert starts == [b for b, _ in Calendar(zone, granularity).buckets(range_start, range_end)]
        sums = [0] * 6
        for bucket, a, b in zip(buckets, starts, ends, strict=True):
            assert a.utcoffset() == a.astimezone(zone).utcoffset()
            assert b.utcoffset() == b.astimezone(zone).utcoffset()
            mine = [s for s in sent if (not as_user or s.user_id == user_id)]
            want = expected_sums(mine, a, b)
            assert {k: bucket[k] for k in ("sms", "mms", "voice")} == metrics_json(want), (
                params,
                granularity,
                bucket,
            )
            sums = [x + y for x, y in zip(sums, want, strict=True)]
        assert {k: usage[k] for k in ("sms", "mms", "voice")} == metrics_json(sums)
        answered += 1
    assert answered >= asked // 2


@pytest.mark.slow
async def test_random_series_in_every_zone_equal_sums_over_the_events_sent(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(20261201)
    organization_id = await make_organization(engine, "Acme")
    users = [await make_user(engine, organization_id, f"U{i}") for i in range(3)]
    key = await make_key(engine, "admin", write=True)
    instants = edge_instants() + [
        WINDOW[0] + (WINDOW[1] - WINDOW[0]) * rng.random() for _ in range(1500)
    ]
    sent = [
        Sent(
            at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC),
            rng.choice([None, *users]),
            random_values(rng),
        )
        for at in instants
    ]
    rng.shuffle(sent)
    half = len(sent) // 2
    await post_events(client, key, [body_of(s, organization_id) for s in sent[:half]])
    await rollup.fold_all(engine)
    await post_events(client, key, [body_of(s, organization_id) for s in sent[half:]])
    # Part folded, part still deltas.
    await check_series(client, key, rng, sent, organization_id, users[0], 40)
    # A fold that is interrupted never happened.
    async with engine.connect() as conn:
        transaction = await conn.begin()
        assert await rollup.fold(conn, 500) == 500
        await transaction.rollback()
    await check_series(client, key, rng, sent, organization_id, users[0], 15)
    await rollup.fold_all(engine)
    await check_series(client, key, rng, sent, organization_id, users[0], 40)


def zero_bucket(start: str, end: str, values: Sequence[int] = (0,) * 6) -> dict[str, Any]:
    return {"start": start, "end": end, **metrics_json(values)}


async def test_the_repeated_hour_is_listed_twice_with_its_own_usage(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin", write=True)
    # 02:30 CEST and 02:30 CET: the same wall time, an hour apart.
    await post_events(
        client,
        key,
        [
            event(organization_id, quantity=2, occurred_at="2026-10-25T00:30:00Z"),
            event(organization_id, quantity=5, occurred_at="2026-10-25T01:30:00Z"),
        ],
    )
    response = await client.get(
        URL,
        headers={"X-API-Key": key},
        params={
            "organization_id": organization_id,
            "start_date": "2026-10-25T01:00",
            "end_date": "2026-10-25T03:59:59",
            "timezone": "Europe/Berlin",
            "granularity": "hour",
        },
    )
    assert response.status_code == 200
    assert response.json() == {
        "success": True,
        "usage": {
            "organization_id": organization_id,
            "organization_name": "Acme",
            **metrics_json((7, 0, 0, 0, 0, 0)),
            "period": "custom",
            "start_date": "2026-10-24T23:00:00Z",
            "end_date": "2026-10-25T02:59:59Z",
            "timezone": "Europe/Berlin",
            "granularity": "hour",
            "buckets": [
                zero_bucket("2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00"),
                zero_bucket(
                    "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00", (2, 0, 0, 0, 0, 0)
                ),
                zero_bucket(
                    "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00", (5, 0, 0, 0, 0, 0)
                ),
                zero_bucket("2026-10-25T03:00:00+01:00", "2026-10-25T04:00:00+01:00"),
            ],
        },
        "powered_by": "Teli",
    }


async def test_days_of_23_and_25_hours_and_a_midnight_that_does_not_exist(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin", write=True)
    await post_events(
        client,
        key,
        [
            # Havana, 2026-03-08: 00:00 never happens; 05:00Z is 01:00-04:00, the day's start.
            event(organization_id, quantity=1, occurred_at="2026-03-08T04:59:59.999999Z"),
            event(organization_id, quantity=10, occurred_at="2026-03-08T05:00:00Z"),
        ],
    )

    async def days(zone: str, start: str, end: str) -> list[dict[str, Any]]:
        response = await client.get(
            URL,
            headers={"X-API-Key": key},
            params={
                "organization_id": organization_id,
                "start_date": start,
                "end_date": end,
                "timezone": zone,
                "granularity": "day",
            },
        )
        assert response.status_code == 200, response.text
        buckets: list[dict[str, Any]] = response.json()["usage"]["buckets"]
        return buckets

    assert await days("America/Havana", "2026-03-07", "2026-03-08") == [
        zero_bucket("2026-03-07T00:00:00-05:00", "2026-03-08T01:00:00-04:00", (1, 0, 0, 0, 0, 0)),
        zero_bucket("2026-03-08T01:00:00-04:00", "2026-03-09T00:00:00-04:00", (10, 0, 0, 0, 0, 0)),
    ]
    assert [
        (b["start"], b["end"]) for b in await days("Europe/Berlin", "2026-03-29", "2026-03-29")
    ] == [("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00")]
    assert [
        (b["start"], b["end"]) for b in await days("Europe/Berlin", "2026-10-25", "2026-10-25")
    ] == [("2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00")]


async def test_1000_buckets_pass_and_1001_are_refused(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin")
    params = {
        "organization_id": organization_id,
        "granularity": "hour",
        "start_date": "2026-01-01T00:00:00Z",
    }
    # 1000 hours: through 2026-02-11T15:59:59Z.
    response = await client.get(
        URL, headers={"X-API-Key": key}, params={**params, "end_date": "2026-02-11T15:59:59Z"}
    )
    assert response.status_code == 200
    assert len(response.json()["usage"]["buckets"]) == 1000
    response = await client.get(
        URL, headers={"X-API-Key": key}, params={**params, "end_date": "2026-02-11T16:00:00Z"}
    )
    assert (response.status_code, response.json()) == (
        400,
        {
            "success": False,
            "error": "too many buckets: at most 1000"
            " (use a coarser granularity or a shorter range)",
        },
    )


async def test_a_monthly_series_reaches_the_last_day_a_date_holds(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin")
    params = {
        "organization_id": organization_id,
        "granularity": "month",
        "start_date": "9999-10-01",
        "end_date": "9999-12-30",
    }
    response = await client.get(URL, headers={"X-API-Key": key}, params=params)
    assert response.status_code == 200
    assert [(b["start"], b["end"]) for b in response.json()["usage"]["buckets"]] == [
        ("9999-10-01T00:00:00+00:00", "9999-11-01T00:00:00+00:00"),
        ("9999-11-01T00:00:00+00:00", "9999-12-01T00:00:00+00:00"),
        ("9999-12-01T00:00:00+00:00", "9999-12-31T00:00:00+00:00"),
    ]


async def test_a_series_without_end_date_runs_through_the_present_bucket(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin")
    now = datetime.now(UTC)
    start = (now - timedelta(days=2)).date().isoformat()
    response = await client.get(
        URL,
        headers={"X-API-Key": key},
        params={"organization_id": organization_id, "start_date": start, "granularity": "day"},
    )
    usage = response.json()["usage"]
    last = datetime.fromisoformat(usage["buckets"][-1]["end"])
    assert last - timedelta(days=1) <= now < last
    assert usage["end_date"] == (last - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("params", "error"),
    [
        (
            {"timezone": "Mars/Olympus"},
            "timezone must be an IANA time zone name, e.g. Europe/Berlin",
        ),
        (
            {"timezone": "+05:30", "start_date": "2026-01-01"},
            "timezone must be an IANA time zone name, e.g. Europe/Berlin",
        ),
        (
            {"granularity": "minute", "start_date": "2026-01-01"},
            "granularity must be one of hour, day, week, month",
        ),
        ({"granularity": "day"}, "start_date is required with granularity"),
        (
            {"granularity": "day", "end_date": "2026-01-01"},
            "start_date is required with granularity",
        ),
        (
            {"granularity": "day", "start_date": "2026-01-02", "end_date": "2026-01-01"},
            "start_date must not be after end_date",
        ),
        # Dates are checked before the time zone, the time zone before the granularity.
        (
            {"start_date": "soon", "timezone": "Mars/Olympus"},
            "start_date must be an ISO 8601 date or date-time, e.g. 2026-02-10T00:00:00Z",
        ),
        (
            {"timezone": "Mars/Olympus", "granularity": "minute"},
            "timezone must be an IANA time zone name, e.g. Europe/Berlin",
        ),
    ],
)
async def test_each_bad_parameter_is_its_own_400(
    client: httpx.AsyncClient, engine: AsyncEngine, params: dict[str, str], error: str
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin")
    response = await client.get(
        URL, headers={"X-API-Key": key}, params={"organization_id": organization_id, **params}
    )
    assert (response.status_code, response.json()) == (400, {"success": False, "error": error})


async def test_a_range_in_a_time_zone_names_it_and_an_all_time_answer_ignores_it(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin", write=True)
    await post_events(
        client,
        key,
        [
            event(organization_id, quantity=3, occurred_at="2026-02-28T18:29:59.999999Z"),
            event(organization_id, quantity=4, occurred_at="2026-02-28T18:30:00Z"),
        ],
    )
    params = {"organization_id": organization_id, "timezone": "Asia/Kolkata"}
    response = await client.get(
        URL, headers={"X-API-Key": key}, params={**params, "start_date": "2026-03-01"}
    )
    assert response.json()["usage"] == {
        "organization_id": organization_id,
        "organization_name": "Acme",
        **metrics_json((4, 0, 0, 0, 0, 0)),
        "period": "custom",
        "start_date": "2026-02-28T18:30:00Z",
        "end_date": None,
        "timezone": "Asia/Kolkata",
    }
    response = await client.get(URL, headers={"X-API-Key": key}, params=params)
    assert response.json()["usage"]["period"] == "all_time"
    assert "timezone" not in response.json()["usage"]


async def test_an_answer_carries_an_etag_and_a_current_copy_gets_304(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin", write=True)
    params = {
        "organization_id": organization_id,
        "start_date": "2026-03-01",
        "end_date": "2026-03-02",
        "granularity": "day",
    }
    first = await client.get(URL, params=params, headers={"X-API-Key": key})
    etag = first.headers["etag"]
    assert first.status_code == 200 and etag.startswith('"') and not etag.startswith("W/")
    again = await client.get(URL, params=params, headers={"X-API-Key": key, "If-None-Match": etag})
    assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    weak = await client.get(
        URL, params=params, headers={"X-API-Key": key, "If-None-Match": f'"x", W/{etag}'}
    )
    assert weak.status_code == 304
    await post_events(client, key, [event(organization_id, occurred_at="2026-03-01T10:00:00Z")])
    changed = await client.get(
        URL, params=params, headers={"X-API-Key": key, "If-None-Match": etag}
    )
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    # All-time answers too.
    plain = await client.get(
        URL, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    assert plain.headers["etag"] != changed.headers["etag"]


async def test_a_series_answer_is_the_json_of_its_content_byte_for_byte(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    # The buckets are written by hand (series_answer): they must read exactly as the
    # standard encoder writes the rest, names that need escaping included.
    name = 'Zoë "Ü" \\ 東京'
    organization_id = await make_organization(engine, name)
    key = await make_key(engine, "admin", write=True)
    await post_events(
        client,
        key,
        [
            event(organization_id, quantity=7, occurred_at="2026-03-29T00:30:00Z"),
            event(
                organization_id,
                type="mms",
                direction="inbound",
                quantity=2,
                occurred_at="2026-03-29T01:00:00Z",
            ),
            event(
                organization_id,
                type="voice",
                quantity=61,
                knowledge_base=True,
                occurred_at="2026-03-29T01:59:59.999999Z",
            ),
        ],
    )
    params = {
        "organization_id": organization_id,
        "start_date": "2026-03-29T01:00",
        "end_date": "2026-03-29T03:59",
        "timezone": "Europe/Berlin",
        "granularity": "hour",
    }
    response = await client.get(URL, params=params, headers={"X-API-Key": key})
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (
        response.content
        == json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    )
    assert body["usage"]["organization_name"] == name
    assert body["usage"]["buckets"] == [
        zero_bucket("2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", (7, 0, 0, 0, 0, 0)),
        zero_bucket("2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00", (0, 0, 0, 2, 0, 61)),
    ]


async def test_a_series_as_csv_has_one_row_per_bucket(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine, "Acme")
    key = await make_key(engine, "admin", write=True)
    await post_events(
        client,
        key,
        [
            event(organization_id, quantity=3, occurred_at="2026-03-01T10:00:00Z"),
            event(
                organization_id,
                type="voice",
                direction="inbound",
                quantity=60,
                knowledge_base=True,
                occurred_at="2026-03-02T10:00:00Z",
            ),
        ],
    )
    params = {
        "organization_id": organization_id,
        "start_date": "2026-03-01",
        "end_date": "2026-03-02",
        "granularity": "day",
        "timezone": "Europe/Berlin",
    }
    expected = (
        "start,end,sms_outbound,sms_inbound,sms_total,mms_outbound,mms_inbound,mms_total,"
        "voice_seconds,voice_kb_seconds,voice_total_seconds\r\n"
        "2026-03-01T00:00:00+01:00,2026-03-02T00:00:00+01:00,3,0,3,0,0,0,0,0,0\r\n"
        "2026-03-02T00:00:00+01:00,2026-03-03T00:00:00+01:00,0,0,0,0,0,0,0,60,60\r\n"
    )
    for extra, headers in [
        ({"format": "csv"}, {}),
        ({}, {"Accept": "application/json;q=0.5, text/csv"}),
    ]:
        response = await client.get(
            URL, params={**params, **extra}, headers={"X-API-Key": key, **headers}
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/csv; charset=utf-8"
        assert response.headers["content-disposition"] == (
            f'attachment; filename="usage-{organization_id}-day.csv"'
        )
        assert response.text == expected
        assert response.headers["etag"]
    refused = await client.get(
        URL, params=params, headers={"X-API-Key": key, "Accept": "text/csv;q=0"}
    )
    assert refused.headers["content-type"] == "application/json"
    # Errors stay JSON.
    error = await client.get(
        URL, params={**params, "granularity": "minute", "format": "csv"}, headers={"X-API-Key": key}
    )
    assert (error.status_code, error.headers["content-type"]) == (400, "application/json")


async def test_a_partner_reads_as_the_sum_of_its_organizations_of_now(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine, "Agency")
    other_partner = await make_partner(engine, "Other")
    first = await make_organization(engine, "First", partner_id)
    second = await make_organization(engine, "Second", partner_id)
    elsewhere = await make_organization(engine, "Elsewhere", other_partner)
    user = await make_user(engine, second, "U")
    admin = await make_key(engine, "admin", write=True)
    await post_events(
        client,
        admin,
        [
            event(first, quantity=2, occurred_at="2026-03-01T10:00:00Z"),
            event(second, quantity=3, user_id=user, occurred_at="2026-03-02T10:00:00Z"),
            event(elsewhere, quantity=100, occurred_at="2026-03-02T10:00:00Z"),
        ],
    )
    await rollup.fold_all(engine)
    await post_events(
        client, admin, [event(second, quantity=5, occurred_at="2026-03-02T11:00:00Z")]
    )

    async def usage(key: str, **params: str) -> httpx.Response:
        return await client.get(URL, params=params, headers={"X-API-Key": key})

    response = await usage(admin, partner_id=partner_id)
    assert response.json() == {
        "success": True,
        "usage": {
            "partner_id": partner_id,
            "partner_name": "Agency",
            **metrics_json((10, 0, 0, 0, 0, 0)),
            "period": "all_time",
        },
        "powered_by": "Teli",
    }
    series = await usage(
        admin,
        partner_id=partner_id,
        start_date="2026-03-01",
        end_date="2026-03-02",
        granularity="day",
    )
    assert [b["sms"]["outbound"] for b in series.json()["usage"]["buckets"]] == [2, 8]
    ranged = await usage(admin, partner_id=partner_id, start_date="2026-03-02")
    assert ranged.json()["usage"]["sms"]["outbound"] == 8
    # With an organization: that organization's, if it is the partner's.
    assert (await usage(admin, partner_id=partner_id, organization_id=first)).json()["usage"][
        "organization_id"
    ] == first
    not_ours = await usage(admin, partner_id=partner_id, organization_id=elsewhere)
    assert (not_ours.status_code, not_ours.json()["error"]) == (404, "organization not found")
    assert (await usage(admin, partner_id=partner_id, user_id=user)).json()["usage"][
        "user_id"
    ] == user
    wrong_user = await usage(admin, partner_id=other_partner, user_id=user)
    assert (wrong_user.status_code, wrong_user.json()["error"]) == (404, "user not found")

    # Scope: a partner key sees its own partner; another partner, unknown, and an
    # organization key's view of any partner all read the same 404.
    own = await make_key(engine, "partner", partner_id=partner_id)
    assert (await usage(own, partner_id=partner_id)).status_code == 200
    unknown = await usage(admin, partner_id="no-such-partner")
    for key, asked in [
        (own, other_partner),
        (await make_key(engine, "organization", organization_id=first), partner_id),
    ]:
        hidden = await usage(key, partner_id=asked)
        assert (hidden.status_code, hidden.content) == (404, unknown.content)
    assert unknown.json() == {"success": False, "error": "partner not found"}
    bad = await usage(admin, partner_id="has space")
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid partner_id")


async def test_an_organization_that_moves_takes_its_history_along(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    old, new = await make_partner(engine, "Old"), await make_partner(engine, "New")
    organization_id = await make_organization(engine, "Mover", old)
    admin = await make_key(engine, "admin", write=True)
    await post_events(client, admin, [event(organization_id, quantity=4)])
    await rollup.fold_all(engine)
    moved = await client.put(
        f"/v1/organizations/{organization_id}",
        headers={"X-API-Key": admin},
        json={"name": "Mover", "partner_id": new},
    )
    assert moved.status_code == 200
    for partner_id, expected in [(old, 0), (new, 4)]:
        response = await client.get(
            URL, params={"partner_id": partner_id}, headers={"X-API-Key": admin}
        )
        assert response.json()["usage"]["sms"]["outbound"] == expected
