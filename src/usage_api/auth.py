"""API keys: how a presented key is recognised, and what each one may see.

Only a key's SHA-256 is stored (keys are made in `keys.py`): the key is already
high-entropy, so a slow password hash would add latency to every request and no safety.
What a key can see is its scope; everything outside it reads as unknown.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usage_api.db import run_autocommit
from usage_api.errors import ApiError

Scope = Literal["admin", "partner", "organization"]


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def invalid_key() -> ApiError:
    return ApiError(401, "invalid API key")


def presented_hash(key: str | None) -> bytes:
    """The hash to look a presented key up by; a 401 when there is none."""
    if not key:
        raise ApiError(401, "X-API-Key header is required")
    return hash_key(key)


# The condition every query of tenant data puts on its organizations row `o`: as bound
# parameters (`Principal.scope_params`), or as the columns of a key row `k` in the query.
VISIBLE_ORGANIZATION = (
    "(:scope = 'admin' OR o.partner_id = :scope_partner_id OR o.id = :scope_organization_id)"
)
VISIBLE_TO_KEY = "(k.scope = 'admin' OR o.partner_id = k.partner_id OR o.id = k.organization_id)"


@dataclass(frozen=True)
class Principal:
    """The caller, as its key describes it."""

    key_id: str
    scope: Scope
    partner_id: str | None
    organization_id: str | None
    can_write: bool

    def scope_params(self) -> dict[str, Any]:
        """Parameters of `VISIBLE_ORGANIZATION`; ids this scope lacks are NULL and never match."""
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


# The live key with a given hash; other statements embed it as `k` (see usage.py).
KEY_LOOKUP = (
    "SELECT id, scope, partner_id, organization_id, can_write FROM api_keys"
    " WHERE key_hash = :key_hash AND revoked_at IS NULL"
    " AND (expires_at IS NULL OR expires_at > now())"
)
_LOOKUP = text(KEY_LOOKUP)


async def _lookup(conn: AsyncConnection, key_hash: bytes) -> Any:
    return (await conn.execute(_LOOKUP, {"key_hash": key_hash})).first()


async def authenticate(engine: AsyncEngine, key: str | None) -> Principal:
    row = await run_autocommit(engine, _lookup, presented_hash(key))
    if row is None:
        raise invalid_key()
    return Principal(row.id, row.scope, row.partner_id, row.organization_id, row.can_write)


async def get_engine(request: Request) -> AsyncEngine:
    # async, though it awaits nothing: FastAPI runs a plain `def` dependency in a thread.
    engine: AsyncEngine = request.app.state.engine
    return engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


# Documents the key as the OpenAPI security scheme; auto_error=False so that a missing key
# is our own 401 with the contract's body, not FastAPI's.
_API_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="An API key (`usk_...`): its scope and permission decide what it may see and do.",
    auto_error=False,
)


async def current_key(
    request: Request,
    engine: EngineDep,
    x_api_key: Annotated[str | None, Security(_API_KEY)],
) -> Principal:
    principal = await authenticate(engine, x_api_key)
    # For the access log, which names a key by its id only.
    request.state.key_id = principal.key_id
    return principal


CurrentKey = Annotated[Principal, Depends(current_key)]
