"""The numbers a view shows, each one an answer of the API's own read (`read_usage`, the
function behind `GET /v1/analytics/usage`) for the same question, asked with the
session's key: so the page can never disagree with the API, and sees what the key sees.

The series is cut into local calendar buckets here and each bucket read as a range; a
partner's figures are its organizations' answers added up; an organization's usage
without a user is its total less its users'. The API's series, partner totals and
breakdowns answer these same questions directly; this module is where they plug in.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from usage_api.analytics.query import UsageQuery
from usage_api.analytics.totals import metrics_of, read_usage
from usage_api.dashboard.filters import FilterError, Filters
from usage_api.dashboard.tenants import Member, Tenant
from usage_api.dates import DateRange
from usage_api.errors import ApiError

MAX_BUCKETS = 1000
PARALLEL_READS = 4
ZERO: tuple[int, ...] = (0, 0, 0, 0, 0, 0)


class KeyGone(Exception):
    """The session's key stopped being live between the session check and a read."""


def metrics(values: tuple[int, ...]) -> dict[str, Any]:
    """A usage object's three metric objects from `METRICS`-ordered values."""
    sms_out, sms_in, mms_out, mms_in, voice, voice_kb = values
    return {
        "sms": {"outbound": sms_out, "inbound": sms_in, "total": sms_out + sms_in},
        "mms": {"outbound": mms_out, "inbound": mms_in, "total": mms_out + mms_in},
        "voice": {"seconds": voice, "kb_seconds": voice_kb, "total_seconds": voice + voice_kb},
    }


def _plus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


def _range(start: datetime, end: datetime) -> DateRange:
    start, end = start.astimezone(UTC), end.astimezone(UTC)
    return DateRange(start, end, None, None)


async def _read(
    engine: AsyncEngine, key_hash: bytes, kind: str, target_id: str, span: DateRange
) -> tuple[int, ...] | None:
    query = UsageQuery(
        target_id if kind == "organization" else None,
        target_id if kind == "user" else None,
        span,
    )
    try:
        _, usage = await read_usage(engine, key_hash, query)
    except ApiError as exc:
        if exc.status == 401:
            raise KeyGone from None
        raise
    return None if usage is None else metrics_of(usage)


@dataclass(frozen=True)
class Bucket:
    start: datetime  # local, inclusive
    end: datetime  # local, exclusive
    values: tuple[int, ...]

    @property
    def usage(self) -> dict[str, Any]:
        return metrics(self.values)


@dataclass(frozen=True)
class Row:
    member: Member
    values: tuple[int, ...]

    @property
    def usage(self) -> dict[str, Any]:
        return metrics(self.values)


def bucket_bounds(filters: Filters) -> list[tuple[datetime, datetime]]:
    """The local calendar buckets of the period, in order, contiguous, clipped to it."""
    end = filters.end
    if filters.granularity == "hour":
        return _hours(filters)
    days: list[date] = []
    day = filters.first_day
    last = filters.last_day
    if filters.granularity == "day":
        _check_count((last - day).days + 1)
        days = [day + timedelta(days=n) for n in range((last - day).days + 1)]
    else:
        while day <= last:
            days.append(day)
            if filters.granularity == "week":
                day += timedelta(days=7 - day.weekday())
            else:
                day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
            _check_count(len(days))
    edges_local = [filters.local_midnight(d) for d in days] + [end]
    return list(itertools.pairwise(edges_local))


def _hours(filters: Filters) -> list[tuple[datetime, datetime]]:
    """Local wall-clock hours: each whole hour of the wall clock that exists, the repeated
    one twice (once per offset); a skipped one is not there."""
    zone = filters.zone
    start, end = filters.start.astimezone(UTC), filters.end.astimezone(UTC)
    _check_count(int((end - start) / timedelta(hours=1)))
    edges = {start, end}
    day = filters.first_day
    while day <= filters.last_day:
        for hour in range(24):
            for fold in (0, 1):
                wall = datetime(day.year, day.month, day.day, hour, tzinfo=zone, fold=fold)
                at = wall.astimezone(UTC)
                if start < at < end:
                    edges.add(at)
        day += timedelta(days=1)
    ordered = sorted(edges)
    _check_count(len(ordered) - 1)
    return [(a.astimezone(zone), b.astimezone(zone)) for a, b in itertools.pairwise(ordered)]


def _check_count(count: int) -> None:
    if count > MAX_BUCKETS:
        raise FilterError(
            "Too many buckets: at most 1000 (use a coarser granularity or a shorter range)."
        )


async def totals(
    engine: AsyncEngine,
    key_hash: bytes,
    tenant: Tenant,
    members: list[Member],
    start: datetime,
    end: datetime,
) -> tuple[int, ...] | None:
    """The tenant's usage over `[start, end)`; None when its key no longer sees it."""
    span = _range(start, end)
    if tenant.kind != "partner":
        return await _read(engine, key_hash, tenant.kind, tenant.id, span)
    total = ZERO
    for member in members:
        assert member.id is not None
        values = await _read(engine, key_hash, "organization", member.id, span)
        total = _plus(total, values or ZERO)
    return total


async def series(
    engine: AsyncEngine,
    key_hash: bytes,
    tenant: Tenant,
    members: list[Member],
    filters: Filters,
) -> list[Bucket]:
    bounds = bucket_bounds(filters)
    # A few buckets at a time: the reads are independent, and a handful of connections
    # keeps the database busy without taking the whole pool from other requests.
    gate = asyncio.Semaphore(PARALLEL_READS)

    async def bucket(start: datetime, end: datetime) -> Bucket:
        async with gate:
            values = await totals(engine, key_hash, tenant, members, start, end)
        return Bucket(start, end, values or ZERO)

    return list(await asyncio.gather(*(bucket(start, end) for start, end in bounds)))


async def breakdown(
    engine: AsyncEngine,
    key_hash: bytes,
    tenant: Tenant,
    members: list[Member],
    total: tuple[int, ...],
    filters: Filters,
) -> list[Row]:
    """Every member's usage over the period, and for an organization its usage without a
    user when that is not zero: rows that add up to `total`."""
    if tenant.kind == "user":
        return []
    kind = "organization" if tenant.kind == "partner" else "user"
    span = filters.span()
    rows = []
    for member in members:
        assert member.id is not None
        values = await _read(engine, key_hash, kind, member.id, span)
        rows.append(Row(member, values or ZERO))
    if tenant.kind == "organization":
        rest = total
        for row in rows:
            rest = _minus(rest, row.values)
        if rest != ZERO:
            rows.append(Row(Member(None, None), rest))
    return rows


def _sort_key(row: Row, field: str) -> Any:
    if field == "id":
        return row.member.id or ""
    if field == "name":
        return row.member.name or ""
    kind, name = field.split(".")
    value: int = row.usage[kind][name]
    return value


def sorted_rows(rows: list[Row], sort: str) -> list[Row]:
    """Sorted by `sort` (`-` for descending), ties by id ascending, as the API sorts."""
    field = sort.removeprefix("-")
    by_id = sorted(rows, key=lambda row: row.member.id or "")
    return sorted(by_id, key=lambda row: _sort_key(row, field), reverse=sort.startswith("-"))
