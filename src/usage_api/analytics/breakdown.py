"""`GET /v1/analytics/usage/breakdown`: the members of a partner or an organization (contract 6).

One statement per page: the key, the parent and its scope, the parent's totals and every
member's sums, sorted and cut after the cursor; so a page is its own snapshot. Every
member is listed, zeros included; an organization's usage without a user is one more
row (`user_id` null) whenever it is not zero, computed as the organization's total less
its users', so the rows always add up to the parent's total.

The cursor is opaque to clients: base64 of the last row's sort value and id, and a digest
of the query it belongs to (parent, grouping, sort, range, zone). Another query's cursor
is refused, so a cursor cannot move a client into another scope; and since the parent is
always checked against the key, a forged position only ever reads what the key may see.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from functools import cache
from typing import Any

from usage_api.analytics.query import UsageQuery, parse_usage_query
from usage_api.analytics.ranges import range_params
from usage_api.analytics.totals import (
    ENTITY_ROWS,
    IN_PARTNER,
    PARTNER_EVENTS,
    PARTNER_VISIBLE,
    metrics_json,
    period_json,
    range_parts,
)
from usage_api.auth import invalid_key
from usage_api.dates import DateRange
from usage_api.errors import bad_request
from usage_api.http.params import blank_as_none, checked_id
from usage_api.models import METRICS
from usage_api.replicas import Reads
from usage_api.sql import (
    EVENT_SUMS,
    KEY_LOOKUP,
    METRIC_COLUMNS,
    METRIC_SUMS,
    Statement,
    compile_named,
    visible_to_key,
)

# Sort keys: the metrics of the answer by their JSON path, and what they sum in SQL.
_SORT_METRICS = {
    "sms.outbound": "sms_outbound",
    "sms.inbound": "sms_inbound",
    "sms.total": "sms_outbound + sms_inbound",
    "mms.outbound": "mms_outbound",
    "mms.inbound": "mms_inbound",
    "mms.total": "mms_outbound + mms_inbound",
    "voice.seconds": "voice_seconds",
    "voice.kb_seconds": "voice_kb_seconds",
    "voice.total_seconds": "voice_seconds + voice_kb_seconds",
}
SORTS = ("id", "name", *_SORT_METRICS)
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class BreakdownQuery:
    usage: UsageQuery  # the parent and the range, checked as for usage
    group_by: str  # "organization" (of a partner) or "user" (of an organization)
    sort: str
    descending: bool
    limit: int
    after: tuple[Any, str] | None  # the cursor's (sort value, id)

    @property
    def binding(self) -> str:
        u = self.usage
        span = (u.span.start.isoformat(), u.span.end_exclusive.isoformat()) if u.span else None
        facts = [u.partner_id, u.organization_id, self.group_by, self.sort, self.descending]
        digest = hashlib.sha256(json.dumps([*facts, span, u.timezone]).encode())
        return digest.hexdigest()[:32]


def parse_breakdown_query(params: Mapping[str, str]) -> BreakdownQuery:
    """Ids, then dates and time zone as for usage, then group_by, sort, limit, cursor."""
    partner_id = checked_id(blank_as_none(params.get("partner_id")), "partner_id")
    organization_id = checked_id(blank_as_none(params.get("organization_id")), "organization_id")
    if partner_id is None and organization_id is None:
        raise bad_request("partner_id or organization_id is required")
    names = ("partner_id", "organization_id", "start_date", "end_date", "timezone")
    usage = parse_usage_query({n: params[n] for n in names if n in params})
    fits = "user" if organization_id is not None else "organization"
    group_by = blank_as_none(params.get("group_by")) or fits
    if group_by != fits:
        raise bad_request(
            "invalid group_by: user with organization_id, organization with partner_id alone"
        )
    sort = blank_as_none(params.get("sort")) or "id"
    descending = sort.startswith("-")
    if sort.removeprefix("-") not in SORTS:
        raise bad_request(f"invalid sort: one of {', '.join(SORTS)}, with - for descending")
    limit = parse_limit(params.get("limit"))
    query = BreakdownQuery(usage, group_by, sort.removeprefix("-"), descending, limit, None)
    cursor = blank_as_none(params.get("cursor"))
    if cursor is None:
        return query
    return BreakdownQuery(
        usage, group_by, query.sort, descending, limit, _read_cursor(cursor, query)
    )


def parse_limit(value: str | None) -> int:
    """A page's `limit`: 1 to 1000, 100 when not given."""
    raw = blank_as_none(value)
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise bad_request(f"invalid limit: an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def page_cursor(last_id: str, binding: str) -> str:
    """An opaque cursor of a list by id: the last id, bound to the list it came from."""
    raw = json.dumps([last_id, binding], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def read_page_cursor(cursor: str, binding: str) -> str:
    """The last id of a `page_cursor` from the same list; 400 for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        last_id, bound = json.loads(raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        last_id, bound = None, None
    if bound != binding or not isinstance(last_id, str):
        raise bad_request("invalid cursor: pass back the next_cursor of the previous page")
    return last_id


def _cursor(query: BreakdownQuery, value: Any, member_id: str) -> str:
    raw = json.dumps([value, member_id, query.binding], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_cursor(cursor: str, query: BreakdownQuery) -> tuple[Any, str]:
    invalid = bad_request("invalid cursor: pass back the next_cursor of the previous page")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value, member_id, binding = json.loads(raw)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise invalid from None
    numeric = query.sort in _SORT_METRICS
    if (
        binding != query.binding
        or not isinstance(member_id, str)
        or (numeric and (not isinstance(value, int) or isinstance(value, bool)))
        or (not numeric and not isinstance(value, str))
    ):
        raise invalid
    return value, member_id


# Members' sums, one row per member with usage. A range is cut for members as for totals,
# but coarser at its edges: raw log rows up to the first and from the last whole UTC day
# (the index on (organization_id, occurred_at) reads only that day's rows, where per-user
# hourly roll-ups can only be found by walking every user's hours), whole days from the
# daily roll-ups, and the unfolded deltas of those days. A partner's organizations also
# take whole UTC months from `organization_monthly`. `coalesce(user_id, '') <> ''` keeps
# the planner on the time index for raw rows: the partial index on users' events would
# walk every event of the organization.
_MEMBERS_ALL_TIME = f"""
    SELECT {{member}} AS member, {METRIC_COLUMNS} FROM usage_counters WHERE {{rollups}}
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM usage_deltas WHERE {{deltas}}
"""
_EDGES = f"""
    SELECT {{member}} AS member, {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= :start AND occurred_at < :first_day_at
        AND :start < :first_day_at GROUP BY 1
    UNION ALL
    SELECT {{member}}, {EVENT_SUMS} FROM usage_events
    WHERE {{events}} AND occurred_at >= :last_day_at AND occurred_at < :end
        AND :last_day_at < :end GROUP BY 1
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM usage_deltas
    WHERE {{deltas}} AND hour_at >= :first_day_at AND hour_at < :last_day_at
        AND :first_day_at < :last_day_at
"""
_USERS_RANGE = f"""{_EDGES}
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM usage_daily
    WHERE {{rollups}} AND day >= :first_day AND day < :last_day
        AND :first_day < :last_day
"""
_ORGANIZATIONS_RANGE = f"""{_EDGES}
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM usage_daily
    WHERE {{rollups}} AND day >= :first_day AND day < :first_month
        AND :first_day < :first_month
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM organization_monthly
    WHERE {{events}} AND month >= :first_month AND month < :last_month
        AND :first_month < :last_month
    UNION ALL
    SELECT {{member}}, {METRIC_COLUMNS} FROM usage_daily
    WHERE {{rollups}} AND day >= :last_month AND day < :last_day
        AND :last_month < :last_day
"""
_USERS_OF = "organization_id = o.id AND user_id <> ''"
_MEMBER_ROWS = {
    # kind of parent: its members' rows of the log (and months), of roll-ups, of deltas
    "partner": (PARTNER_EVENTS, f"{PARTNER_EVENTS} AND user_id = ''", PARTNER_EVENTS),
    "organization": (
        "organization_id = o.id AND coalesce(user_id, '') <> ''",
        _USERS_OF,
        _USERS_OF,
    ),
}
_MEMBER_OF = {"partner": "organization_id", "organization": "user_id"}


def _member_parts(kind: str, ranged: bool) -> str:
    events, rollups, deltas = _MEMBER_ROWS[kind]
    if not ranged:
        parts = _MEMBERS_ALL_TIME
    else:
        parts = _ORGANIZATIONS_RANGE if kind == "partner" else _USERS_RANGE
    return parts.format(member=_MEMBER_OF[kind], events=events, rollups=rollups, deltas=deltas)


_PARENT_ALL_TIME = f"""
    SELECT {METRIC_COLUMNS} FROM usage_counters WHERE {{rollups}}
    UNION ALL
    SELECT {METRIC_COLUMNS} FROM usage_deltas WHERE {{events}}
"""


_PARENT = {
    "partner": f"""
        SELECT p.id, p.name FROM k, partners p
        WHERE p.id = :partner_id AND {PARTNER_VISIBLE}""",
    "organization": f"""
        SELECT o.id, o.name FROM k, organizations o
        WHERE o.id = :organization_id AND {visible_to_key()} AND {IN_PARTNER}""",
}
# The parent is `p` (a partner) or `o` (an organization), as the shared SQL expects.
_ALIAS = {"partner": "p", "organization": "o"}
_DIRECTORY = {
    "partner": "organizations m WHERE m.partner_id = :partner_id",
    "organization": "users m WHERE m.organization_id = :organization_id",
}
_NAMES = {
    "partner": "n.name, CAST(NULL AS text)",
    "organization": "n.name, n.email",
}
_NAMED = {
    "partner": "LEFT JOIN organizations n ON n.id = r.id",
    "organization": "LEFT JOIN users n ON n.organization_id = :organization_id AND n.id = r.id",
}
_ZEROS = ", ".join(f"CAST(0 AS bigint) AS {m}" for m in METRICS)


@cache
def _statement(kind: str, ranged: bool, sort: str, descending: bool) -> Statement:
    """Kind "partner" (rows: organizations) or "organization" (rows: users).

    The members' sums are taken once (`s`). The page is cut from two lists, each sorted
    and cut after the cursor on its own: the members with usage (and an organization's
    row without a user), a few thousand rows at most; and the members without usage, all
    zeros, read from the directory in id order, so a sort by a metric stops after the
    page's rows instead of sorting every member (a sort by name reads them all). Only the
    page's rows are then joined to their names and emails. The row without a user is the
    organization's total (`t`, from its own roll-ups) less its users' sums; a partner's
    total is its organizations' sums. Every member of `s` is one of the parent's (usage
    is accepted only for known users, who never change organization; a partner's parts
    read its organizations of now), so the two lists hold each member exactly once.
    """
    key = {"id": "coalesce(r.id, '')", "name": "coalesce(r.name, '')"}.get(sort)
    if key is None:
        key = "(" + " + ".join(f"r.{c.strip()}" for c in _SORT_METRICS[sort].split("+")) + ")"
    value = (
        "CAST(:after_value AS text)" if sort in ("id", "name") else "CAST(:after_value AS bigint)"
    )
    before = "<" if descending else ">"
    order = "DESC" if descending else "ASC"
    alias = _ALIAS[kind]
    used_name = "CAST(NULL AS text)"
    used_from = "s"
    if sort == "name":
        used_name = "n.name"
        used_from = "s " + _NAMED[kind].replace("r.id", "s.member")
    used = f"""
        SELECT s.member AS id, {used_name} AS name, {", ".join(f"s.{m}" for m in METRICS)}
        FROM {used_from}"""
    if kind == "organization":
        events, rollups = ENTITY_ROWS["organization"]
        less = ", ".join(f"t.{m} - u.{m} AS {m}" for m in METRICS)
        used += f"""
        UNION ALL
        SELECT NULL, NULL, {less} FROM t CROSS JOIN (SELECT {METRIC_SUMS} FROM s) u
        WHERE {" OR ".join(f"t.{m} <> u.{m}" for m in METRICS)}"""
        total = f"""SELECT {METRIC_SUMS} FROM parent o CROSS JOIN LATERAL ({
            range_parts("organization")
            if ranged
            else _PARENT_ALL_TIME.format(events=events, rollups=rollups)
        }) x"""
    else:
        total = f"SELECT {METRIC_SUMS} FROM s"
    unused_name = "m.name" if sort == "name" else "CAST(NULL AS text)"
    # `NOT IN` over `s` is a hashed filter on the directory's index scan (in id order).
    # By the parent's id itself, not joined to `parent`: a join would lose the index's order.
    unused = f"""
        SELECT m.id, {unused_name} AS name, {_ZEROS} FROM {_DIRECTORY[kind]}
        AND m.id NOT IN (SELECT member FROM s WHERE member IS NOT NULL)"""
    after = f"""NOT :has_cursor OR {key} {before} {value}
           OR ({key} = {value} AND coalesce(r.id, '') > :after_id)"""
    row = ", ".join(["r.id", _NAMES[kind], *(f"r.{m}" for m in METRICS)])
    sql = f"""
WITH k AS ({KEY_LOOKUP}),
parent AS ({_PARENT[kind]}),
s AS MATERIALIZED (
    SELECT mp.member, {METRIC_SUMS}
    FROM parent {alias} CROSS JOIN LATERAL ({_member_parts(kind, ranged)}) mp
    GROUP BY mp.member
),
t AS ({total}),
used AS (
    SELECT r.*, {key} AS sort_key FROM ({used}) r
    WHERE {after}
    ORDER BY {key} {order}, coalesce(r.id, '') LIMIT :limit
),
unused AS (
    SELECT r.*, {key} AS sort_key FROM ({unused}) r
    WHERE {after}
    ORDER BY {key} {order}, r.id LIMIT :limit
),
page AS (
    SELECT * FROM (SELECT * FROM used UNION ALL SELECT * FROM unused) r
    ORDER BY r.sort_key {order}, coalesce(r.id, '') LIMIT :limit
)
SELECT k.id AS key_id, e.* FROM k LEFT JOIN LATERAL (
    SELECT o.id, o.name, t.*, (
        SELECT json_agg(json_build_array({row}, r.sort_key)
                        ORDER BY r.sort_key {order}, coalesce(r.id, ''))
        FROM page r {_NAMED[kind]}
    ) AS page
    FROM parent o CROSS JOIN t
) e ON true"""
    return compile_named(sql)


def _range_params(span: DateRange) -> dict[str, Any]:
    """`range_params`, and the whole UTC months inside its whole days (`first_month` =
    `last_month` = `last_day` when there is none)."""
    params = range_params(span)
    first_day: date = params["first_day"]
    last_day: date = params["last_day"]
    first_month = first_day if first_day.day == 1 else _next_month(first_day)
    last_month = last_day.replace(day=1)
    if first_month >= last_month:
        first_month = last_month = last_day
    return params | {"first_month": first_month, "last_month": last_month}


def _next_month(day: date) -> date:
    return date(day.year + day.month // 12, day.month % 12 + 1, 1)


async def read_breakdown(
    reads: Reads, key_hash: bytes, query: BreakdownQuery
) -> tuple[str, dict[str, Any] | None]:
    """The id of the caller's key and the `breakdown` object (None when the parent is
    unknown or outside the key's scope)."""
    usage = query.usage
    kind = "partner" if query.group_by == "organization" else "organization"
    statement = _statement(kind, usage.span is not None, query.sort, query.descending)
    params: dict[str, Any] = {
        "key_hash": key_hash,
        "partner_id": usage.partner_id,
        "organization_id": usage.organization_id,
        "has_cursor": query.after is not None,
        "after_value": query.after[0] if query.after else None,
        "after_id": query.after[1] if query.after else "",
        "limit": query.limit + 1,
    }
    if usage.span is not None:
        params.update(_range_params(usage.span))
    row = await reads.fetch_row(statement.sql, *statement.args(params))
    if row is None:
        raise invalid_key()
    if row["id"] is None:
        return row["key_id"], None
    # The pool's connections decode json themselves (db.py); a bare asyncpg one would not.
    page = row["page"] or []
    if isinstance(page, str):
        page = json.loads(page)
    more = len(page) > query.limit
    page = page[: query.limit]
    breakdown: dict[str, Any] = {f"{kind}_id": row["id"], f"{kind}_name": row["name"]}
    breakdown.update(metrics_json(row))
    breakdown.update(period_json(usage))
    breakdown["group_by"] = query.group_by
    breakdown["rows"] = [_row(query.group_by, member) for member in page]
    breakdown["next_cursor"] = (
        _cursor(query, page[-1][-1], page[-1][0] or "") if more and page else None
    )
    return row["key_id"], breakdown


def _row(group_by: str, member: list[Any]) -> dict[str, Any]:
    member_id, name, email, *values = member[:-1]
    sums = metrics_json(dict(zip(METRICS, values, strict=True)))
    if group_by == "user":
        return {"user_id": member_id, "user_name": name, "user_email": email, **sums}
    return {"organization_id": member_id, "organization_name": name, **sums}


def csv_rows(group_by: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The CSV columns of a breakdown page: the member's id and name columns first."""
    head = (
        ["user_id", "user_name", "user_email"]
        if group_by == "user"
        else ["organization_id", "organization_name"]
    )
    return head, [[row[c] for c in head] for row in rows]
