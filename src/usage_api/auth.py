"""API keys: how they are made and stored, and what each one may see.

A key is `usk_` followed by 256 random bits. Only its SHA-256 is stored: the key is
already high-entropy, so a slow password hash would add latency to every request and
no safety. What a key can see is its scope; everything outside it reads as unknown.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usage_api.db import run_autocommit
from usage_api.errors import ApiError
from usage_api.ids import new_id
from usage_api.sql import KEY_LOOKUP

KEY_PREFIX = "usk_"
KeyScope = Literal["admin", "partner", "organization"]


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def invalid_key() -> ApiError:
    return ApiError(401, "invalid API key")


def presented_hash(key: str | None) -> bytes:
    """The hash to look a presented key up by; a 401 when there is none."""
    if not key:
        raise ApiError(401, "X-API-Key header is required")
    return hash_key(key)


@dataclass(frozen=True)
class Principal:
    """The caller, as its key describes it."""

    key_id: str
    scope: KeyScope
    partner_id: str | None
    organization_id: str | None
    can_write: bool

    def scope_params(self) -> dict[str, Any]:
        """Parameters of `sql.visible_organization`; ids this scope lacks are NULL."""
        return {
            "scope": self.scope,
            "scope_partner_id": self.partner_id,
            "scope_organization_id": self.organization_id,
        }

    def require_write(self) -> None:
        if not self.can_write:
            raise ApiError(403, "API key does not have write permission")

    def require_admin(self) -> None:
        if self.scope != "admin":
            raise ApiError(403, "API key does not have admin scope")


_LOOKUP = text(KEY_LOOKUP)


async def _lookup(conn: AsyncConnection, key_hash: bytes) -> Any:
    return (await conn.execute(_LOOKUP, {"key_hash": key_hash})).first()


async def authenticate(engine: AsyncEngine, key: str | None) -> Principal:
    row = await run_autocommit(engine, _lookup, presented_hash(key))
    if row is None:
        raise invalid_key()
    return Principal(row.id, row.scope, row.partner_id, row.organization_id, row.can_write)


# The key administration below is used by the CLI; it runs inside the caller's transaction.


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


async def create_key(
    conn: AsyncConnection,
    *,
    scope: KeyScope,
    partner_id: str | None = None,
    organization_id: str | None = None,
    can_write: bool = False,
    name: str | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, str]:
    """Store a new key and return `(key_id, key)`; the key itself is never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_id()
    await conn.execute(
        text(
            "INSERT INTO api_keys (id, key_hash, prefix, name, scope, partner_id,"
            " organization_id, can_write, expires_at) VALUES (:id, :key_hash, :prefix, :name,"
            " :scope, :partner_id, :organization_id, :can_write, :expires_at)"
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
        },
    )
    return key_id, key


async def list_keys(conn: AsyncConnection) -> list[KeyInfo]:
    rows = await conn.execute(
        text(
            "SELECT id, prefix, name, scope, partner_id, organization_id, can_write,"
            " created_at, expires_at, revoked_at, last_used_at FROM api_keys"
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


async def rotate_key(
    conn: AsyncConnection, key_id: str, grace: timedelta, expires_at: datetime | None = None
) -> tuple[str, str, datetime] | None:
    """Replace a live key: a new key with the same scope, permission and name, and the old
    one ending after `grace` (sooner if it was to end sooner). Returns `(new_key_id, key,
    old_key_expires_at)`; None when there is no live key with that id."""
    old = (
        await conn.execute(
            text(
                "SELECT scope, partner_id, organization_id, can_write, name FROM api_keys"
                " WHERE id = :id AND revoked_at IS NULL"
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
    )
    old_expires_at: datetime = await conn.scalar(
        text(
            "UPDATE api_keys SET expires_at = least(expires_at, now() + :grace) WHERE id = :id"
            " RETURNING expires_at"
        ),
        {"id": key_id, "grace": grace},
    )
    return new_key_id, key, old_expires_at
