"""Alembic environment: runs migrations on DATABASE_URL (or the URL the caller passes)."""

from __future__ import annotations

import asyncio

from alembic import context
from alembic.util import CommandError
from sqlalchemy import pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from usage_api.config import get_settings
from usage_api.db import async_url
from usage_api.models import Base

config = context.config
target_metadata = Base.metadata

# Several `usage-api serve` processes may start at once: the first to take this lock
# migrates, the others wait and then find nothing left to do.
_MIGRATION_LOCK = 0x6D69677261746521


def _url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url
    if not url:
        raise CommandError("DATABASE_URL is not set")
    return async_url(url)


def _run(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.begin() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
