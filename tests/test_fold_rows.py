"""What the fold writes: only the roll-up rows whose sums change get a new version, and the
roll-ups keep room on their pages for those versions (HOT updates, no index entries)."""

from __future__ import annotations

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_organization, make_partner, make_user
from tests.test_series import post_events
from usage_api.analytics import rollup

ROLLUPS = {
    "usage_counters": "organization_id = :o",
    "usage_hourly": "organization_id = :o",
    "usage_daily": "organization_id = :o",
    "organization_monthly": "organization_id = :o",
    "partner_hourly": "partner_id = :p",
    "partner_daily": "partner_id = :p",
}


async def _versions(engine: AsyncEngine, organization_id: str, partner_id: str) -> set[str]:
    """Every roll-up row of the organization and its partner, by table, key and version."""
    found: set[str] = set()
    async with engine.connect() as conn:
        for table, where in ROLLUPS.items():
            rows = await conn.execute(
                text(f"SELECT xmin::text || ctid::text FROM {table} WHERE {where}"),
                {"o": organization_id, "p": partner_id},
            )
            found |= {f"{table} {row[0]}" for row in rows}
    return found


async def test_roll_ups_leave_room_on_their_pages(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT relname, reloptions FROM pg_class WHERE relname = ANY(:names)"
                " AND relkind = 'r' ORDER BY relname"
            ),
            {"names": list(ROLLUPS)},
        )
        assert {row[0]: row[1] for row in rows} == {
            "organization_monthly": ["fillfactor=70"],
            "partner_daily": ["fillfactor=70"],
            "partner_hourly": ["fillfactor=70"],
            "usage_counters": ["fillfactor=70"],
            "usage_daily": ["fillfactor=85"],
            "usage_hourly": ["fillfactor=90"],
        }


async def test_sums_that_do_not_change_update_no_row(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine)
    organization_id = await make_organization(engine, "Zero", partner_id)
    user_id = await make_user(engine, organization_id, "Zed", "zed@example.com")
    key = await make_key(engine, "admin", write=True)
    at = "2026-02-10T12:00:00Z"
    await post_events(
        client, key, [event(organization_id, user_id=user_id, quantity=3, occurred_at=at)]
    )
    assert await rollup.fold_all(engine) == 1
    before = await _versions(engine, organization_id, partner_id)
    assert len(before) == 9  # counters, hourly, daily for the user and the organization; 3 more

    # A call of no seconds, in the same hour: every sum stays, so no row is written again.
    zero = event(organization_id, user_id=user_id, type="voice", quantity=0, occurred_at=at)
    await post_events(client, key, [zero])
    assert await rollup.fold_all(engine) == 1
    assert await _versions(engine, organization_id, partner_id) == before

    # In a new hour it is still a new (zero) row, and the log and the counters agree.
    later = event(organization_id, type="voice", quantity=0, occurred_at="2026-02-10T13:00:00Z")
    await post_events(client, key, [later])
    assert await rollup.fold_all(engine) == 1
    after = await _versions(engine, organization_id, partner_id)
    assert before < after and len(after) == 11  # the organization's and the partner's hour
    async with engine.connect() as conn:
        hourly = await conn.execute(
            text(
                "SELECT user_id, to_char(hour_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24'),"
                " sms_outbound, voice_seconds FROM usage_hourly"
                " WHERE organization_id = :o ORDER BY 1, 2"
            ),
            {"o": organization_id},
        )
        assert [tuple(row) for row in hourly] == [
            ("", "2026-02-10 12", 3, 0),
            ("", "2026-02-10 13", 0, 0),
            (user_id, "2026-02-10 12", 3, 0),
        ]
        assert (await conn.execute(text("SELECT count(*) FROM usage_deltas"))).scalar() == 0
