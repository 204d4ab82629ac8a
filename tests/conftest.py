"""Fixtures: a real, migrated PostgreSQL for the session and a clean slate for every test.

The database is `TEST_DATABASE_URL` when set (it is reset: every table is dropped and
migrated again), else an embedded server started for this run. The app runs in-process
behind httpx's ASGI transport, with its lifespan, and with the background fold off so
that each test decides when deltas are folded.

Markers (`--strict-markers`: a marker not registered here or in pyproject.toml is an error):
- `slow` (pyproject.toml): the test starts processes or servers, or runs long properties;
  `pytest -m "not slow"` runs the rest.
- `own_database` (registered below): the test brings a database of its own, so the clean
  slate of `clean_database` does not apply to it, and the session database is not even
  started for it.

Shared fixtures live in `tests.support.apps` and are loaded as a plugin here.
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
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.database import alembic_config
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.db import create_engine

pytest_plugins = ("tests.support.apps",)

TABLES = (
    "usage_events, usage_deltas, usage_counters, usage_hourly, usage_daily,"
    " organization_monthly, partner_hourly, partner_daily,"
    " dashboard_sessions, api_key_windows, api_keys, users, organizations, partners"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "own_database: the test uses a database of its own (no clean slate here)"
    )


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        command.downgrade(alembic_config(url), "base")
        command.upgrade(alembic_config(url), "head")
        yield url
        return
    from usage_api.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="usage-api-test-") as tmp:
        # As root the server runs as another account, which must be able to enter it.
        os.chmod(tmp, 0o755)
        with EmbeddedPostgres(Path(tmp) / "pgdata", fast=True) as url:
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
def clean_database(request: pytest.FixtureRequest) -> None:
    """Every test starts from empty tables, except those marked `own_database`."""
    if request.node.get_closest_marker("own_database") is None:
        request.getfixturevalue("truncate_after")


@pytest.fixture
async def truncate_after(database_url: str, settings: Settings) -> AsyncIterator[None]:
    """Empties every table of the session database once the test is done."""
    yield
    engine = create_engine(settings, database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {TABLES}"))
    finally:
        await engine.dispose()
