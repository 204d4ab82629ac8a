"""The CPU of one request inside the process: instructions (valgrind) and Python calls.

Raw ASGI calls into `create_app` as served (access lines and shared metrics files on),
no server and no network, against the demo data (loaded
here by `usage-api demo`): what the service's own code costs a counter read (`--path
counter`) or a single-event POST (`--path ingest`, a new event each time). The instruction
count is the difference between a run of 1 and a run of `1 + N` requests after the same
warm-up, over N; it does not move with the machine's load, so a change of a few percent
shows where wall-clock figures on a shared machine cannot. PostgreSQL's own work is in
its processes, not counted here.

    uv run python -m bench.request_cost [--path counter|ingest] [--baseline-root DIR]
        [--calls] [--url postgresql://postgres@127.0.0.1:5432/cost]

With `--baseline-root` (a checkout of another commit) the same is measured for that tree,
in a database of its own (`<name>_baseline`), and printed beside. `--calls` counts Python
calls a request with cProfile instead of instructions (no valgrind needed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import logging.config
import os
import pstats
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ORGANIZATION_ID = "1767623610019x414651971228139500"  # the demo's organization
WARM_UP = 300
MEASURED = 2000


def _request(path: str, key: str) -> Callable[[], tuple[dict[str, Any], bytes]]:
    """Each call: the scope and body of the next request of `path` (a new event each
    time for `ingest`: a duplicate would take another path)."""
    headers = [(b"host", b"bench"), (b"x-api-key", key.encode())]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "scheme": "http",
        "root_path": "",
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    if path == "counter":
        target = "/v1/analytics/usage"
        scope |= {"method": "GET", "query_string": f"organization_id={ORGANIZATION_ID}".encode()}
    else:
        target = "/v1/usage/events"
        scope |= {"method": "POST", "query_string": b""}
        headers.append((b"content-type", b"application/json"))
    scope |= {"path": target, "raw_path": target.encode()}
    prefix = os.urandom(6).hex()
    numbers = itertools.count()
    occurred_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

    def next_request() -> tuple[dict[str, Any], bytes]:
        if path == "counter":
            return {**scope, "headers": headers}, b""
        body = (
            f'{{"events":[{{"id":"cost-{prefix}-{next(numbers)}",'
            f'"organization_id":"{ORGANIZATION_ID}","type":"sms","direction":"outbound",'
            f'"segments":1,"occurred_at":"{occurred_at}"}}]}}'
        ).encode()
        length = (b"content-length", str(len(body)).encode())
        return {**scope, "headers": [*headers, length]}, body

    return next_request


async def _requests(url: str, key: str, path: str, count: int, profile: bool) -> int:
    """`count` requests after the warm-up; the Python calls a request when profiling."""
    from usage_api.app import create_app
    from usage_api.config import get_settings
    from usage_api.logs import logging_config

    # As `usage-api serve --workers 2` runs: JSON access lines (on stderr, which is thrown
    # away) and metrics in the files workers share (PROMETHEUS_MULTIPROC_DIR, set by
    # `_run`). No fold, and a limit no request reaches: the limiter's admission and its
    # headers are part of every request. Its sync is left out (once an hour): it costs a
    # statement every 100 ms whatever the rate, which under valgrind, 50 times slower,
    # would be counted against a request 50 times over.
    logging.config.dictConfig(logging_config("info"))
    settings = replace(
        get_settings(), rollup_interval_ms=0, rate_limit=1_000_000_000, rate_limit_sync_ms=3_600_000
    )
    app = create_app(settings, url)
    statuses: set[int] = set()
    next_request = _request(path, key)

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    async def one() -> None:
        scope, body = next_request()

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        await app(scope, receive, send)

    async with app.router.lifespan_context(app):
        for _ in range(WARM_UP):
            await one()
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        for _ in range(count):
            await one()
        if profiler is not None:
            profiler.disable()
    if statuses != {200}:
        raise RuntimeError(f"{path} answered {statuses}")
    if profiler is None:
        return 0
    return int(pstats.Stats(profiler).total_calls) // count  # type: ignore[attr-defined]


def _database(url: str, name: str) -> str:
    """The URL of a fresh database `name` on the server of `url`."""

    async def create() -> None:
        admin = make_url(url).set(drivername="postgresql", database="postgres")
        conn = await asyncpg.connect(admin.render_as_string(False))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return make_url(url).set(database=name).render_as_string(False)


def _env(root: Path, url: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root / "src"), "DATABASE_URL": url}


def _key(root: Path, url: str, path: str) -> str:
    """A key for `path` on the demo data (loaded here): its read key, or a write key."""
    command: list[str | Path] = [BIN / "usage-api", "demo"]
    if path == "ingest":
        subprocess.run(command, cwd=root, env=_env(root, url), check=True, capture_output=True)
        command = [BIN / "usage-api", "keys", "create", "--scope", "organization"]
        command += ["--organization", ORGANIZATION_ID, "--write"]
    done = subprocess.run(
        command, cwd=root, env=_env(root, url), check=True, capture_output=True, text=True
    )
    key: str = done.stdout.strip().splitlines()[-1]
    return key


def _run(
    root: Path, url: str, key: str, path: str, count: int, tool: list[str], *flags: str
) -> str:
    command = [*tool, sys.executable, __file__, "--path", path, "--inner", str(count), *flags]
    with tempfile.TemporaryDirectory() as metrics:
        env = {**_env(root, url), "KEY": key, "PROMETHEUS_MULTIPROC_DIR": metrics}
        return subprocess.run(
            command, cwd=root, env=env, check=True, capture_output=True, text=True
        ).stdout


def _instructions(root: Path, url: str, key: str, path: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        _run(root, url, key, path, count, valgrind)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in callgrind's output")


def measure(root: Path, url: str, path: str, calls: bool) -> str:
    key = _key(root, url, path)
    if calls:
        return _run(root, url, key, path, MEASURED, [], "--profile").strip() + " Python calls"
    one = _instructions(root, url, key, path, 1)
    many = _instructions(root, url, key, path, 1 + MEASURED)
    return f"{(many - one) / MEASURED / 1000:.1f}k instructions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/cost")
    parser.add_argument("--path", choices=["counter", "ingest"], default="counter")
    parser.add_argument("--baseline-root", type=Path, default=None)
    parser.add_argument("--calls", action="store_true", help="Python calls, not instructions")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        env = os.environ
        calls = asyncio.run(
            _requests(env["DATABASE_URL"], env["KEY"], args.path, args.inner, args.profile)
        )
        if args.profile:
            print(calls)
        return
    name = make_url(args.url).database or "cost"
    trees = [("this tree", ROOT, name)]
    if args.baseline_root is not None:
        trees.append(("baseline", args.baseline_root.resolve(), f"{name}_baseline"))
    what = {"counter": "a counter read", "ingest": "a single-event POST"}[args.path]
    for label, root, database in trees:
        url = _database(args.url, database)
        print(f"{label} ({root}): {measure(root, url, args.path, args.calls)} {what}", flush=True)


if __name__ == "__main__":
    main()
