"""The demo tenants: the public docs' Acme Corp and John Smith, whose all-time totals are
exactly the docs' two example responses, inside a partner with several organizations and
users, and a year of usage with a weekly and a seasonal shape.

Acme Corp's usage that is not John Smith's is shared among its other users and its own
events without a user, so both all-time totals stay the docs' to the unit.
"""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.analytics.rollup import fold_all
from usage_api.auth import Principal
from usage_api.dates import utc_now
from usage_api.db import PrimaryEngine, transact
from usage_api.directory import put_organization, put_partner, put_user
from usage_api.ingest import ingest
from usage_api.keys import create_key
from usage_api.schemas import (
    Direction,
    EventType,
    OrganizationIn,
    PartnerIn,
    UsageEventIn,
    UserIn,
)

ORGANIZATION_ID = "1767623610019x414651971228139500"
USER_ID = "1768236789852x707565875153419434"
PARTNER_ID = "1767000000000x100000000000000001"

# (type, direction, knowledge_base): (organization total, John Smith's share)
_TOTALS: dict[tuple[EventType, Direction, bool], tuple[int, int]] = {
    ("sms", "outbound", False): (12450, 1234),
    ("sms", "inbound", False): (3821, 567),
    ("mms", "outbound", False): (245, 89),
    ("mms", "inbound", False): (67, 12),
    ("voice", "outbound", False): (45678, 5678),
    ("voice", "inbound", True): (12345, 1234),
}
# Acme Corp's other users, with their weight in the usage that is not John Smith's; the
# rest (weight of None) is the organization's own, without a user.
_ACME_USERS: tuple[tuple[str | None, str, str, int], ...] = (
    ("1768236789852x707565875153419435", "Maria Garcia", "maria@example.com", 35),
    ("1768236789852x707565875153419436", "Wei Chen", "wei@example.com", 25),
    ("1768236789852x707565875153419437", "Aisha Khan", "aisha@example.com", 15),
    ("1768236789852x707565875153419438", "Lukas Becker", "lukas@example.com", 10),
    (None, "", "", 15),
)
# The partner's other organizations (and one without a partner): id, name, how busy
# relative to Acme Corp, and their users.
_OTHERS: tuple[tuple[str, str, float, bool, tuple[tuple[str, str], ...]], ...] = (
    (
        "1767623610020x414651971228139501",
        "Globex Logistics",
        2.0,
        True,
        (("Hank Scorpio", "hank@globex.example"), ("Mindy Simmons", "mindy@globex.example")),
    ),
    (
        "1767623610021x414651971228139502",
        "Initech Health",
        0.6,
        True,
        (("Peter Gibbons", "peter@initech.example"), ("Joanna Park", "joanna@initech.example")),
    ),
    (
        "1767623610022x414651971228139503",
        "Umbrella Retail",
        1.3,
        True,
        (("Alice Abernathy", "alice@umbrella.example"),),
    ),
    ("1767623610023x414651971228139504", "Hooli Travel", 0.3, True, ()),
    (
        "1767623610024x414651971228139505",
        "Soylent Foods",
        0.5,
        False,
        (("Sol Roth", "sol@soylent.example"),),
    ),
)
_ADMIN = Principal("demo", "admin", None, None, can_write=True)
# The README's range example (2026-02-10 to 2026-03-12) always has usage in it.
_EARLIEST_START = datetime(2026, 2, 1, tzinfo=UTC)
_YEAR = timedelta(days=365)
# Usage by hour of day (UTC): office hours, a quiet night.
_HOUR_WEIGHTS = [1, 1, 1, 1, 1, 2, 4, 7, 10, 12, 12, 11, 9, 10, 11, 11, 10, 8, 6, 4, 3, 2, 2, 1]


def history_start(now: datetime) -> datetime:
    """The first instant of the demo's history: a year back, or the README's example range,
    whichever is earlier."""
    return min(now - _YEAR, _EARLIEST_START)


def _split(total: int, low: int, high: int, rng: random.Random) -> list[int]:
    """Deterministic parts in [low, high] (the last may be smaller) that add up to `total`."""
    parts = []
    while total > 0:
        part = min(rng.randint(low, high), total)
        parts.append(part)
        total -= part
    return parts


class _Clock:
    """Draws event times with the demo's shape: fewer on weekends, a summer dip and a
    December peak, slow growth over the year, office hours."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        start = history_start(now).replace(hour=0, minute=0, second=0, microsecond=0)
        self.days = [start + timedelta(days=n) for n in range((now - start).days + 1)]
        count = len(self.days)
        self.weights = [
            (0.35 if day.weekday() >= 5 else 1.0)
            * (1 + 0.35 * math.cos(2 * math.pi * (day.timetuple().tm_yday - 350) / 365))
            * (0.7 + 0.6 * n / count)
            for n, day in enumerate(self.days)
        ]

    def draw(self, rng: random.Random) -> datetime:
        (day,) = rng.choices(self.days, self.weights)
        (hour,) = rng.choices(range(24), _HOUR_WEIGHTS)
        at = day + timedelta(hours=hour, seconds=rng.randrange(3600))
        # Never in the future: ingestion refuses that.
        return at if at <= self.now else self.now - timedelta(seconds=rng.randrange(1, 3600))


def _event(
    event_id: str,
    organization_id: str,
    user_id: str | None,
    kind: EventType,
    direction: Direction,
    kb: bool,
    quantity: int,
    at: datetime,
) -> UsageEventIn:
    voice = kind == "voice"
    return UsageEventIn(
        id=event_id,
        organization_id=organization_id,
        user_id=user_id,
        type=kind,
        direction=direction,
        segments=None if voice else quantity,
        seconds=quantity if voice else None,
        knowledge_base=kb if voice else None,
        occurred_at=at,
    )


def _sizes(kind: EventType) -> tuple[int, int]:
    return (20, 400) if kind == "voice" else (1, 4)


def demo_events(now: datetime) -> list[UsageEventIn]:
    """The demo's events: fixed ids and quantities, spread over the history before `now`.

    Loading them again later offers the same ids, which are already recorded, so the
    totals never change."""
    rng = random.Random(20260210)  # noqa: S311 - demo data, not secrets
    clock = _Clock(now)
    events = []
    acme_owners = [user_id for user_id, _, _, _ in _ACME_USERS]
    acme_weights = [weight for _, _, _, weight in _ACME_USERS]
    for (kind, direction, kb), (org_total, user_total) in _TOTALS.items():
        low, high = _sizes(kind)
        for owner, total in ((USER_ID, user_total), (None, org_total - user_total)):
            for n, quantity in enumerate(_split(total, low, high, rng)):
                event_id = f"demo-{kind}-{direction}-{'john' if owner else 'org'}-{n:05d}"
                user_id = owner or rng.choices(acme_owners, acme_weights)[0]
                events.append(
                    _event(
                        event_id,
                        ORGANIZATION_ID,
                        user_id,
                        kind,
                        direction,
                        kb,
                        quantity,
                        clock.draw(rng),
                    )
                )
    for index, (organization_id, _, busy, _, users) in enumerate(_OTHERS):
        owners = [_other_user_id(index, n) for n in range(len(users))] + [None]
        for (kind, direction, kb), (org_total, _) in _TOTALS.items():
            low, high = _sizes(kind)
            # Bigger parts than Acme Corp's: the same shape from fewer events.
            parts = _split(round(org_total * busy), low * 3, high * 3, rng)
            for n, quantity in enumerate(parts):
                events.append(
                    _event(
                        f"demo-{kind}-{direction}-{n:05d}",
                        organization_id,
                        rng.choice(owners),
                        kind,
                        direction,
                        kb,
                        quantity,
                        clock.draw(rng),
                    )
                )
    return events


def _other_user_id(organization_index: int, user_index: int) -> str:
    return f"1768236789853x70756587515342{organization_index:02d}{user_index:02d}"


async def load_demo(engine: PrimaryEngine) -> None:
    """Create the demo partner, organizations, users and usage; running it again changes
    nothing."""
    await transact(engine, put_partner, _ADMIN, PARTNER_ID, PartnerIn(name="Northwind Partners"))
    await transact(
        engine,
        put_organization,
        _ADMIN,
        ORGANIZATION_ID,
        OrganizationIn(name="Acme Corp", partner_id=PARTNER_ID),
    )
    users = [(USER_ID, "John Smith", "john@example.com")]
    users += [(user_id, name, email) for user_id, name, email, _ in _ACME_USERS if user_id]
    for user_id, name, email in users:
        await transact(
            engine,
            put_user,
            _ADMIN,
            user_id,
            UserIn(organization_id=ORGANIZATION_ID, name=name, email=email),
        )
    for index, (organization_id, name, _, in_partner, others) in enumerate(_OTHERS):
        await transact(
            engine,
            put_organization,
            _ADMIN,
            organization_id,
            OrganizationIn(name=name, partner_id=PARTNER_ID if in_partner else None),
        )
        for n, (user_name, email) in enumerate(others):
            await transact(
                engine,
                put_user,
                _ADMIN,
                _other_user_id(index, n),
                UserIn(organization_id=organization_id, name=user_name, email=email),
            )
    events = demo_events(utc_now())
    for start in range(0, len(events), 1000):
        await transact(engine, ingest, _ADMIN, events[start : start + 1000])
    await fold_all(engine)


async def demo_key(conn: AsyncConnection) -> str:
    """A new read key scoped to the demo organization."""
    _, key = await create_key(
        conn, scope="organization", organization_id=ORGANIZATION_ID, name="demo"
    )
    return key
