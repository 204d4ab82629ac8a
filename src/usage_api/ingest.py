"""Recording usage: `POST /v1/usage/events`.

A batch is one statement (`_write`), which PostgreSQL runs atomically: the caller's key
(or principal), the target check, the log rows and their deltas. Log rows go in with
`ON CONFLICT DO NOTHING`, so an id seen before is never applied twice; what was really
inserted is summed per (organization, user, hour) into `usage_deltas` by the same
statement. Writers only insert, in key order, so concurrent batches neither queue on a
hot row nor deadlock. The HTTP route runs that statement on asyncpg directly, one round
trip per request, as the hottest read does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from usage_api.auth import Principal, authenticate, invalid_key, presented_hash
from usage_api.dates import utc_now
from usage_api.db import PrimaryEngine, fetch_rows, write_row
from usage_api.errors import ApiError, bad_request
from usage_api.http.deps import presented_key, services
from usage_api.http.openapi import error_responses, request_body
from usage_api.http.params import FastRoute, json_body
from usage_api.schemas import IngestResponse, UsageEventIn, UsageEventsIn, error_message
from usage_api.sql import (
    EVENT_COLUMNS,
    EVENT_SUMS,
    KEY_LOOKUP,
    METRIC_COLUMNS,
    compile_named,
    visible_to_key,
)

MAX_EVENTS = 1000
MAX_FUTURE = timedelta(minutes=5)

_UNNEST = "unnest({}) WITH ORDINALITY AS input({}, position)".format(
    ", ".join(f"CAST(:{column} AS {type_}[])" for column, type_ in EVENT_COLUMNS.items()),
    ", ".join(EVENT_COLUMNS),
)
_COLUMN_LIST = ", ".join(EVENT_COLUMNS)
# What an event is, apart from its identity: a stored event with the same id and other
# content is a conflict.
_CONTENT = [column for column in EVENT_COLUMNS if column not in ("organization_id", "id")]


def _write(caller: str) -> str:
    """The write of a batch in one statement, given `caller`: a query of one row (`id`,
    `scope`, `partner_id`, `organization_id`, `can_write`) describing who writes, none for
    an unknown key.

    Every event's organization must lie in the caller's scope and its user, if any, belong
    to that organization; unless all do, and the caller may write, nothing is inserted.
    The first event of each (organization, id) in the batch is the one offered for
    insertion; any repeat in the same batch is then judged against what got stored, like a
    retry. What was really inserted is summed per (organization, user, hour) into
    `usage_deltas`. It answers who the caller is, how many events were inserted (when it is
    the batch's size, every event was applied), and the positions of events whose
    organization or user is not found.
    """
    return f"""
WITH k AS ({caller}),
input AS (SELECT * FROM {_UNNEST}),
checked AS (
    SELECT input.position, o.id IS NOT NULL AS organization_found,
           input.user_id IS NULL OR u.id IS NOT NULL AS user_found
    FROM input CROSS JOIN k
    LEFT JOIN organizations o ON o.id = input.organization_id AND {visible_to_key("o", "k")}
    LEFT JOIN users u ON u.organization_id = input.organization_id AND u.id = input.user_id
),
inserted AS (
    INSERT INTO usage_events ({_COLUMN_LIST})
    SELECT DISTINCT ON (organization_id, id) {_COLUMN_LIST} FROM input
    WHERE (SELECT can_write FROM k)
      AND NOT EXISTS (SELECT FROM checked WHERE NOT (organization_found AND user_found))
    ORDER BY organization_id, id, position
    ON CONFLICT (organization_id, id) DO NOTHING
    RETURNING {_COLUMN_LIST}
),
deltas AS (
    INSERT INTO usage_deltas (organization_id, user_id, hour_at, {METRIC_COLUMNS})
    SELECT organization_id, coalesce(user_id, ''), date_trunc('hour', occurred_at, 'UTC'),
           {EVENT_SUMS}
    FROM inserted
    GROUP BY 1, 2, 3
)
SELECT k.id AS key_id, k.can_write, (SELECT count(*) FROM inserted) AS accepted,
       ARRAY(SELECT position FROM checked WHERE NOT organization_found ORDER BY 1)
           AS organizations_not_found,
       ARRAY(SELECT position FROM checked WHERE organization_found AND NOT user_found
             ORDER BY 1) AS users_not_found
FROM k
"""


# From an API key: its row, if live (the HTTP path: the key is checked in the write).
_KEY_WRITE = compile_named(_write(KEY_LOOKUP))
# From a `Principal` already known (the import, tests, the demo).
_PRINCIPAL_WRITE = text(
    _write(
        "SELECT CAST(:key_id AS text) AS id, CAST(:scope AS text) AS scope,"
        " CAST(:scope_partner_id AS text) AS partner_id,"
        " CAST(:scope_organization_id AS text) AS organization_id,"
        " CAST(:can_write AS bool) AS can_write"
    )
)

# Which of the given events (1-based positions) differ from what is stored under their id.
_CONFLICTS_SQL = f"""
SELECT input.position FROM {_UNNEST}
JOIN usage_events stored USING (organization_id, id)
WHERE ({", ".join(f"stored.{column}" for column in _CONTENT)})
      IS DISTINCT FROM ({", ".join(f"input.{column}" for column in _CONTENT)})
"""
_CONFLICTS = text(_CONFLICTS_SQL)
_KEY_CONFLICTS = compile_named(_CONFLICTS_SQL)


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    conflicts: list[str] = field(default_factory=list)


_BATCH = TypeAdapter(list[UsageEventIn])


def _semantic_errors(event: UsageEventIn, latest: datetime) -> list[tuple[str, str]]:
    """What a well-typed event can still get wrong: fields that do not fit its type, a time
    too far ahead."""
    problems = event.quantity_errors()
    if event.occurred_at > latest:
        problems.append(("occurred_at", "must not be more than 5 minutes in the future"))
    return problems


def _fits(event: UsageEventIn, latest: datetime) -> bool:
    """Whether `_semantic_errors` would find nothing, without building its lists: the
    question asked of every event of every batch (a third of a batch's validation)."""
    return event.occurred_at <= latest and event.fits_its_type()


def parse_events(raw: Any) -> list[UsageEventIn]:
    """Validate a batch; a 400 naming every bad event if any is."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_EVENTS:
        raise bad_request(f"events must be a list of 1 to {MAX_EVENTS} events")
    latest = utc_now() + MAX_FUTURE
    try:
        # One call into pydantic-core for the whole batch: the common case, and 3x faster
        # than one call per event. Only a batch with errors takes the loop that names them.
        valid = _BATCH.validate_python(raw)
    except ValidationError:
        pass
    else:
        if all(_fits(event, latest) for event in valid):
            return valid
        details = [
            {"index": index, "field": field, "error": error}
            for index, event in enumerate(valid)
            for field, error in _semantic_errors(event, latest)
        ]
        if details:
            raise bad_request("invalid events", details)
        return valid

    events: list[UsageEventIn] = []
    details = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            details.append({"index": index, "field": "event", "error": "must be an object"})
            continue
        try:
            event = UsageEventIn.model_validate(item)
        except ValidationError as exc:
            details.extend(
                {
                    "index": index,
                    "field": ".".join(str(part) for part in error["loc"]) or "event",
                    "error": error_message(error),
                }
                for error in exc.errors(include_url=False)
            )
            continue
        details.extend(
            {"index": index, "field": field, "error": error}
            for field, error in _semantic_errors(event, latest)
        )
        events.append(event)
    if details:
        raise bad_request("invalid events", details)
    return events


def _columns(events: list[UsageEventIn]) -> dict[str, list[Any]]:
    """The batch as one list per column of `EVENT_COLUMNS`."""
    columns = {column: [getattr(e, column) for e in events] for column in EVENT_COLUMNS}
    columns["knowledge_base"] = [bool(value) for value in columns["knowledge_base"]]
    return columns


def _target_errors(row: Any) -> list[dict[str, Any]]:
    """The 400's details from a write's answer: each event whose target is not found."""
    details = [
        {"index": position - 1, "field": "organization_id", "error": "organization not found"}
        for position in row["organizations_not_found"]
    ] + [
        {"index": position - 1, "field": "user_id", "error": "user not found"}
        for position in row["users_not_found"]
    ]
    details.sort(key=lambda detail: detail["index"])
    return details


def _with_conflicts(
    result: IngestResult, events: list[UsageEventIn], conflicting: set[int]
) -> IngestResult:
    """`result` with the duplicates and conflicts among the events it did not apply: every
    event of the batch was compared with what is stored under its id; the ones the write
    inserted are stored as they are, so only the others can differ."""
    result.duplicates = len(events) - result.accepted - len(conflicting)
    # In batch order, so that conflicts are listed in the order they were sent.
    for position, event in enumerate(events, start=1):
        if position in conflicting and event.id not in result.conflicts:
            result.conflicts.append(event.id)
    return result


async def ingest(
    conn: AsyncConnection, principal: Principal, events: list[UsageEventIn]
) -> IngestResult:
    """Record a validated batch inside the caller's transaction."""
    columns = _columns(events)
    row = (
        (
            await conn.execute(
                _PRINCIPAL_WRITE,
                columns
                | principal.scope_params()
                | {"key_id": principal.key_id, "can_write": principal.can_write},
            )
        )
        .mappings()
        .one()
    )
    if not row["can_write"]:
        principal.require_write()
    if details := _target_errors(row):
        raise bad_request("invalid events", details)
    result = IngestResult(accepted=row["accepted"])
    if result.accepted < len(events):
        conflicting = set((await conn.scalars(_CONFLICTS, columns)).all())
        return _with_conflicts(result, events, conflicting)
    return result


async def ingest_with_key(
    engine: PrimaryEngine, key_hash: bytes, events: list[UsageEventIn]
) -> tuple[str, IngestResult]:
    """Record a validated batch for the key with `key_hash`: the id of the key, and what
    was applied. 401 for a key that is not live, 403 for a read key, 400 for an unknown
    target: in each case nothing is written.

    One statement on asyncpg directly, outside a transaction: the key check, the target
    check, the insert and the deltas are that statement, which PostgreSQL runs atomically
    and in one round trip (no BEGIN and COMMIT). Only a batch that was not applied whole
    takes a second statement, to tell duplicates from conflicts; stored events never
    change, so it may run after the write has committed.
    """
    columns = _columns(events)
    params = columns | {"key_hash": key_hash}
    row = await write_row(engine, _KEY_WRITE.sql, *_KEY_WRITE.args(params))
    if row is None:
        raise invalid_key()
    if not row["can_write"]:
        raise ApiError(403, "API key does not have write permission")
    if details := _target_errors(row):
        raise bad_request("invalid events", details)
    result = IngestResult(accepted=row["accepted"])
    if result.accepted < len(events):
        rows = await fetch_rows(engine, _KEY_CONFLICTS.sql, *_KEY_CONFLICTS.args(columns))
        result = _with_conflicts(result, events, {r["position"] for r in rows})
    return row["key_id"], result


router = APIRouter(tags=["ingestion"], route_class=FastRoute)


@router.post(
    "/v1/usage/events",
    operation_id="postEvents",
    openapi_extra={"security": [{"ApiKey": []}], **request_body(UsageEventsIn)},
    responses={
        200: {"model": IngestResponse},
        **error_responses(400, 401, 403, 413, 415, 429, 500, 503),
    },
)
async def post_events(request: Request) -> Response:
    """Record a batch of 1 to 1000 usage events, exactly once each."""
    app = services(request)
    api_key = presented_key(request)
    key_hash = presented_hash(api_key)
    try:
        body = await json_body(request)
        if not isinstance(body, dict) or set(body) != {"events"}:
            raise bad_request("request body must be a JSON object with only an events list")
        events = parse_events(body["events"])
    except ApiError:
        # A bad key, then a read key, outrank a bad body.
        principal = await authenticate(app.databases.primary, api_key)
        request.state.key_id = principal.key_id
        principal.require_write()
        raise
    # The key is checked in the same statement as the write: one round trip.
    request.state.key_id, result = await ingest_with_key(app.databases.primary, key_hash, events)
    if app.telemetry is not None:
        app.telemetry.count_events(result.accepted, result.duplicates, len(result.conflicts))
    return JSONResponse(
        {
            "success": True,
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "conflicts": result.conflicts,
        }
    )
