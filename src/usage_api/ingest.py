"""Recording usage: `POST /v1/usage/events`.

A batch is one transaction. Log rows go in with `ON CONFLICT DO NOTHING`, so an id seen
before is never applied twice; what was really inserted is summed per (organization,
user, hour) into `usage_deltas` by the same statement. Writers only insert, in key
order, so concurrent batches neither queue on a hot row nor deadlock.
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

from usage_api.auth import Principal
from usage_api.dates import utc_now
from usage_api.db import transact
from usage_api.errors import bad_request
from usage_api.http.deps import CurrentKey, PrimaryDb, ServicesDep
from usage_api.http.openapi import error_responses, request_body
from usage_api.http.params import json_body
from usage_api.schemas import IngestResponse, UsageEventIn, UsageEventsIn, error_message
from usage_api.sql import EVENT_COLUMNS, EVENT_SUMS, METRIC_COLUMNS, visible_organization

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

# The first event of each (organization, id) in the batch is the one offered for insertion;
# any repeat in the same batch is then judged against what got stored, like a retry. Only
# the number inserted comes back: when it is the batch's size, every event was applied.
_INSERT = text(f"""
WITH inserted AS (
    INSERT INTO usage_events ({_COLUMN_LIST})
    SELECT DISTINCT ON (organization_id, id) {_COLUMN_LIST} FROM {_UNNEST}
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
SELECT count(*) FROM inserted
""")

# Which of the given events (1-based positions) differ from what is stored under their id.
_CONFLICTS = text(f"""
SELECT input.position FROM {_UNNEST}
JOIN usage_events stored USING (organization_id, id)
WHERE ({", ".join(f"stored.{column}" for column in _CONTENT)})
      IS DISTINCT FROM ({", ".join(f"input.{column}" for column in _CONTENT)})
""")

# Joined with the id lists rather than `id = ANY(...)`: with a few hundred ids the planner
# read all of `pk_users` (organization_id, id) by skip scan instead of probing `users.id`'s
# own index once per id, about 10 ms against 1 ms for a batch of 500.
_VISIBLE = text(f"""
SELECT 'organization' AS kind, o.id, o.id AS organization_id FROM organizations o
JOIN unnest(CAST(:organization_ids AS text[])) AS wanted(id) ON o.id = wanted.id
WHERE {visible_organization()}
UNION ALL
SELECT 'user', u.id, u.organization_id FROM users u
JOIN unnest(CAST(:user_ids AS text[])) AS wanted(id) ON u.id = wanted.id
""")


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


async def _check_targets(
    conn: AsyncConnection, principal: Principal, events: list[UsageEventIn]
) -> None:
    rows = await conn.execute(
        _VISIBLE,
        {
            "organization_ids": sorted({e.organization_id for e in events}),
            "user_ids": sorted({e.user_id for e in events if e.user_id is not None}),
            **principal.scope_params(),
        },
    )
    organizations: set[str] = set()
    user_organization: dict[str, str] = {}
    for row in rows:
        if row.kind == "organization":
            organizations.add(row.id)
        else:
            user_organization[row.id] = row.organization_id
    details: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        if event.organization_id not in organizations:
            details.append(
                {"index": index, "field": "organization_id", "error": "organization not found"}
            )
        elif event.user_id is not None and user_organization.get(event.user_id) != (
            event.organization_id
        ):
            details.append({"index": index, "field": "user_id", "error": "user not found"})
    if details:
        raise bad_request("invalid events", details)


def _columns(events: list[UsageEventIn]) -> dict[str, list[Any]]:
    """The batch as one list per column of `EVENT_COLUMNS`."""
    columns = {column: [getattr(e, column) for e in events] for column in EVENT_COLUMNS}
    columns["knowledge_base"] = [bool(value) for value in columns["knowledge_base"]]
    return columns


async def ingest(
    conn: AsyncConnection, principal: Principal, events: list[UsageEventIn]
) -> IngestResult:
    """Record a validated batch inside the caller's transaction."""
    await _check_targets(conn, principal, events)
    columns = _columns(events)
    result = IngestResult(accepted=await conn.scalar(_INSERT, columns) or 0)
    if result.accepted < len(events):
        # Some events were not applied: each is a duplicate or a conflict. Every event of
        # the batch is compared with what is stored under its id; the ones this statement
        # inserted are stored as they are, so only the others can differ.
        conflicting = set((await conn.scalars(_CONFLICTS, columns)).all())
        result.duplicates = len(events) - result.accepted - len(conflicting)
        # In batch order, so that conflicts are listed in the order they were sent.
        for position, event in enumerate(events, start=1):
            if position in conflicting and event.id not in result.conflicts:
                result.conflicts.append(event.id)
    return result


router = APIRouter(tags=["ingestion"])


@router.post(
    "/v1/usage/events",
    operation_id="postEvents",
    openapi_extra=request_body(UsageEventsIn),
    responses={
        200: {"model": IngestResponse},
        **error_responses(400, 401, 403, 413, 415, 429, 500, 503),
    },
)
async def post_events(
    request: Request, engine: PrimaryDb, principal: CurrentKey, services: ServicesDep
) -> JSONResponse:
    """Record a batch of 1 to 1000 usage events, exactly once each."""
    principal.require_write()
    body = await json_body(request)
    if not isinstance(body, dict) or set(body) != {"events"}:
        raise bad_request("request body must be a JSON object with only an events list")
    result = await transact(engine, ingest, principal, parse_events(body["events"]))
    if services.telemetry is not None:
        services.telemetry.count_events(result.accepted, result.duplicates, len(result.conflicts))
    return JSONResponse(
        {
            "success": True,
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "conflicts": result.conflicts,
        }
    )
