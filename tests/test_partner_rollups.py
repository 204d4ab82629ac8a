"""Partner and monthly roll-ups (`partner_hourly`, `partner_daily`, `organization_monthly`):
partner totals and breakdowns read them, so they must equal the log to the unit whatever
has been folded, and follow an organization that changes partner, even mid-fold."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from tests.test_series import HTTP_ZONES, edge_instants, metrics_json, post_events
from usage_api.analytics import rollup
from usage_api.analytics.calendar import GRANULARITIES, Calendar
from usage_api.db import PrimaryEngine, async_url, transact
from usage_api.migrations import alembic_config

US = timedelta(microseconds=1)
# Month, day and hour boundaries of the first quarter of 2026, each with an instant on it
# and one a microsecond before.
EDGES = [
    datetime(2026, 1, 31, 23, tzinfo=UTC),
    datetime(2026, 2, 1, tzinfo=UTC),
    datetime(2026, 2, 1, 1, tzinfo=UTC),
    datetime(2026, 2, 14, tzinfo=UTC),
    datetime(2026, 3, 1, tzinfo=UTC),
    datetime(2026, 3, 1, 0, 30, tzinfo=UTC),
    datetime(2026, 3, 31, 23, 59, tzinfo=UTC),
]
KINDS = [
    ("sms", "outbound", None),
    ("sms", "inbound", None),
    ("mms", "outbound", None),
    ("mms", "inbound", None),
    ("voice", "outbound", False),
    ("voice", "inbound", True),
]


@dataclass(frozen=True)
class Sent:
    organization_id: str
    user_id: str | None
    at: datetime
    kind: int
    quantity: int

    def body(self) -> dict[str, Any]:
        type_, direction, kb = KINDS[self.kind]
        return event(
            self.organization_id,
            type=type_,
            direction=direction,
            quantity=self.quantity,
            knowledge_base=kb,
            user_id=self.user_id,
            occurred_at=self.at.isoformat().replace("+00:00", "Z"),
        )


def sums(sent: list[Sent], start: datetime | None = None, end: datetime | None = None) -> list[int]:
    values = [0] * 6
    for s in sent:
        if (start is None or start <= s.at) and (end is None or s.at < end):
            values[s.kind] += s.quantity
    return values


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def random_events(rng: random.Random, members: dict[str, list[str]], count: int) -> list[Sent]:
    lo = datetime(2026, 1, 20, tzinfo=UTC)
    sent = []
    for i in range(count):
        organization_id = rng.choice(list(members))
        if i < 2 * len(EDGES):
            at = EDGES[i // 2] - (US if i % 2 else timedelta(0))
        else:
            at = lo + timedelta(microseconds=rng.randrange(int(75 * 86400e6)))
        user = rng.choice([None, *members[organization_id]])
        sent.append(Sent(organization_id, user, at, rng.randrange(6), rng.randint(1, 40)))
    return sent


def ranges(rng: random.Random) -> list[tuple[datetime, datetime]]:
    """Whole months, a month and a bit, ragged ranges to the microsecond, all of it."""
    fixed = [
        (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)),
        (datetime(2026, 1, 31, 23, 0, 0, 1, tzinfo=UTC), datetime(2026, 3, 1, 0, 30, tzinfo=UTC)),
        (datetime(2026, 2, 1, 0, 59, tzinfo=UTC), datetime(2026, 2, 1, 1, 0, 0, 1, tzinfo=UTC)),
    ]
    lo = datetime(2026, 1, 15, tzinfo=UTC)
    ragged = []
    for _ in range(6):
        start = lo + timedelta(microseconds=rng.randrange(int(80 * 86400e6)))
        ragged.append((start, start + timedelta(seconds=rng.uniform(600, 70 * 86400))))
    return fixed + ragged


async def get(client: httpx.AsyncClient, key: str, path: str, **params: str) -> dict[str, Any]:
    response = await client.get(path, params=params, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def walk(client: httpx.AsyncClient, key: str, **params: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        asked = params | ({"cursor": cursor} if cursor else {})
        page = (await get(client, key, "/v1/analytics/usage/breakdown", **asked))["breakdown"]
        rows += page["rows"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


def head(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: answer[k] for k in ("sms", "mms", "voice")}


async def check_partner(
    client: httpx.AsyncClient,
    key: str,
    partner_id: str,
    members: dict[str, list[str]],
    sent: list[Sent],
    spans: list[tuple[datetime | None, datetime | None]],
) -> None:
    """The partner's total and breakdown, and each organization's breakdown, over each span,
    equal the sums of the events sent."""
    for start, end in spans:
        params = {}
        if start is not None and end is not None:
            params = {"start_date": stamp(start), "end_date": stamp(end - US)}
        where = f"{partner_id} {params}"
        total = (await get(client, key, "/v1/analytics/usage", partner_id=partner_id, **params))[
            "usage"
        ]
        assert head(total) == metrics_json(sums(sent, start, end)), where
        rows = await walk(
            client, key, partner_id=partner_id, sort="-sms.total", limit="2", **params
        )
        assert {r["organization_id"]: head(r) for r in rows} == {
            o: metrics_json(sums([s for s in sent if s.organization_id == o], start, end))
            for o in members
        }, where
        for organization_id, users in members.items():
            mine = [s for s in sent if s.organization_id == organization_id]
            rows = await walk(
                client, key, organization_id=organization_id, sort="voice.seconds", **params
            )
            expected = {
                u: metrics_json(sums([s for s in mine if s.user_id == u], start, end))
                for u in users
            }
            no_user = sums([s for s in mine if s.user_id is None], start, end)
            if any(no_user):
                expected[None] = metrics_json(no_user)  # type: ignore[index]
            assert {r["user_id"]: head(r) for r in rows} == expected, where


async def assert_rollups_agree(engine: AsyncEngine) -> None:
    """Each partner's rows are its organizations' of now, hour by hour and day by day, and
    each organization's months are its days."""
    async with engine.connect() as conn:
        for partner_table, source, unit in (
            ("partner_hourly", "usage_hourly", "hour_at"),
            ("partner_daily", "usage_daily", "day"),
        ):
            differing = await conn.scalar(
                text(f"""
                WITH theirs AS (
                    SELECT o.partner_id, r.{unit}, sum(r.sms_outbound) AS a, sum(r.sms_inbound)
                        AS b, sum(r.mms_outbound) AS c, sum(r.mms_inbound) AS d,
                        sum(r.voice_seconds) AS e, sum(r.voice_kb_seconds) AS f
                    FROM {source} r JOIN organizations o ON o.id = r.organization_id
                    WHERE r.user_id = '' AND o.partner_id IS NOT NULL GROUP BY 1, 2
                ), ours AS (
                    SELECT partner_id, {unit}, sms_outbound AS a, sms_inbound AS b,
                        mms_outbound AS c, mms_inbound AS d, voice_seconds AS e,
                        voice_kb_seconds AS f
                    FROM {partner_table} WHERE (sms_outbound, sms_inbound, mms_outbound,
                        mms_inbound, voice_seconds, voice_kb_seconds) <> (0, 0, 0, 0, 0, 0)
                )
                SELECT count(*) FROM theirs FULL JOIN ours USING (partner_id, {unit})
                WHERE (theirs.a, theirs.b, theirs.c, theirs.d, theirs.e, theirs.f)
                    IS DISTINCT FROM (ours.a, ours.b, ours.c, ours.d, ours.e, ours.f)
                """)
            )
            assert differing == 0, partner_table
        differing = await conn.scalar(
            text("""
            WITH days AS (
                SELECT organization_id, date_trunc('month', day::timestamp)::date AS month,
                    sum(sms_outbound) AS a, sum(voice_kb_seconds) AS f
                FROM usage_daily WHERE user_id = '' GROUP BY 1, 2
            )
            SELECT count(*) FROM days
            FULL JOIN organization_monthly m USING (organization_id, month)
            WHERE (days.a, days.f) IS DISTINCT FROM (m.sms_outbound, m.voice_kb_seconds)
            """)
        )
        assert differing == 0, "organization_monthly"


async def test_partner_totals_and_breakdowns_equal_the_log_unfolded_half_folded_and_folded(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(10)
    partner_id = await make_partner(engine, "Agency")
    members: dict[str, list[str]] = {}
    for name in ("Alpha", "Beta", "Gamma"):
        organization_id = await make_organization(engine, name, partner_id)
        members[organization_id] = [
            await make_user(engine, organization_id, f"{name} {i}", f"{name}{i}@example.com")
            for i in range(3 if name != "Gamma" else 0)
        ]
    elsewhere = await make_organization(engine, "Elsewhere")
    key = await make_key(engine, "admin", write=True)
    sent = random_events(rng, members, 240)
    outside = [Sent(elsewhere, None, s.at, s.kind, 1000) for s in sent[:20]]
    spans: list[tuple[datetime | None, datetime | None]] = [(None, None), *ranges(rng)]

    await post_events(client, key, [s.body() for s in [*sent[:120], *outside]])
    await check_partner(client, key, partner_id, members, sent[:120], spans)
    # A fold of part of the deltas: some hours are in the roll-ups, some still deltas.
    assert await transact(PrimaryEngine(engine), rollup.fold, 25) == 25
    await check_partner(client, key, partner_id, members, sent[:120], spans)
    await rollup.fold_all(engine)
    await assert_rollups_agree(engine)
    await post_events(client, key, [s.body() for s in sent[120:]])
    await check_partner(client, key, partner_id, members, sent, spans)
    await rollup.fold_all(engine)
    await assert_rollups_agree(engine)
    await check_partner(client, key, partner_id, members, sent, spans)


async def move(
    client: httpx.AsyncClient, key: str, organization_id: str, partner: str | None
) -> None:
    response = await client.put(
        f"/v1/organizations/{organization_id}",
        headers={"X-API-Key": key},
        json={"name": "Mover", "partner_id": partner},
    )
    assert response.status_code == 200, response.text


async def test_an_organization_changing_partner_takes_its_folded_history_and_its_deltas(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(11)
    old, new = await make_partner(engine, "Old"), await make_partner(engine, "New")
    mover = await make_organization(engine, "Mover", old)
    stays = await make_organization(engine, "Stays", old)
    joined = await make_organization(engine, "Joined", new)
    user = await make_user(engine, mover, "Mover user")
    key = await make_key(engine, "admin", write=True)
    members = {mover: [user], stays: [], joined: []}
    sent = random_events(rng, members, 150)
    spans: list[tuple[datetime | None, datetime | None]] = [(None, None), *ranges(rng)[:6]]

    def of(*organizations: str) -> list[Sent]:
        return [s for s in sent if s.organization_id in organizations]

    await post_events(client, key, [s.body() for s in sent[:100]])
    await rollup.fold_all(engine)
    await post_events(client, key, [s.body() for s in sent[100:]])  # still deltas

    await move(client, key, mover, new)
    await check_partner(client, key, old, {stays: []}, of(stays), spans)
    await check_partner(client, key, new, {mover: [user], joined: []}, of(mover, joined), spans)
    await assert_rollups_agree(engine)
    await rollup.fold_all(engine)  # the deltas fold into the partner it has now
    await assert_rollups_agree(engine)
    await check_partner(client, key, new, {mover: [user], joined: []}, of(mover, joined), spans)

    await move(client, key, mover, None)
    await check_partner(client, key, new, {joined: []}, of(joined), spans)
    await move(client, key, mover, old)
    await assert_rollups_agree(engine)
    await check_partner(client, key, old, {mover: [user], stays: []}, of(mover, stays), spans)


async def test_a_change_of_partner_waits_for_a_fold_in_progress_and_moves_what_it_folded(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    old, new = await make_partner(engine, "Old"), await make_partner(engine, "New")
    mover = await make_organization(engine, "Mover", old)
    key = await make_key(engine, "admin", write=True)
    at = datetime(2026, 2, 10, 12, tzinfo=UTC)
    sent = [Sent(mover, None, at + timedelta(hours=i), i % 6, i + 1) for i in range(12)]
    await post_events(client, key, [s.body() for s in sent])
    spans: list[tuple[datetime | None, datetime | None]] = [
        (None, None),
        (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC)),
        (at + timedelta(minutes=30), at + timedelta(hours=7, minutes=30)),
    ]

    async with engine.connect() as folding:
        await folding.begin()
        # The fold has summed the deltas into the old partner's rows, not yet committed.
        assert await rollup.fold(folding, 1000) == 12
        moving = asyncio.create_task(move(client, key, mover, new))
        await asyncio.sleep(0.5)
        assert not moving.done()  # the change waits for the fold's lock
        await folding.commit()
    await moving
    await assert_rollups_agree(engine)
    await check_partner(client, key, old, {}, [], spans)
    await check_partner(client, key, new, {mover: []}, sent, spans)


async def test_a_change_of_partner_is_refused_outside_read_committed(engine: AsyncEngine) -> None:
    old, new = await make_partner(engine, "Old"), await make_partner(engine, "New")
    mover = await make_organization(engine, "Mover", old)
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        with pytest.raises(DBAPIError, match="only in a READ COMMITTED transaction"):
            await conn.execute(
                text("UPDATE organizations SET partner_id = :new WHERE id = :id"),
                {"new": new, "id": mover},
            )


async def test_the_migration_starts_partner_and_monthly_rows_from_the_history_there_is(
    client: httpx.AsyncClient, engine: AsyncEngine, database_url: str
) -> None:
    rng = random.Random(12)
    partner_id = await make_partner(engine, "Agency")
    members = {await make_organization(engine, n, partner_id): [] for n in ("A", "B")}
    alone = await make_organization(engine, "Alone")
    key = await make_key(engine, "admin", write=True)
    sent = random_events(rng, members, 60)
    await post_events(client, key, [s.body() for s in sent])
    await post_events(client, key, [event(alone, quantity=5)])
    await rollup.fold_all(engine)
    config = alembic_config(database_url)
    # Back to before the roll-ups existed, and forward again on a fresh engine (the app's
    # connections hold statements prepared against the dropped tables).
    await asyncio.to_thread(command.downgrade, config, "d4a5b0c7e912")
    await asyncio.to_thread(command.upgrade, config, "head")
    fresh = create_async_engine(async_url(database_url))
    try:
        await assert_rollups_agree(fresh)
        async with fresh.connect() as conn:
            days = await conn.scalar(
                text(
                    "SELECT sum(sms_outbound + voice_kb_seconds) FROM partner_daily"
                    " WHERE partner_id = :p"
                ),
                {"p": partner_id},
            )
        expected = sums(sent)
        assert days == expected[0] + expected[5]
    finally:
        await fresh.dispose()


# Long enough for many buckets, short enough for at most 1000.
SERIES_SPAN = {"hour": 40 * 86400, "day": 300 * 86400, "week": 300 * 86400, "month": 300 * 86400}


async def check_partner_series(
    client: httpx.AsyncClient,
    key: str,
    rng: random.Random,
    partner_id: str,
    sent: list[Sent],
    asked: int,
) -> None:
    """`asked` random series of the partner (random zone, granularity and range, in local
    dates or to the microsecond in UTC), each bucket against the sum of the events sent;
    the totals are the answer without `granularity`."""
    lo = datetime(2026, 1, 15, tzinfo=UTC)
    for _ in range(asked):
        zone_name, granularity = rng.choice(HTTP_ZONES), rng.choice(GRANULARITIES)
        start = lo + timedelta(microseconds=rng.randrange(int(300 * 86400e6)))
        end = start + timedelta(seconds=rng.uniform(3600, SERIES_SPAN[granularity]))
        if rng.random() < 0.5:
            params = {"start_date": stamp(start), "end_date": stamp(end)}
        else:
            params = {"start_date": start.date().isoformat(), "end_date": end.date().isoformat()}
        params |= {"partner_id": partner_id, "timezone": zone_name}
        where = f"{params} {granularity}"
        total = (await get(client, key, "/v1/analytics/usage", **params))["usage"]
        series = (await get(client, key, "/v1/analytics/usage", granularity=granularity, **params))[
            "usage"
        ]
        assert {k: v for k, v in series.items() if k not in ("granularity", "buckets")} == total
        range_start = datetime.fromisoformat(total["start_date"])
        range_end = datetime.fromisoformat(total["end_date"])
        range_end += timedelta(seconds=1) if "." not in total["end_date"] else US
        buckets = series["buckets"]
        starts = [datetime.fromisoformat(b["start"]) for b in buckets]
        ends = [datetime.fromisoformat(b["end"]) for b in buckets]
        calendar = Calendar(ZoneInfo(zone_name), granularity)
        assert list(zip(starts, ends, strict=True)) == calendar.buckets(range_start, range_end)
        assert [b["start"] for b in buckets] == [calendar.label(a) for a in starts], where
        for bucket, a, b in zip(buckets, starts, ends, strict=True):
            assert head(bucket) == metrics_json(sums(sent, a, b)), where
        assert head(total) == metrics_json(sums(sent, range_start, range_end)), where


async def test_partner_series_equal_the_log_unfolded_half_folded_folded_and_after_a_move(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    rng = random.Random(13)
    partner_id, other = await make_partner(engine, "Agency"), await make_partner(engine, "Other")
    members: dict[str, list[str]] = {}
    for name in ("Alpha", "Beta", "Gamma"):
        organization_id = await make_organization(engine, name, partner_id)
        members[organization_id] = [await make_user(engine, organization_id, f"{name} user")]
    elsewhere = await make_organization(engine, "Elsewhere", other)
    key = await make_key(engine, "admin", write=True)
    # Random instants, and every local midnight and hour start around the zones' changes
    # of offset (and a microsecond before each).
    sent = [
        Sent(
            rng.choice(list(members)),
            None,
            at,
            rng.randrange(6),
            rng.randint(1, 40),
        )
        for at in [
            *edge_instants(),
            *(
                datetime(2026, 1, 15, tzinfo=UTC) + timedelta(days=rng.uniform(0, 310))
                for _ in range(300)
            ),
        ]
    ]
    sent = [
        Sent(
            s.organization_id,
            rng.choice([None, *members[s.organization_id]]),
            s.at,
            s.kind,
            s.quantity,
        )
        for s in sent
    ]
    rng.shuffle(sent)
    half = len(sent) // 2
    outside = [Sent(elsewhere, None, s.at, s.kind, 1000) for s in sent[:40]]

    await post_events(client, key, [s.body() for s in [*sent[:half], *outside]])
    await check_partner_series(client, key, rng, partner_id, sent[:half], 8)  # all deltas
    assert await transact(PrimaryEngine(engine), rollup.fold, 40) == 40
    await check_partner_series(client, key, rng, partner_id, sent[:half], 8)  # part folded
    await rollup.fold_all(engine)
    await post_events(client, key, [s.body() for s in sent[half:]])
    await check_partner_series(client, key, rng, partner_id, sent, 8)  # folded and deltas

    # An organization moves with folded history and unfolded deltas.
    mover = next(iter(members))
    await move(client, key, mover, other)
    stays = [s for s in sent if s.organization_id != mover]
    joined = [s for s in sent if s.organization_id == mover] + outside
    await check_partner_series(client, key, rng, partner_id, stays, 6)
    await check_partner_series(client, key, rng, other, joined, 6)
    await rollup.fold_all(engine)
    await assert_rollups_agree(engine)
    await check_partner_series(client, key, rng, partner_id, stays, 6)
    await check_partner_series(client, key, rng, other, joined, 6)
