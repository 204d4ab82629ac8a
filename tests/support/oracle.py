"""What events add up to, computed here by brute force, independently of the service's SQL.

The slot of each event, the totals a client's events must add up to, the log and the
roll-ups summed per bucket, and the API's own answer in the same shape, so that tests
compare them directly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Literal

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usage_api.analytics.totals import metrics_of

# (organization_id, user_id): user_id "" is the organization as a whole, every user included.
Key = tuple[str, str]
# sms out, sms in, mms out, mms in, voice seconds, voice kb seconds.
Metrics = tuple[int, int, int, int, int, int]
ZERO: Metrics = (0, 0, 0, 0, 0, 0)
# How finely the roll-ups are compared with the log: all time, per UTC hour, per UTC day.
Grain = Literal["all", "hour", "day"]
_ROLLUPS: dict[Grain, tuple[str, str]] = {
    "all": ("usage_counters", "NULL"),
    "hour": ("usage_hourly", "hour_at"),
    "day": ("usage_daily", "day"),
}
SLOTS = {
    ("sms", "outbound"): 0,
    ("sms", "inbound"): 1,
    ("mms", "outbound"): 2,
    ("mms", "inbound"): 3,
}
_SUMS = ", ".join(
    f"sum({m})::bigint"
    for m in (
        "sms_outbound",
        "sms_inbound",
        "mms_outbound",
        "mms_inbound",
        "voice_seconds",
        "voice_kb_seconds",
    )
)


def event_metrics(type_: str, direction: str, knowledge_base: bool, quantity: int) -> list[int]:
    """The six metrics of one event: its quantity in the slot its type, direction and
    knowledge base say, zero elsewhere."""
    metrics = [0] * 6
    slot = (5 if knowledge_base else 4) if type_ == "voice" else SLOTS[type_, direction]
    metrics[slot] = quantity
    return metrics


def _bucket(hour_at: datetime, grain: Grain) -> tuple[Any, ...]:
    if grain == "hour":
        return (hour_at,)
    if grain == "day":
        return (hour_at.astimezone(UTC).date(),)
    return ()


class Tally:
    """Metrics per (organization, user[, bucket]); "" is the organization with every user."""

    def __init__(self) -> None:
        self.rows: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 6)

    def add(self, key: tuple[Any, ...], metrics: Iterable[int]) -> None:
        row = self.rows[key]
        for slot, quantity in enumerate(metrics):
            row[slot] += int(quantity)

    def add_usage(
        self, organization_id: str, user_id: str, bucket: tuple[Any, ...], metrics: list[int]
    ) -> None:
        """Usage of one user (or none): it counts for the organization too."""
        self.add((organization_id, "", *bucket), metrics)
        if user_id:
            self.add((organization_id, user_id, *bucket), metrics)

    def as_dict(self) -> dict[Any, Metrics]:
        """Without all-zero rows, so that "no row" and "a row of zeros" compare equal."""
        return {
            key: (row[0], row[1], row[2], row[3], row[4], row[5])
            for key, row in self.rows.items()
            if any(row)
        }


def sent_totals(events: Iterable[dict[str, Any]]) -> dict[Key, Metrics]:
    """What the events a client sent add up to (each (organization, id) once)."""
    unique = {(e["organization_id"], e["id"]): e for e in events}
    totals = Tally()
    for e in unique.values():
        quantity = e["seconds"] if e["type"] == "voice" else e["segments"]
        metrics = event_metrics(e["type"], e["direction"], bool(e.get("knowledge_base")), quantity)
        totals.add_usage(e["organization_id"], e.get("user_id") or "", (), metrics)
    return totals.as_dict()


async def log_totals(conn: AsyncConnection, grain: Grain = "all") -> dict[Any, Metrics]:
    """The log, summed by brute force."""
    rows = await conn.execute(
        text(
            "SELECT organization_id, coalesce(user_id, '') AS user_id, type, direction,"
            " knowledge_base, date_trunc('hour', occurred_at, 'UTC') AS hour_at,"
            " sum(coalesce(segments, seconds))::bigint AS quantity"
            " FROM usage_events GROUP BY 1, 2, 3, 4, 5, 6"
        )
    )
    totals = Tally()
    for row in rows:
        metrics = event_metrics(row.type, row.direction, row.knowledge_base, int(row.quantity))
        totals.add_usage(row.organization_id, row.user_id, _bucket(row.hour_at, grain), metrics)
    return totals.as_dict()


async def rollup_totals(conn: AsyncConnection, grain: Grain) -> dict[Any, Metrics]:
    """A roll-up table plus the deltas not folded into it yet."""
    table, bucket = _ROLLUPS[grain]
    totals = Tally()
    rows = await conn.execute(
        text(f"SELECT organization_id, user_id, {bucket}, {_SUMS} FROM {table} GROUP BY 1, 2, 3")
    )
    for organization_id, user_id, at, *metrics in rows:
        totals.add((organization_id, user_id, *(() if grain == "all" else (at,))), metrics)
    deltas = await conn.execute(
        text(
            f"SELECT organization_id, user_id, hour_at, {_SUMS} FROM usage_deltas GROUP BY 1, 2, 3"
        )
    )
    for organization_id, user_id, hour_at, *metrics in deltas:
        totals.add_usage(organization_id, user_id, _bucket(hour_at, grain), metrics)
    return totals.as_dict()


async def assert_snapshot_consistent(engine: AsyncEngine) -> None:
    """In one snapshot, every roll-up plus the unfolded deltas equals the log, bucket by bucket."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            for grain in _ROLLUPS:
                assert await rollup_totals(conn, grain) == await log_totals(conn, grain), grain


async def api_totals(
    client: httpx.AsyncClient, key: str, targets: Iterable[Key], **params: str
) -> dict[Key, Metrics]:
    """All-time usage of each target as the API reports it (non-zero rows only)."""
    totals: dict[Key, Metrics] = {}
    for organization_id, user_id in targets:
        query = {"user_id": user_id} if user_id else {"organization_id": organization_id}
        response = await client.get(
            "/v1/analytics/usage", params={**query, **params}, headers={"X-API-Key": key}
        )
        assert response.status_code == 200, response.text
        metrics: Metrics = metrics_of(response.json()["usage"])
        if any(metrics):
            totals[organization_id, user_id] = metrics
    return totals
