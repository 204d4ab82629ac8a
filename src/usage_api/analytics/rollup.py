"""Folding deltas into the roll-ups.

Ingest only appends to `usage_deltas`. `fold` moves a batch of deltas into
`usage_counters`, `usage_hourly`, `usage_daily` and `organization_monthly` in one
statement that also deletes them, so at every snapshot each delta is counted exactly
once: either still a delta or already in the roll-ups. Only one fold runs at a time
across every process (a transaction-level advisory lock), so the roll-up rows it updates
never contend with writers or with each other, and a fold interrupted at any point simply
never happened.

The same statement adds each organization's hours and days to its partner's rows
(`partner_hourly`, `partner_daily`), by the partner the organization has at the fold's
snapshot. An organization that changes partner moves its folded history from the old
partner's rows to the new one's in the transaction of the change, after taking this same
lock (the trigger of migration 5b1e7c3d9a20): a fold that began before the change folded
into the old partner and is then moved along; one after it sees the new partner. So a
partner's rows are always exactly its organizations' of now, as readers count them.
"""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.db import PrimaryEngine, transact
from usage_api.errors import ServiceUnavailable
from usage_api.models import METRICS
from usage_api.sql import METRIC_COLUMNS, METRIC_SUMS, compile_named

log = logging.getLogger("usage_api")

# A row whose sums are all zero is not updated: its sums would not change, and a new row
# version is WAL and a dead tuple for nothing (it is still inserted when it is new).
_ADD_EXCLUDED = ", ".join(f"{m} = {{table}}.{m} + excluded.{m}" for m in METRICS) + (
    " WHERE NOT (" + " AND ".join(f"excluded.{m} = 0" for m in METRICS) + ")"
)

# 0x7573616765 is "usage": any constant will do as long as nothing else uses it.
_FOLD_LOCK = 0x7573616765

# Deltas are summed per hour for the hourly rows, and per day once: every daily row and
# every counter comes from those day sums, so the user rows (nearly one per delta when
# usage is spread over many users) are not sorted and grouped again for each roll-up.
_FOLD = compile_named(f"""
WITH batch AS (
    DELETE FROM usage_deltas
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM usage_deltas LIMIT :limit))
    RETURNING organization_id, user_id, hour_at, {METRIC_COLUMNS}
),
days AS (
    SELECT organization_id, user_id, (hour_at AT TIME ZONE 'UTC')::date AS day, {METRIC_SUMS}
    FROM batch
    GROUP BY 1, 2, 3
),
targets AS (
    SELECT organization_id, user_id, day, {METRIC_COLUMNS} FROM days WHERE user_id <> ''
    UNION ALL
    SELECT organization_id, '', day, {METRIC_SUMS} FROM days GROUP BY organization_id, day
),
hourly AS (
    INSERT INTO usage_hourly (organization_id, user_id, hour_at, {METRIC_COLUMNS})
    SELECT organization_id, user_id, hour_at, {METRIC_SUMS} FROM batch WHERE user_id <> ''
    GROUP BY organization_id, user_id, hour_at
    UNION ALL
    SELECT organization_id, '', hour_at, {METRIC_SUMS} FROM batch
    GROUP BY organization_id, hour_at
    ORDER BY 1, 2, 3
    ON CONFLICT (organization_id, user_id, hour_at)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="usage_hourly")}
),
daily AS (
    INSERT INTO usage_daily (organization_id, user_id, day, {METRIC_COLUMNS})
    SELECT organization_id, user_id, day, {METRIC_COLUMNS} FROM targets
    ORDER BY organization_id, user_id, day
    ON CONFLICT (organization_id, user_id, day)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="usage_daily")}
),
monthly AS (
    INSERT INTO organization_monthly (organization_id, month, {METRIC_COLUMNS})
    SELECT organization_id, date_trunc('month', day::timestamp)::date, {METRIC_SUMS} FROM targets
    WHERE user_id = ''
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (organization_id, month)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="organization_monthly")}
),
partner_hours AS (
    SELECT o.partner_id, b.hour_at, {METRIC_SUMS}
    FROM batch b JOIN organizations o ON o.id = b.organization_id
    WHERE o.partner_id IS NOT NULL
    GROUP BY 1, 2
),
partner_hourly AS (
    INSERT INTO partner_hourly (partner_id, hour_at, {METRIC_COLUMNS})
    SELECT partner_id, hour_at, {METRIC_COLUMNS} FROM partner_hours
    ORDER BY partner_id, hour_at
    ON CONFLICT (partner_id, hour_at)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="partner_hourly")}
),
partner_daily AS (
    INSERT INTO partner_daily (partner_id, day, {METRIC_COLUMNS})
    SELECT partner_id, (hour_at AT TIME ZONE 'UTC')::date, {METRIC_SUMS} FROM partner_hours
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (partner_id, day)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="partner_daily")}
),
counters AS (
    INSERT INTO usage_counters (organization_id, user_id, {METRIC_COLUMNS})
    SELECT organization_id, user_id, {METRIC_SUMS} FROM targets
    GROUP BY organization_id, user_id
    ORDER BY organization_id, user_id
    ON CONFLICT (organization_id, user_id)
    DO UPDATE SET {_ADD_EXCLUDED.format(table="usage_counters")}
)
SELECT count(*) FROM batch
""")


# A fold is background work, not a request: under a heavy write load a fold of 20,000
# deltas can take longer than a request's statement_timeout, and a fold cut short is
# all its work thrown away, again and again while the load lasts. So it has its own
# timeout, on the server (statement_timeout) and on the client (asyncpg's, which would
# otherwise give up at the request's statement_timeout plus a second).
_FOLD_TIMEOUT_S = 300
_LOCK_FOR_FOLD = text(
    "SELECT pg_try_advisory_xact_lock(:key),"
    f" set_config('statement_timeout', '{_FOLD_TIMEOUT_S}s', true)"
)


async def fold(conn: AsyncConnection, limit: int = 20_000) -> int | None:
    """Fold up to `limit` deltas; the number folded, or None if another fold holds the lock."""
    locked = (await conn.execute(_LOCK_FOR_FOLD, {"key": _FOLD_LOCK})).scalar()
    if not locked:
        return None
    # On asyncpg directly, in the transaction the lock statement began: SQLAlchemy has
    # no per-statement client timeout.
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    folded = await driver.fetchval(
        _FOLD.sql, *_FOLD.args({"limit": limit}), timeout=_FOLD_TIMEOUT_S + 1
    )
    return int(folded or 0)


async def fold_all(engine: PrimaryEngine, limit: int = 20_000) -> int:
    """Fold until no deltas are left (or another process is folding); the number folded."""
    total = 0
    while True:
        folded = await transact(engine, fold, limit)
        if not folded:
            return total
        total += folded
        if folded < limit:
            return total


async def run_folder(engine: PrimaryEngine, interval_s: float) -> None:
    """Fold deltas every `interval_s` seconds until cancelled; errors are logged, not fatal."""
    while True:
        try:
            await fold_all(engine)
        except asyncio.CancelledError:
            raise
        except ServiceUnavailable:
            # The database is away (a restart, a failover); `transact` has logged it.
            pass
        except Exception:
            log.warning("folding deltas failed; will retry", exc_info=True)
        await asyncio.sleep(interval_s)
