"""The SQL vocabulary that ingestion, the fold and reads share, and how statements are
compiled for asyncpg.

Statements are written with `:name` parameters and compiled once, at import, by
SQLAlchemy's own asyncpg compiler into `$n` placeholders plus the order of the names
(`Statement`); the hot paths then run them on asyncpg directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import asyncpg

from usage_api.models import METRICS

# The columns of a `usage_events` row as ingestion sends them, with their SQL types.
EVENT_COLUMNS = {
    "organization_id": "text",
    "id": "text",
    "user_id": "text",
    "type": "text",
    "direction": "text",
    "segments": "int",
    "seconds": "int",
    "knowledge_base": "bool",
    "occurred_at": "timestamptz",
}

# The six metrics of a set of `usage_events` rows.
EVENT_SUMS = """
    coalesce(sum(segments) FILTER (WHERE type = 'sms' AND direction = 'outbound'), 0)
        AS sms_outbound,
    coalesce(sum(segments) FILTER (WHERE type = 'sms' AND direction = 'inbound'), 0)
        AS sms_inbound,
    coalesce(sum(segments) FILTER (WHERE type = 'mms' AND direction = 'outbound'), 0)
        AS mms_outbound,
    coalesce(sum(segments) FILTER (WHERE type = 'mms' AND direction = 'inbound'), 0)
        AS mms_inbound,
    coalesce(sum(seconds) FILTER (WHERE type = 'voice' AND NOT knowledge_base), 0)
        AS voice_seconds,
    coalesce(sum(seconds) FILTER (WHERE type = 'voice' AND knowledge_base), 0)
        AS voice_kb_seconds"""

# The six metrics of a set of rows that already carry them (roll-ups, deltas).
METRIC_SUMS = ", ".join(f"coalesce(sum({m}), 0)::bigint AS {m}" for m in METRICS)
METRIC_COLUMNS = ", ".join(METRICS)

# What makes an `api_keys` row live: neither revoked nor expired.
LIVE_KEY = "revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())"
# The live key with a given hash; reads embed it as `k` to check the key in their statement.
KEY_LOOKUP = (
    "SELECT id, scope, partner_id, organization_id, can_write FROM api_keys"
    f" WHERE key_hash = :key_hash AND {LIVE_KEY}"
)


def visible_organization(alias: str = "o") -> str:
    """The condition that organizations row `alias` lies in the caller's scope, given as
    the parameters of `Principal.scope_params` (ids a scope lacks are NULL: no match)."""
    return (
        f"(:scope = 'admin' OR {alias}.partner_id = :scope_partner_id"
        f" OR {alias}.id = :scope_organization_id)"
    )


def visible_to_key(organization: str = "o", key: str = "k") -> str:
    """The same condition with the scope taken from key row `key` of the statement."""
    return (
        f"({key}.scope = 'admin' OR {organization}.partner_id = {key}.partner_id"
        f" OR {organization}.id = {key}.organization_id)"
    )


@dataclass(frozen=True)
class Statement:
    """SQL with asyncpg's `$n` placeholders, and the names of the parameters they stand for."""

    sql: str
    names: tuple[str, ...]

    def args(self, params: dict[str, Any]) -> list[Any]:
        """The positional arguments for `params`, in placeholder order."""
        return [params[name] for name in self.names]


_DIALECT = asyncpg.dialect()  # type: ignore[no-untyped-call]


def compile_named(sql: str) -> Statement:
    """Compile SQL with `:name` parameters (`::type` casts are left alone) for asyncpg."""
    compiled = text(sql).compile(dialect=_DIALECT)
    return Statement(str(compiled), tuple(compiled.positiontup or ()))
