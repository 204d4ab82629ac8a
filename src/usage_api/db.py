"""The engines, and the ways requests and commands run SQL on them.

The types say which database a piece of code may touch: `transact` (every write) takes a
`PrimaryEngine` only, and reads take any engine, so a `ReadEngine`, which points at a
replica, cannot be written through. Requests' reads go through `Databases.read`
(`replicas.Reads`): a replica that has caught up, else the primary.

When the database goes away (a restart, a failover, a frozen host), no request waits
longer than a few seconds and none is answered 500: connecting gives up after
`CONNECT_TIMEOUT_S`, a statement after the server's `statement_timeout` or, if the
server does not answer at all, `statement_timeout` + `_CLIENT_GRACE_S` on our side, and
each of these becomes a 503 with Retry-After. Connections that died with the server are
dropped when they are next checked out, without a round trip, so the first requests
after a restart are served normally (see docs/reliability.md for the figures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Concatenate, NewType, ParamSpec, TypeVar

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from usage_api.config import ConfigError, Settings
from usage_api.errors import ApiError, ServiceUnavailable, is_unavailable

if TYPE_CHECKING:
    from usage_api.replicas import Reads

log = logging.getLogger("usage_api")

P = ParamSpec("P")
T = TypeVar("T")

# serialization_failure and deadlock_detected: the transaction did nothing, run it again.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
_MAX_ATTEMPTS = 5

# Longest wait for a new connection, and for a free one from a full pool.
CONNECT_TIMEOUT_S = 5
# How much longer than statement_timeout we wait for a server that does not answer at all
# (frozen, or cut off by the network): the server's own timeout normally fires first.
_CLIENT_GRACE_S = 1.0
# During an outage every request fails the same way: say so once a second, not each time.
_UNAVAILABLE_LOG_INTERVAL_S = 1.0
_unavailable_logged_at = -_UNAVAILABLE_LOG_INTERVAL_S
_unavailable_unlogged = 0


def async_url(url: str) -> str:
    """`postgresql://...` as SQLAlchemy's asyncpg dialect wants it."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    raise ConfigError("DATABASE_URL must be a postgresql:// URL")


# The primary, which takes writes; a database that serves reads only.
PrimaryEngine = NewType("PrimaryEngine", AsyncEngine)
ReadEngine = NewType("ReadEngine", AsyncEngine)


@dataclass(frozen=True)
class Databases:
    """A process's engines: requests' writes, requests' reads, and background work."""

    primary: PrimaryEngine
    # Requests' reads: the replicas of DATABASE_READ_URLS when caught up, else the primary.
    read: Reads
    # The rate limit's sync and the fold have two connections of their own: they never
    # take one a request is waiting for, even while the database hangs.
    background: PrimaryEngine

    @classmethod
    def create(cls, settings: Settings, url: str) -> Databases:
        """Engines for `url`; no connection is opened until one is used."""
        # Here, not at the top: replicas builds on this module's read helpers.
        from usage_api.replicas import Reads, Replica, replica_name

        primary = PrimaryEngine(create_engine(settings, url))
        background = PrimaryEngine(create_engine(replace(settings, pool_size=2), url))
        replicas = [
            Replica(replica_name(replica), ReadEngine(create_engine(settings, replica)))
            for replica in settings.database_read_urls
        ]
        read = Reads(
            primary,
            replicas,
            background=background,
            # One connection of its own, held while serving (only with replicas).
            fence_engine=(
                PrimaryEngine(create_engine(replace(settings, pool_size=1), url))
                if replicas
                else None
            ),
            wait_s=settings.replica_wait_ms / 1000,
        )
        return cls(primary=primary, read=read, background=background)

    async def dispose(self) -> None:
        await self.read.dispose()
        for engine in (self.primary, self.background):
            await engine.dispose()


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    engine = create_async_engine(
        async_url(url),
        pool_size=settings.pool_size,
        # No overflow: connections opened past the pool's size are closed on return, and
        # under load that churn (a new connection per request) costs more than waiting.
        max_overflow=0,
        pool_timeout=CONNECT_TIMEOUT_S,
        # No pool_pre_ping: `_drop_closed` finds the connections a restart killed without
        # a round trip; pre-ping would cost three (BEGIN, ping, ROLLBACK) per checkout.
        pool_recycle=3600,
        connect_args={
            "timeout": CONNECT_TIMEOUT_S,
            "command_timeout": settings.statement_timeout_ms / 1000 + _CLIENT_GRACE_S,
            "server_settings": {
                "application_name": "usage-api",
                "statement_timeout": str(settings.statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(settings.statement_timeout_ms * 2),
            },
        },
    )
    event.listen(engine.sync_engine, "checkout", _drop_closed)
    event.listen(engine.sync_engine, "handle_error", _abandon_unanswered)
    return engine


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection the server has closed (a restart, a terminated backend) is
    replaced before anyone uses it; asyncpg saw the close happen, so this costs nothing."""
    if dbapi_connection.driver_connection.is_closed():
        # The pool reconnects this slot and hands out the new connection.
        raise DisconnectionError("connection closed by the server")


def _abandon_unanswered(context: ExceptionContext) -> None:
    """A statement past command_timeout got no answer: close its connection at once.

    SQLAlchemy would first try a polite close, waiting up to two more seconds for a server
    that is not answering.
    """
    connection = context.connection
    if (
        isinstance(context.original_exception, TimeoutError)
        and connection is not None
        and not connection.invalidated
    ):
        driver = connection.connection.driver_connection
        if driver is not None:
            driver.terminate()


def _unavailable(exc: BaseException) -> ServiceUnavailable:
    """The 503 for `exc`, logged in one line (at most once a second: outages are loud)."""
    global _unavailable_logged_at, _unavailable_unlogged
    now = time.monotonic()
    if now - _unavailable_logged_at < _UNAVAILABLE_LOG_INTERVAL_S:
        _unavailable_unlogged += 1
    else:
        log.warning(
            "database unavailable, answering 503 (%d more since the last report): %s: %s",
            _unavailable_unlogged,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        _unavailable_logged_at, _unavailable_unlogged = now, 0
    return ServiceUnavailable()


@contextlib.contextmanager
def _unavailable_as_503() -> Iterator[None]:
    """Errors that mean the database is away become the 503; the rest pass unchanged."""
    try:
        yield
    except ApiError:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise _unavailable(exc) from exc
        raise


async def transact(
    engine: PrimaryEngine,
    work: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run `work(conn, *args)` in one transaction, committed before this returns.

    Serialization failures and deadlocks are retried; an unreachable database becomes a 503.
    """
    with _unavailable_as_503():
        for attempt in range(1, _MAX_ATTEMPTS + 1):
            try:
                async with engine.begin() as conn:
                    return await work(conn, *args, **kwargs)
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate not in _RETRYABLE_SQLSTATES or attempt == _MAX_ATTEMPTS:
                    raise
                log.info("retrying transaction after %s (attempt %d)", sqlstate, attempt)
                await asyncio.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")


async def run_autocommit(
    engine: AsyncEngine,
    work: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run `work(conn, ...)` outside a transaction: for a single read statement, which
    has its own snapshot anyway, this saves the BEGIN and COMMIT round trips."""
    with _unavailable_as_503():
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await work(conn, *args, **kwargs)


async def fetch_row(engine: AsyncEngine, statement: str, *args: Any) -> Any:
    """One read statement (`$n` placeholders) on asyncpg directly, outside a transaction
    like `run_autocommit`; its row or None.

    For the hottest reads: the connection comes from the engine's pool, with its checks,
    but the statement skips SQLAlchemy's execution (a greenlet switch, the cursor and
    result layers: about 0.3 ms a statement); asyncpg prepares it once per connection.
    """
    return await _on_driver(engine, "fetchrow", statement, args)


async def fetch_rows(engine: AsyncEngine, statement: str, *args: Any) -> list[Any]:
    """`fetch_row`, for every row of the statement's answer."""
    rows: list[Any] = await _on_driver(engine, "fetch", statement, args)
    return rows


async def _on_driver(engine: AsyncEngine, method: str, statement: str, args: Any) -> Any:
    """asyncpg's Connection.<method>(statement, *args) on a connection of the pool."""
    with _unavailable_as_503():
        pooled = await engine.raw_connection()
        driver: Any = pooled.driver_connection  # asyncpg's Connection
        try:
            result = await getattr(driver, method)(statement, *args)
        except BaseException as exc:
            # Whatever went wrong (a timeout, a cancelled request), the connection may
            # still be busy with the statement: close it rather than hand it to the next.
            pooled.invalidate(exc if isinstance(exc, Exception) else None)
            raise
        pooled.close()
        return result


async def write_rows(engine: PrimaryEngine, statement: str, *args: Any) -> list[Any]:
    """One writing statement (`$n` placeholders) on asyncpg directly, outside a transaction:
    PostgreSQL runs a single statement atomically, so it needs no BEGIN and COMMIT, and it
    is committed when this returns. Its rows.

    As `transact`, a serialization failure or deadlock (the statement did nothing) is
    retried and an unreachable database becomes a 503.
    """
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            return await fetch_rows(engine, statement, *args)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate not in _RETRYABLE_SQLSTATES or attempt == _MAX_ATTEMPTS:
                raise
            log.info("retrying statement after %s (attempt %d)", exc.sqlstate, attempt)
            await asyncio.sleep(0.005 * 2**attempt)
    raise AssertionError("unreachable")
