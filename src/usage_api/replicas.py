"""Read replicas that never answer stale.

A read may go to a streaming replica only when the replica provably holds every
transaction that had committed on the primary when the read began. So each read:

1. takes a *fence*: the primary's WAL position, fetched after the read began (`Fence`:
   one `SELECT` on the primary, shared by every read of the process that is waiting for
   one; a fetch already in flight when a read began may predate commits the read must
   see, so that read waits for the next fetch);
2. on a connection to a healthy replica, checks that the replica has replayed up to the
   fence (`pg_last_wal_replay_lsn()`), *before* the read's own statement takes its
   snapshot: replay only moves forward, so the snapshot then holds everything up to the
   fence. A connection remembers the position it last saw replayed, and skips the check
   while the fence has not moved past it (a replay position is only ever compared on
   the connection that observed it: a restarted standby gets new connections). A
   replica just behind is given a few milliseconds (`USAGE_API_REPLICA_WAIT_MS`);
3. runs the read there; or, when no replica is healthy, the replica is behind the
   fence, or it fails, runs the read on the primary. That is a *fallback*: counted by
   its reason, never an error, never stale.

Each replica is probed in the background (state, replay position, lag): a replica that
is unreachable, paused, promoted or a copy of another cluster serves nothing until a
probe finds it well again, probes backing off while it stays down. Why this design and
what it costs is measured in docs/scaling.md.

The fence is the primary's flushed position, or its inserted position when it commits
asynchronously (`synchronous_commit = off`: a commit is acknowledged before it is
flushed, so the flushed position can be behind it; the session's setting is the
server's, as the service never changes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from usage_api.db import PrimaryEngine, ReadEngine, fetch_row, run_autocommit
from usage_api.errors import ApiError, is_unavailable

log = logging.getLogger("usage_api")

P = ParamSpec("P")
T = TypeVar("T")

State = Literal["starting", "up", "down", "paused", "not_standby", "other_cluster"]
FallbackReason = Literal["unavailable", "behind", "failed", "no_fence"]
FALLBACK_REASONS: tuple[FallbackReason, ...] = ("unavailable", "behind", "failed", "no_fence")

# Positions travel as byte offsets (int8): asyncpg has no codec for pg_lsn.
FENCE_SQL = (
    "SELECT (CASE WHEN current_setting('synchronous_commit') = 'off'"
    " THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END - '0/0')::int8"
)
_REPLAYED_SQL = "SELECT (pg_last_wal_replay_lsn() - '0/0')::int8"
_PROBE_SQL = """
SELECT pg_is_in_recovery() AS standby,
       (pg_last_wal_replay_lsn() - '0/0')::int8 AS replayed,
       CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() END AS pause,
       extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age_s,
       (SELECT system_identifier FROM pg_control_system()) AS system_id
"""
_SYSTEM_ID_SQL = "SELECT system_identifier FROM pg_control_system()"

# How long a read may wait for a replica to replay up to its fence before the primary
# answers instead (a replica is normally a millisecond or two behind a fresh commit).
WAIT_S = 0.01
_FIRST_WAIT_S = 0.001

# How often a healthy replica is probed, and how far probes of a down one back off.
CHECK_INTERVAL_S = 1.0
FIRST_RETRY_S = 0.25
MAX_BACKOFF_S = 10.0

# Where a connection keeps the replay position it last observed (SQLAlchemy clears a
# connection's `info` when it replaces the connection).
_REPLAYED_KEY = "usage_api.replayed"


async def _fetch(engine: AsyncEngine, statement: str, *, row: bool = False) -> Any:
    """One value (or row) of one statement, errors as the driver raised them: unlike
    `db.fetch_row` an unreachable server is not a 503 here, only a fact to act on."""
    pooled = await engine.raw_connection()
    driver: Any = pooled.driver_connection  # asyncpg's Connection
    try:
        value = await (driver.fetchrow(statement) if row else driver.fetchval(statement))
    except BaseException as exc:
        pooled.invalidate(exc if isinstance(exc, Exception) else None)
        raise
    pooled.close()
    return value


class Fence:
    """The primary's WAL position as of a moment after each caller began.

    At most one fetch is in flight; every caller that began before it started waits for
    the next one, and every caller that began after it started shares it.
    """

    def __init__(self, fetch: Callable[[], Awaitable[int]]) -> None:
        self._fetch = fetch
        self._task: asyncio.Future[int] | None = None
        self._started = 0  # fetches started so far; the one in flight is number `_started`
        self.fetches = 0

    async def position(self) -> int:
        began = self._started
        while True:
            task = self._task
            if task is None:
                self._started += 1
                self.fetches += 1
                task = self._task = asyncio.ensure_future(self._fetch())
                task.add_done_callback(self._done)
                # Shielded: a caller cancelled (its client went away) leaves it to the others.
                return await asyncio.shield(task)
            if self._started > began:
                return await asyncio.shield(task)
            # In flight since before this caller began: its answer may be too old.
            await asyncio.wait([task])

    def _done(self, task: asyncio.Future[int]) -> None:
        if self._task is task:
            self._task = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have gone


@dataclass
class Replica:
    """One `DATABASE_READ_URLS` entry and what the last probe found."""

    name: str
    engine: ReadEngine
    state: State = "starting"
    replayed: int | None = None
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    reads: int = 0
    checked_at: float | None = None
    # False once it failed to catch up within a read's wait: the next reads do not wait
    # for it (a replica far behind would cost each of them the whole wait) until one
    # finds it caught up.
    keeps_up: bool = True
    _retry_s: float = FIRST_RETRY_S
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def serving(self) -> bool:
        return self.state == "up"

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": self.lag_seconds,
            "reads": self.reads,
        }

    def failed(self, exc: BaseException) -> None:
        """A read found it unreachable: it serves nothing until a probe finds it back."""
        if self.state == "up":
            log.warning("read replica %s is down: %s", self.name, _first_line(exc))
        self.state = "down"
        self._wake.set()


def replica_name(url: str) -> str:
    """host:port/database, without the credentials, for logs, /readyz and /metrics."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 5432}{parts.path}"


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Reads:
    """Where reads run: a healthy, caught-up replica, else the primary.

    Without replicas every read runs on the primary with no fence and no extra cost.
    """

    def __init__(
        self,
        primary: PrimaryEngine,
        replicas: Sequence[Replica] = (),
        *,
        background: PrimaryEngine | None = None,
        fence_engine: PrimaryEngine | None = None,
        wait_s: float = WAIT_S,
        check_interval_s: float = CHECK_INTERVAL_S,
        max_backoff_s: float = MAX_BACKOFF_S,
    ) -> None:
        self.primary = primary
        self.replicas = list(replicas)
        # Probes use the background pool: they never wait behind requests for a connection.
        self._probe_primary = background or primary
        self._wait_s = wait_s
        self._check_interval_s = check_interval_s
        self._max_backoff_s = max_backoff_s
        # Fences are fetched one at a time, so one connection, held, serves them all: a
        # pool checkout per fence would cost the API as much CPU as the fetch itself.
        # Owned (and disposed) here when given.
        self._fence_engine = fence_engine
        self._fence_connection: Any = None
        self.fence = Fence(self._fetch_fence)
        self.fallbacks: dict[FallbackReason, int] = dict.fromkeys(FALLBACK_REASONS, 0)
        self._next = 0
        self._system_id: int | None = None
        # Metrics hooks (`instrument`).
        self.on_fallback: Callable[[FallbackReason], None] | None = None
        self.on_replica_read: Callable[[Replica], None] | None = None
        self.on_probe: Callable[[Replica], None] | None = None

    async def _fetch_fence(self) -> int:
        pooled = self._fence_connection
        if pooled is None or pooled.driver_connection.is_closed():
            if pooled is not None:
                pooled.invalidate()
            pooled = self._fence_connection = await (
                self._fence_engine or self.primary
            ).raw_connection()
        try:
            position: int = await pooled.driver_connection.fetchval(FENCE_SQL)
        except BaseException as exc:
            self._fence_connection = None
            pooled.invalidate(exc if isinstance(exc, Exception) else None)
            raise
        return position

    # The read path

    async def fetch_row(self, statement: str, *args: Any) -> Any:
        """`db.fetch_row` on a replica that has caught up, else on the primary."""
        if not self.replicas:  # the common case, without the routing's layers
            return await fetch_row(self.primary, statement, *args)

        async def on_replica(replica: Replica, fence: int, wait_s: float) -> Any:
            pooled = await replica.engine.raw_connection()
            driver: Any = pooled.driver_connection
            try:
                if not await _caught_up(pooled.info, driver, fence, wait_s):
                    pooled.close()
                    return _BEHIND
                row = await driver.fetchrow(statement, *args)
            except BaseException as exc:
                pooled.invalidate(exc if isinstance(exc, Exception) else None)
                raise
            pooled.close()
            return row

        async def on_primary() -> Any:
            return await fetch_row(self.primary, statement, *args)

        return await self._route(on_replica, on_primary)

    async def run(
        self,
        work: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """`db.run_autocommit` on a replica that has caught up, else on the primary."""
        if not self.replicas:
            return await run_autocommit(self.primary, work, *args, **kwargs)

        async def on_replica(replica: Replica, fence: int, wait_s: float) -> Any:
            async with replica.engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                pooled = await conn.get_raw_connection()
                if not await _caught_up(pooled.info, pooled.driver_connection, fence, wait_s):
                    return _BEHIND
                return await work(conn, *args, **kwargs)

        async def on_primary() -> T:
            return await run_autocommit(self.primary, work, *args, **kwargs)

        result: T = await self._route(on_replica, on_primary)
        return result

    async def _route(
        self,
        on_replica: Callable[[Replica, int, float], Awaitable[Any]],
        on_primary: Callable[[], Awaitable[Any]],
    ) -> Any:
        """With replicas: the read on one that has caught up, else on the primary."""
        replica = self._pick()
        if replica is None:
            return await self._fall_back("unavailable", on_primary)
        try:
            fence = await self.fence.position()
        except Exception:
            # The primary did not answer: no replica can prove it has caught up, and the
            # primary's own answer (a 503 if it is away) is the honest one.
            return await self._fall_back("no_fence", on_primary)
        try:
            result = await on_replica(replica, fence, self._wait_s if replica.keeps_up else 0.0)
        except ApiError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                replica.failed(exc)
            else:
                # E.g. a query cancelled by a conflict with recovery: the replica is well.
                log.info("read on replica %s failed, reading the primary: %s", replica.name, exc)
            return await self._fall_back("failed", on_primary)
        if result is _BEHIND:
            replica.keeps_up = False
            return await self._fall_back("behind", on_primary)
        replica.keeps_up = True
        replica.reads += 1
        if self.on_replica_read is not None:
            self.on_replica_read(replica)
        return result

    def _pick(self) -> Replica | None:
        """The next serving replica, round robin."""
        count = len(self.replicas)
        for offset in range(count):
            replica = self.replicas[(self._next + offset) % count]
            if replica.serving:
                self._next = (self._next + offset + 1) % count
                return replica
        return None

    async def _fall_back(self, reason: FallbackReason, on_primary: Callable[[], Awaitable[T]]) -> T:
        self.fallbacks[reason] += 1
        if self.on_fallback is not None:
            self.on_fallback(reason)
        return await on_primary()

    # Health

    async def watch(self) -> None:
        """Probe every replica until cancelled (the app's lifespan runs this)."""
        if self.replicas:
            await asyncio.gather(*(self._watch(replica) for replica in self.replicas))

    async def probe_all(self) -> None:
        """One probe of every replica (at start-up, so that they serve from the first read)."""
        await asyncio.gather(*(self.probe(replica) for replica in self.replicas))

    async def _watch(self, replica: Replica) -> None:
        while True:
            await self.probe(replica)
            delay = self._check_interval_s if replica.serving else replica._retry_s
            if not replica.serving:
                replica._retry_s = min(replica._retry_s * 2, self._max_backoff_s)
            replica._wake.clear()
            with contextlib.suppress(TimeoutError):
                # A read that finds it down wakes the probe (which then backs off).
                await asyncio.wait_for(replica._wake.wait(), delay)

    async def probe(self, replica: Replica) -> None:
        before = replica.state
        replica.checked_at = time.monotonic()
        try:
            status = await _fetch(replica.engine, _PROBE_SQL, row=True)
        except Exception as exc:
            replica.state = "down"
            replica.lag_bytes = replica.lag_seconds = None
            if self.on_probe is not None:
                self.on_probe(replica)
            if before != "down":
                log.warning("read replica %s is down: %s", replica.name, _first_line(exc))
            return
        primary_at: int | None = None
        # The primary being away says nothing about the replica (and no read can use it
        # meanwhile: there is no fence); its lag is then unknown.
        with contextlib.suppress(Exception):
            if self._system_id is None:
                self._system_id = await _fetch(self._probe_primary, _SYSTEM_ID_SQL)
            primary_at = await _fetch(self._probe_primary, FENCE_SQL)
        replica.replayed = status["replayed"]
        if self._system_id is None:
            replica.state = "starting"  # not yet compared with the primary
        elif status["system_id"] != self._system_id:
            replica.state = "other_cluster"  # not a copy of DATABASE_URL at all
        elif not status["standby"] or replica.replayed is None:
            replica.state = "not_standby"  # e.g. promoted: it has writes of its own
        elif status["pause"] != "not paused":
            replica.state = "paused"
        else:
            replica.state = "up"
            replica._retry_s = FIRST_RETRY_S
        if replica.replayed is None or primary_at is None:
            replica.lag_bytes = replica.lag_seconds = None
        else:
            replica.lag_bytes = max(primary_at - replica.replayed, 0)
            # The age of the last replayed commit is its lag only while there is WAL to
            # replay: on a quiet primary it just grows.
            replica.lag_seconds = (
                max(status["replay_age_s"] or 0.0, 0.0) if replica.lag_bytes > 0 else 0.0
            )
        if self.on_probe is not None:
            self.on_probe(replica)
        if replica.state != before:
            level = logging.INFO if replica.state == "up" else logging.WARNING
            log.log(level, "read replica %s is %s", replica.name, replica.state)

    def describe(self) -> list[dict[str, Any]]:
        return [replica.describe() for replica in self.replicas]

    async def dispose(self) -> None:
        if self._fence_connection is not None:
            self._fence_connection.close()
            self._fence_connection = None
        if self._fence_engine is not None:
            await self._fence_engine.dispose()
        for replica in self.replicas:
            await replica.engine.dispose()


class _Behind:
    """The replica had not replayed up to the fence: nothing was read there."""


_BEHIND: Any = _Behind()


async def _caught_up(info: dict[Any, Any], driver: Any, fence: int, wait_s: float) -> bool:
    """Whether this replica connection's server has replayed up to `fence`, waiting up
    to `wait_s` for it (checking again after 1, 2, 4... ms)."""
    seen: int | None = info.get(_REPLAYED_KEY)
    if seen is not None and seen >= fence:
        return True
    deadline = time.monotonic() + wait_s
    pause = _FIRST_WAIT_S
    while True:
        replayed: int | None = await driver.fetchval(_REPLAYED_SQL)
        if replayed is None:
            return False  # not a standby (any more)
        info[_REPLAYED_KEY] = replayed
        if replayed >= fence:
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(pause, left))
        pause *= 2


def instrument(reads: Reads, registry: CollectorRegistry) -> None:
    """Count reads and fallbacks, and publish each replica's state and lag, in `registry`.

    With several worker processes each one publishes what its own probes see; the scrape
    keeps the worst: a replica counts as up only if every live worker finds it up.
    """
    fallbacks = Counter(
        "usage_api_read_fallbacks",
        "Reads answered by the primary although replicas are configured, by reason:"
        " unavailable (no replica serving), behind (not replayed up to the read's fence),"
        " failed (the replica failed the read), no_fence (the primary gave no position).",
        ("reason",),
        registry=registry,
    )
    replica_reads = Counter(
        "usage_api_replica_reads",
        "Reads answered by a replica.",
        ("replica",),
        registry=registry,
    )
    up = Gauge(
        "usage_api_replica_up",
        "1 if the replica serves reads (reachable, a standby of the primary, replaying).",
        ("replica",),
        multiprocess_mode="livemin",
        registry=registry,
    )
    lag_bytes = Gauge(
        "usage_api_replica_lag_bytes",
        "WAL the replica had not replayed at the last probe (-1: unknown).",
        ("replica",),
        multiprocess_mode="livemax",
        registry=registry,
    )
    lag_seconds = Gauge(
        "usage_api_replica_lag_seconds",
        "Age of the last replayed commit while WAL is left to replay, else 0 (-1: unknown).",
        ("replica",),
        multiprocess_mode="livemax",
        registry=registry,
    )
    for reason in FALLBACK_REASONS:
        fallbacks.labels(reason)
    for replica in reads.replicas:
        replica_reads.labels(replica.name)

    def probed(replica: Replica) -> None:
        up.labels(replica.name).set(1 if replica.serving else 0)
        unknown = replica.lag_bytes is None or replica.lag_seconds is None
        lag_bytes.labels(replica.name).set(-1 if unknown else replica.lag_bytes or 0)
        lag_seconds.labels(replica.name).set(-1 if unknown else replica.lag_seconds or 0)

    for replica in reads.replicas:
        probed(replica)
    reads.on_probe = probed
    reads.on_fallback = lambda reason: fallbacks.labels(reason).inc()
    reads.on_replica_read = lambda replica: replica_reads.labels(replica.name).inc()
