"""The `series` scenario: series, breakdowns and partner totals over HTTP, one request at a
time, beside the naive GROUP BY over the raw log (asyncpg, no HTTP) on the same data; then
random series and breakdowns checked bucket by bucket and row by row against raw sums."""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from bench.dataset import event_sums
from bench.loadgen import percentile
from bench.scenarios import Context
from bench.servers import load, log
from usage_api.analytics.totals import metrics_of
from usage_api.models import METRICS

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Havana",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
)
SORTS = ("id", "name", "-sms.total", "sms.outbound", "-voice.total_seconds", "mms.inbound")
_SUMS = event_sums()


def _sort_value(sort: str, metrics: tuple[int, ...]) -> int:
    """The value a metric sort orders by, from METRICS-ordered sums."""
    name = sort.lstrip("-")
    if name == "voice.total_seconds":
        return metrics[4] + metrics[5]
    kind, _, field = name.partition(".")
    if field == "total":
        return (
            metrics[METRICS.index(f"{kind}_outbound")] + metrics[METRICS.index(f"{kind}_inbound")]
        )
    return metrics[METRICS.index(name.replace(".", "_"))]


@dataclass(frozen=True)
class Naive:
    """A naive query and its arguments."""

    sql: str
    args: tuple[Any, ...]


def _local_range(first: date, last: date, zone: str) -> tuple[datetime, datetime]:
    """[local midnight of `first`, local midnight after `last`) in UTC."""
    tz = ZoneInfo(zone)
    start = datetime(first.year, first.month, first.day, tzinfo=tz).astimezone(UTC)
    after = last + timedelta(days=1)
    return start, datetime(after.year, after.month, after.day, tzinfo=tz).astimezone(UTC)


def _naive_series(where: str, unit: str, zone: str) -> str:
    return (
        f"SELECT date_trunc('{unit}', occurred_at, '{zone}') AS bucket, {_SUMS}"
        f" FROM usage_events WHERE {where} AND occurred_at >= $2 AND occurred_at < $3"
        " GROUP BY 1 ORDER BY 1"
    )


def _order(sort: str, column: str) -> str:
    if sort in ("id", "name"):
        return column
    descending = sort.startswith("-")
    metric = sort.lstrip("-").replace(".", "_")
    if metric.endswith("_total"):
        kind = metric.removesuffix("_total")
        expression = f"{kind}_outbound + {kind}_inbound"
    elif metric == "voice_total_seconds":
        expression = "voice_seconds + voice_kb_seconds"
    else:
        expression = metric
    return f"{expression} {'DESC' if descending else 'ASC'}, {column}"


def _naive_breakdown(where: str, column: str, sort: str, offset: int) -> str:
    return (
        f"SELECT * FROM (SELECT {column}, {_SUMS} FROM usage_events WHERE {where}"
        f" AND occurred_at >= $2 AND occurred_at < $3 GROUP BY {column}) g"
        f" ORDER BY {_order(sort, column)} LIMIT 100 OFFSET {offset}"
    )


async def _last_page(client: httpx.AsyncClient, query: dict[str, str]) -> tuple[str, int]:
    """The path of the last page of a breakdown (walked with its cursors) and the rows before it."""
    path = f"/v1/analytics/usage/breakdown?{urlencode(query)}"
    before = 0
    while True:
        response = await client.get(path)
        response.raise_for_status()
        page = response.json()["breakdown"]
        if page["next_cursor"] is None:
            return path, before
        before += len(page["rows"])
        path = f"/v1/analytics/usage/breakdown?{urlencode(query | {'cursor': page['next_cursor']})}"


# The series cases: (label, granularity, zone, first local day, last local day).
SERIES_CASES = (
    *(
        (f"365-day daily, busy org, {zone}", "day", zone, date(2025, 1, 1), date(2025, 12, 31))
        for zone in ("UTC", "America/New_York", "Asia/Kolkata")
    ),
    (
        "31-day hourly, busy org, Europe/Berlin",
        "hour",
        "Europe/Berlin",
        date(2025, 3, 10),
        date(2025, 4, 9),
    ),
    (
        "52 weeks, busy org, America/New_York",
        "week",
        "America/New_York",
        date(2024, 12, 30),
        date(2025, 12, 28),
    ),
    (
        "12 months, busy org, America/New_York",
        "month",
        "America/New_York",
        date(2025, 1, 1),
        date(2025, 12, 31),
    ),
)


def series_path(organization_id: str, unit: str, zone: str, first: date, last: date) -> str:
    query = {
        "organization_id": organization_id,
        "start_date": first.isoformat(),
        "end_date": last.isoformat(),
        "timezone": zone,
        "granularity": unit,
    }
    return f"/v1/analytics/usage?{urlencode(query)}"


async def _cases(ctx: Context, client: httpx.AsyncClient) -> list[tuple[str, str, Naive]]:
    busy, wide = ctx.busy.id, ctx.orgs[ctx.params.wide].id
    partner = ctx.params.large_partner
    members = [o.id for o in ctx.orgs if o.partner_id == partner]
    year_first, year_last = date(2025, 1, 1), date(2025, 12, 31)
    cases: list[tuple[str, str, Naive]] = []
    for label, unit, zone, first, last in SERIES_CASES:
        start, end = _local_range(first, last, zone)
        naive = Naive(_naive_series("organization_id = $1", unit, zone), (busy, start, end))
        cases.append((label, series_path(busy, unit, zone, first, last), naive))

    start, end = _local_range(date(2025, 6, 1), date(2025, 6, 30), "UTC")
    sort = "-sms.total"
    query = {
        "organization_id": wide,
        "start_date": "2025-06-01",
        "end_date": "2025-06-30",
        "sort": sort,
    }
    last_path, before = await _last_page(client, query)
    for label, path, offset in (
        (
            "breakdown, 10,000-user org, 30 days, first page",
            f"/v1/analytics/usage/breakdown?{urlencode(query)}",
            0,
        ),
        ("breakdown, 10,000-user org, 30 days, last page", last_path, before),
    ):
        # The naive query cannot list users without usage; it pages over those with some.
        naive = Naive(
            _naive_breakdown("organization_id = $1", "user_id", sort, min(offset, 10_000 - 100)),
            (wide, start, end),
        )
        cases.append((label, path, naive))

    start, end = _local_range(year_first, year_last, "UTC")
    year = {"partner_id": partner, "start_date": "2025-01-01", "end_date": "2025-12-31"}
    in_partner = "organization_id = ANY($1::text[])"
    cases.append(
        (
            "breakdown, 500-org partner, 365 days, first page",
            f"/v1/analytics/usage/breakdown?{urlencode(year | {'sort': sort})}",
            Naive(_naive_breakdown(in_partner, "organization_id", sort, 0), (members, start, end)),
        )
    )
    cases.append(
        (
            "total, 500-org partner, 365 days",
            f"/v1/analytics/usage?{urlencode(year)}",
            Naive(
                f"SELECT {_SUMS} FROM usage_events WHERE {in_partner}"
                " AND occurred_at >= $2 AND occurred_at < $3",
                (members, start, end),
            ),
        )
    )
    return cases


BASELINE = " (baseline)"


async def timings(ctx: Context, port: int, baseline_port: int | None = None) -> dict[str, Any]:
    """p50/p99 of each case over HTTP beside its naive query. With `baseline_port` (another
    checkout's API on the same database), every request also goes there, right after or
    right before (in turn), so that both are timed in the same conditions."""
    passes, naive_samples = (10, 3) if ctx.quick else (30, 5)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ctx.read_key}, timeout=120
    ) as client:
        cases = await _cases(ctx, client)
    requests: list[list[Any]] = []
    for i, (label, path, _) in enumerate(cases):
        pair = [[label, path, port]]
        if baseline_port is not None:
            pair.append([label + BASELINE, path, baseline_port])
        requests += pair if i % 2 == 0 else pair[::-1]
    log(f"series: {len(requests)} requests x {passes} passes over HTTP, one at a time")
    await ctx.cpu.wait_quiet()
    since = ctx.cpu.sample()
    http = await load(
        {
            "host": "127.0.0.1",
            "headers": {"X-API-Key": ctx.read_key},
            "requests": requests,
            "connections": 1,
            "warmup_passes": 2,
            "passes": passes,
        }
    )
    http_cpu = ctx.cpu.usage(since)
    log(f"series: the naive queries, {naive_samples} runs each")
    since = ctx.cpu.sample()
    rows = []
    async with ctx.pool.acquire() as conn:
        for label, _, naive in cases:
            await conn.fetch(naive.sql, *naive.args)  # warm
            samples = []
            for _ in range(naive_samples):
                began = time.perf_counter()
                await conn.fetch(naive.sql, *naive.args)
                samples.append((time.perf_counter() - began) * 1000)
            api = http["labels"][label]
            naive_p50 = percentile(samples, 0.5)
            baseline = http["labels"].get(label + BASELINE)
            if baseline is not None:
                rows.append(
                    {
                        "case": label + BASELINE,
                        "api_p50_ms": baseline["p50_ms"],
                        "api_p99_ms": baseline["p99_ms"],
                        "api_errors": baseline["errors"],
                        "requests": baseline["count"],
                        "naive_p50_ms": naive_p50,
                        "naive_p99_ms": percentile(samples, 0.99),
                        "naive_samples": len(samples),
                        "speedup": naive_p50 / baseline["p50_ms"],
                    }
                )
            rows.append(
                {
                    "case": label,
                    "api_p50_ms": api["p50_ms"],
                    "api_p99_ms": api["p99_ms"],
                    "api_errors": api["errors"],
                    "requests": api["count"],
                    "naive_p50_ms": naive_p50,
                    "naive_p99_ms": percentile(samples, 0.99),
                    "naive_samples": len(samples),
                    "speedup": naive_p50 / api["p50_ms"],
                }
            )
    return {
        "cells": rows,
        "error_samples": http["error_samples"],
        "cpu": {"http": http_cpu, "naive": ctx.cpu.usage(since)},
    }


# ---------------------------------------------------------------- exactness


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _entity(ctx: Context, rng: random.Random) -> tuple[dict[str, str], str, tuple[Any, ...]]:
    """A random organization, user or partner: its query and the raw log's WHERE."""
    kind = rng.random()
    org = ctx.busy if rng.random() < 0.3 else rng.choice(ctx.orgs)
    if kind < 0.4:
        return {"organization_id": org.id}, "organization_id = $1", (org.id,)
    if kind < 0.8:
        user = rng.choice(org.users)
        return (
            {"user_id": user},
            "organization_id = $1 AND user_id = $2",
            (org.id, user),
        )
    partner = rng.choice(sorted({o.partner_id for o in ctx.orgs if o.partner_id}))
    members = [o.id for o in ctx.orgs if o.partner_id == partner]
    return {"partner_id": partner}, "organization_id = ANY($1::text[])", (members,)


def _range(rng: random.Random, longest: timedelta) -> tuple[datetime, datetime]:
    """A range starting at a random microsecond around the dataset's year."""
    lo = datetime(2024, 12, 1, tzinfo=UTC)
    start = lo + timedelta(microseconds=rng.randrange(int(400 * 86400 * 1e6)))
    length = timedelta(seconds=rng.uniform(60, longest.total_seconds()))
    return start, start + length


_LONGEST = {
    "hour": timedelta(days=40),
    "day": timedelta(days=400),
    "week": timedelta(days=420),
    "month": timedelta(days=420),
}


async def _bucket_sums(
    conn: asyncpg.Connection,
    where: str,
    args: tuple[Any, ...],
    bounds: list[tuple[datetime, datetime]],
) -> list[tuple[int, ...]]:
    n = len(args)
    rows = await conn.fetch(
        f"SELECT b.n, {event_sums()} FROM unnest(${n + 1}::timestamptz[], ${n + 2}::timestamptz[])"
        f" WITH ORDINALITY AS b(lo, hi, n) LEFT JOIN usage_events ON {where}"
        " AND occurred_at >= b.lo AND occurred_at < b.hi GROUP BY b.n ORDER BY b.n",
        *args,
        [lo for lo, _ in bounds],
        [hi for _, hi in bounds],
    )
    return [tuple(int(r[m]) for m in METRICS) for r in rows]


async def series_exactness(ctx: Context, port: int, count: int) -> dict[str, Any]:
    """Random series (entity, zone, granularity, range to the microsecond): buckets
    contiguous and covering the range, each starting where its zone's unit starts, each equal
    to the raw log's sum over it, and the totals equal to the buckets' sums."""
    rng = random.Random(f"{ctx.params.seed}:series")
    mismatches: list[str] = []
    buckets_checked = 0
    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ctx.read_key}, timeout=120
        ) as client,
        ctx.pool.acquire() as conn,
    ):
        for _ in range(count):
            query, where, args = _entity(ctx, rng)
            unit = rng.choice(("hour", "day", "day", "week", "month"))
            zone = rng.choice(ZONES)
            start, end = _range(rng, _LONGEST[unit])
            # end_date is inclusive: the last microsecond of the range.
            query = query | {
                "start_date": _stamp(start),
                "end_date": _stamp(end - timedelta(microseconds=1)),
                "timezone": zone,
                "granularity": unit,
            }
            response = await client.get("/v1/analytics/usage", params=query)
            if response.status_code != 200:
                mismatches.append(
                    f"{urlencode(query)}: {response.status_code} {response.text[:200]}"
                )
                continue
            usage = response.json()["usage"]
            bounds = [
                (datetime.fromisoformat(b["start"]), datetime.fromisoformat(b["end"]))
                for b in usage["buckets"]
            ]
            problems = []
            if bounds[0][0] != start or bounds[-1][1] != end:
                problems.append("buckets do not cover the range")
            if any(a[1] != b[0] for a, b in itertools.pairwise(bounds)):
                problems.append("buckets not contiguous")
            tz = ZoneInfo(zone)
            for lo, _ in bounds[1:]:
                local = lo.astimezone(tz)
                before = (lo - timedelta(microseconds=1)).astimezone(tz)
                if local.utcoffset() != lo.utcoffset():
                    problems.append(f"{lo} not labelled with the zone's offset")
                elif unit == "hour":
                    # An hour starts at HH:00 or where the offset changes.
                    on_hour = (local.minute, local.second, local.microsecond) == (0, 0, 0)
                    if not on_hour and before.utcoffset() == local.utcoffset():
                        problems.append(f"{lo} is not the start of a local hour")
                # A day starts at local midnight or, where there is none, at its first instant.
                elif before.date() == local.date():
                    problems.append(f"{lo} is not the start of a local day")
                elif unit == "week" and local.weekday() != 0:
                    problems.append(f"{lo} is not a Monday")
                elif unit == "month" and local.day != 1:
                    problems.append(f"{lo} is not the first of a month")
            got = [metrics_of(b) for b in usage["buckets"]]
            expected = await _bucket_sums(conn, where, args, bounds)
            buckets_checked += len(bounds)
            wrong = sum(1 for g, e in zip(got, expected, strict=True) if g != e)
            if wrong:
                problems.append(f"{wrong} of {len(got)} buckets differ from the log")
            totals = tuple(sum(column) for column in zip(*got, strict=True))
            if metrics_of(usage) != totals:
                problems.append("totals are not the buckets' sums")
            if problems:
                mismatches.append(f"{urlencode(query)}: {'; '.join(problems[:3])}")
    return {
        "series": count,
        "buckets": buckets_checked,
        "mismatches": len(mismatches),
        "examples": mismatches[:5],
    }


async def breakdown_exactness(ctx: Context, port: int, count: int) -> dict[str, Any]:
    """Random breakdowns (organization or partner, random range, sort and limit), walked
    to the last page: every member exactly once, each row equal to the raw log's sum, rows
    in the sort's order, and the rows adding up to the parent's total."""
    rng = random.Random(f"{ctx.params.seed}:breakdowns")
    partners = sorted({o.partner_id for o in ctx.orgs if o.partner_id})
    mismatches: list[str] = []
    pages = 0
    async with (
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": ctx.read_key}, timeout=120
        ) as client,
        ctx.pool.acquire() as conn,
    ):
        for n in range(count):
            pick = rng.random()
            args: tuple[Any, ...]
            if pick < 0.4 or n == 0:
                partner = ctx.params.large_partner if n == 0 or pick < 0.1 else rng.choice(partners)
                members = {o.id for o in ctx.orgs if o.partner_id == partner}
                query = {"partner_id": partner}
                where, args, column = (
                    "organization_id = ANY($1::text[])",
                    (sorted(members),),
                    "organization_id",
                )
                member_ids: set[str | None] = set(members)
            else:
                org = (
                    ctx.orgs[ctx.params.wide]
                    if pick < 0.5 or n == 1
                    else (ctx.busy if pick < 0.6 else rng.choice(ctx.orgs))
                )
                query = {"organization_id": org.id}
                where, args, column = "organization_id = $1", (org.id,), "user_id"
                member_ids = set(org.users)
            start, end = _range(rng, timedelta(days=400))
            sort = rng.choice(SORTS)
            query |= {
                "start_date": _stamp(start),
                "end_date": _stamp(end - timedelta(microseconds=1)),
                "sort": sort,
                "limit": str(rng.choice((1000, 1000, 250, 100))),
            }
            rows: list[dict[str, Any]] = []
            parent: tuple[int, ...] | None = None
            cursor: str | None = None
            failed = None
            while True:
                response = await client.get(
                    "/v1/analytics/usage/breakdown",
                    params=query | ({"cursor": cursor} if cursor else {}),
                )
                pages += 1
                if response.status_code != 200:
                    failed = f"{response.status_code} {response.text[:200]}"
                    break
                page = response.json()["breakdown"]
                parent = parent or metrics_of(page)
                rows.extend(page["rows"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            if failed:
                mismatches.append(f"{urlencode(query)}: {failed}")
                continue
            log_rows = await conn.fetch(
                f"SELECT {column} AS member, {event_sums()} FROM usage_events WHERE {where}"
                f" AND occurred_at >= ${len(args) + 1} AND occurred_at < ${len(args) + 2}"
                f" GROUP BY {column}",
                *args,
                start,
                end,
            )
            expected = {r["member"]: tuple(int(r[m]) for m in METRICS) for r in log_rows}
            zero = (0,) * len(METRICS)
            got = {row[column]: metrics_of(row) for row in rows}
            problems = []
            if len(got) != len(rows):
                problems.append("a member listed twice")
            # Users listed: all of them, and the no-user row whenever it is not zero.
            wanted = member_ids | ({None} if expected.get(None, zero) != zero else set())
            if set(got) - {None} != member_ids or (None in wanted) != (None in got):
                problems.append(f"members: {len(got)} listed, {len(wanted)} expected")
            wrong = sum(1 for k, v in got.items() if v != expected.get(k, zero))
            if wrong:
                problems.append(f"{wrong} rows differ from the log")
            if parent != tuple(sum(c) for c in zip(*got.values(), strict=True)):
                problems.append("rows do not add up to the parent's total")
            # Metric, then id ascending (the row without a user is left out of the check).
            listed = [(metrics_of(r), r[column]) for r in rows if r[column] is not None]
            if sort == "id":
                keys: list[tuple[int, str]] = [(0, i) for _, i in listed]
            elif sort == "name":
                keys = []
            else:
                sign = -1 if sort.startswith("-") else 1
                keys = [(sign * _sort_value(sort, m), i) for m, i in listed]
            if keys != sorted(keys):
                problems.append("rows not in the sort's order")
            if problems:
                mismatches.append(f"{urlencode(query)}: {'; '.join(problems)}")
    return {
        "breakdowns": count,
        "pages": pages,
        "mismatches": len(mismatches),
        "examples": mismatches[:5],
    }


# ---------------------------------------------------------------- report

# The p50 targets per case (ms); every case must also be 20x its naive query.
_TARGETS = {
    "365-day daily, busy org, UTC": 10.0,
    "365-day daily, busy org, America/New_York": 10.0,
    "365-day daily, busy org, Asia/Kolkata": 50.0,
    "31-day hourly, busy org, Europe/Berlin": 10.0,
    "breakdown, 10,000-user org, 30 days, first page": 50.0,
    "breakdown, 10,000-user org, 30 days, last page": 50.0,
    "breakdown, 500-org partner, 365 days, first page": 50.0,
    "total, 500-org partner, 365 days": 20.0,
}
SPEEDUP_TARGET = 20.0


def _verdict(cell: dict[str, Any]) -> str:
    misses = []
    if cell["case"].endswith(BASELINE):
        return "(the baseline checkout, for comparison)"
    target = _TARGETS.get(cell["case"])
    if target is not None and cell["api_p50_ms"] > target:
        misses.append(f"p50 {cell['api_p50_ms'] / target:.1f}x the {target:g} ms target")
    if cell["speedup"] < SPEEDUP_TARGET:
        misses.append(f"{cell['speedup']:.1f}x < {SPEEDUP_TARGET:g}x")
    goal = (f"<= {target:g} ms, " if target is not None else "") + f">= {SPEEDUP_TARGET:g}x"
    return f"{goal}: " + ("met" if not misses else "MISSED (" + "; ".join(misses) + ")")


def render(result: dict[str, Any]) -> list[str]:
    t = result["timings"]
    rows = [
        [
            c["case"],
            f"{c['api_p50_ms']:.2f} ms",
            f"{c['api_p99_ms']:.2f} ms",
            f"{c['naive_p50_ms']:.1f} ms",
            f"{c['speedup']:.1f}x",
            f"{c['requests']} / {c['api_errors']}",
            _verdict(c),
        ]
        for c in t["cells"]
    ]
    head = "| case | API p50 | API p99 | naive p50 | speedup | requests / errors | target |"
    lines = [head, "|" + "---|" * 7]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    s, b = result["series_exactness"], result["breakdown_exactness"]
    return [
        "",
        "## Series and breakdowns",
        "",
        "One request at a time over HTTP (`usage-api serve`); naive: GROUP BY over raw",
        "`usage_events` (asyncpg, no HTTP) for the same range and buckets or members."
        f" Others' CPU: {t['cpu']['http']['others']:.0%} during the HTTP part,"
        f" {t['cpu']['naive']['others']:.0%} during the naive part.",
        "",
        *lines,
        "",
        f"Exactness: {s['series']} random series ({s['buckets']:,} buckets; 7 zones, 4"
        f" granularities, organizations, users and partners, ranges to the microsecond):"
        f" **{s['mismatches']} mismatches**. {b['breakdowns']} random breakdowns walked to"
        f" the last page ({b['pages']} pages; organizations incl. the 10,000-user one,"
        f" partners incl. the 500-organization one): **{b['mismatches']} mismatches**.",
        *[f"- `{x}`" for x in s["examples"] + b["examples"]],
    ]
