"""What operators see of requests: one access line each, request ids, metrics, and the
security headers every response carries (the JSON log format itself is in `logs`).

`Observer` is a pure ASGI middleware placed outside everything else, Starlette's
ServerErrorMiddleware included (see `ObservedFastAPI`), so that a 500 is logged, counted
and headed like any other response. `Metrics` holds the Prometheus instruments of one
app; with several worker processes (`PROMETHEUS_MULTIPROC_DIR` set, as `usage-api serve
--workers N` does) they live in files that any worker's `/metrics` sums up.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from usage_api.logs import request_id_var

access_log = logging.getLogger("usage_api.access")


# Metrics


def multiprocess_dir() -> str | None:
    """The directory where worker processes share their metrics, when there are several."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# Our answers take a few milliseconds; Prometheus' default buckets start at 5 ms.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_POOL_GAUGES = {
    "usage_api_db_pool_size": "Connections the pool keeps open (USAGE_API_POOL_SIZE).",
    "usage_api_db_pool_checked_out": "Connections in use by a request or the folder.",
    "usage_api_db_pool_overflow": "Connections open beyond the pool size.",
}


def _pool_values(engine: AsyncEngine) -> tuple[float, float, float]:
    pool: Any = engine.pool
    # QueuePool.overflow() counts from -size up: negative while the pool is not full.
    return pool.size(), pool.checkedout(), max(pool.overflow(), 0)


class _PoolCollector:
    """The pool's state read at scrape time (one process)."""

    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None

    def collect(self) -> Iterable[Metric]:
        if self.engine is None:
            return
        for (name, documentation), value in zip(
            _POOL_GAUGES.items(), _pool_values(self.engine), strict=True
        ):
            yield GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    """The Prometheus instruments of one app, and their exposition."""

    def __init__(self) -> None:
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "usage_api_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "usage_api_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response.",
            ("method", "route", "status"),
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        events = Counter(
            "usage_api_events",
            "Ingested events: accepted, duplicate (already recorded) or conflicting.",
            ("outcome",),
            registry=self.registry,
        )
        self.accepted = events.labels("accepted")
        self.duplicate = events.labels("duplicate")
        self.conflicting = events.labels("conflicting")
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._engine: AsyncEngine | None = None
        self._pool_gauges: list[Gauge] = []
        if self.multiprocess_dir is None:
            self._pool = _PoolCollector()
            self.registry.register(self._pool)
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        else:
            # Another worker cannot read this one's pool at scrape time: each worker
            # publishes its own after every request, and the scrape sums the live ones.
            self._pool_gauges = [
                Gauge(name, doc, multiprocess_mode="livesum", registry=self.registry)
                for name, doc in _POOL_GAUGES.items()
            ]

    def bind(self, engine: AsyncEngine) -> None:
        """Report on `engine`'s pool (at start-up)."""
        if self.multiprocess_dir is None:
            self._pool.engine = engine
        else:
            self._engine = engine
            _forget_dead_workers(self.multiprocess_dir)
            self._publish_pool()

    def unbind(self) -> None:
        """Stop reporting (at shutdown): this worker's pool leaves the sums."""
        if self.multiprocess_dir is None:
            self._pool.engine = None
        else:
            self._engine = None
            mark_process_dead(os.getpid(), self.multiprocess_dir)  # type: ignore[no-untyped-call]

    def observe(self, method: str, route: str | None, status: int, seconds: float) -> None:
        key = (method, route or UNMATCHED_ROUTE, status)
        children = self._children.get(key)
        if children is None:
            # Anything a client may invent is folded into one label value.
            labels = (method if method in _METHODS else "other", key[1], str(status))
            children = self._children[key] = (
                self.requests.labels(*labels),
                self.latency.labels(*labels),
            )
        children[0].inc()
        children[1].observe(seconds)
        if self._engine is not None:
            self._publish_pool()

    def _publish_pool(self) -> None:
        assert self._engine is not None
        for gauge, value in zip(self._pool_gauges, _pool_values(self._engine), strict=True):
            gauge.set(value)

    def count_events(self, accepted: int, duplicates: int, conflicts: int) -> None:
        self.accepted.inc(accepted)
        self.duplicate.inc(duplicates)
        self.conflicting.inc(conflicts)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    async def endpoint(self, request: Request) -> Response:
        """Prometheus metrics (for scrapers; not to be exposed publicly)."""
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)


def _forget_dead_workers(path: str) -> None:
    """Drop the pool gauges of workers that died without saying so (a crash, a kill)."""
    for file in Path(path).glob("gauge_live*_*.db"):
        pid = int(file.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, another user's


# The middleware

_VALID_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}").fullmatch
_SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_NO_STORE = (b"cache-control", b"no-store")
# The dashboard's pages load their own stylesheet, script and icon, and nothing else.
_DASHBOARD_CSP = (
    b"content-security-policy",
    b"default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
)
# /docs loads Swagger UI's script and styles from a CDN: no CSP there.
_DOCS_HEADERS = _SECURITY_HEADERS
_API_HEADERS = [*_SECURITY_HEADERS, _CSP, _NO_STORE]
_OTHER_HEADERS = [*_SECURITY_HEADERS, _CSP]
# `same-origin`: with `no-referrer` a browser sends `Origin: null` on the dashboard's own
# form posts, and the sign-in could not tell them from a cross-site one.
_DASHBOARD_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    _DASHBOARD_CSP,
]


class Observer:
    """Request id, security headers, the access log line and request metrics."""

    def __init__(self, app: ASGIApp, metrics: Metrics | None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = time.perf_counter()
        request_id = _request_id(scope["headers"])
        token = request_id_var.set(request_id)
        # Created here so that every copy of the scope below shares it: `current_key`
        # leaves the key's id in it.
        state = scope.setdefault("state", {})
        path: str = scope["path"]
        if path.startswith("/v1/"):
            headers = _API_HEADERS
        elif path.startswith("/docs"):
            headers = _DOCS_HEADERS
        elif path == "/dashboard" or path.startswith("/dashboard/"):
            headers = _DASHBOARD_HEADERS
        else:
            headers = _OTHER_HEADERS
        headers = [*headers, (b"x-request-id", request_id.encode())]
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
            if self.metrics is not None:
                self.metrics.observe(scope["method"], route, status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client")
                access_log.info(
                    "%s %s %d",
                    scope["method"],
                    route or UNMATCHED_ROUTE,
                    status,
                    extra={
                        "method": scope["method"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                        "key_id": state.get("key_id"),
                        "request_id": request_id,
                        "client_ip": client[0] if client else None,
                    },
                )
            request_id_var.reset(token)


def _request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-ID` when it is 1-128 visible ASCII characters, else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            if _VALID_REQUEST_ID(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class ObservedFastAPI(FastAPI):
    """FastAPI with `Observer` around its whole middleware stack."""

    def __init__(self, *, metrics: Metrics | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.metrics = metrics

    def build_middleware_stack(self) -> ASGIApp:
        # Outside ServerErrorMiddleware, which FastAPI puts first: the 500s it renders
        # get a request id, security headers, a log line and a count like the rest.
        return Observer(super().build_middleware_stack(), self.metrics)
