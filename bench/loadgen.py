"""The load generator: a separate process speaking plain HTTP/1.1 over keep-alive sockets.

It reads a JSON spec on stdin and prints a JSON summary on stdout. It is deliberately
small (no HTTP library, uvloop when available) so that on a 2-core machine it takes as
little CPU as possible from the server it measures, and the same for every server.

Two ways to run:

- `"requests"`: a list of `[label, path]` GETs, run `passes` times in order (after
  `warmup_passes` unrecorded passes), over `connections` sockets; statistics per label.
  A request `[label, path, port]` goes to that port instead (two servers side by side).
- `"duration_s"`: `connections` sockets send requests for `warmup_s + duration_s`
  seconds; only requests both started and finished in the measured window count. The
  requests are GETs from `paths` (random order), or ingestion bodies built on the fly
  from `ingest` (`batch` events each, unique ids, random targets), posted to its `path`
  (default `/v1/usage/events`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

HEADER_END = b"\r\n\r\n"


class Connection:
    """One keep-alive connection; reconnects when the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(HEADER_END)
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            self.reader = None


@dataclass
class Sample:
    label: str
    latency_s: float
    status: int
    events: int = 0


@dataclass
class Recorder:
    samples: list[Sample] = field(default_factory=list)
    error_bodies: list[str] = field(default_factory=list)

    def add(self, sample: Sample, body: bytes) -> None:
        self.samples.append(sample)
        if sample.status != 200 and len(self.error_bodies) < 5:
            self.error_bodies.append(f"{sample.status} {body[:300]!r}")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of `values` (q in 0..1); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def summarize(samples: list[Sample], elapsed_s: float | None) -> dict[str, Any]:
    latencies = [s.latency_s * 1000 for s in samples]
    summary: dict[str, Any] = {
        "count": len(samples),
        "errors": sum(1 for s in samples if s.status != 200),
        "events": sum(s.events for s in samples),
        "p50_ms": percentile(latencies, 0.50),
        "p90_ms": percentile(latencies, 0.90),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": max(latencies, default=math.nan),
        "mean_ms": sum(latencies) / len(latencies) if latencies else math.nan,
    }
    if elapsed_s:
        summary["elapsed_s"] = elapsed_s
        summary["rps"] = len(samples) / elapsed_s
        summary["events_per_s"] = summary["events"] / elapsed_s
    return summary


def _get(host: str, port: int, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _post(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class EventMaker:
    """Valid random events for `POST /v1/usage/events`, with ids unique to this run.

    Building JSON for 20,000 events a second would take a core from the server under test,
    so request bodies are made up front as templates; each request only stamps a fresh
    token into its template's ids.
    """

    TOKEN = b"@@"

    def __init__(self, spec: dict[str, Any], stream: int) -> None:
        self.targets: list[tuple[str, list[str]]] = [(t[0], t[1]) for t in spec["targets"]]
        self.prefix = f"{spec['id_prefix']}-{stream}-"
        self.rng = random.Random(f"{spec['id_prefix']}:{stream}")
        self.window_s = float(spec.get("window_s", 3600))
        batch = int(spec["batch"])
        templates = max(8, 256 // batch)
        now = datetime.now(UTC)
        self.templates = itertools.cycle(
            [
                json.dumps({"events": [self.event(now, n) for n in range(batch)]}).encode()
                for _ in range(templates)
            ]
        )
        self.sequence = itertools.count()

    def event(self, now: datetime, number: int) -> dict[str, Any]:
        rng = self.rng
        organization_id, users = rng.choice(self.targets)
        event: dict[str, Any] = {
            "id": f"{self.prefix}{self.TOKEN.decode()}-{number}",
            "organization_id": organization_id,
        }
        if users and rng.random() >= 0.1:
            event["user_id"] = rng.choice(users)
        kind = rng.random()
        if kind < 0.70:
            event |= {"type": "sms", "direction": _direction(rng, 0.62)}
            event["segments"] = 1 if rng.random() < 0.75 else rng.randint(2, 4)
        elif kind < 0.82:
            event |= {"type": "mms", "direction": _direction(rng, 0.55), "segments": 1}
        else:
            event |= {"type": "voice", "direction": _direction(rng, 0.5)}
            event["seconds"] = int(rng.expovariate(1 / 150))
            event["knowledge_base"] = rng.random() < 0.3
        at = now - timedelta(seconds=rng.random() * self.window_s)
        event["occurred_at"] = at.isoformat(timespec="microseconds").replace("+00:00", "Z")
        return event

    def body(self) -> bytes:
        return next(self.templates).replace(self.TOKEN, str(next(self.sequence)).encode())


def _direction(rng: random.Random, outbound: float) -> str:
    return "outbound" if rng.random() < outbound else "inbound"


async def run_list(spec: dict[str, Any]) -> dict[str, Any]:
    """Each labelled GET `passes` times, in order; per-label latency statistics."""
    host, headers = spec["host"], spec.get("headers", {})
    requests = []
    for label, path, *port in spec["requests"]:
        to = port[0] if port else spec["port"]
        requests.append((label, to, _get(host, to, path, headers)))
    ports = {to for _, to, _ in requests}
    # Each client has a socket to each server.
    clients = [
        {to: Connection(host, to) for to in ports} for _ in range(spec.get("connections", 1))
    ]
    recorder = Recorder()

    async def run_pass(record: bool) -> None:
        queue = iter(requests)

        async def worker(connections: dict[int, Connection]) -> None:
            for label, to, raw in queue:
                started = time.perf_counter()
                status, body = await connections[to].request(raw)
                if record:
                    recorder.add(Sample(label, time.perf_counter() - started, status), body)

        await asyncio.gather(*(worker(c) for c in clients))

    for _ in range(spec.get("warmup_passes", 1)):
        await run_pass(record=False)
    for _ in range(spec.get("passes", 1)):
        await run_pass(record=True)
    for connections in clients:
        for connection in connections.values():
            await connection.close()
    labels = {label: None for label, *_ in spec["requests"]}
    return {
        "labels": {
            label: summarize([s for s in recorder.samples if s.label == label], None)
            for label in labels
        },
        "total": summarize(recorder.samples, None),
        "error_samples": recorder.error_bodies,
    }


async def run_timed(spec: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load for a fixed time; throughput and latency of the measured window."""
    host, port, headers = spec["host"], spec["port"], spec.get("headers", {})
    warmup_s, duration_s = float(spec.get("warmup_s", 1)), float(spec["duration_s"])
    connections = spec["connections"]
    recorder = Recorder()
    statuses: Counter[int] = Counter()
    ingest = spec.get("ingest")

    def request_maker(stream: int) -> Callable[[], bytes]:
        if ingest is not None:
            maker = EventMaker(ingest, stream)
            path = ingest.get("path", "/v1/usage/events")
            return lambda: _post(host, port, path, headers, maker.body())
        rng = random.Random(stream)
        raws = [_get(host, port, path, headers) for path in spec["paths"]]
        cycle: Iterator[bytes] = itertools.cycle(rng.sample(raws, len(raws)))
        return lambda: next(cycle)

    makers = [request_maker(stream) for stream in range(connections)]
    begin = time.perf_counter()
    window_start, window_end = begin + warmup_s, begin + warmup_s + duration_s

    async def worker(stream: int, make: Callable[[], bytes]) -> None:
        # Connections opened all at once can all land on one uvicorn worker (each worker
        # races to accept on the shared socket); opened a few ms apart, an idle worker
        # wins the next one, and the load spreads over the workers as real clients' would.
        await asyncio.sleep(stream * 0.01)
        connection = Connection(host, port)
        while True:
            raw = make()
            started = time.perf_counter()
            if started >= window_end:
                break
            status, body = await connection.request(raw)
            finished = time.perf_counter()
            statuses[status] += 1
            if started >= window_start and finished <= window_end:
                events = 0
                if ingest is not None and status == 200:
                    events = int(json.loads(body)["accepted"])
                recorder.add(Sample("all", finished - started, status, events), body)
        await connection.close()

    await asyncio.gather(*(worker(stream, make) for stream, make in enumerate(makers)))
    return {
        "total": summarize(recorder.samples, duration_s),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "error_samples": recorder.error_bodies,
    }


async def _main() -> None:
    spec = json.loads(sys.stdin.read())
    result = await (run_list(spec) if "requests" in spec else run_timed(spec))
    sys.stdout.write(json.dumps(result))


def main() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(_main())
    else:
        uvloop.run(_main())


if __name__ == "__main__":
    main()
