"""The engine, and the one way requests and commands run a transaction."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Concatenate, ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from usage_api.config import Settings
from usage_api.errors import ApiError, ServiceUnavailable, is_unavailable

log = logging.getLogger("usage_api")

P = ParamSpec("P")
T = TypeVar("T")

# serialization_failure and deadlock_detected: the transaction did nothing, run it again.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
_MAX_ATTEMPTS = 5


def async_url(url: str) -> str:
    """`postgresql://...` as SQLAlchemy's asyncpg dialect wants it."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url.removeprefix(prefix)
    raise SystemExit("DATABASE_URL must be a postgresql:// URL")


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    return create_async_engine(
        async_url(url),
        pool_size=settings.pool_size,
        max_overflow=settings.pool_size,
        pool_timeout=5,
        # A connection that died with the server is noticed on use and replaced;
        # no ping round trip on every checkout.
        pool_recycle=3600,
        connect_args={
            "timeout": 5,
            "server_settings": {
                "application_name": "usage-api",
                "statement_timeout": str(settings.statement_timeout_ms),
                "idle_in_transaction_session_timeout": str(settings.statement_timeout_ms * 2),
            },
        },
    )


async def transact(
    engine: AsyncEngine,
    work: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run `work(conn, *args)` in one transaction, committed before this returns.

    Serialization failures and deadlocks are retried; an unreachable database becomes a 503.
    """
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            async with engine.begin() as conn:
                return await work(conn, *args, **kwargs)
        except ApiError:
            raise
        except DBAPIError as exc:
            sqlstate = getattr(exc.orig, "sqlstate", None)
            if sqlstate in _RETRYABLE_SQLSTATES and attempt < _MAX_ATTEMPTS:
                log.info("retrying transaction after %s (attempt %d)", sqlstate, attempt)
                await asyncio.sleep(0.005 * 2**attempt)
                continue
            if is_unavailable(exc):
                raise ServiceUnavailable() from exc
            raise
        except Exception as exc:
            if is_unavailable(exc):
                raise ServiceUnavailable() from exc
            raise
    raise AssertionError("unreachable")


async def run_autocommit(
    engine: AsyncEngine,
    work: Callable[Concatenate[AsyncConnection, P], Awaitable[T]],
    *args: P.args,
    **kwargs: P.kwargs,
) -> T:
    """Run `work(conn, ...)` outside a transaction: for a single read statement, which
    has its own snapshot anyway, this saves the BEGIN and COMMIT round trips."""
    try:
        async with engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            return await work(conn, *args, **kwargs)
    except ApiError:
        raise
    except Exception as exc:
        if is_unavailable(exc):
            raise ServiceUnavailable() from exc
        raise
