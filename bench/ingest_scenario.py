"""The `ingest` scenario: the API's ingestion against the write floor, in one run.

For each server (the API, optionally a baseline copy of it, and the floor app), in turn
and in alternating order over the rounds: single events (`--connections` clients, one new
event per request) and 1000-event batches (4 clients). Then the SQL-only floor:
PostgreSQL inserting the same kind of rows with no client work at all (the floor's
statement over `generate_series`, 1000 rows a statement, from one and two connections).

Each figure comes with CPU per event of the server under test and of PostgreSQL, measured
around the whole load (warm-up included) and divided by every event it inserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from bench.floor_app import FLOOR_TABLES, floor_insert
from bench.scenarios import Context, timed_load, wait_for_fold
from bench.servers import ServerSpec, log, serving

CASES = (("single", 1, None), ("batch", 1000, 4))  # name, events a request, clients

# The floor's statement over 1000 generated rows: targets cycle through the given
# organizations and users ('' for none), kinds and directions as the load generator's.
_GENERATED = floor_insert("""(
    SELECT organization_id, id, nullif(user_id, '') AS user_id, type, direction,
           CASE WHEN type <> 'voice' THEN 1 + g % 3 END AS segments,
           CASE WHEN type = 'voice' THEN g % 300 END AS seconds,
           type = 'voice' AND g % 4 = 0 AS knowledge_base,
           now() - make_interval(secs => g % 3600) AS occurred_at
    FROM (
        SELECT g, $1 || '-' || g AS id,
               ($2::text[])[1 + (g + $3) % cardinality($2::text[])] AS organization_id,
               ($4::text[])[1 + (g + $3) % cardinality($4::text[])] AS user_id,
               (ARRAY['sms', 'sms', 'sms', 'sms', 'sms', 'sms', 'sms', 'mms', 'voice',
                      'voice'])[1 + g % 10] AS type,
               CASE WHEN g % 3 = 0 THEN 'inbound' ELSE 'outbound' END AS direction
        FROM generate_series(1, 1000) AS g
    ) generated
) AS input""")


def _events(result: dict[str, Any], batch: int) -> int:
    """Every event the load inserted (each answered request carried new events only)."""
    return int(result["statuses"].get("200", 0)) * batch


def _figures(result: dict[str, Any], batch: int) -> dict[str, Any]:
    events = _events(result, batch)
    cpu = result["cpu"]
    return {
        "events_per_s": result["total"]["events_per_s"],
        "p50_ms": result["total"]["p50_ms"],
        "p99_ms": result["total"]["p99_ms"],
        "errors": result["total"]["errors"],
        "error_samples": result["error_samples"],
        "events": events,
        "app_cpu_us_per_event": cpu["server_s"] * 1e6 / events if events else None,
        "pg_cpu_us_per_event": cpu["postgres_s"] * 1e6 / events if events else None,
        "others": cpu["others"],
        "deadlocks": result["database"]["deadlocks"],
        "statements": result["statements"],
    }


async def _server_cases(ctx: Context, spec: ServerSpec, logs: Any, round_: int) -> dict[str, Any]:
    path = "/v1/usage/events" if spec.is_api else "/floor/events"
    key = {"X-API-Key": ctx.write_key} if spec.is_api else {}
    out: dict[str, Any] = {}
    await _checkpoint(ctx)
    async with serving(spec, logs) as server:
        for name, batch, clients in CASES:
            log(f"ingest: {spec.name}, {name}, round {round_ + 1}")
            result = await timed_load(
                ctx,
                server,
                {
                    "connections": clients or ctx.connections,
                    "headers": key,
                    "ingest": {
                        "batch": batch,
                        "targets": [[o.id, list(o.users)] for o in ctx.orgs],
                        "id_prefix": f"{spec.name}-{name}-{round_}-{int(time.time())}",
                        "window_s": 3600,
                        "path": path,
                    },
                },
                # One attempt, after at most 10 s waiting for a quiet moment: the servers
                # alternate, so a busy machine weighs on every side, and runs stay short.
                attempts=1,
                patience_s=10,
            )
            out[name] = f = _figures(result, batch)
            log(
                f"  {f['events_per_s']:,.0f} events/s, app {f['app_cpu_us_per_event'] or 0:.0f}"
                f" us/event, PG {f['pg_cpu_us_per_event'] or 0:.0f} us/event,"
                f" {f['errors']} errors, others {f['others']:.0%}"
            )
            if spec.is_api:
                # The fold of these events is the API's work: not left to the next one.
                out[name]["fold_catch_up_s"] = await wait_for_fold(ctx.pool)
    return out


async def _checkpoint(ctx: Context) -> None:
    """Every server starts after a checkpoint: each pays the full-page images of the pages
    it touches first, none inherits another's."""
    async with ctx.pool.acquire() as conn:
        try:
            await conn.execute("CHECKPOINT")
        except asyncpg.InsufficientPrivilegeError:
            log("ingest: no CHECKPOINT (not a superuser); full-page images fall unevenly")


async def sql_floor(ctx: Context, connections: int) -> dict[str, Any]:
    """The floor's statement over generated rows, 1000 a statement, from `connections`
    connections for the measured duration: what PostgreSQL alone does."""
    orgs = [o.id for o in ctx.orgs for _ in (0, 1)]
    users = [u for o in ctx.orgs for u in (o.users[0], "")]
    prefix = f"sql-{connections}-{int(time.time())}"
    await ctx.cpu.wait_quiet(patience_s=10)
    since = ctx.cpu.sample()
    began = time.perf_counter()
    inserted = 0

    async def loop(stream: int) -> None:
        nonlocal inserted
        async with ctx.pool.acquire() as conn:
            n = 0
            while time.perf_counter() - began < ctx.duration_s:
                inserted += await conn.fetchval(
                    _GENERATED, f"{prefix}-{stream}-{n}", orgs, n * 1000, users
                )
                n += 1

    await asyncio.gather(*(loop(s) for s in range(connections)))
    elapsed = time.perf_counter() - began
    cpu = ctx.cpu.usage(since)
    log(
        f"  SQL only, {connections} connection(s): {inserted / elapsed:,.0f} events/s,"
        f" PG {cpu['postgres_s'] * 1e6 / max(inserted, 1):.0f} us/event, others {cpu['others']:.0%}"
    )
    return {
        "connections": connections,
        "events_per_s": inserted / elapsed,
        "events": inserted,
        "pg_cpu_us_per_event": cpu["postgres_s"] * 1e6 / inserted if inserted else None,
        "others": cpu["others"],
    }


async def ingest(
    ctx: Context, spec: Callable[[str, Any], ServerSpec], logs: Any, baseline: Any, rounds: int
) -> dict[str, Any]:
    """Every server's single events and batches, `rounds` times alternating, then the SQL
    floor; per case, the round with the median API/floor ratio."""
    async with ctx.pool.acquire() as conn:
        await conn.execute("DROP TABLE IF EXISTS floor_events, floor_deltas")
        await conn.execute(FLOOR_TABLES)
        # The floor writes into a table of the same size as the API's: fewer, fresher pages
        # would cost it fewer full-page images in the WAL (2.6x fewer bytes per event when
        # it started empty) and flatter it.
        log("ingest: copying usage_events into floor_events")
        await conn.execute("INSERT INTO floor_events SELECT * FROM usage_events")
        await conn.execute("VACUUM ANALYZE floor_events")
    servers = [spec("api", None)]
    if baseline is not None:
        servers.append(spec("api-base", baseline))
    servers.append(spec("floor", None))
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        order = servers if round_ % 2 == 0 else servers[::-1]
        runs.append({s.name: await _server_cases(ctx, s, logs, round_) for s in order})
    cases: dict[str, Any] = {}
    for name, _, _ in CASES:
        ratios = [r["api"][name]["events_per_s"] / r["floor"][name]["events_per_s"] for r in runs]
        median = sorted(range(rounds), key=ratios.__getitem__)[rounds // 2]
        cases[name] = {s: runs[median][s][name] for s in runs[median]} | {"ratios": ratios}
    log("ingest: the SQL-only floor")
    sql = []
    for connections in (1, 2):
        await _checkpoint(ctx)
        sql.append(await sql_floor(ctx, connections))
    async with ctx.pool.acquire() as conn:
        await conn.execute("DROP TABLE floor_events, floor_deltas")
    return {"cases": cases, "sql_floor": sql, "rounds": rounds}
