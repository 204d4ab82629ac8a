"""The numbers a view shows, each one an answer of the API's own reads for the same
question, asked with the session's key: the series and its totals from `read_series` (what
`GET /v1/analytics/usage` answers with `granularity`), each table row from `read_usage`
for its member. So the page can never disagree with the API, and sees what the key sees.
An organization's usage without a user is its total less its users'.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from usage_api.analytics.query import UsageQuery, parse_usage_query
from usage_api.analytics.series import read_series
from usage_api.analytics.totals import metrics_of, read_usage
from usage_api.dashboard.filters import FilterError, Filters
from usage_api.dashboard.tenants import Member, Tenant
from usage_api.dates import DateRange
from usage_api.errors import ApiError
from usage_api.replicas import Reads

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


def _minus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x - y for x, y in zip(a, b, strict=True))


async def _read(
    engine: Reads, key_hash: bytes, kind: str, target_id: str, span: DateRange
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


async def series(
    engine: Reads,
    key_hash: bytes,
    tenant: Tenant,
    filters: Filters,
) -> tuple[tuple[int, ...], list[Bucket]] | None:
    """The period's totals and buckets: the API's series answer to the same question
    (`GET /v1/analytics/usage` with the view's id, local dates, zone and granularity).
    None when the key no longer sees the tenant."""
    params = {
        f"{tenant.kind}_id": tenant.id,
        "start_date": filters.first_day.isoformat(),
        "end_date": filters.last_day.isoformat(),
        "timezone": filters.tz,
        "granularity": filters.granularity,
    }
    try:
        query = parse_usage_query(params)
        _, usage = await read_series(engine, key_hash, query)
    except ApiError as exc:
        if exc.status == 401:
            raise KeyGone from None
        if exc.status == 400:
            raise FilterError(exc.message[0].upper() + exc.message[1:] + ".") from None
        raise
    if usage is None:
        return None
    buckets = [
        Bucket(
            datetime.fromisoformat(bucket["start"]),
            datetime.fromisoformat(bucket["end"]),
            metrics_of(bucket),
        )
        for bucket in usage["buckets"]
    ]
    return metrics_of(usage), buckets


async def breakdown(
    engine: Reads,
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
