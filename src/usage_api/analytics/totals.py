"""The totals of one organization or user: `GET /v1/analytics/usage` without series.

Each answer is one statement, so one snapshot and one round trip: the caller's key, the
entity, its scope check and its sums. It runs on asyncpg directly (`db.fetch_row`): this
is the hottest route, and SQLAlchemy's execution layers cost as much as the statement.
All time is the counter row plus the deltas not yet folded into it; a range is summed from
the pieces `ranges.range_params` cuts it into, plus the unfolded deltas of its whole hours.
`python -m usage_api.analytics.totals` prints the four statements as they run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from usage_api.analytics.query import UsageQuery
from usage_api.analytics.ranges import range_params
from usage_api.auth import invalid_key
from usage_api.models import METRICS
from usage_api.replicas import Reads
from usage_api.sql import (
    EVENT_SUMS,
    KEY_LOOKUP,
    METRIC_COLUMNS,
    METRIC_SUMS,
    Statement,
    compile_named,
    visible_to_key,
)

# Placeholders: {events} and {rollups} select the entity's rows; an organization's
# events and deltas include every user's, its roll-ups are the rows with user_id ''.
_ALL_TIME_PARTS = f"""
    SELECT {METRIC_COLUMNS} FROM usage_counters WHERE {{rollups}}
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM usage_deltas WHERE {{events}}
"""

_RANGE_PARTS = f"""
    SELECT {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= :start AND occurred_at < :first_hour
        AND :start < :first_hour
    UNION ALL
    SELECT {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= :last_hour AND occurred_at < :end
        AND :last_hour < :end
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM {{hourly}}
    WHERE {{rollups}} AND hour_at >= :first_hour AND hour_at < :first_day_at
        AND :first_hour < :first_day_at
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM {{hourly}}
    WHERE {{rollups}} AND hour_at >= :last_day_at AND hour_at < :last_hour
        AND :last_day_at < :last_hour
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM {{daily}}
    WHERE {{rollups}} AND day >= :first_day AND day < :last_day
        AND :first_day < :last_day
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM usage_deltas
    WHERE {{events}} AND hour_at >= :first_hour AND hour_at < :last_hour
        AND :first_hour < :last_hour
"""

# With `partner_id` too, the organization must be one of the partner's.
IN_PARTNER = "(CAST(:partner_id AS text) IS NULL OR o.partner_id = :partner_id)"
PARTNER_VISIBLE = "(k.scope = 'admin' OR k.partner_id = p.id)"

# What each kind of entity answers with, where it comes from, and the condition that it is
# the one asked for and inside the key's scope.
_ENTITIES = {
    "organization": (
        "o.id, o.name",
        "organizations o",
        f"o.id = :organization_id AND {visible_to_key()} AND {IN_PARTNER}",
    ),
    "user": (
        "u.id, u.name, u.email",
        "users u JOIN organizations o ON o.id = u.organization_id",
        f"u.id = :user_id AND {visible_to_key()}"
        " AND (CAST(:organization_id AS text) IS NULL OR u.organization_id = :organization_id)"
        f" AND {IN_PARTNER}",
    ),
    # A partner's usage is its organizations' of now: every part selects their rows at once.
    "partner": ("p.id, p.name", "partners p", f"p.id = :partner_id AND {PARTNER_VISIBLE}"),
}


def entity_statement(kind: str, sums: str) -> str:
    """The statement of one answer: the caller's key, the entity and `sums` (a subquery of
    the entity's metrics, as `m`). No row: the key is unknown, revoked or expired. A row
    with a NULL `id`: the entity is unknown or outside the key's scope, which must read the
    same."""
    columns, source, condition = _ENTITIES[kind]
    return f"""
WITH k AS ({KEY_LOOKUP})
SELECT k.id AS key_id, e.* FROM k LEFT JOIN LATERAL (
    SELECT {columns}, m.* FROM {source}
    CROSS JOIN LATERAL ({sums}) m
    WHERE {condition}
) e ON true
"""


PARTNER_EVENTS = (
    "organization_id = ANY(ARRAY(SELECT po.id FROM organizations po WHERE po.partner_id = p.id))"
)
ENTITY_ROWS = {
    "user": ("organization_id = u.organization_id AND user_id = u.id",) * 2,
    "organization": ("organization_id = o.id", "organization_id = o.id AND user_id = ''"),
    "partner": (PARTNER_EVENTS, f"{PARTNER_EVENTS} AND user_id = ''"),
}
_PARTNER_VISIBLE = f"""
WITH k AS ({KEY_LOOKUP})
SELECT EXISTS (SELECT FROM partners p WHERE p.id = :partner_id AND {PARTNER_VISIBLE}) FROM k
"""


KINDS = tuple(_ENTITIES)
_SUMS = f"SELECT {METRIC_SUMS} FROM ({{parts}}) parts"


# The placeholders of a range's parts (and a series'): {events} selects the entity's log
# rows and deltas, {rollups} its rows of the {hourly} and {daily} roll-ups. A partner's
# whole hours and days come from its own roll-ups: a row per hour or day, where its
# organizations' would be one per organization per hour or day (measured in
# bench/NOTES.md, "Breakdown and partner speed"). Its edges and deltas are its
# organizations' of now, as for every other kind.
ROLLUP_ROWS = {
    kind: {
        "events": events,
        "rollups": rollups,
        "hourly": "usage_hourly",
        "daily": "usage_daily",
    }
    for kind, (events, rollups) in ENTITY_ROWS.items()
}
ROLLUP_ROWS["partner"] |= {
    "rollups": "partner_id = p.id",
    "hourly": "partner_hourly",
    "daily": "partner_daily",
}


def range_parts(kind: str) -> str:
    """The parts of a range's sums for `kind`, as in `_RANGE_PARTS`."""
    return _RANGE_PARTS.format(**ROLLUP_ROWS[kind])


def _statement(kind: str, ranged: bool) -> Statement:
    events, rollups = ENTITY_ROWS[kind]
    parts = range_parts(kind) if ranged else _ALL_TIME_PARTS.format(events=events, rollups=rollups)
    return compile_named(entity_statement(kind, _SUMS).replace("{parts}", parts))


_STATEMENTS = {
    (kind, ranged): _statement(kind, ranged) for kind in KINDS for ranged in (False, True)
}
_PARTNER_VISIBLE_STATEMENT = compile_named(_PARTNER_VISIBLE)


async def partner_visible(reads: Reads, key_hash: bytes, partner_id: str) -> bool:
    """Whether the key may see the partner (for the 404 that names what was not found)."""
    params = {"key_hash": key_hash, "partner_id": partner_id}
    statement = _PARTNER_VISIBLE_STATEMENT
    row = await reads.fetch_row(statement.sql, *statement.args(params))
    return row is not None and bool(row[0])


def metrics_json(row: Any) -> dict[str, Any]:
    """`sms`, `mms` and `voice` of the contract from a row (or mapping) of the six sums."""
    return sums_json([int(row[m]) for m in METRICS])


def sums_json(sums: Sequence[int]) -> dict[str, Any]:
    """`sms`, `mms` and `voice` of the contract from the six sums in `METRICS` order."""
    sms_out, sms_in, mms_out, mms_in, voice, voice_kb = sums
    return {
        "sms": {"outbound": sms_out, "inbound": sms_in, "total": sms_out + sms_in},
        "mms": {"outbound": mms_out, "inbound": mms_in, "total": mms_out + mms_in},
        "voice": {"seconds": voice, "kb_seconds": voice_kb, "total_seconds": voice + voice_kb},
    }


def entity_json(kind: str, row: Any) -> dict[str, Any]:
    """The head of a `usage` answer: who it is about."""
    if kind == "user":
        return {"user_id": row["id"], "user_name": row["name"], "user_email": row["email"]}
    return {f"{kind}_id": row["id"], f"{kind}_name": row["name"]}


def period_json(query: UsageQuery) -> dict[str, Any]:
    """The tail of a `usage` answer: all time, or the range's echo (and its zone)."""
    if query.span is None:
        return {"period": "all_time"}
    period = {
        "period": "custom",
        "start_date": query.span.start_echo,
        "end_date": query.span.end_echo,
    }
    if query.timezone is not None:
        period["timezone"] = query.timezone
    return period


def metrics_of(usage: dict[str, Any]) -> tuple[int, ...]:
    """The metrics of a `usage` answer back in `METRICS` order: what `metrics_json` spread out."""
    sms, mms, voice = usage["sms"], usage["mms"], usage["voice"]
    return (
        sms["outbound"],
        sms["inbound"],
        mms["outbound"],
        mms["inbound"],
        voice["seconds"],
        voice["kb_seconds"],
    )


async def read_usage(
    reads: Reads, key_hash: bytes, query: UsageQuery
) -> tuple[str, dict[str, Any] | None]:
    """The id of the caller's key, and the `usage` object in the contract's key order
    (None when the organization or user is unknown or outside the key's scope)."""
    kind = query.kind
    params: dict[str, Any] = {
        "key_hash": key_hash,
        "organization_id": query.organization_id,
        "user_id": query.user_id,
        "partner_id": query.partner_id,
    }
    if query.span is not None:
        params.update(range_params(query.span))
    statement = _STATEMENTS[kind, query.span is not None]
    row = await reads.fetch_row(statement.sql, *statement.args(params))
    if row is None:
        raise invalid_key()
    if row["id"] is None:
        return row["key_id"], None

    usage = entity_json(kind, row)
    usage.update(metrics_json(row))
    usage.update(period_json(query))
    return row["key_id"], usage


if __name__ == "__main__":
    for (kind, ranged), statement in _STATEMENTS.items():
        print(f"-- {kind}, {'range' if ranged else 'all time'}; $n: {', '.join(statement.names)}")
        print(statement.sql.strip(), end=";\n\n")
