"""The demo tenant: the public docs' Acme Corp and John Smith, with usage whose all-time
totals are exactly the docs' two example responses."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.analytics.rollup import fold_all
from usage_api.auth import Principal
from usage_api.dates import utc_now
from usage_api.db import PrimaryEngine, transact
from usage_api.directory import put_organization, put_user
from usage_api.ingest import ingest
from usage_api.keys import create_key
from usage_api.schemas import Direction, EventType, OrganizationIn, UsageEventIn, UserIn

ORGANIZATION_ID = "1767623610019x414651971228139500"
USER_ID = "1768236789852x707565875153419434"

# (type, direction, knowledge_base): (organization total, John Smith's share)
_TOTALS: dict[tuple[EventType, Direction, bool], tuple[int, int]] = {
    ("sms", "outbound", False): (12450, 1234),
    ("sms", "inbound", False): (3821, 567),
    ("mms", "outbound", False): (245, 89),
    ("mms", "inbound", False): (67, 12),
    ("voice", "outbound", False): (45678, 5678),
    ("voice", "inbound", True): (12345, 1234),
}
_SPREAD = timedelta(weeks=6)
_ADMIN = Principal("demo", "admin", None, None, can_write=True)


def _split(total: int, low: int, high: int, rng: random.Random) -> list[int]:
    """Deterministic parts in [low, high] (the last may be smaller) that add up to `total`."""
    parts = []
    while total > 0:
        part = min(rng.randint(low, high), total)
        parts.append(part)
        total -= part
    return parts


def demo_events(now: datetime) -> list[UsageEventIn]:
    """The demo's events: fixed ids and quantities, spread over the six weeks before `now`.

    Loading them again later offers the same ids, which are already recorded, so the
    totals never change."""
    rng = random.Random(20260210)  # noqa: S311 - demo data, not secrets
    events = []
    for (kind, direction, kb), (org_total, user_total) in _TOTALS.items():
        low, high = (30, 900) if kind == "voice" else (1, 4)
        for owner, total in ((USER_ID, user_total), (None, org_total - user_total)):
            for n, quantity in enumerate(_split(total, low, high, rng)):
                event_id = f"demo-{kind}-{direction}-{'john' if owner else 'org'}-{n:05d}"
                events.append(
                    UsageEventIn(
                        id=event_id,
                        organization_id=ORGANIZATION_ID,
                        user_id=owner,
                        type=kind,
                        direction=direction,
                        segments=None if kind == "voice" else quantity,
                        seconds=quantity if kind == "voice" else None,
                        knowledge_base=kb if kind == "voice" else None,
                        occurred_at=now - _SPREAD * rng.random(),
                    )
                )
    return events


async def load_demo(engine: PrimaryEngine) -> None:
    """Create the demo organization, user and usage; running it again changes nothing."""
    await transact(
        engine, put_organization, _ADMIN, ORGANIZATION_ID, OrganizationIn(name="Acme Corp")
    )
    await transact(
        engine,
        put_user,
        _ADMIN,
        USER_ID,
        UserIn(organization_id=ORGANIZATION_ID, name="John Smith", email="john@example.com"),
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
