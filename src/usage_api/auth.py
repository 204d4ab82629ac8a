"""API keys: how a presented key is recognised, and what each one may see.

Only a key's SHA-256 is stored (keys are made in `keys.py`): the key is already
high-entropy, so a slow password hash would add latency to every request and no safety.
What a key can see is its scope; everything outside it reads as unknown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usage_api.db import run_autocommit
from usage_api.errors import ApiError
from usage_api.sql import KEY_LOOKUP

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
