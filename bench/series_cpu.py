"""`uv run python -m bench.series_cpu [--baseline PATH]`: the CPU a series request costs.

The series cases of `bench/series_scenario.py`, sent in-process (httpx.ASGITransport: no
server, no load generator, no socket between them) to the app of this checkout and, with
`--baseline`, of another one (a worktree of main, say), each in a process of its own with
its `src/` first on the path, in rounds that alternate which goes first. Per case: the
median wall time and the median CPU time of that process per request (the app, asyncpg
and the in-process client; PostgreSQL's CPU is not in it). On a shared machine CPU per
request moves much less than wall time does.

Uses the benchmark's stored dataset (`python -m bench --events N` makes it) and its
embedded server, or BENCH_DATABASE_URL; run it when no other benchmark is running.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import dataset
from bench.series_scenario import SERIES_CASES, series_path
from bench.servers import ROOT, database

BENCH = Path(__file__).resolve().parent


async def _measure(url: str, key: str, paths: dict[str, str], requests: int) -> dict[str, Any]:
    import httpx

    from usage_api.app import create_app
    from usage_api.config import Settings

    app = create_app(Settings.from_env(), url)
    results = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://bench", headers={"X-API-Key": key}
        ) as client:
            for label, path in paths.items():
                for _ in range(3):
                    (await client.get(path)).raise_for_status()
                wall, cpu = [], []
                for _ in range(requests):
                    began, began_cpu = time.perf_counter(), time.process_time()
                    (await client.get(path)).raise_for_status()
                    wall.append((time.perf_counter() - began) * 1000)
                    cpu.append((time.process_time() - began_cpu) * 1000)
                results[label] = {
                    "wall_ms": statistics.median(wall),
                    "cpu_ms": statistics.median(cpu),
                }
    return results


async def _key(url: str) -> str:
    from sqlalchemy import text

    from usage_api.config import Settings
    from usage_api.db import create_engine, transact
    from usage_api.keys import create_key

    engine = create_engine(Settings.from_env(), url)
    try:

        async def work(conn: Any) -> str:
            await conn.execute(text("DELETE FROM api_keys WHERE name = 'bench-series-cpu'"))
            _, key = await create_key(conn, scope="admin", name="bench-series-cpu")
            return key

        return await transact(engine, work)
    finally:
        await engine.dispose()


def _run_child(root: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ) | {
        "PYTHONPATH": os.pathsep.join([str(root / "src"), str(ROOT)]),
        "USAGE_API_LOG_LEVEL": "warning",
        "USAGE_API_RATE_LIMIT": str(10**12),
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.series_cpu", "--child"],
        input=json.dumps(spec).encode(),
        capture_output=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.series_cpu", description=__doc__)
    parser.add_argument("--events", type=int, default=2_000_000, help="the stored dataset's")
    parser.add_argument("--requests", type=int, default=40, help="timed requests per case")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with")
    parser.add_argument("--data-dir", type=Path, default=BENCH / "data")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.load(sys.stdin)
        results = asyncio.run(_measure(spec["url"], spec["key"], spec["paths"], spec["requests"]))
        print(json.dumps(results))
        return

    busy = dataset.organizations(dataset.Params(events=args.events))[0].id
    paths = {label: series_path(busy, *case) for label, *case in SERIES_CASES}
    roots = {"this checkout": ROOT} | ({"baseline": args.baseline} if args.baseline else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in roots}
    with database(args.data_dir) as (url, _):
        spec = {"url": url, "key": asyncio.run(_key(url)), "paths": paths}
        spec["requests"] = args.requests
        for round_ in range(args.rounds):
            order = list(roots.items())
            for name, root in order if round_ % 2 == 0 else order[::-1]:
                runs[name].append(_run_child(root, spec))
    print("| case | " + " | ".join(f"{n} wall | {n} CPU" for n in roots) + " |")
    print("|---|" + "---|---|" * len(roots))
    for label in paths:
        cells = []
        for name in roots:
            wall = statistics.median(r[label]["wall_ms"] for r in runs[name])
            cpu = statistics.median(r[label]["cpu_ms"] for r in runs[name])
            cells += [f"{wall:.2f} ms", f"{cpu:.2f} ms"]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
