"""The dataset: a deterministic year of usage, generated inside PostgreSQL.

1000 organizations of 50 users each, but organization 1 ("wide") has 10,000; one
organization (index 0, "busy") holds 30% of the events, the others share the rest with a
long tail (organization 1 is the next largest, the last one, "small", the least). Twenty
partners have 40 organizations each (four in five of the first half); one partner
("large") has the last 500. 90% of events carry a user. The mix is 70% sms, 12%
mms, 18% voice, with business-hour peaks (UTC) and microsecond timestamps.

Every random choice is a hash of the event's number (`hashint8extended`), so the data
depend only on the parameters, not on how the work is split between connections. The log
is bulk-inserted without indexes; the roll-ups are then built set-based from it, with
the folder's semantics (each event counts in its organization's row `user_id = ''` and,
when it has a user, in that user's row, hourly and daily alike); then indexes,
constraints, VACUUM ANALYZE.

What was generated is recorded in `bench.dataset`: a later run with the same parameters,
generator version and schema revision reuses it. Events the ingestion scenarios add all
occur after the dataset's year; `restore` removes them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.servers import log
from usage_api.cli import migrate_to_head
from usage_api.models import METRICS

GENERATOR_VERSION = 2
CHUNK = 500_000
LOADED_TABLES = ("usage_events", "usage_hourly", "usage_daily", "usage_counters")
METRIC_LIST = ", ".join(METRICS)

# The seed's definition of the six metrics over raw log rows: the oracle of every check.
_EVENT_METRICS = (
    "sum(segments) FILTER (WHERE type = 'sms' AND direction = 'outbound')",
    "sum(segments) FILTER (WHERE type = 'sms' AND direction = 'inbound')",
    "sum(segments) FILTER (WHERE type = 'mms' AND direction = 'outbound')",
    "sum(segments) FILTER (WHERE type = 'mms' AND direction = 'inbound')",
    "sum(seconds) FILTER (WHERE type = 'voice' AND NOT knowledge_base)",
    "sum(seconds) FILTER (WHERE type = 'voice' AND knowledge_base)",
)


def event_sums(prefix: str = "") -> str:
    """The six sums over `usage_events` rows, named `<prefix><metric>`."""
    return ",\n    ".join(
        f"coalesce({expression}, 0)::bigint AS {prefix}{metric}"
        for expression, metric in zip(_EVENT_METRICS, METRICS, strict=True)
    )


ROW_SUMS = ", ".join(f"sum({m})::bigint" for m in METRICS)

# Relative traffic per UTC hour: quiet nights, a peak in North American office hours.
HOUR_WEIGHTS = (3, 2, 2, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 9, 10, 10, 10, 10, 9, 8, 7, 6, 5, 4)


@dataclass(frozen=True)
class Params:
    events: int
    organizations: int = 1000
    users_per_organization: int = 50
    busy_share: float = 0.30
    no_user_share: float = 0.10
    seed: int = 2025
    wide_users: int = 10_000
    large_partner_organizations: int = 500
    start: datetime = datetime(2025, 1, 1, tzinfo=UTC)
    days: int = 365

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=self.days)

    @property
    def busy(self) -> int:
        return 0

    @property
    def small(self) -> int:
        return self.organizations - 1

    @property
    def wide(self) -> int:
        """The organization with `wide_users` users (breakdowns of many members)."""
        return 1

    def users_of(self, organization: int) -> int:
        return self.wide_users if organization == self.wide else self.users_per_organization

    @property
    def large_partner(self) -> str:
        return _seedlike_id(self.seed, "partner", "large")

    def in_large_partner(self, organization: int) -> bool:
        return organization >= self.organizations - self.large_partner_organizations

    def fingerprint(self, schema_revision: str) -> dict[str, Any]:
        fields = asdict(self) | {"start": self.start.isoformat()}
        return fields | {"generator": GENERATOR_VERSION, "schema_revision": schema_revision}


def _seedlike_id(seed: int, *parts: object) -> str:
    """An id shaped like the seed's: `<epoch milliseconds>x<18 digits>`."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    value = int.from_bytes(digest[:16], "big")
    return f"{1_700_000_000_000 + value % 60_000_000_000}x{value // 10**12 % 10**18:018d}"


@dataclass(frozen=True)
class Organization:
    index: int
    id: str
    partner_id: str | None
    users: tuple[str, ...]


def organizations(params: Params) -> list[Organization]:
    partners = [_seedlike_id(params.seed, "partner", p) for p in range(20)]
    return [
        Organization(
            index=o,
            id=_seedlike_id(params.seed, "org", o),
            # The last ones belong to the large partner; of the others, four in five come
            # through a partner.
            partner_id=params.large_partner
            if params.in_large_partner(o)
            else partners[o % 25]
            if o % 25 < 20
            else None,
            users=tuple(_seedlike_id(params.seed, "user", o, u) for u in range(params.users_of(o))),
        )
        for o in range(params.organizations)
    ]


def _draw(params: Params, k: int) -> str:
    """SQL for the k-th uniform draw in [0, 1) of event `i`."""
    mask, scale = (1 << 48) - 1, 1 << 48
    return f"((hashint8extended(i, {params.seed * 64 + k}) & {mask})::float8 / {scale})"


def _hour_table() -> str:
    """1000 slots, each an hour of the day, in proportion to HOUR_WEIGHTS."""
    total = sum(HOUR_WEIGHTS)
    bounds = [sum(HOUR_WEIGHTS[: h + 1]) / total for h in range(24)]
    slots = [next(h for h, b in enumerate(bounds) if (s + 0.5) / 1000 < b) for s in range(1000)]
    return "ARRAY[" + ",".join(map(str, slots)) + "]"


def events_sql(params: Params) -> str:
    """INSERT of events number $1 to $2 (inclusive)."""
    busy, other = params.busy_share, params.organizations - 1
    r = [_draw(params, k) for k in range(9)]
    return f"""
INSERT INTO usage_events (organization_id, id, user_id, type, direction, segments, seconds,
                          knowledge_base, occurred_at, recorded_at)
SELECT o.id, 'e' || d.i, u.id, d.type, d.direction,
       CASE WHEN d.type = 'sms' THEN
                CASE WHEN d.q < 0.75 THEN 1 WHEN d.q < 0.92 THEN 2 WHEN d.q < 0.97 THEN 3
                     ELSE 4 + floor((d.q - 0.97) / 0.03 * 7)::int END
            WHEN d.type = 'mms' THEN CASE WHEN d.q < 0.9 THEN 1 ELSE 2 END END,
       CASE WHEN d.type = 'voice' THEN least(floor(-150 * ln(1 - d.q)), 7200)::int END,
       d.type = 'voice' AND d.kb,
       d.at, d.at + interval '2 seconds'
FROM (
    SELECT i,
           CASE WHEN {r[0]} < {busy} THEN 0
                ELSE 1 + least(floor({other} * (({r[0]} - {busy}) / {1 - busy}) ^ 2)::int,
                               {other - 1}) END AS org,
           CASE WHEN {r[1]} < {params.no_user_share} THEN NULL
                ELSE ({r[1]} - {params.no_user_share}) / {1 - params.no_user_share}
                END AS user_draw,
           CASE WHEN {r[2]} < 0.70 THEN 'sms' WHEN {r[2]} < 0.82 THEN 'mms' ELSE 'voice' END
               AS type,
           CASE WHEN {r[3]} < CASE WHEN {r[2]} < 0.70 THEN 0.62
                                   WHEN {r[2]} < 0.82 THEN 0.55 ELSE 0.5 END
                THEN 'outbound' ELSE 'inbound' END AS direction,
           {r[4]} AS q,
           {r[5]} < 0.3 AS kb,
           TIMESTAMPTZ '{params.start.isoformat()}'
               + floor({r[6]} * {params.days}) * interval '1 day'
               + ({_hour_table()})[1 + floor({r[7]} * 1000)::int] * interval '1 hour'
               + {r[8]} * interval '1 hour' AS at
    FROM generate_series($1::bigint, $2::bigint) AS i
) d
JOIN bench.organization_index o ON o.idx = d.org
-- No user when user_draw is NULL; else one of the organization's own number of users.
LEFT JOIN bench.user_index u
    ON u.org = d.org AND u.slot = least(floor(d.user_draw * o.users)::int, o.users - 1)
"""


# Hourly roll-ups of [$1, $2): per user, and per organization (GROUPING SETS' empty set).
_HOURLY = f"""
INSERT INTO usage_hourly (organization_id, user_id, hour_at, {METRIC_LIST})
SELECT organization_id, CASE WHEN grouping(user_id) = 1 THEN '' ELSE user_id END, hour_at,
       {event_sums()}
FROM (SELECT *, date_trunc('hour', occurred_at, 'UTC') AS hour_at FROM usage_events
      WHERE occurred_at >= $1 AND occurred_at < $2) e
GROUP BY organization_id, hour_at, GROUPING SETS ((user_id), ())
HAVING grouping(user_id) = 1 OR user_id IS NOT NULL
"""
_DAILY = f"""
INSERT INTO usage_daily (organization_id, user_id, day, {METRIC_LIST})
SELECT organization_id, user_id, (hour_at AT TIME ZONE 'UTC')::date, {ROW_SUMS}
FROM usage_hourly WHERE hour_at >= $1 AND hour_at < $2
GROUP BY 1, 2, 3
"""
_COUNTERS = f"""
INSERT INTO usage_counters (organization_id, user_id, {METRIC_LIST})
SELECT organization_id, user_id, {ROW_SUMS} FROM usage_daily GROUP BY 1, 2
"""
# Partner and monthly roll-ups from the organizations' own rows from $1 on, as the fold
# keeps them.
_PARTNER_AND_MONTHLY = [
    f"""
INSERT INTO {table} (partner_id, {unit}, {METRIC_LIST})
SELECT o.partner_id, r.{unit}, {ROW_SUMS} FROM {source} r
JOIN organizations o ON o.id = r.organization_id
WHERE r.user_id = '' AND o.partner_id IS NOT NULL AND r.{unit} >= $1
GROUP BY 1, 2
"""
    for table, source, unit in (
        ("partner_hourly", "usage_hourly", "hour_at"),
        ("partner_daily", "usage_daily", "day"),
    )
] + [
    f"""
INSERT INTO organization_monthly (organization_id, month, {METRIC_LIST})
SELECT organization_id, date_trunc('month', day::timestamp)::date, {ROW_SUMS} FROM usage_daily
WHERE user_id = '' AND day >= $1::timestamptz::date
GROUP BY 1, 2
"""
]


@dataclass(frozen=True)
class Built:
    fingerprint: dict[str, Any]
    seconds: float
    reused: bool


class _Timer:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.steps: list[tuple[str, float]] = []

    def step(self, name: str, since: float) -> None:
        seconds = round(time.perf_counter() - since, 1)
        self.steps.append((name, seconds))
        log(f"  {name}: {seconds:.1f} s")


async def _in_parallel(
    pool: asyncpg.Pool, jobs: list[Callable[[asyncpg.Connection], Awaitable[Any]]]
) -> None:
    """Run the jobs over the pool's connections, a job queue for each connection."""
    queue = list(reversed(jobs))

    async def worker() -> None:
        async with pool.acquire() as conn:
            while queue:
                await queue.pop()(conn)

    await asyncio.gather(*(worker() for _ in range(pool.get_max_size())))


async def _session(conn: asyncpg.Connection) -> None:
    # Bulk load only: a crash mid-way just means generating again.
    await conn.execute(
        "SET synchronous_commit = off; SET work_mem = '512MB';"
        " SET max_parallel_maintenance_workers = 0; SET statement_timeout = 0"
    )


async def stored_fingerprint(conn: asyncpg.Connection) -> tuple[dict[str, Any] | None, bool]:
    exists = await conn.fetchval("SELECT to_regclass('bench.dataset') IS NOT NULL")
    if not exists:
        return None, False
    row = await conn.fetchrow("SELECT fingerprint, dirty FROM bench.dataset")
    if row is None:
        return None, False
    return json.loads(row["fingerprint"]), bool(row["dirty"])


async def _refuse_foreign_database(conn: asyncpg.Connection) -> None:
    has_bench = await conn.fetchval("SELECT to_regclass('bench.dataset') IS NOT NULL")
    has_table = await conn.fetchval("SELECT to_regclass('public.organizations') IS NOT NULL")
    has_data = has_table and await conn.fetchval("SELECT EXISTS (SELECT FROM organizations)")
    if has_data and not has_bench:
        raise SystemExit(
            "the benchmark database already holds organizations that the benchmark did not"
            " generate; refusing to wipe it (point BENCH_DATABASE_URL at a scratch database)"
        )


async def _save_and_drop_indexes(conn: asyncpg.Connection) -> list[list[str]]:
    """Drop the loaded tables' indexes and constraints; the DDL that recreates them, in
    three stages: indexes, then the keys that adopt them, then foreign keys."""
    indexes, keys, foreign, drops = [], [], [], []
    for table in LOADED_TABLES:
        for row in await conn.fetch(
            "SELECT conname, contype::text AS contype, pg_get_constraintdef(oid) AS definition,"
            " pg_get_indexdef(conindid) AS index FROM pg_constraint"
            " WHERE conrelid = $1::regclass AND contype IN ('p', 'u', 'f')"
            " ORDER BY contype = 'f' DESC",
            table,
        ):
            drops.append(f"ALTER TABLE {table} DROP CONSTRAINT {row['conname']}")
            if row["contype"] == "f":
                foreign.append(
                    f"ALTER TABLE {table} ADD CONSTRAINT {row['conname']} {row['definition']}"
                )
                continue
            # Built as a plain index (no exclusive lock, so builds on one table overlap),
            # then adopted by the constraint.
            indexes.append(row["index"])
            kind = "PRIMARY KEY" if row["contype"] == "p" else "UNIQUE"
            keys.append(
                f"ALTER TABLE {table} ADD CONSTRAINT {row['conname']} {kind}"
                f" USING INDEX {row['conname']}"
            )
        for row in await conn.fetch(
            "SELECT indexrelid::regclass::text AS name, pg_get_indexdef(indexrelid) AS index"
            " FROM pg_index WHERE indrelid = $1::regclass"
            " AND NOT EXISTS (SELECT FROM pg_constraint WHERE conindid = indexrelid)",
            table,
        ):
            drops.append(f"DROP INDEX {row['name']}")
            indexes.append(row["index"])
    for statement in drops:
        await conn.execute(statement)
    return [indexes, keys, foreign]


async def _load_directory(conn: asyncpg.Connection, params: Params) -> None:
    orgs = organizations(params)
    partners = sorted({o.partner_id for o in orgs if o.partner_id is not None})
    large = params.large_partner
    await conn.copy_records_to_table(
        "partners",
        records=[
            (p, "Partner large" if p == large else f"Partner {n:02d}")
            for n, p in enumerate(partners)
        ],
        columns=["id", "name"],
    )
    await conn.copy_records_to_table(
        "organizations",
        records=[(o.id, o.partner_id, f"Organization {o.index:04d}") for o in orgs],
        columns=["id", "partner_id", "name"],
    )
    await conn.copy_records_to_table(
        "users",
        records=[
            (o.id, u, f"User {o.index:04d}-{n:02d}", f"user{o.index:04d}.{n:02d}@example.com")
            for o in orgs
            for n, u in enumerate(o.users)
        ],
        columns=["organization_id", "id", "name", "email"],
    )
    await conn.execute(
        "CREATE TABLE bench.organization_index (idx int PRIMARY KEY, id text NOT NULL,"
        " users int NOT NULL);"
        " CREATE TABLE bench.user_index (org int, slot int, id text NOT NULL,"
        " PRIMARY KEY (org, slot))"
    )
    await conn.copy_records_to_table(
        "organization_index",
        schema_name="bench",
        records=[(o.index, o.id, len(o.users)) for o in orgs],
    )
    await conn.copy_records_to_table(
        "user_index",
        schema_name="bench",
        records=[(o.index, n, u) for o in orgs for n, u in enumerate(o.users)],
    )
    await conn.execute("ANALYZE bench.organization_index; ANALYZE bench.user_index")


async def generate(pool: asyncpg.Pool, url: str, params: Params, schema_revision: str) -> Built:
    """Wipe the usage tables and generate the dataset; every step is timed."""
    timer = _Timer()
    fingerprint = params.fingerprint(schema_revision)
    log(f"generating the dataset: {params.events:,} events")
    async with pool.acquire() as conn:
        await _refuse_foreign_database(conn)
        at = time.perf_counter()
        # The empty table marks the database as the benchmark's even if this run dies.
        await conn.execute(
            "DROP SCHEMA IF EXISTS bench CASCADE; CREATE SCHEMA bench;"
            " CREATE TABLE bench.dataset (fingerprint jsonb NOT NULL, dirty boolean NOT NULL,"
            " seconds float8 NOT NULL, steps jsonb NOT NULL,"
            " generated_at timestamptz NOT NULL DEFAULT now())"
        )
        # A fresh schema: an earlier generation may have died with its indexes dropped.
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"DROP TABLE {names} CASCADE")
        # And the schema's own functions (a trigger's), not those of extensions.
        functions = await conn.fetch(
            "SELECT p.oid::regprocedure::text AS name FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND NOT EXISTS (SELECT FROM pg_depend d"
            " WHERE d.objid = p.oid AND d.deptype = 'e')"
        )
        for function in functions:
            await conn.execute(f"DROP FUNCTION {function['name']} CASCADE")
    await asyncio.to_thread(migrate_to_head, url)
    async with pool.acquire() as conn:
        await _load_directory(conn, params)
        ddl = await _save_and_drop_indexes(conn)
        timer.step("schema, directory, dropping indexes", at)

    at = time.perf_counter()
    insert = events_sql(params)
    chunks = [(lo, min(lo + CHUNK - 1, params.events)) for lo in range(1, params.events + 1, CHUNK)]
    done = 0

    def chunk_job(lo: int, hi: int) -> Callable[[asyncpg.Connection], Awaitable[None]]:
        async def job(conn: asyncpg.Connection) -> None:
            nonlocal done
            await _session(conn)
            await conn.execute(insert, lo, hi)
            done += hi - lo + 1
            if len(chunks) > 4:
                log(f"    {done:,} / {params.events:,} events")

        return job

    await _in_parallel(pool, [chunk_job(lo, hi) for lo, hi in chunks])
    timer.step("events", at)

    # Split by time at a day boundary: no roll-up row spans both halves.
    middle = params.start + timedelta(days=params.days // 2)
    halves = [(params.start, middle), (middle, params.end)]
    for name, sql in (("hourly roll-ups", _HOURLY), ("daily roll-ups", _DAILY)):
        at = time.perf_counter()

        def rollup_job(
            lo: datetime, hi: datetime, sql: str = sql
        ) -> Callable[[asyncpg.Connection], Awaitable[None]]:
            async def job(conn: asyncpg.Connection) -> None:
                await _session(conn)
                await conn.execute(sql, lo, hi)

            return job

        await _in_parallel(pool, [rollup_job(lo, hi) for lo, hi in halves])
        timer.step(name, at)
    at = time.perf_counter()
    async with pool.acquire() as conn:
        await _session(conn)
        await conn.execute(_COUNTERS)
        for sql in _PARTNER_AND_MONTHLY:
            await conn.execute(sql, params.start)
    timer.step("counters, partner and monthly roll-ups", at)

    for stage, statements in zip(("indexes", "primary keys", "foreign keys"), ddl, strict=True):
        at = time.perf_counter()

        def ddl_job(statement: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
            async def job(conn: asyncpg.Connection) -> None:
                await _session(conn)
                await conn.execute(statement)

            return job

        await _in_parallel(pool, [ddl_job(s) for s in statements])
        timer.step(stage, at)

    at = time.perf_counter()
    await vacuum(pool)
    timer.step("vacuum analyze", at)

    at = time.perf_counter()
    await verify_counters(pool, params)
    timer.step("verifying counters against the log", at)

    seconds = round(time.perf_counter() - timer.started, 1)
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO bench.dataset (fingerprint, dirty, seconds, steps)"
            " VALUES ($1, false, $2, $3)",
            json.dumps(fingerprint),
            seconds,
            json.dumps(timer.steps),
        )
    log(f"dataset generated in {seconds:.0f} s")
    return Built(fingerprint, seconds, reused=False)


async def vacuum(pool: asyncpg.Pool) -> None:
    """VACUUM ANALYZE: statistics, and the visibility map that index-only scans need."""

    def job(table: str) -> Callable[[asyncpg.Connection], Awaitable[None]]:
        async def run(conn: asyncpg.Connection) -> None:
            await conn.execute("SET maintenance_work_mem = '1GB'")
            await conn.execute(f"VACUUM (ANALYZE) {table}")

        return run

    tables = (*LOADED_TABLES, "usage_deltas", "users", "organizations", "partners", "api_keys")
    await _in_parallel(pool, [job(t) for t in tables])


async def verify_counters(pool: asyncpg.Pool, params: Params, every: bool = False) -> int:
    """Counter rows (organization and users) that differ from the log's sums.

    The busy, the small and a few other organizations, or every organization.
    """
    orgs = organizations(params)
    chosen = (
        [o.id for o in orgs]
        if every
        else [orgs[i].id for i in sorted({params.busy, 1, len(orgs) // 2, params.small})]
    )
    sums = ", ".join(f"log_{m}" for m in METRICS)
    query = f"""
WITH log AS (
    SELECT organization_id, CASE WHEN grouping(user_id) = 1 THEN '' ELSE user_id END AS user_id,
           {event_sums("log_")}
    FROM usage_events WHERE organization_id = ANY($1::text[])
    GROUP BY organization_id, GROUPING SETS ((user_id), ())
    HAVING grouping(user_id) = 1 OR user_id IS NOT NULL
),
counters AS (SELECT * FROM usage_counters WHERE organization_id = ANY($1::text[]))
SELECT count(*) FROM log FULL JOIN counters USING (organization_id, user_id)
WHERE ({sums}) IS DISTINCT FROM ({METRIC_LIST})
"""
    async with pool.acquire() as conn:
        await conn.execute("SET work_mem = '256MB'")
        mismatches: int = await conn.fetchval(query, chosen)
    if mismatches and not every:
        raise RuntimeError(f"{mismatches} counter rows differ from the log after generation")
    return mismatches


async def restore(pool: asyncpg.Pool, params: Params) -> None:
    """Remove what the ingestion scenarios added (all of it after the dataset's year)."""
    log("removing the events the last run's ingestion added")
    ids = [o.id for o in organizations(params)]
    async with pool.acquire() as conn:
        await _session(conn)
        async with conn.transaction():
            await conn.execute(
                "DELETE FROM usage_events WHERE organization_id = ANY($1::text[])"
                " AND occurred_at >= $2",
                ids,
                params.end,
            )
            await conn.execute("DELETE FROM usage_deltas")
            await conn.execute(
                "DELETE FROM usage_hourly WHERE organization_id = ANY($1::text[])"
                " AND hour_at >= $2",
                ids,
                params.end,
            )
            await conn.execute(
                "DELETE FROM usage_daily WHERE organization_id = ANY($1::text[]) AND day >= $2",
                ids,
                params.end.date(),
            )
            await conn.execute("TRUNCATE usage_counters")
            # The ingest scenario's floor tables.
            await conn.execute("DROP TABLE IF EXISTS floor_events, floor_deltas")
            await conn.execute(_COUNTERS)
            await conn.execute("DELETE FROM partner_hourly WHERE hour_at >= $1", params.end)
            await conn.execute("DELETE FROM partner_daily WHERE day >= $1", params.end.date())
            month = params.end.date().replace(day=1)
            await conn.execute("DELETE FROM organization_monthly WHERE month >= $1", month)
            await conn.execute(
                _PARTNER_AND_MONTHLY[2], datetime(month.year, month.month, 1, tzinfo=UTC)
            )
            await conn.execute("UPDATE bench.dataset SET dirty = false")
    await vacuum(pool)
    await verify_counters(pool, params)


async def mark_dirty(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute("UPDATE bench.dataset SET dirty = true")


async def ensure(pool: asyncpg.Pool, url: str, params: Params, schema_revision: str) -> Built:
    """The dataset for `params`: the stored one when it matches, else a new one."""
    async with pool.acquire() as conn:
        stored, dirty = await stored_fingerprint(conn)
    wanted = params.fingerprint(schema_revision)
    if stored != wanted:
        if stored is not None:
            log("the stored dataset was made with other parameters; generating again")
        return await generate(pool, url, params, schema_revision)
    if dirty:
        await restore(pool, params)
    async with pool.acquire() as conn:
        seconds = await conn.fetchval("SELECT seconds FROM bench.dataset")
    log("reusing the stored dataset")
    return Built(wanted, float(seconds), reused=True)


async def describe(pool: asyncpg.Pool, params: Params) -> dict[str, Any]:
    """Row counts and sizes of the tables, and the busy and small organizations' events."""
    orgs = organizations(params)
    async with pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT relname AS table, reltuples::bigint AS rows,"
            " pg_total_relation_size(oid) AS bytes FROM pg_class"
            " WHERE relname = ANY($1::text[]) AND relkind = 'r' ORDER BY bytes DESC",
            [*LOADED_TABLES, "usage_deltas", "users", "organizations"],
        )
        steps = await conn.fetchval("SELECT steps FROM bench.dataset")
        per_org = {
            name: await conn.fetchval(
                "SELECT count(*) FROM usage_events WHERE organization_id = $1 AND occurred_at < $2",
                orgs[index].id,
                params.end,
            )
            for name, index in (("busy", params.busy), ("small", params.small))
        }
        database_bytes = await conn.fetchval("SELECT pg_database_size(current_database())")
    return {
        "tables": [dict(t) for t in tables],
        "steps": json.loads(steps) if steps else [],
        "events_per_org": per_org,
        "database_bytes": database_bytes,
    }
