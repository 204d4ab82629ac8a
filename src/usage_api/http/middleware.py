"""The ASGI middleware every request passes: request ids, security headers, the access log
line and request metrics (`Observer`), HEAD answered like GET, and the body-size limit.

`Observer` is placed outside everything else, Starlette's ServerErrorMiddleware included
(see `ObservedFastAPI`), so that a 500 is logged, counted and headed like any other
response. Which security headers a response gets is one table, `HEADER_POLICIES`, by path.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_api import errors
from usage_api.http.telemetry import UNMATCHED_ROUTE, Telemetry
from usage_api.logs import request_id_var

access_log = logging.getLogger("usage_api.access")

Headers = list[tuple[bytes, bytes]]

_COMMON: Headers = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_NOTHING_LOADS = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")

# Swagger UI's page starts it with an inline script and styles itself inline.
_DOCS_LOAD_FROM_HERE = (
    b"content-security-policy",
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline';"
    b" img-src 'self' data:; frame-ancestors 'none'",
)

# The security headers of a response by the prefix of its path, first match wins. API
# answers are data that nothing may render or cache; /docs loads from this origin only.
HEADER_POLICIES: list[tuple[str, Headers]] = [
    ("/v1/", [*_COMMON, _NOTHING_LOADS, (b"cache-control", b"no-store")]),
    # The dashboard loads its own stylesheet, script and icon, and nothing else. Its
    # Referrer-Policy is `same-origin`: with `no-referrer` a browser sends `Origin: null` on
    # the dashboard's own form posts, which the sign-in could not tell from a cross-site one.
    (
        "/dashboard",
        [
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
            (b"x-frame-options", b"DENY"),
            (
                b"content-security-policy",
                b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
            ),
        ],
    ),
    ("/docs", [*_COMMON, _DOCS_LOAD_FROM_HERE]),
    ("", [*_COMMON, _NOTHING_LOADS]),
]


def security_headers(path: str) -> Headers:
    return next(headers for prefix, headers in HEADER_POLICIES if path.startswith(prefix))


_VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}").fullmatch


class Observer:
    """Request id, security headers, the access log line and request metrics."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry | None) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        request_id = _request_id(scope["headers"])
        token = request_id_var.set(request_id)
        # Created here so that every copy of the scope below shares it: the key's id is
        # left in it for the access line.
        state = scope.setdefault("state", {})
        headers = [*security_headers(scope["path"]), (b"x-request-id", request_id.encode())]
        status = 500  # what a server answers when the app sends nothing
        started = False

        async def send_headed(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        try:
            await self.app(scope, receive, send_headed)
        except Exception:
            # ServerErrorMiddleware re-raises after sending the 500 "for the server to
            # log"; the error handler has logged it with its traceback already.
            if not started:
                raise
        finally:
            seconds = time.perf_counter() - started_at
            route = getattr(scope.get("route"), "path_format", None)
            if self.telemetry is not None:
                self.telemetry.observe(scope["method"], route, status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                _log_access(scope, route, status, seconds, state.get("key_id"), request_id)
            request_id_var.reset(token)


def _log_access(
    scope: Scope,
    route: str | None,
    status: int,
    seconds: float,
    key_id: str | None,
    request_id: str,
) -> None:
    client = scope.get("client")
    # What `access_log.info` does, less finding its caller's file and line in the stack
    # (the JSON lines show neither): made and handled directly.
    record = access_log.makeRecord(
        access_log.name,
        logging.INFO,
        __file__,
        0,
        "%s %s %d",
        (scope["method"], route or UNMATCHED_ROUTE, status),
        None,
        extra={
            "method": scope["method"],
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "key_id": key_id,
            "request_id": request_id,
            "client_ip": client[0] if client else None,
        },
    )
    access_log.handle(record)


def _request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` when it is 1-128 visible ASCII characters, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            if _VALID_REQUEST_ID(value):
                return value.decode("ascii")
            break
    # 128 random bits (a uuid4 has 122) at a quarter of what uuid4() costs.
    return os.urandom(16).hex()


class HeadAsGet:
    """HEAD is answered as GET would be, without the body, on every GET route (RFC 9110):
    routes and their documentation declare GET only (a 405's `Allow` adds HEAD to GET, in
    `errors`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine of its own: any other request is the next app's call as it is.
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return self.app(scope, receive, send)
        return self._head(scope, receive, send)

    async def _head(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, send_without_body)
        finally:
            # The route the GET reached names the HEAD in the access line and the metrics.
            if "route" in as_get:
                scope["route"] = as_get["route"]


_FRAMED_BY_HEADERS = ("1.0", "1.1")


class BodySizeLimit:
    """Answer 413 as soon as a request body grows past `limit` bytes, before it is read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine of its own where there is nothing to count (as HeadAsGet).
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.limit:
                return self._reject(scope, receive, send)
            # The server reads exactly Content-Length bytes of body: nothing to count.
            return self.app(scope, receive, send)
        if b"transfer-encoding" not in headers and scope["http_version"] in _FRAMED_BY_HEADERS:
            # HTTP/1: without either header there is no body (RFC 9112 6.3).
            return self.app(scope, receive, send)
        return self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
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


class ObservedFastAPI(FastAPI):
    """FastAPI with `Observer` around its whole middleware stack."""

    def __init__(self, *, telemetry: Telemetry | None, **kwargs: Any) -> None:
        # FastAPI's own OpenTelemetry instruments are off: `Observer` logs and counts every
        # request, and checking on each request whether OpenTelemetry has been set up cost a
        # counter read 6 Python calls and 3 reads of os.environ.
        super().__init__(telemetry={"tracing": False, "metrics": False, "logs": False}, **kwargs)
        self.telemetry = telemetry

    def build_middleware_stack(self) -> ASGIApp:
        # Outside ServerErrorMiddleware, which FastAPI puts first: the 500s it renders
        # get a request id, security headers, a log line and a count like the rest.
        return Observer(super().build_middleware_stack(), self.telemetry)
