"""The numbers a view shows, each one an answer of the API's own reads for the same
question, asked with the session's key: the series and its totals from `read_series` (what
`GET /v1/analytics/usage` answers with `granularity`), and the table's pages from
`read_breakdown` (what `GET /v1/analytics/usage/breakdown` answers), with its sort, its
cursor and its rows, the organization's usage without a user included. So the page can
never disagree with the API, and sees what the key sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from usage_api.analytics.breakdown import MAX_LIMIT, parse_breakdown_query, read_breakdown
from usage_api.analytics.query import parse_usage_query
from usage_api.analytics.series import read_series
from usage_api.analytics.totals import metrics_of, sums_json
from usage_api.dashboard.filters import FilterError, Filters
from usage_api.dashboard.tenants import Member, Tenant
from usage_api.errors import ApiError
from usage_api.replicas import Reads


class KeyGone(Exception):
    """The session's key stopped being live between the session check and a read."""


class StaleCursor(Exception):
    """The table's cursor belongs to another question (other filters, or a preset period
    that has moved on to another day since the link was made)."""


def _in_words(exc: ApiError) -> Exception:
    """An API error as the page tells it: a gone key, a filter in words, or as it is."""
    if exc.status == 401:
        return KeyGone()
    if exc.status == 400:
        return FilterError(exc.message[0].upper() + exc.message[1:] + ".")
    return exc


def _question(tenant: Tenant, filters: Filters) -> dict[str, str]:
    """The view's question in the API's parameters: its id, local dates and zone."""
    return {
        f"{tenant.kind}_id": tenant.id,
        "start_date": filters.first_day.isoformat(),
        "end_date": filters.last_day.isoformat(),
        "timezone": filters.tz,
    }


@dataclass(frozen=True)
class Bucket:
    start: datetime  # local, inclusive
    end: datetime  # local, exclusive
    values: tuple[int, ...]

    @property
    def usage(self) -> dict[str, Any]:
        return sums_json(self.values)


@dataclass(frozen=True)
class Row:
    member: Member
    values: tuple[int, ...]

    @property
    def usage(self) -> dict[str, Any]:
        return sums_json(self.values)


async def series(
    engine: Reads,
    key_hash: bytes,
    tenant: Tenant,
    filters: Filters,
) -> tuple[tuple[int, ...], list[Bucket]] | None:
    """The period's totals and buckets: the API's series answer to the same question
    (`GET /v1/analytics/usage` with the view's id, local dates, zone and granularity).
    None when the key no longer sees the tenant."""
    params = {**_question(tenant, filters), "granularity": filters.granularity}
    try:
        query = parse_usage_query(params)
        _, usage = await read_series(engine, key_hash, query)
    except ApiError as exc:
        raise _in_words(exc) from None
    if usage is None:
        return None
    buckets = [
        Bucket(datetime.fromisoformat(start), datetime.fromisoformat(end), sums)
        for start, end, sums in usage["buckets"]
    ]
    return metrics_of(usage), buckets


@dataclass(frozen=True)
class TablePage:
    rows: list[Row]
    next_cursor: str | None  # the breakdown's, None on the last page


def _member(group_by: str, row: dict[str, Any]) -> Member:
    if group_by == "user":
        return Member(row["user_id"], row["user_name"], row["user_email"])
    return Member(row["organization_id"], row["organization_name"])


async def table_page(
    engine: Reads,
    key_hash: bytes,
    tenant: Tenant,
    filters: Filters,
    limit: int,
    cursor: str | None = None,
) -> TablePage | None:
    """A page of the table: the API's breakdown answer to the same question (the view's
    id, local dates and zone, its sort, `limit` and `cursor`). None when the key no longer
    sees the tenant."""
    params = {**_question(tenant, filters), "sort": filters.sort, "limit": str(limit)}
    try:
        query = parse_breakdown_query(params)
    except ApiError as exc:
        raise _in_words(exc) from None
    if cursor is not None:
        # The rest of the question is known good: what is refused now is the cursor.
        try:
            query = parse_breakdown_query({**params, "cursor": cursor})
        except ApiError:
            raise StaleCursor from None
    try:
        _, answer = await read_breakdown(engine, key_hash, query)
    except ApiError as exc:
        raise _in_words(exc) from None
    if answer is None:
        return None
    group_by = answer["group_by"]
    rows = [Row(_member(group_by, row), metrics_of(row)) for row in answer["rows"]]
    return TablePage(rows, answer["next_cursor"])


async def whole_table(
    engine: Reads, key_hash: bytes, tenant: Tenant, filters: Filters
) -> list[Row] | None:
    """Every row of the table, in its order: its pages walked with the breakdown's cursor,
    the largest a page may be (each page is its own snapshot, as in the API)."""
    rows: list[Row] = []
    cursor = None
    while True:
        page = await table_page(engine, key_hash, tenant, filters, MAX_LIMIT, cursor)
        if page is None:
            return None
        rows += page.rows
        if page.next_cursor is None:
            return rows
        cursor = page.next_cursor
