"""`uv run python -m bench [--events N] [--quick] ...`: generate (or reuse) the dataset, run
the scenarios, print the results and write bench/RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text

from bench import dataset, ingest_scenario, report, scenarios, series_scenario
from bench.servers import (
    ROOT,
    CpuMeter,
    ServerSpec,
    database,
    log,
    pgbench_binary,
    postmaster_pid,
    server_settings,
    serving,
)
from usage_api.config import Settings
from usage_api.db import create_engine, transact
from usage_api.keys import create_key

SCENARIOS = ("pgbench", "ranges", "exactness", "series", "counters", "ingestion", "ingest")
BENCH = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000_000, help="events to generate")
    parser.add_argument("--seed", type=int, default=2025, help="generator seed")
    parser.add_argument(
        "--quick", action="store_true", help="shorter measurements and fewer samples"
    )
    parser.add_argument("--workers", type=int, default=2, help="uvicorn workers under test")
    parser.add_argument(
        "--counter-rounds",
        type=int,
        default=3,
        help="api/floor pairs per worker count in the counter scenario; the median ratio counts",
    )
    parser.add_argument(
        "--counter-workers",
        default="1,2",
        help="worker counts for the counter-read comparison (comma-separated)",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=int(os.environ.get("USAGE_API_POOL_SIZE") or 10),
        help="USAGE_API_POOL_SIZE for the API and the floor app",
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent clients")
    parser.add_argument("--duration", type=float, help="seconds per timed measurement")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"any of {', '.join(SCENARIOS)}"
    )
    parser.add_argument("--data-dir", type=Path, default=BENCH / "data")
    parser.add_argument(
        "--results", type=Path, default=BENCH / "RESULTS.md", help="'-' to write no file"
    )
    parser.add_argument(
        "--report-from",
        type=Path,
        help="only render the report of an earlier run (its bench/data/last-run.json)",
    )
    parser.add_argument(
        "--api-root",
        type=Path,
        help="serve the API from this copy of the repository (to try a change to src/)",
    )
    parser.add_argument(
        "--baseline-root",
        type=Path,
        help="also serve the API from this copy of the repository (e.g. a worktree of main):"
        " the series, counters and ingest scenarios measure it side by side with this one",
    )
    parser.add_argument(
        "--ingest-rounds",
        type=int,
        help="rounds of the ingest scenario (default 3, 1 with --quick); the median"
        " API/floor ratio counts",
    )
    args = parser.parse_args(argv)
    if args.duration is None:
        args.duration = 4.0 if args.quick else 10.0
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    return args


def _head_revision() -> str:
    """The migrations' head, which a stored dataset must have been generated at (a dataset
    from another branch's schema is generated again, not migrated)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    # Where `usage-api migrate` finds its configuration.
    ini = Path("alembic.ini") if Path("alembic.ini").exists() else ROOT / "alembic.ini"
    head = ScriptDirectory.from_config(Config(str(ini))).get_current_head()
    if head is None:
        raise SystemExit("no migrations found")
    return head


async def _make_keys(url: str) -> tuple[str, str]:
    """A fresh admin read key and admin write key; earlier runs' keys are deleted."""
    engine = create_engine(Settings.from_env(), url)
    try:

        async def work(conn: Any) -> tuple[str, str]:
            await conn.execute(text("DELETE FROM api_keys WHERE name LIKE 'bench-%'"))
            _, read = await create_key(conn, scope="admin", name="bench-read")
            _, write = await create_key(conn, scope="admin", can_write=True, name="bench-write")
            return read, write

        return await transact(engine, work)
    finally:
        await engine.dispose()


async def run(url: str, bin_dir: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    params = dataset.Params(events=args.events, seed=args.seed)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=2, command_timeout=None)
    try:
        cpu = CpuMeter(
            None if os.environ.get("BENCH_DATABASE_URL") else postmaster_pid(args.data_dir)
        )
        built = await dataset.ensure(pool, url, params, _head_revision())
        statements = await scenarios.enable_statement_statistics(pool)
        began = time.perf_counter()
        described = await dataset.describe(pool, params)
        read_key, write_key = await _make_keys(url)
        ctx = scenarios.Context(
            params=params,
            orgs=dataset.organizations(params),
            pool=pool,
            read_key=read_key,
            write_key=write_key,
            quick=args.quick,
            connections=args.connections,
            duration_s=args.duration,
            cpu=cpu,
            statements=statements,
        )
        since = cpu.sample()
        results = await _scenarios(ctx, url, bin_dir, args)
        run_seconds = time.perf_counter() - began
        cpu_used = cpu.usage(since)
        settings = await server_settings(url)
    finally:
        await pool.close()

    steps = ", ".join(f"{k} {v:.0f} s" for k, v in described["steps"])
    per_org = described["events_per_org"]
    return {
        "command": "python -m bench " + shlex.join(sys.argv[1:]),
        "machine": report.machine(),
        "postgres": {
            "settings": settings,
            "where": "BENCH_DATABASE_URL"
            if os.environ.get("BENCH_DATABASE_URL")
            else f"embedded, data in {args.data_dir}",
        },
        "dataset": {
            "summary": (
                f"{params.events:,} events over {params.days} days from"
                f" {params.start:%Y-%m-%d}, {params.organizations} organizations x"
                f" {params.users_per_organization} users (organization {params.wide}:"
                f" {params.wide_users:,}), one partner of {params.large_partner_organizations}"
                " organizations; busy organization"
                f" {per_org['busy']:,} events, small organization {per_org['small']:,};"
                f" database {described['database_bytes'] / 2**30:.1f} GiB"
            ),
            "generation": (
                f"{built.seconds:.0f} s ({steps})"
                + (" - generated by an earlier run, reused" if built.reused else "")
            ),
            "tables": described["tables"],
        },
        "api_server": "`usage-api serve --workers N` (uvicorn, uvloop + httptools),"
        " USAGE_API_LOG_LEVEL=warning"
        + (f", served from {args.api_root}" if args.api_root else "")
        + (
            f"; series also timed against {args.baseline_root}, request by request"
            if args.baseline_root
            else ""
        ),
        "workers": args.workers,
        "pool_size": args.pool_size,
        "connections": args.connections,
        "duration_s": args.duration,
        "load_generator": "bench/loadgen.py in its own process (asyncio + uvloop, raw HTTP/1.1"
        " keep-alive)",
        "seconds": run_seconds,
        "cpu": cpu_used,
        "results": results,
    }


async def _scenarios(
    ctx: scenarios.Context, url: str, bin_dir: Path | None, args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    logs = args.data_dir / "logs"
    params = ctx.params

    def spec(name: str, workers: int) -> ServerSpec:
        return ServerSpec(name, workers, args.pool_size, url, args.api_root)

    if "pgbench" in args.scenarios:
        binary = pgbench_binary(bin_dir)
        if binary is None:
            log("pgbench: no pgbench binary found; skipped")
        else:
            results["pgbench"] = await scenarios.pgbench(
                ctx, binary, url, 3 if args.quick else int(args.duration)
            )

    if {"ranges", "exactness"} & set(args.scenarios):
        async with serving(spec("api", args.workers), logs) as api:
            if "ranges" in args.scenarios:
                results["ranges"] = await scenarios.ranges(ctx, api.port)
            if "exactness" in args.scenarios:
                log("exactness: 1000 random ranges against the raw SUM")
                window = (params.start - timedelta(days=20), params.end + timedelta(days=2))
                results["exactness"] = await scenarios.exactness(ctx, api.port, 1000, window)

    if "series" in args.scenarios:
        async with contextlib.AsyncExitStack() as stack:
            api = await stack.enter_async_context(serving(spec("api", args.workers), logs))
            baseline = None
            if args.baseline_root is not None:
                baseline_spec = ServerSpec(
                    "api", args.workers, args.pool_size, url, args.baseline_root
                )
                baseline = await stack.enter_async_context(serving(baseline_spec, logs))
            timings = await series_scenario.timings(
                ctx, api.port, baseline.port if baseline else None
            )
            log("series: random series and breakdowns against the raw log")
            results["series"] = {
                "timings": timings,
                "series_exactness": await series_scenario.series_exactness(
                    ctx, api.port, 100 if args.quick else 300
                ),
                "breakdown_exactness": await series_scenario.breakdown_exactness(
                    ctx, api.port, 50 if args.quick else 100
                ),
            }

    if "counters" in args.scenarios:
        api_paths, floor_paths = scenarios.counter_paths(ctx)
        counter_runs = []
        worker_counts = sorted({int(w) for w in args.counter_workers.split(",")} | {args.workers})
        rounds = 1 if args.quick else args.counter_rounds
        # With --baseline-root its API is a third server of every round.
        names = ["api", "floor"] + (["baseline"] if args.baseline_root is not None else [])
        for workers in worker_counts:
            pairs = []
            for round_ in range(rounds):
                # Each round in another order (api, floor, then floor, api, ...): a machine
                # whose speed drifts favours no server.
                shift = round_ % len(names)
                order = names[shift:] + names[:shift]
                if round_ % 2 == 1:
                    order.reverse()
                pair: dict[str, Any] = {"workers": workers}
                for name in order:
                    log(f"counter reads: {name}, {workers} workers, round {round_ + 1}/{rounds}")
                    server_spec = (
                        ServerSpec("api", workers, args.pool_size, url, args.baseline_root)
                        if name == "baseline"
                        else spec(name, workers)
                    )
                    async with serving(server_spec, logs) as server:
                        pair[name] = await scenarios.counter_reads(
                            ctx,
                            server,
                            floor_paths if name == "floor" else api_paths,
                            key=name != "floor",
                        )
                pairs.append(pair)
            ratios = [p["api"]["total"]["rps"] / p["floor"]["total"]["rps"] for p in pairs]
            # The round with the median ratio stands for the worker count; all ratios are kept.
            median = sorted(range(rounds), key=ratios.__getitem__)[rounds // 2]
            run_ = pairs[median] | {"ratios": ratios}
            if args.baseline_root is not None:
                run_["baseline_ratios"] = [
                    p["baseline"]["total"]["rps"] / p["floor"]["total"]["rps"] for p in pairs
                ]
                run_["api_rps"] = [p["api"]["total"]["rps"] for p in pairs]
                run_["baseline_rps"] = [p["baseline"]["total"]["rps"] for p in pairs]
            counter_runs.append(run_)
        results["counters"] = {
            "runs": counter_runs,
            "main": next(r for r in counter_runs if r["workers"] == args.workers),
        }

    if "ingestion" in args.scenarios:
        await dataset.mark_dirty(ctx.pool)
        async with serving(spec("api", args.workers), logs) as api:
            started = datetime.now(UTC)
            runs = {}
            for name, orgs, clients, batch in (
                ("batch", ctx.orgs, 4, 500),
                ("single-spread", ctx.orgs, args.connections, 1),
                ("single-busy", [ctx.busy], args.connections, 1),
            ):
                runs[name] = await scenarios.ingestion(ctx, api, name, orgs, clients, batch)
            after = await scenarios.after_ingestion(ctx, api.port, started)
        results["ingestion"] = {"runs": runs, "after": after}
        await dataset.restore(ctx.pool, params)

    if "ingest" in args.scenarios:
        await dataset.mark_dirty(ctx.pool)
        results["ingest"] = await ingest_scenario.ingest(
            ctx,
            lambda name, root: ServerSpec(
                name, args.workers, args.pool_size, url, root or args.api_root
            ),
            logs,
            args.baseline_root,
            args.ingest_rounds or (1 if args.quick else 3),
        )
        await dataset.restore(ctx.pool, params)
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report_from:
        outcome = json.loads(args.report_from.read_text())
    else:
        args.data_dir.mkdir(parents=True, exist_ok=True)
        with database(args.data_dir) as (url, bin_dir):
            outcome = asyncio.run(run(url, bin_dir, args))
        # Everything measured, for a closer look than the report gives.
        (args.data_dir / "last-run.json").write_text(json.dumps(outcome, indent=2, default=str))
    markdown = report.render(outcome, outcome["results"], BENCH / "NOTES.md")
    print(markdown)
    if str(args.results) != "-":
        args.results.write_text(markdown)
        shown = (
            args.results.relative_to(ROOT) if args.results.is_relative_to(ROOT) else args.results
        )
        log(f"wrote {shown}")
