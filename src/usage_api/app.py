"""The application: routes, lifespan, and the body-size limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_api import errors
from usage_api.auth import CurrentKey, EngineDep, authenticate, presented_hash
from usage_api.config import Settings, get_settings
from usage_api.dates import make_range, parse_instant
from usage_api.db import CONNECT_TIMEOUT_S, create_engine, run_autocommit, transact
from usage_api.directory import put_organization, put_partner, put_user
from usage_api.errors import ApiError, bad_request, not_found
from usage_api.ids import is_valid_id
from usage_api.ingest import ingest, parse_events
from usage_api.observability import Metrics, ObservedFastAPI
from usage_api.ratelimit import RateLimit, RateLimiter
from usage_api.replicas import Reads, instrument, replicas_of
from usage_api.rollup import run_folder
from usage_api.schemas import (
    IngestResponse,
    OrganizationIdPath,
    OrganizationIn,
    OrganizationResponse,
    PartnerIdPath,
    PartnerIn,
    PartnerResponse,
    UsageEventsIn,
    UsageResponse,
    UserIdPath,
    UserIn,
    UserResponse,
    complete_openapi,
    error_message,
    error_responses,
    request_body,
    upsert_responses,
    usage_parameters,
)
from usage_api.usage import UsageQuery, read_usage


class BodySizeLimit:
    """Answer 413 as soon as a request body grows past `limit` bytes, before it is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._reject(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    @staticmethod
    async def _reject(scope: Scope, receive: Receive, send: Send) -> None:
        response = errors.error_response(413, "request body too large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class _IdConvertor(PathConvertor):
    """A caller's id in a path: anything, newlines included, for `_checked_id` to judge.
    With `path` (`.*`), Starlette's route pattern, which ends in `$`, would match
    `/v1/users/u1%0A` as user `u1`: `$` also matches before a trailing newline."""

    regex = "(?s:.*)"


register_url_convertor("id", _IdConvertor())


class _PlainRoute(Route):
    """A Starlette route that, like FastAPI's, names itself in the scope (for the access
    log and the metrics)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def _optional(value: str | None) -> str | None:
    """An empty query parameter (`?start_date=`) counts as absent, as forms send them."""
    return value if value else None


def _checked_id(value: str | None, name: str) -> str | None:
    if value is not None and not is_valid_id(value):
        raise bad_request(f"invalid {name}")
    return value


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body(), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        # RecursionError: nesting deep enough to exhaust the parser's stack is not a
        # document any client means to send.
        raise bad_request("request body must be valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _model(model: type[BaseModel], body: Any) -> Any:
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise bad_request(f"invalid {field}: {error_message(first)}") from None


def _upserted(kind: str, created: bool, entity: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"success": True, kind: entity}, status_code=201 if created else 200)


def _usage_query(
    organization_id: str | None,
    user_id: str | None,
    start_date: str | None,
    end_date: str | None,
) -> UsageQuery:
    """The query's parameters checked in the contract's order: ids, then dates."""
    organization_id = _checked_id(_optional(organization_id), "organization_id")
    user_id = _checked_id(_optional(user_id), "user_id")
    if organization_id is None and user_id is None:
        raise bad_request("organization_id or user_id is required")
    start_date, end_date = _optional(start_date), _optional(end_date)
    bounds = []
    for name, raw in (("start_date", start_date), ("end_date", end_date)):
        instant = parse_instant(raw) if raw is not None else None
        if raw is not None and instant is None:
            raise bad_request(
                f"{name} must be an ISO 8601 date or date-time, e.g. 2026-02-10T00:00:00Z"
            )
        bounds.append(instant)
    span = None
    if start_date is not None or end_date is not None:
        span = make_range(bounds[0], bounds[1])
        if span is None:
            raise bad_request("start_date must not be after end_date")
    return UsageQuery(organization_id, user_id, span)


def create_app(settings: Settings | None = None, database_url: str | None = None) -> FastAPI:
    settings = settings or get_settings()
    url = database_url or settings.database_url
    if url is None:
        raise SystemExit("DATABASE_URL is not set")
    metrics = Metrics() if settings.metrics_enabled else None
    limiter = RateLimiter(
        settings.rate_limit, settings.rate_limit_window_s, settings.rate_limit_sync_ms / 1000
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings, url)
        app.state.engine = engine
        # Background work (the rate limit's sync, the fold) has its own two connections:
        # it never takes one a request is waiting for, even while the database hangs.
        background = create_engine(replace(settings, pool_size=2), url)
        if metrics is not None:
            metrics.bind(engine)
        reads = Reads(
            engine,
            replicas_of(
                settings.database_read_urls, lambda replica: create_engine(settings, replica)
            ),
            background=background,
            wait_s=settings.replica_wait_ms / 1000,
        )
        app.state.reads = reads
        if metrics is not None and reads.replicas:
            instrument(reads, metrics.registry)
        # Replicas serve from the first request on, unless one is slow to answer.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reads.probe_all(), CONNECT_TIMEOUT_S)
        tasks = [asyncio.create_task(limiter.run(background)), asyncio.create_task(reads.watch())]
        if settings.rollup_interval_ms > 0:
            tasks.append(
                asyncio.create_task(run_folder(background, settings.rollup_interval_ms / 1000))
            )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if metrics is not None:
                metrics.unbind()
            await reads.dispose()
            await engine.dispose()
            await background.dispose()

    app = ObservedFastAPI(
        metrics=metrics,
        title="Usage Analytics API",
        version="1.0.0",
        summary="SMS and MMS segments and voice seconds, per organization and user.",
        lifespan=lifespan,
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    errors.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete_openapi(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.add_middleware(RateLimit, limiter=limiter)
    app.state.limiter = limiter
    powered_by = settings.powered_by

    @app.get(
        "/v1/analytics/usage",
        openapi_extra=usage_parameters(),
        responses={200: {"model": UsageResponse}, **error_responses(400, 401, 404, 429, 500, 503)},
    )
    async def get_usage(request: Request) -> JSONResponse:
        """Usage of an organization or a user: all time, or over a date range."""
        # The hottest route reads its parameters itself (`usage_parameters` documents them):
        # FastAPI's parameter machinery would be a tenth of its cost.
        params = request.query_params
        api_key = request.headers.get("x-api-key")
        engine: AsyncEngine = request.app.state.engine
        reads: Reads = request.app.state.reads
        key_hash = presented_hash(api_key)
        try:
            query = _usage_query(
                params.get("organization_id"),
                params.get("user_id"),
                params.get("start_date"),
                params.get("end_date"),
            )
        except ApiError:
            # A bad key outranks bad parameters.
            request.state.key_id = (await authenticate(engine, api_key)).key_id
            raise
        # The key is checked in the same statement as the read: one round trip.
        key_id, usage = await read_usage(reads, key_hash, query)
        request.state.key_id = key_id
        if usage is None:
            raise not_found("user" if query.user_id is not None else "organization")
        return JSONResponse({"success": True, "usage": usage, "powered_by": powered_by})

    # FastAPI's handling of a request (dependency solving, its exit stack) is about a
    # seventh of a counter read's CPU, and `get_usage` needs none of it: a plain Starlette
    # route in front serves it, and the route above only documents it.
    app.router.routes.insert(0, _PlainRoute("/v1/analytics/usage", get_usage, methods=["GET"]))

    @app.post(
        "/v1/usage/events",
        openapi_extra=request_body(UsageEventsIn),
        responses={
            200: {"model": IngestResponse},
            **error_responses(400, 401, 403, 413, 429, 500, 503),
        },
    )
    async def post_events(
        request: Request, engine: EngineDep, principal: CurrentKey
    ) -> JSONResponse:
        """Record a batch of 1 to 1000 usage events, exactly once each."""
        principal.require_write()
        body = await _json_body(request)
        if not isinstance(body, dict) or set(body) != {"events"}:
            raise bad_request("request body must be a JSON object with only an events list")
        events = parse_events(body["events"])
        result = await transact(engine, ingest, principal, events)
        if metrics is not None:
            metrics.count_events(result.accepted, result.duplicates, len(result.conflicts))
        return JSONResponse(
            {
                "success": True,
                "accepted": result.accepted,
                "duplicates": result.duplicates,
                "conflicts": result.conflicts,
            }
        )

    @app.put(
        "/v1/partners/{partner_id:id}",
        openapi_extra=request_body(PartnerIn),
        responses=upsert_responses(PartnerResponse, 400, 401, 403, 413, 429, 500, 503),
    )
    async def put_partner_route(
        request: Request,
        engine: EngineDep,
        principal: CurrentKey,
        partner_id: PartnerIdPath,
    ) -> JSONResponse:
        """Create or rename a partner (admin keys)."""
        principal.require_write()
        principal.require_admin()
        _checked_id(partner_id, "partner_id")
        body: PartnerIn = _model(PartnerIn, await _json_body(request))
        created, entity = await transact(engine, put_partner, principal, partner_id, body)
        return _upserted("partner", created, entity)

    @app.put(
        "/v1/organizations/{organization_id:id}",
        openapi_extra=request_body(OrganizationIn),
        responses=upsert_responses(OrganizationResponse, 400, 401, 403, 404, 413, 429, 500, 503),
    )
    async def put_organization_route(
        request: Request,
        engine: EngineDep,
        principal: CurrentKey,
        organization_id: OrganizationIdPath,
    ) -> JSONResponse:
        """Create or update an organization in the key's scope (no `partner_id`: keep it)."""
        principal.require_write()
        _checked_id(organization_id, "organization_id")
        body: OrganizationIn = _model(OrganizationIn, await _json_body(request))
        created, entity = await transact(engine, put_organization, principal, organization_id, body)
        return _upserted("organization", created, entity)

    @app.put(
        "/v1/users/{user_id:id}",
        openapi_extra=request_body(UserIn),
        responses=upsert_responses(UserResponse, 400, 401, 403, 404, 409, 413, 429, 500, 503),
    )
    async def put_user_route(
        request: Request,
        engine: EngineDep,
        principal: CurrentKey,
        user_id: UserIdPath,
    ) -> JSONResponse:
        """Create or update a user of an organization inside the key's scope."""
        principal.require_write()
        _checked_id(user_id, "user_id")
        body: UserIn = _model(UserIn, await _json_body(request))
        created, entity = await transact(engine, put_user, principal, user_id, body)
        return _upserted("user", created, entity)

    if metrics is not None:
        app.add_api_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is alive (no database check)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(500, 503))
    async def readyz(request: Request, engine: EngineDep) -> dict[str, Any]:
        """The database answers (and, with read replicas, how each one is doing)."""
        await run_autocommit(engine, _ping)
        reads: Reads = request.app.state.reads
        if not reads.replicas:
            return {"status": "ready"}
        # A replica that is down does not make the service unready: the primary serves.
        return {"status": "ready", "replicas": reads.describe(), "fallbacks": reads.fallbacks}

    return app


async def _ping(conn: Any) -> None:
    await conn.execute(text("SELECT 1"))
