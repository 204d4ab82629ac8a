"""Dashboard sessions: a pasted key exchanged for a cookie that holds a random token.

Only the token's SHA-256 is stored, beside the id of the key it was opened with. Every
page load looks the token up joined to that key's row, so a key that is revoked or expires
ends its sessions on the next load. A session lasts at most `SESSION_LIFETIME`, never
longer than its key. The cookie is HttpOnly, SameSite=Strict, limited to `/dashboard`, and
Secure whenever the request came over HTTPS; the `/v1` API never reads it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from usage_api.auth import Principal, hash_key
from usage_api.sql import KEY_LOOKUP

COOKIE = "usage_session"
COOKIE_PATH = "/dashboard"
SESSION_LIFETIME = timedelta(hours=12)

# The session's key must still be live: the same conditions as the API's key lookup.
_OPEN = text(
    f"""
    WITH k AS ({KEY_LOOKUP}), expired AS (
        DELETE FROM dashboard_sessions WHERE expires_at <= now()
    )
    INSERT INTO dashboard_sessions (token_hash, key_id, expires_at)
    SELECT :token_hash, k.id, least(now() + :lifetime, a.expires_at)
    FROM k JOIN api_keys a ON a.id = k.id
    RETURNING expires_at, now() AS now
    """
)
_FIND = text(
    """
    SELECT k.id, k.key_hash, k.scope, k.partner_id, k.organization_id, k.can_write,
           k.name, s.expires_at
    FROM dashboard_sessions s JOIN api_keys k ON k.id = s.key_id
    WHERE s.token_hash = :token_hash AND s.expires_at > now()
      AND k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
    """
)
_CLOSE = text("DELETE FROM dashboard_sessions WHERE token_hash = :token_hash")


@dataclass(frozen=True)
class Session:
    """A live session: its key as the API sees it, and the hash the API's reads take."""

    principal: Principal
    key_hash: bytes
    key_name: str | None
    expires_at: datetime


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def open_session(conn: AsyncConnection, key: str) -> tuple[str, timedelta] | None:
    """A new session's token and how long it lasts; None when the key is not live."""
    token = secrets.token_urlsafe(32)
    row = (
        await conn.execute(
            _OPEN,
            {
                "key_hash": hash_key(key),
                "token_hash": _token_hash(token),
                "lifetime": SESSION_LIFETIME,
            },
        )
    ).first()
    if row is None:
        return None
    return token, row.expires_at - row.now


async def find_session(conn: AsyncConnection, token: str) -> Session | None:
    row = (await conn.execute(_FIND, {"token_hash": _token_hash(token)})).first()
    if row is None:
        return None
    principal = Principal(row.id, row.scope, row.partner_id, row.organization_id, row.can_write)
    return Session(principal, row.key_hash, row.name, row.expires_at)


async def close_session(conn: AsyncConnection, token: str) -> None:
    await conn.execute(_CLOSE, {"token_hash": _token_hash(token)})


def set_cookie(response: Response, request: Request, token: str, lifetime: timedelta) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=max(int(lifetime.total_seconds()), 1),
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def is_same_origin(request: Request) -> bool:
    """Whether a state-changing request (sign-in, sign-out) came from our own pages.

    SameSite=Strict already keeps the cookie off cross-site requests; this also stops a
    cross-site form from signing a browser in with someone else's key. Browsers send
    `Sec-Fetch-Site`, or at least `Origin`, on every POST; a client that sends neither is
    not a browser another site can steer."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        # Set by the browser itself, never by a page's script: it has the last word.
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    # The host only: behind a proxy that ends TLS the scheme seen here may differ.
    return urlsplit(origin).netloc == request.headers.get("host", "")


def form_fields(body: bytes) -> dict[str, Any]:
    """An `application/x-www-form-urlencoded` body, each field's first value."""
    fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=10)
    return {name: values[0] for name, values in fields.items()}
