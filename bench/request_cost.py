"""The CPU of one counter read inside the process: instructions (valgrind) and Python calls.

Raw ASGI calls into `create_app`, no server and no network, against the demo data (loaded
here by `usage-api demo`): what the service's own code costs a request. The instruction
count is the difference between a run of 1 and a run of `1 + N` reads after the same
warm-up, over N; it does not move with the machine's load, so a change of a few percent
shows where wall-clock figures on a shared machine cannot.

    uv run python -m bench.request_cost [--url postgresql://postgres@127.0.0.1:5432/cost]
        [--baseline-root DIR] [--calls]

With `--baseline-root` (a checkout of another commit) the same is measured for that tree,
in a database of its own (`<name>_baseline`), and printed beside. `--calls` counts Python
calls a read with cProfile instead of instructions (no valgrind needed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ORGANIZATION_ID = "1767623610019x414651971228139500"  # the demo's organization
WARM_UP = 300
MEASURED = 2000


def _scope(key: str) -> dict[str, Any]:
    path = "/v1/analytics/usage"
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": f"organization_id={ORGANIZATION_ID}".encode(),
        "headers": [(b"host", b"bench"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def _reads(url: str, key: str, count: int, profile: bool) -> int:
    """`count` reads after the warm-up; the Python calls a read when profiling."""
    from usage_api.app import create_app
    from usage_api.config import get_settings

    # No metrics files, no fold, and a limit no read reaches: the limiter's admission and
    # its headers are part of every read, as in service. Its sync is left out (once an hour):
    # it costs a statement every 100 ms whatever the rate, which under valgrind, 50 times
    # slower, would be counted against a read 50 times over.
    settings = replace(
        get_settings(),
        metrics_enabled=False,
        rollup_interval_ms=0,
        rate_limit=1_000_000_000,
        rate_limit_sync_ms=3_600_000,
    )
    app = create_app(settings, url)
    statuses: set[int] = set()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    scope = _scope(key)
    async with app.router.lifespan_context(app):
        for _ in range(WARM_UP):
            await app(dict(scope), receive, send)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        for _ in range(count):
            await app(dict(scope), receive, send)
        if profiler is not None:
            profiler.disable()
    if statuses != {200}:
        raise RuntimeError(f"reads answered {statuses}")
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


def _demo_key(root: Path, url: str) -> str:
    done = subprocess.run(
        [BIN / "usage-api", "demo"],
        cwd=root,
        env=_env(root, url),
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip().splitlines()[-1]


def _run(root: Path, url: str, key: str, count: int, tool: list[str], *flags: str) -> str:
    command = [*tool, sys.executable, __file__, "--inner", str(count), *flags]
    env = {**_env(root, url), "KEY": key}
    return subprocess.run(
        command, cwd=root, env=env, check=True, capture_output=True, text=True
    ).stdout


def _instructions(root: Path, url: str, key: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        _run(root, url, key, count, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no totals in callgrind's output")


def measure(root: Path, url: str, calls: bool) -> str:
    key = _demo_key(root, url)
    if calls:
        return _run(root, url, key, MEASURED, [], "--profile").strip() + " Python calls"
    one = _instructions(root, url, key, 1)
    many = _instructions(root, url, key, 1 + MEASURED)
    return f"{(many - one) / MEASURED / 1000:.1f}k instructions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/cost")
    parser.add_argument("--baseline-root", type=Path, default=None)
    parser.add_argument("--calls", action="store_true", help="Python calls, not instructions")
    parser.add_argument("--inner", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner is not None:
        env = os.environ
        calls = asyncio.run(_reads(env["DATABASE_URL"], env["KEY"], args.inner, args.profile))
        if args.profile:
            print(calls)
        return
    name = make_url(args.url).database
    trees = [("this tree", ROOT, name)]
    if args.baseline_root is not None:
        trees.append(("baseline", args.baseline_root.resolve(), f"{name}_baseline"))
    for label, root, database in trees:
        url = _database(args.url, database)
        print(f"{label} ({root}): {measure(root, url, args.calls)} a counter read", flush=True)


if __name__ == "__main__":
    main()
