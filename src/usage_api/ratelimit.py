"""Per-key request counting: the rate limit, and when each key was last used.

A key may make `limit` requests in each fixed window of `window_s` seconds (windows are
aligned to the epoch, so every process agrees on them). Every worker of every replica
counts in `api_key_windows`, but no request waits for the database: a worker decides from
the key's total as of its last sync plus its own requests since, and a background task
(`run`) adds its new requests to the shared totals and reads them back a few times a
second, in one statement for all keys.

What that promises, with `n` processes each seeing `rate` requests/s of one key:
- a key is never refused before it has made `limit` requests in the window (every count
  a worker holds is of real requests);
- a key may be admitted past its limit by what the other processes admit between two of
  their syncs: at most `(n - 1) * rate * sync_s` requests;
- the database takes one statement per process per sync, whatever the request rate.

The same sync records `api_keys.last_used_at`, written at most once a minute per key.
Keys unknown to the database are neither limited nor remembered past one sync: they are
answered 401 by the routes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, INTEGER
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_api import errors
from usage_api.auth import hash_key
from usage_api.db import PrimaryEngine, transact
from usage_api.errors import ServiceUnavailable

log = logging.getLogger(__name__)

POLICY = "per-key"

# Adds each key's new requests to its window's total and returns the totals. A row of an
# older window starts over; a worker still counting in an older window than the row's
# (a clock behind by a moment) adds nothing. Rows go in key order: concurrent syncs of
# several workers never deadlock. `last_used_at` is written only when a minute old.
_SYNC = text("""
WITH presented AS (
    SELECT k.id, k.key_hash, p.requests
    FROM unnest(:key_hashes, :requests) AS p(key_hash, requests)
    JOIN api_keys AS k ON k.key_hash = p.key_hash
),
touched AS (
    UPDATE api_keys SET last_used_at = now()
    WHERE id IN (SELECT id FROM presented)
      AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
),
counted AS (
    INSERT INTO api_key_windows AS w (key_id, window_start, requests)
    SELECT id, :window_start, requests FROM presented ORDER BY id
    ON CONFLICT (key_id) DO UPDATE SET
        requests = CASE
            WHEN w.window_start = excluded.window_start THEN w.requests + excluded.requests
            WHEN w.window_start < excluded.window_start THEN excluded.requests
            ELSE w.requests
        END,
        window_start = greatest(w.window_start, excluded.window_start)
    RETURNING key_id, requests
)
SELECT p.key_hash, c.requests FROM counted AS c JOIN presented AS p ON p.id = c.key_id
""").bindparams(
    bindparam("key_hashes", type_=ARRAY(BYTEA)),
    bindparam("requests", type_=ARRAY(INTEGER)),
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    reset_s: int

    def headers(self, limit: int, window_s: int) -> list[tuple[bytes, bytes]]:
        """The `RateLimit-Policy` and `RateLimit` fields (IETF httpapi draft)."""
        return [
            (b"ratelimit-policy", f'"{POLICY}";q={limit};w={window_s}'.encode()),
            (b"ratelimit", f'"{POLICY}";r={self.remaining};t={self.reset_s}'.encode()),
        ]


class RateLimiter:
    """One process's view of every key's window. `limit = 0` turns the limit off and
    keeps the last-use records."""

    def __init__(
        self,
        limit: int,
        window_s: int,
        sync_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.sync_s = sync_s
        self.clock = clock
        self._window = self._current_window()
        # Totals across all processes as of this process's last sync, and this
        # process's requests since; both of the current window, by key hash.
        self._synced: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}

    def _current_window(self) -> int:
        return int(self.clock() // self.window_s)

    def _roll(self) -> None:
        window = self._current_window()
        if window != self._window:
            self._window = window
            self._synced = {}
            # Past requests no longer count, but their keys were still used.
            self._pending = dict.fromkeys(self._pending, 0)

    def take(self, key_hash: bytes) -> Decision | None:
        """Count one request of a key; None when no limit applies."""
        self._roll()
        pending = self._pending.get(key_hash, 0)
        if self.limit <= 0:
            self._pending[key_hash] = pending + 1
            return None
        used = self._synced.get(key_hash, 0) + pending
        reset_s = max(1, math.ceil((self._window + 1) * self.window_s - self.clock()))
        if used >= self.limit:
            return Decision(False, 0, reset_s)
        self._pending[key_hash] = pending + 1
        return Decision(True, self.limit - used - 1, reset_s)

    async def sync(self, engine: PrimaryEngine) -> None:
        """Add this process's new requests to the shared totals and read those back."""
        self._roll()
        if not self._pending:
            return
        window, pending = self._window, self._pending
        self._pending = {}
        try:
            totals = await transact(engine, _sync, window * self.window_s, pending)
        except BaseException:
            # Not counted yet: keep them for the next sync.
            for key_hash, requests in pending.items():
                self._pending[key_hash] = self._pending.get(key_hash, 0) + requests
            raise
        if window == self._window:
            self._synced.update(totals)

    async def run(self, engine: PrimaryEngine) -> None:
        """Sync every `sync_s` seconds until cancelled, then once more."""
        try:
            while True:
                await asyncio.sleep(self.sync_s)
                try:
                    await self.sync(engine)
                except ServiceUnavailable:
                    pass  # The database is away; `transact` has logged it.
                except Exception:
                    log.warning("syncing key use failed; will retry", exc_info=True)
        finally:
            # The last requests' last use; a few seconds at most, then give up.
            try:
                await asyncio.wait_for(self.sync(engine), timeout=5)
            except Exception:
                log.warning("could not record the last key use at shutdown", exc_info=True)


async def _sync(
    conn: AsyncConnection, window_start: int, pending: dict[bytes, int]
) -> dict[bytes, int]:
    rows = await conn.execute(
        _SYNC,
        {
            "key_hashes": list(pending),
            "requests": list(pending.values()),
            "window_start": datetime.fromtimestamp(window_start, UTC),
        },
    )
    return {bytes(key_hash): requests for key_hash, requests in rows}


class RateLimit:
    """ASGI middleware: counts each `/v1` request that presents a key, answers 429 past the
    key's limit, and tells the caller where it stands in `RateLimit` headers."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = _presented_key(scope) if scope.get("path", "").startswith("/v1/") else None
        decision = self.limiter.take(hash_key(key)) if key is not None else None
        if decision is None:
            await self.app(scope, receive, send)
            return
        headers = decision.headers(self.limiter.limit, self.limiter.window_s)
        if not decision.allowed:
            response = errors.error_response(
                429,
                "rate limit exceeded",
                headers={"Retry-After": str(decision.reset_s)},
            )
            response.raw_headers.extend(headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _presented_key(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-api-key":
            return value.decode("latin-1") or None
    return None
