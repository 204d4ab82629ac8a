"""Key administration, as the CLI does it: create, list, rotate, revoke, set a key's limit.

A key is `usk_` followed by 256 random bits; only its SHA-256 is stored (`auth.hash_key`).
Every function runs inside the caller's transaction.

A key's `rate_limit` is its requests per window (`ratelimit.py`); 0 means unlimited and
NULL means "the default": the `USAGE_API_RATE_LIMIT` of the process serving the request.
NULL rather than the default's value at creation, so that changing the variable moves
every key that never had a limit of its own (a partner's dashboard "keeps the default"),
and so that keys made before per-key limits existed behave exactly as they did.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import KeyScope, hash_key
from usage_api.ids import new_id

KEY_PREFIX = "usk_"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    prefix: str
    name: str | None
    scope: str
    partner_id: str | None
    organization_id: str | None
    can_write: bool
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    rate_limit: int | None


async def create_key(
    conn: AsyncConnection,
    *,
    scope: KeyScope,
    partner_id: str | None = None,
    organization_id: str | None = None,
    can_write: bool = False,
    name: str | None = None,
    expires_at: datetime | None = None,
    rate_limit: int | None = None,
) -> tuple[str, str]:
    """Store a new key and return `(key_id, key)`; the key itself is never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_id()
    await conn.execute(
        text(
            "INSERT INTO api_keys (id, key_hash, prefix, name, scope, partner_id,"
            " organization_id, can_write, expires_at, rate_limit) VALUES (:id, :key_hash,"
            " :prefix, :name, :scope, :partner_id, :organization_id, :can_write, :expires_at,"
            " :rate_limit)"
        ),
        {
            "id": key_id,
            "key_hash": hash_key(key),
            "prefix": key[:12],
            "name": name,
            "scope": scope,
            "partner_id": partner_id,
            "organization_id": organization_id,
            "can_write": can_write,
            "expires_at": expires_at,
            "rate_limit": rate_limit,
        },
    )
    return key_id, key


async def list_keys(conn: AsyncConnection) -> list[KeyInfo]:
    rows = await conn.execute(
        text(
            "SELECT id, prefix, name, scope, partner_id, organization_id, can_write,"
            " created_at, expires_at, revoked_at, last_used_at, rate_limit FROM api_keys"
            " ORDER BY created_at, id"
        )
    )
    return [KeyInfo(**row._mapping) for row in rows]


async def revoke_key(conn: AsyncConnection, key_id: str) -> bool:
    """Revoke a key; False when there is no such key."""
    result = await conn.execute(
        text(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = :id"
            " RETURNING id"
        ),
        {"id": key_id},
    )
    return result.first() is not None


async def set_limit(conn: AsyncConnection, key_id: str, rate_limit: int | None) -> bool:
    """Give a key its own limit (None: the default again); False when there is no such
    key. Every process applies it from its next sync."""
    result = await conn.execute(
        text("UPDATE api_keys SET rate_limit = :rate_limit WHERE id = :id RETURNING id"),
        {"id": key_id, "rate_limit": rate_limit},
    )
    return result.first() is not None


async def rotate_key(
    conn: AsyncConnection, key_id: str, grace: timedelta, expires_at: datetime | None = None
) -> tuple[str, str, datetime] | None:
    """Replace a live key: a new key with the same scope, permission, name and rate limit,
    and the old one ending after `grace` (sooner if it was to end sooner). Returns
    `(new_key_id, key, old_key_expires_at)`; None when there is no live key with that id."""
    old = (
        await conn.execute(
            text(
                "SELECT scope, partner_id, organization_id, can_write, name, rate_limit"
                " FROM api_keys WHERE id = :id AND revoked_at IS NULL"
                " AND (expires_at IS NULL OR expires_at > now()) FOR UPDATE"
            ),
            {"id": key_id},
        )
    ).first()
    if old is None:
        return None
    new_key_id, key = await create_key(
        conn,
        scope=old.scope,
        partner_id=old.partner_id,
        organization_id=old.organization_id,
        can_write=old.can_write,
        name=old.name,
        expires_at=expires_at,
        rate_limit=old.rate_limit,
    )
    old_expires_at: datetime = await conn.scalar(
        text(
            "UPDATE api_keys SET expires_at = least(expires_at, now() + :grace) WHERE id = :id"
            " RETURNING expires_at"
        ),
        {"id": key_id, "grace": grace},
    )
    return new_key_id, key, old_expires_at
