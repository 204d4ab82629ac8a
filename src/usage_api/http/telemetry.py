"""The Prometheus instruments of one app (`Telemetry`) and their exposition at `/metrics`.

With several worker processes (`PROMETHEUS_MULTIPROC_DIR` set, as `usage-api serve
--workers N` does) they live in files that any worker's `/metrics` sums up.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import (
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

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "unmatched"
# Our answers take a few milliseconds; Prometheus' default buckets start at 5 ms.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
POOL_PUBLISH_S = 1.0
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


class Telemetry:
    """The Prometheus instruments of one app, and their exposition."""

    def __init__(self, multiprocess_dir: str | None) -> None:
        # Where worker processes share their metrics, when there are several.
        self.multiprocess_dir = multiprocess_dir
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
            # publishes its own every `POOL_PUBLISH_S` (`run`), and the scrape sums the
            # live ones.
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

    async def run(self) -> None:
        """With several workers: publish this worker's pool every `POOL_PUBLISH_S` until
        cancelled (the app's lifespan runs it). After every request instead, it was three
        gauge writes to the shared files a request, some 15 Python calls."""
        if self.multiprocess_dir is None:
            return
        while True:
            await asyncio.sleep(POOL_PUBLISH_S)
            if self._engine is not None:
                self._publish_pool()

    def _publish_pool(self) -> None:
        assert self._engine is not None
        for gauge, value in zip(self._pool_gauges, _pool_values(self._engine), strict=True):
            gauge.set(value)

    def count_events(self, accepted: int, duplicates: int, conflicts: int) -> None:
        # Only what moved: with several workers each `inc` is a write to the shared files,
        # and most batches have neither duplicates nor conflicts.
        for counter, count in (
            (self.accepted, accepted),
            (self.duplicate, duplicates),
            (self.conflicting, conflicts),
        ):
            if count:
                counter.inc(count)

    def render(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


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
