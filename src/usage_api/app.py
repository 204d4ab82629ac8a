"""The application: its services, its middleware and its routers, wired together."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI

from usage_api import errors
from usage_api.analytics import routes as analytics
from usage_api.analytics.rollup import run_folder
from usage_api.config import ConfigError, Settings, get_settings
from usage_api.dashboard.routes import router as dashboard
from usage_api.db import CONNECT_TIMEOUT_S, Databases
from usage_api.directory import router as directory
from usage_api.http import docs, health
from usage_api.http.deps import Services
from usage_api.http.middleware import BodySizeLimit, HeadAsGet, ObservedFastAPI
from usage_api.http.openapi import complete_openapi
from usage_api.http.telemetry import Telemetry
from usage_api.ingest import Writer
from usage_api.ingest import router as ingestion
from usage_api.ratelimit import RateLimiter, RateLimitMiddleware
from usage_api.replicas import instrument

_TAGS = [
    {"name": "analytics", "description": "Usage of partners, organizations and users."},
    {"name": "ingestion", "description": "Recording usage events (write keys)."},
    {"name": "directory", "description": "Partners, organizations and users."},
    {"name": "operations", "description": "Liveness and readiness, without a key."},
]


def create_app(settings: Settings | None = None, database_url: str | None = None) -> FastAPI:
    settings = settings or get_settings()
    url = database_url or settings.database_url
    if url is None:
        raise ConfigError("DATABASE_URL is not set")
    databases = Databases.create(settings, url)
    services = Services(
        settings=settings,
        databases=databases,
        limiter=RateLimiter(
            settings.rate_limit, settings.rate_limit_window_s, settings.rate_limit_sync_ms / 1000
        ),
        telemetry=Telemetry(settings.metrics_dir) if settings.metrics_enabled else None,
        writer=Writer(databases.primary, settings.write_statements),
    )

    app = ObservedFastAPI(
        telemetry=services.telemetry,
        title="Usage Analytics API",
        version="1.0.0",
        summary="SMS and MMS segments and voice seconds, per organization and user.",
        lifespan=_lifespan,
        # Served by http/docs.py from the process itself, not from a CDN.
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        openapi_tags=_TAGS,
    )
    app.state.services = services
    errors.install(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RateLimitMiddleware, limiter=services.limiter)
    app.add_middleware(HeadAsGet)

    # The busiest first: Starlette tries routes in order, each one before a request's own
    # a regular-expression match it pays for.
    routers = [ingestion, analytics.router, directory, health.router]
    if settings.docs_enabled:
        routers.append(docs.router)
    routers.append(dashboard)
    if services.telemetry is not None:
        routers.append(health.metrics_router)
    _add_routes(app, routers)
    if settings.docs_enabled:
        app.mount(docs.ASSETS, docs.assets())
    return app


def _add_routes(app: FastAPI, routers: list[APIRouter]) -> None:
    """Put the routers' routes on the app as they are, in order, ahead of FastAPI's own
    (`/openapi.json`, which a client fetches once).

    `include_router` adds an inclusion that FastAPI resolves on every request, matching the
    path twice: about a fifth of a counter read's Python calls. Our routers have no prefix
    or dependencies of their own, so the routes they made are complete already.
    """
    ours = []
    for router in routers:
        assert not router.prefix and not router.dependencies, "an inclusion would be needed"
        ours.extend(router.routes)
    app.router.routes[:0] = ours


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Background work while serving: the rate limit's sync, the fold, replica probes, the
    pool's gauges."""
    services: Services = app.state.services
    settings, databases, telemetry = services.settings, services.databases, services.telemetry
    reads = databases.read
    if telemetry is not None:
        telemetry.bind(databases.primary)
        if reads.replicas:
            instrument(reads, telemetry.registry)
    # Replicas serve from the first request on, unless one is slow to answer.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reads.probe_all(), CONNECT_TIMEOUT_S)
    tasks = [
        asyncio.create_task(services.limiter.run(databases.background)),
        asyncio.create_task(reads.watch()),
    ]
    if telemetry is not None:
        tasks.append(asyncio.create_task(telemetry.run()))
    if settings.rollup_interval_ms > 0:
        interval_s = settings.rollup_interval_ms / 1000
        tasks.append(asyncio.create_task(run_folder(databases.background, interval_s)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if telemetry is not None:
            telemetry.unbind()
        await databases.dispose()


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        app.openapi_schema = complete_openapi(FastAPI.openapi(app))
    return app.openapi_schema
