"""Recording usage: `POST /v1/usage/events`.

A batch is one statement (`_write`), which PostgreSQL runs atomically: the caller's key
(or principal), the target check, the log rows and their deltas. Log rows go in with
`ON CONFLICT DO NOTHING`, so an id seen before is never applied twice; what was really
inserted is summed per (organization, user, hour) into `usage_deltas` by the same
statement. Writers only insert, in key order, so concurrent batches neither queue on a
hot row nor deadlock. The HTTP route runs that statement on asyncpg directly, as the
hottest read does, through a `Writer`: batches that arrive while the process's statements
are all in flight are written together by the next one, each request still its own
all-or-nothing unit with its own answer.
"""

from __future__ import annotations

import asyncio
from collections import deque
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
from usage_api.db import PrimaryEngine, fetch_rows, write_rows
from usage_api.errors import ApiError, ServiceUnavailable, bad_request
from usage_api.http.deps import presented_key, services
from usage_api.http.openapi import error_responses, request_body
from usage_api.http.params import FastRoute, json_body
from usage_api.schemas import IngestResponse, UsageEventIn, UsageEventsIn, error_message
from usage_api.sql import (
    EVENT_COLUMNS,
    EVENT_SUMS,
    LIVE_KEY,
    METRIC_COLUMNS,
    compile_named,
    visible_to_key,
)

MAX_EVENTS = 1000
MAX_FUTURE = timedelta(minutes=5)


def _unnest(*extra: tuple[str, str]) -> str:
    """The batch's column arrays (`EVENT_COLUMNS`, then `extra` (name, type) pairs) as rows
    named `input`, numbered from 1 in `position`."""
    columns = [*EVENT_COLUMNS.items(), *extra]
    return "unnest({}) WITH ORDINALITY AS input({}, position)".format(
        ", ".join(f"CAST(:{column} AS {type_}[])" for column, type_ in columns),
        ", ".join(column for column, _ in columns),
    )


_COLUMN_LIST = ", ".join(EVENT_COLUMNS)
# What an event is, apart from its identity: a stored event with the same id and other
# content is a conflict.
_CONTENT = [column for column in EVENT_COLUMNS if column not in ("organization_id", "id")]


def _write(callers: str) -> str:
    """The write of one or more requests' batches in one statement, given `callers`: a
    query of one row per request whose caller is known (`request`, numbered from 1, then
    `id`, `scope`, `partner_id`, `organization_id`, `can_write`).

    The events come as one set of column arrays, each event with the number of its
    request. Every event's organization must lie in its caller's scope and its user, if
    any, belong to that organization; unless all of a request's do, and its caller may
    write, nothing of that request is inserted (the others' are). The first event of each
    (organization, id) is the one offered for insertion; any repeat, in the same request
    or another, is then judged against what got stored, like a retry. What was really
    inserted is summed per (organization, user, hour) into `usage_deltas`. It answers, per
    request of a known caller: who the caller is, how many of its events were inserted
    (when it is the batch's size, every event was applied), and the positions (over the
    whole statement) of its events whose organization or user is not found.

    Which request an inserted row came from (`applied`) is found by aggregation, not by a
    join of `inserted` with `offered`: each (organization, id) is offered once and inserted
    at most once, so a key that appears twice was inserted. With the one-row estimates of a
    generic plan the join became a nested loop over both, 4x slower at 1000 events.
    """
    return f"""
WITH k AS ({callers}),
input AS (SELECT * FROM {_unnest(("request", "int"))}),
checked AS (
    SELECT input.request, input.position, o.id IS NOT NULL AS organization_found,
           input.user_id IS NULL OR u.id IS NOT NULL AS user_found
    FROM input JOIN k USING (request)
    LEFT JOIN organizations o ON o.id = input.organization_id AND {visible_to_key("o", "k")}
    LEFT JOIN users u ON u.organization_id = input.organization_id AND u.id = input.user_id
),
refused AS (
    SELECT request FROM k WHERE NOT can_write
    UNION SELECT request FROM checked WHERE NOT (organization_found AND user_found)
),
offered AS (
    SELECT DISTINCT ON (organization_id, id) * FROM input
    WHERE request IN (SELECT request FROM k) AND request NOT IN (SELECT request FROM refused)
    ORDER BY organization_id, id, position
),
inserted AS (
    INSERT INTO usage_events ({_COLUMN_LIST})
    SELECT {_COLUMN_LIST} FROM offered ORDER BY organization_id, id
    ON CONFLICT (organization_id, id) DO NOTHING
    RETURNING {_COLUMN_LIST}
),
deltas AS (
    INSERT INTO usage_deltas (organization_id, user_id, hour_at, {METRIC_COLUMNS})
    SELECT organization_id, coalesce(user_id, ''), date_trunc('hour', occurred_at, 'UTC'),
           {EVENT_SUMS}
    FROM inserted
    GROUP BY 1, 2, 3
),
applied AS (
    SELECT max(request) AS request FROM (
        SELECT organization_id, id, request FROM offered
        UNION ALL
        SELECT organization_id, id, NULL FROM inserted
    ) AS offered_or_inserted
    GROUP BY organization_id, id
    HAVING count(*) = 2
),
accepted AS (SELECT request, count(*) AS accepted FROM applied GROUP BY 1)
SELECT k.request, k.id AS key_id, k.can_write, coalesce(accepted.accepted, 0) AS accepted,
       ARRAY(SELECT position FROM checked c
             WHERE c.request = k.request AND NOT organization_found ORDER BY 1)
           AS organizations_not_found,
       ARRAY(SELECT position FROM checked c
             WHERE c.request = k.request AND organization_found AND NOT user_found
             ORDER BY 1) AS users_not_found
FROM k LEFT JOIN accepted USING (request)
"""


# From the API keys of the requests: the rows of the live ones (the HTTP path: the keys are
# checked in the write).
_KEY_WRITE = compile_named(
    _write(
        "SELECT keys.request, api_keys.id, scope, partner_id, organization_id, can_write"
        " FROM unnest(CAST(:key_hashes AS bytea[])) WITH ORDINALITY AS keys(key_hash, request)"
        f" JOIN api_keys USING (key_hash) WHERE {LIVE_KEY}"
    )
)
# From a `Principal` already known (the import, tests, the demo): one request.
_PRINCIPAL_WRITE = text(
    _write(
        "SELECT 1 AS request, CAST(:key_id AS text) AS id, CAST(:scope AS text) AS scope,"
        " CAST(:scope_partner_id AS text) AS partner_id,"
        " CAST(:scope_organization_id AS text) AS organization_id,"
        " CAST(:can_write AS bool) AS can_write"
    )
)

# Which of the given events (1-based positions) differ from what is stored under their id.
_CONFLICTS_SQL = f"""
SELECT input.position FROM {_unnest()}
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


def _target_errors(row: Any, first: int = 1) -> list[dict[str, Any]]:
    """The 400's details from a write's answer for a request whose events the statement
    numbered from `first`: each event whose target is not found."""
    details = [
        {"index": position - first, "field": "organization_id", "error": "organization not found"}
        for position in row["organizations_not_found"]
    ] + [
        {"index": position - first, "field": "user_id", "error": "user not found"}
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
                | {"request": [1] * len(events)}
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


@dataclass
class _Request:
    """A request's batch waiting in a `Writer`, and where its answer goes."""

    key_hash: bytes
    columns: dict[str, list[Any]]
    size: int
    answer: asyncio.Future[tuple[Any, int]]


class Writer:
    """The HTTP path's writes of one process, `statements` at a time: batches that arrive
    while as many are in flight wait, and then go together in one statement (a group
    commit), up to `MAX_EVENTS` events.

    Under a load of small batches most of a write's cost is the statement's own (its
    execution's set-up, its commit and WAL flush, the round trip), not its rows': many
    pipelines each sending one event at a time are written as a few statements of many
    events. A batch that arrives with a statement free goes at once, in a statement of its
    own: a batch waits only while the process's statements are all in flight. Each request
    is still its own all-or-nothing unit, checked against its own key and scope (`_write`);
    a statement that fails for any reason but the database being away is run again one
    request at a time, so no batch fails for another's.
    """

    def __init__(self, engine: PrimaryEngine, statements: int) -> None:
        self._engine = engine
        self._statements = statements
        self._pending: deque[_Request] = deque()
        self._writers = 0
        # The writers' tasks: the event loop keeps only weak references to tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """How many batches wait for a statement."""
        return len(self._pending)

    async def ingest(self, key_hash: bytes, events: list[UsageEventIn]) -> tuple[str, IngestResult]:
        """Record a validated batch for the key with `key_hash`: the id of the key, and what
        was applied. 401 for a key that is not live, 403 for a read key, 400 for an unknown
        target: in each case nothing of the batch is written.

        The write is one statement on asyncpg directly, outside a transaction (PostgreSQL
        runs it atomically, in one round trip, with no BEGIN and COMMIT), committed when
        this gets its answer. Only a batch that was not applied whole takes a second
        statement, to tell duplicates from conflicts; stored events never change, so it may
        run after the write has committed.
        """
        columns = _columns(events)
        if self._writers < self._statements and not self._pending:
            # A statement is free: the batch is written at once, in a statement of its own.
            self._writers += 1
            try:
                row, first = await self._write_alone(key_hash, columns, len(events)), 1
            finally:
                self._writers -= 1
                self._start()
        else:
            answer = asyncio.get_running_loop().create_future()
            self._pending.append(_Request(key_hash, columns, len(events), answer))
            self._start()
            row, first = await answer
        if row is None:
            raise invalid_key()
        if not row["can_write"]:
            raise ApiError(403, "API key does not have write permission")
        if details := _target_errors(row, first):
            raise bad_request("invalid events", details)
        result = IngestResult(accepted=row["accepted"])
        if result.accepted < len(events):
            args = _KEY_CONFLICTS.args(columns)
            found = await fetch_rows(self._engine, _KEY_CONFLICTS.sql, *args)
            result = _with_conflicts(result, events, {r["position"] for r in found})
        return row["key_id"], result

    def _start(self) -> None:
        """A writer for the batches that wait, if a statement is free."""
        if self._pending and self._writers < self._statements:
            self._writers += 1
            task = asyncio.create_task(self._write_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write_alone(self, key_hash: bytes, columns: dict[str, list[Any]], size: int) -> Any:
        """One request's batch in a statement of its own: its row, None for a key that is
        not live."""
        params = columns | {"request": [1] * size, "key_hashes": [key_hash]}
        rows = await write_rows(self._engine, _KEY_WRITE.sql, *_KEY_WRITE.args(params))
        return rows[0] if rows else None

    async def _write_pending(self) -> None:
        """Write what waits, a statement at a time, until nothing does."""
        try:
            while self._pending:
                group = [self._pending.popleft()]
                size = group[0].size
                while self._pending and size + self._pending[0].size <= MAX_EVENTS:
                    request = self._pending.popleft()
                    group.append(request)
                    size += request.size
                await self._write(group)
        finally:
            # Counted down here, not when the task is done: a batch that arrives in between
            # would find every statement taken and none left to write it.
            self._writers -= 1

    async def _write(self, group: list[_Request]) -> None:
        """Write `group` in one statement and give each request its answer: its row (None
        for a key that is not live) and the position of its first event."""
        params: dict[str, Any] = {column: [] for column in EVENT_COLUMNS}
        params["request"] = []
        for number, request in enumerate(group, start=1):
            for column, values in request.columns.items():
                params[column] += values
            params["request"] += [number] * request.size
        params["key_hashes"] = [request.key_hash for request in group]
        try:
            rows = await write_rows(self._engine, _KEY_WRITE.sql, *_KEY_WRITE.args(params))
        except asyncio.CancelledError:
            # The process is stopping: no request may wait for an answer for ever.
            for request in group:
                request.answer.cancel()
            raise
        except Exception as exc:
            if len(group) > 1 and not isinstance(exc, ServiceUnavailable):
                for request in group:
                    await self._write([request])
                return
            for request in group:
                if not request.answer.done():
                    request.answer.set_exception(exc)
            return
        by_request = {row["request"]: row for row in rows}
        first = 1
        for number, request in enumerate(group, start=1):
            # A request whose client went away has its answer cancelled.
            if not request.answer.done():
                request.answer.set_result((by_request.get(number), first))
            first += request.size


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
    request.state.key_id, result = await app.writer.ingest(key_hash, events)
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
