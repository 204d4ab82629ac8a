"""Fixtures of an app that fails on purpose, and of one whose database cannot be reached.

Loaded by tests/conftest.py as a plugin, so that every module gets the same ones.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.http.deps import CurrentKey

# Nothing listens on port 1: every connection attempt is refused at once.
UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/nope"
# What /v1/boom of `failing_app` raises: it must reach the server log, never a response.
SECRET_DETAIL = "secret detail: password=hunter2"


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    """A client of `app` in-process. The default transport raises what escapes the app, so
    a test fails unless every error became a response."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def failing_app(database_url: str, settings: Settings) -> AsyncIterator[FastAPI]:
    """The service with one more route, GET /v1/boom, that checks the key (so the access
    log names it) and then raises a RuntimeError."""
    app = create_app(settings, database_url)

    @app.get("/v1/boom")
    async def boom(principal: CurrentKey) -> None:
        raise RuntimeError(SECRET_DETAIL)

    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def failing_client(failing_app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(failing_app) as client:
        yield client


@pytest.fixture
async def unavailable_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service on a database that refuses every connection."""
    app = create_app(settings, UNREACHABLE_DATABASE)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        yield client
