"""Fixtures: a real, migrated PostgreSQL for the session and a clean slate for every test.

The database is `TEST_DATABASE_URL` when set (it is reset: every table is dropped and
migrated again), else an embedded server started for this run. The app runs in-process
behind httpx's ASGI transport, with its lifespan, and with the background fold off so
that each test decides when deltas are folded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from alembic import command
from alembic.config import Config
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.db import create_engine

ROOT = Path(__file__).resolve().parents[1]
TABLES = (
    "usage_events, usage_deltas, usage_counters, usage_hourly, usage_daily,"
    " api_key_windows, api_keys, users, organizations, partners"
)


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = url
    return config


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        command.downgrade(alembic_config(url), "base")
        command.upgrade(alembic_config(url), "head")
        yield url
        return
    from usage_api.embedded import EmbeddedPostgres

    with (
        tempfile.TemporaryDirectory(prefix="usage-api-test-") as tmp,
        EmbeddedPostgres(Path(tmp) / "pgdata", fast=True) as url,
    ):
        command.upgrade(alembic_config(url), "head")
        yield url


@pytest.fixture(scope="session")
def settings() -> Settings:
    return replace(Settings.from_env(), powered_by="Teli", rollup_interval_ms=0)


@pytest.fixture
async def app(database_url: str, settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings, database_url)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
def engine(app: FastAPI) -> AsyncEngine:
    engine: AsyncEngine = app.state.services.databases.primary
    return engine


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture(autouse=True)
async def clean_database(database_url: str, settings: Settings) -> AsyncIterator[None]:
    """Every test starts from empty tables."""
    yield
    engine = create_engine(settings, database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {TABLES}"))
    finally:
        await engine.dispose()
