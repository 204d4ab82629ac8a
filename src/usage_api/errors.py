"""Errors, and how every one of them reaches a client.

    ApiError                 a domain error: status, message, optional details and headers
      ServiceUnavailable     503 with Retry-After (database down, statement timeout)

A client that goes away before its request body is complete (starlette's ClientDisconnect)
is counted and logged as 499, without a traceback: nobody is left to answer. Everything
else that escapes a route is a 500 `internal error`, logged with its traceback and never
shown to the client. `install` registers the handlers that render all of them,
and Starlette's own 404/405/validation errors, as `{"success": false, "error": ...}`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

log = logging.getLogger("usage_api")

RETRY_AFTER_SECONDS = 2
# nginx's status for a request its client abandoned: never sent, only counted and logged.
CLIENT_CLOSED_REQUEST = 499
# Where the HTTP server (`usage_api.http.server`) leaves the status it answered itself for
# a request the app was still reading (a body too slow: 408), to be counted under it.
ANSWERED_STATUS = "usage_api.answered_status"


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details
        self.headers = headers


class ServiceUnavailable(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503,
            "service temporarily unavailable",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


def bad_request(message: str, details: list[dict[str, Any]] | None = None) -> ApiError:
    return ApiError(400, message, details=details)


def not_found(kind: str) -> ApiError:
    return ApiError(404, f"{kind} not found")


# SQLSTATE classes that mean "the database is not there right now", not "this request is
# wrong": connection exceptions (08), operator intervention (57: shutting down, starting
# up, a statement cancelled by statement_timeout) and insufficient resources (53: too many
# connections, disk full).
_UNAVAILABLE_SQLSTATE_PREFIXES = ("08", "57", "53")


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the database is unreachable, restarting or too slow.

    Looks at `exc` and what it wraps: SQLAlchemy's `orig` (the driver's error, which
    carries the SQLSTATE) and explicit causes (`raise ... from`), whether asyncpg's
    errors arrive wrapped by SQLAlchemy (as they do once connected) or bare.
    """
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        # OSError: refused, reset, unreachable; TimeoutError: connect or command timeout.
        if isinstance(error, PoolTimeoutError | OSError | TimeoutError):
            return True
        sqlstate = getattr(error, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATE_PREFIXES):
            return True
        # asyncpg's InterfaceError is mostly misuse, but "connection is closed" and
        # "the underlying connection is closed" say the server went away.
        if isinstance(error, asyncpg.InterfaceError) and "connection is closed" in str(error):
            return True
        # A server going down sends its idle connections an error before closing them; in
        # between, asyncpg refuses to start a statement on one (no connection is ever
        # shared here, so that is the only way to meet this). Nothing was sent.
        if isinstance(error, asyncpg.InternalClientError):
            return True
        error = error.orig if isinstance(error, DBAPIError) else error.__cause__
    return False


def error_response(
    status: int,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"success": False, "error": message}
    if details is not None:
        body["details"] = details
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, details=exc.details, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    messages = {404: "not found", 405: "method not allowed"}
    message = messages.get(
        exc.status_code, "bad request" if exc.status_code < 500 else "internal error"
    )
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette names the methods of the first route of the path only; a path with a
        # GET and a PUT route allows both.
        headers = {**(headers or {}), "Allow": ", ".join(_allowed(request))}
    return error_response(exc.status_code, message, headers=headers)


def _allowed(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": ""})
        if match == Match.PARTIAL and isinstance(route, Route) and route.methods:
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")  # answered as GET on every GET route (http.middleware.HeadAsGet)
    return sorted(methods)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    return error_response(400, "invalid request")


async def _client_disconnected(request: Request, exc: Exception) -> JSONResponse:
    status = request.scope.get("state", {}).get(ANSWERED_STATUS, CLIENT_CLOSED_REQUEST)
    if status == CLIENT_CLOSED_REQUEST:
        log.info(
            "client disconnected before its request was read: %s %s",
            request.method,
            request.url.path,
        )
    return error_response(status, "client closed request")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_unavailable(exc):
        log.warning("database unavailable: %s %s: %r", request.method, request.url.path, exc)
        unavailable = ServiceUnavailable()
        return error_response(unavailable.status, unavailable.message, headers=unavailable.headers)
    log.exception("unhandled error: %s %s", request.method, request.url.path)
    return error_response(500, "internal error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected)
