"""Per-key request counting: the rate limit, which keys exist, and when each was last used.

A key may make its `limit` of requests in each fixed window of `window_s` seconds
(windows are aligned to the epoch, so every process agrees on them). The limit is the
key's own (`api_keys.rate_limit`), or the process's default when the key has none; 0 is
no limit. Every worker of every replica counts in `api_key_windows`, and a worker decides
from the key's total as of its last sync plus its own requests since (those of a sync
still in flight included), so no request of a key the worker knows waits for the
database. A background task (`run`) adds the new requests to the shared totals and reads
back the totals, limits and expiry of every key the worker knows, in one statement for
all keys, every `sync_s` seconds.

What that promises, with `n` processes each seeing `rate` requests/s of one key:
- a key is never refused before it has made `limit` requests in the window (every count
  a worker holds is of real requests);
- one process alone never admits more than `limit`: everything it admitted is counted;
- a key may be admitted past its limit by what the other processes admit between two of
  their syncs: at most `(n - 1) * rate * sync_s` requests, and never more than `n * limit`
  in all;
- a new limit (`keys set-limit`) and a revocation apply in every process from its next
  sync; an expiry at once;
- the database takes one statement per process per sync, whatever the request rate, and
  none from a process whose keys have all been idle for `IDLE_S`.

Keys a worker does not know yet (new to it, or not in the database at all) are looked up
before their request goes on, all of those waiting in one statement, at most one such
statement every `LOOKUP_GAP_S`: a flood of made-up keys costs the database a bounded
number of statements a second, whatever its rate, and a real key made a moment ago is
found by the next one. A key found unknown, revoked or expired is remembered as such for
`UNKNOWN_TTL_S` and answered 401 here, as the routes would: unknown keys are never
counted, and revoked or expired ones, once known so, are answered exactly like them.

The same sync records `api_keys.last_used_at`, written at most once a minute per key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BOOLEAN, BYTEA, INTEGER
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_api import errors
from usage_api.auth import hash_key, invalid_key
from usage_api.db import PrimaryEngine, run_autocommit, transact
from usage_api.errors import ApiError, ServiceUnavailable

log = logging.getLogger(__name__)

POLICY = "per-key"

# Keys new to this process: one lookup statement at most this often, for at most
# `LOOKUP_BATCH` keys; past `MAX_WAITING` keys waiting, a new one is answered 503.
LOOKUP_GAP_S = 0.02
LOOKUP_BATCH = 1000
MAX_WAITING = 10_000
# Keys found not to be live: remembered this long, at most this many (oldest go first).
UNKNOWN_TTL_S = 600.0
MAX_UNKNOWN = 10_000
# A live key unused this long is forgotten (looked up afresh when it comes back): every
# sync carries only the keys in use lately, and an idle process syncs nothing.
IDLE_S = 60.0

# For each presented live key: its limit, expiry and current window's total, after
# adding the new requests. A row of an older window starts over; a worker still
# counting in an older window than the row's (a clock behind by a moment) adds nothing.
# Rows go in key order: concurrent syncs of several workers never deadlock.
# `last_used_at` is written for keys used since the last sync, only when a minute old.
_SYNC = text("""
WITH presented AS (
    SELECT k.id, k.key_hash, k.rate_limit, k.expires_at, p.requests, p.used
    FROM unnest(:key_hashes, :requests, :used) AS p(key_hash, requests, used)
    JOIN api_keys AS k ON k.key_hash = p.key_hash
    WHERE k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > now())
),
touched AS (
    UPDATE api_keys SET last_used_at = now()
    WHERE id IN (SELECT id FROM presented WHERE used)
      AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')
),
counted AS (
    INSERT INTO api_key_windows AS w (key_id, window_start, requests)
    SELECT id, :window_start, requests FROM presented WHERE requests > 0 ORDER BY id
    ON CONFLICT (key_id) DO UPDATE SET
        requests = CASE
            WHEN w.window_start = excluded.window_start THEN w.requests + excluded.requests
            WHEN w.window_start < excluded.window_start THEN excluded.requests
            ELSE w.requests
        END,
        window_start = greatest(w.window_start, excluded.window_start)
    RETURNING key_id, requests
)
SELECT p.key_hash, p.rate_limit, p.expires_at,
       coalesce(c.requests, CASE WHEN w.window_start >= :window_start THEN w.requests END, 0)
           AS requests
FROM presented AS p
LEFT JOIN counted AS c ON c.key_id = p.id
LEFT JOIN api_key_windows AS w ON w.key_id = p.id
""").bindparams(
    bindparam("key_hashes", type_=ARRAY(BYTEA)),
    bindparam("requests", type_=ARRAY(INTEGER)),
    bindparam("used", type_=ARRAY(BOOLEAN)),
)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int

    def headers(self, window_s: int) -> list[tuple[bytes, bytes]]:
        """The `RateLimit-Policy` and `RateLimit` fields (IETF httpapi draft)."""
        return [
            (b"ratelimit-policy", f'"{POLICY}";q={self.limit};w={window_s}'.encode()),
            (b"ratelimit", f'"{POLICY}";r={self.remaining};t={self.reset_s}'.encode()),
        ]


@dataclass
class _Key:
    """A live key as this process knows it."""

    limit: int
    expires_at: float | None  # epoch seconds
    taken_at: float  # monotonic: its last request here


@dataclass(frozen=True)
class _Found:
    limit: int | None
    expires_at: datetime | None
    requests: int


class RateLimiter:
    """One process's view of every key it has met: live keys with their limits and
    window totals, and keys found not to be live."""

    def __init__(
        self,
        default_limit: int,
        window_s: int,
        sync_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.default_limit = default_limit
        self.window_s = window_s
        self.sync_s = sync_s
        self.clock = clock
        self._window = self._current_window()
        self._keys: dict[bytes, _Key] = {}
        # Not live, by hash, with when that was found (monotonic).
        self._unknown: dict[bytes, float] = {}
        # Of the current window, by key hash: totals across all processes as of the last
        # sync; this process's requests in the sync now in flight; and those since.
        self._synced: dict[bytes, int] = {}
        self._in_flight: dict[bytes, int] = {}
        self._pending: dict[bytes, int] = {}
        # Keys used since the last sync (for `last_used_at`), whatever the window.
        self._used: set[bytes] = set()
        self._sync_lock = asyncio.Lock()
        # Keys new to this process waiting for a lookup, each with its waiters' future.
        self._waiting: dict[bytes, asyncio.Future[bool]] = {}
        self._wanted = asyncio.Event()

    def _current_window(self) -> int:
        return int(self.clock() // self.window_s)

    def _roll(self) -> None:
        window = self._current_window()
        if window != self._window:
            self._window = window
            self._synced, self._in_flight, self._pending = {}, {}, {}

    async def admit(self, key_hash: bytes) -> Decision | None:
        """Count one request of a key; None when no limit applies to it. Raises the 401
        of an unknown key (revoked and expired ones included), or a 503 when the key
        cannot be looked up."""
        if key_hash not in self._keys:
            await self._look_up(key_hash)
        return self.admit_known(key_hash)

    def knows(self, key_hash: bytes) -> bool:
        """Whether the key is live as far as this process knows: `admit_known` decides."""
        return key_hash in self._keys

    def admit_known(self, key_hash: bytes) -> Decision | None:
        """`admit` of a key this process `knows`, at once (no coroutine for the hot path)."""
        key = self._keys[key_hash]
        if key.expires_at is not None and key.expires_at <= time.time():
            self._forget(key_hash)
            raise invalid_key()
        return self._take(key_hash, key)

    def _take(self, key_hash: bytes, key: _Key) -> Decision | None:
        self._roll()
        key.taken_at = time.monotonic()
        self._used.add(key_hash)
        pending = self._pending.get(key_hash, 0)
        if key.limit <= 0:
            self._pending[key_hash] = pending + 1
            return None
        used = self._synced.get(key_hash, 0) + self._in_flight.get(key_hash, 0) + pending
        reset_s = max(1, math.ceil((self._window + 1) * self.window_s - self.clock()))
        if used >= key.limit:
            return Decision(False, key.limit, 0, reset_s)
        self._pending[key_hash] = pending + 1
        return Decision(True, key.limit, key.limit - used - 1, reset_s)

    async def _look_up(self, key_hash: bytes) -> None:
        found_at = self._unknown.get(key_hash)
        if found_at is not None:
            if time.monotonic() - found_at < UNKNOWN_TTL_S:
                raise invalid_key()
            del self._unknown[key_hash]
        waiting = self._waiting.get(key_hash)
        if waiting is None:
            if len(self._waiting) >= MAX_WAITING:
                raise ServiceUnavailable()
            waiting = asyncio.get_running_loop().create_future()
            # Its waiters may all be gone (cancelled requests) when it fails.
            waiting.add_done_callback(_retrieve)
            self._waiting[key_hash] = waiting
            self._wanted.set()
        # Shielded: one request cancelled must not cancel the others' lookup.
        if not await asyncio.shield(waiting):
            raise invalid_key()
        if key_hash not in self._keys:  # found, and revoked by a sync since: as unknown
            raise invalid_key()

    def _know(self, key_hash: bytes, found: _Found, now: float) -> None:
        limit = self.default_limit if found.limit is None else found.limit
        expires_at = found.expires_at.timestamp() if found.expires_at is not None else None
        key = self._keys.get(key_hash)
        if key is None:
            self._keys[key_hash] = _Key(limit, expires_at, now)
        else:
            key.limit, key.expires_at = limit, expires_at

    def _forget(self, key_hash: bytes) -> None:
        """The key is not live (any more): from now on it is an unknown key."""
        self._keys.pop(key_hash, None)
        for counts in (self._synced, self._in_flight, self._pending):
            counts.pop(key_hash, None)
        self._used.discard(key_hash)
        self._unknown.pop(key_hash, None)
        self._unknown[key_hash] = time.monotonic()
        while len(self._unknown) > MAX_UNKNOWN:
            del self._unknown[next(iter(self._unknown))]

    async def look_up(self, engine: PrimaryEngine) -> None:
        """Find out about the keys waiting (up to `LOOKUP_BATCH`), in one statement that
        counts nothing, and let their requests go on."""
        batch = dict(itertools.islice(self._waiting.items(), LOOKUP_BATCH))
        if not batch:
            return
        self._roll()
        window = self._window
        try:
            # Nothing is written: no transaction needed around the one statement.
            found = await run_autocommit(
                engine,
                _sync,
                window * self.window_s,
                list(batch),
                [0] * len(batch),
                [False] * len(batch),
            )
        except BaseException as exc:
            for key_hash, waiting in batch.items():
                del self._waiting[key_hash]
                if not waiting.done():
                    waiting.set_exception(
                        exc if isinstance(exc, Exception) else ServiceUnavailable()
                    )
            raise
        now = time.monotonic()
        for key_hash, waiting in batch.items():
            del self._waiting[key_hash]
            live = found.get(key_hash)
            if live is None:
                self._forget(key_hash)
            else:
                self._know(key_hash, live, now)
                if window == self._window:
                    self._synced[key_hash] = live.requests
            if not waiting.done():
                waiting.set_result(live is not None)

    async def sync(self, engine: PrimaryEngine) -> None:
        """Add this process's new requests to the shared totals, and read back the
        totals, limits and expiry of every key it knows."""
        async with self._sync_lock:
            self._roll()
            now = time.monotonic()
            for key_hash, key in list(self._keys.items()):
                if now - key.taken_at > IDLE_S and key_hash not in self._used:
                    del self._keys[key_hash]
                    self._synced.pop(key_hash, None)
            key_hashes = list(self._keys)
            if not key_hashes:
                return
            window, sending, used = self._window, self._pending, self._used
            self._in_flight, self._pending, self._used = sending, {}, set()
            try:
                found = await transact(
                    engine,
                    _sync,
                    window * self.window_s,
                    key_hashes,
                    [sending.get(key_hash, 0) for key_hash in key_hashes],
                    [key_hash in used for key_hash in key_hashes],
                )
            except BaseException:
                # Not counted yet: keep them for the next sync.
                self._used |= used
                if window == self._window:
                    for key_hash, requests in sending.items():
                        self._pending[key_hash] = self._pending.get(key_hash, 0) + requests
                raise
            finally:
                self._in_flight = {}
            for key_hash in key_hashes:
                live = found.get(key_hash)
                if live is None:
                    self._forget(key_hash)
                elif key_hash in self._keys:
                    self._know(key_hash, live, now)
                    if window == self._window:
                        self._synced[key_hash] = live.requests

    async def run_lookups(self, engine: PrimaryEngine) -> None:
        """Look keys up as they arrive, one statement at most every `LOOKUP_GAP_S`."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self.look_up(engine)
            except ServiceUnavailable:
                pass  # Its waiters got the 503, and it is logged.
            except Exception:
                log.warning("looking keys up failed", exc_info=True)
            if self._waiting:
                self._wanted.set()
            await asyncio.sleep(LOOKUP_GAP_S)

    async def run(self, engine: PrimaryEngine) -> None:
        """Look keys up, and sync every `sync_s` seconds, until cancelled; then sync once
        more."""
        lookups = asyncio.create_task(self.run_lookups(engine))
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
            lookups.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lookups
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(ServiceUnavailable())
            self._waiting.clear()
            # The last requests' last use; a few seconds at most, then give up.
            try:
                await asyncio.wait_for(self.sync(engine), timeout=5)
            except Exception:
                log.warning("could not record the last key use at shutdown", exc_info=True)


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()


async def _sync(
    conn: AsyncConnection,
    window_start: int,
    key_hashes: list[bytes],
    requests: list[int],
    used: list[bool],
) -> dict[bytes, _Found]:
    rows = await conn.execute(
        _SYNC,
        {
            "key_hashes": key_hashes,
            "requests": requests,
            "used": used,
            "window_start": datetime.fromtimestamp(window_start, UTC),
        },
    )
    return {
        bytes(row.key_hash): _Found(row.rate_limit, row.expires_at, row.requests) for row in rows
    }


class RateLimitMiddleware:
    """ASGI middleware: for each `/v1` request that presents a key, answers 401 for a key
    known not to be live, 429 past the key's limit, and tells the caller where its key
    stands in `RateLimit` headers (never on a 401: a key revoked since the last sync
    must answer exactly like an unknown one)."""

    def __init__(self, app: ASGIApp, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = None
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            key = _presented_key(scope)
        if key is None:
            await self.app(scope, receive, send)
            return
        key_hash, limiter = hash_key(key), self.limiter
        try:
            if limiter.knows(key_hash):
                decision = limiter.admit_known(key_hash)
            else:
                decision = await limiter.admit(key_hash)
        except ApiError as exc:
            _name_route(scope)
            response = errors.error_response(exc.status, exc.message, headers=exc.headers)
            await response(scope, receive, send)
            return
        if decision is None:
            await self.app(scope, receive, send)
            return
        headers = decision.headers(self.limiter.window_s)
        if not decision.allowed:
            _name_route(scope)
            response = errors.error_response(
                429,
                "rate limit exceeded",
                headers={"Retry-After": str(decision.reset_s)},
            )
            response.raw_headers.extend(headers)
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] != 401:
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _presented_key(scope: Scope) -> str | None:
    keys = [value for name, value in scope["headers"] if name == b"x-api-key"]
    # With two keys neither is judged here: the route refuses the request (400).
    return keys[0].decode("latin-1") or None if len(keys) == 1 else None


def _name_route(scope: Scope) -> None:
    """Name the route a request answered here would have reached: the access log and the
    metrics count it under that route, like the routes' own answers."""
    route = _route_for(getattr(getattr(scope.get("app"), "router", None), "routes", ()), scope)
    if route is not None:
        scope["route"] = route


def _route_for(routes: Any, scope: Scope) -> Any:
    """The route that matches `scope` fully, else by path only."""
    partial = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial
