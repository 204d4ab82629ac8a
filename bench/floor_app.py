"""The floor app: the least an HTTP counter read, and an HTTP ingestion, can cost on this
stack.

`GET /floor/counters`: one asyncpg primary-key lookup of `usage_counters`. `POST
/floor/events`: the body validated by FastAPI into pydantic models (the API's own event
model), then one statement that checks each event's organization and user, inserts the
events with `ON CONFLICT DO NOTHING` into `floor_events` (made `LIKE usage_events
INCLUDING ALL`: the same keys and indexes) and appends their sums per hour to
`floor_deltas` (`LIKE usage_deltas`). No key check, no ORM layer, no duplicate/conflict
report. It runs under the same uvicorn settings, worker count and pool size as the API,
so the API can be judged against it in the same run.

`python -m bench.floor_app --port 8001 --workers 2` with DATABASE_URL set.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from usage_api.models import METRICS
from usage_api.schemas import UsageEventIn
from usage_api.sql import EVENT_COLUMNS, EVENT_SUMS, METRIC_COLUMNS

_LOOKUP = (
    f"SELECT {', '.join(METRICS)} FROM usage_counters WHERE organization_id = $1 AND user_id = $2"
)

_COLUMNS = ", ".join(EVENT_COLUMNS)

# The tables the floor writes to: the API's, copied with their keys and indexes.
FLOOR_TABLES = """
CREATE TABLE IF NOT EXISTS floor_events (LIKE usage_events INCLUDING ALL);
CREATE TABLE IF NOT EXISTS floor_deltas (LIKE usage_deltas INCLUDING ALL);
"""


def floor_insert(source: str) -> str:
    """The floor's write: the rows of `source` (a FROM item with the event columns) whose
    organization exists and whose user, if any, belongs to it; inserted at most once each,
    with their per-hour sums appended to floor_deltas; the count inserted."""
    return f"""
WITH inserted AS (
    INSERT INTO floor_events ({_COLUMNS})
    SELECT {_COLUMNS} FROM {source}
    WHERE EXISTS (SELECT FROM organizations o WHERE o.id = input.organization_id)
      AND (input.user_id IS NULL OR EXISTS (
          SELECT FROM users u
          WHERE u.organization_id = input.organization_id AND u.id = input.user_id))
    ON CONFLICT (organization_id, id) DO NOTHING
    RETURNING {_COLUMNS}
),
deltas AS (
    INSERT INTO floor_deltas (organization_id, user_id, hour_at, {METRIC_COLUMNS})
    SELECT organization_id, coalesce(user_id, ''), date_trunc('hour', occurred_at, 'UTC'),
           {EVENT_SUMS}
    FROM inserted
    GROUP BY 1, 2, 3
)
SELECT count(*) FROM inserted
"""


_INSERT = floor_insert(
    "unnest({}) AS input({})".format(
        ", ".join(f"${n}::{t}[]" for n, t in enumerate(EVENT_COLUMNS.values(), start=1)),
        _COLUMNS,
    )
)


_KNOWLEDGE_BASE = list(EVENT_COLUMNS).index("knowledge_base")


async def _keep(connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is."""


class FloorBatch(BaseModel):
    events: list[UsageEventIn] = Field(min_length=1, max_length=1000)


def create_app() -> FastAPI:
    url = os.environ["DATABASE_URL"]
    # As many connections per worker as the API's pool (USAGE_API_POOL_SIZE, no overflow).
    pool_size = int(os.environ.get("USAGE_API_POOL_SIZE") or 10)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Without asyncpg's reset on release (RESET ALL, CLOSE ALL and friends: a round trip
        # per request): neither route sets anything that would need it, and the API's pool
        # does not pay it either (a rollback of nothing sends nothing).
        async with asyncpg.create_pool(url, min_size=1, max_size=pool_size, reset=_keep) as pool:
            app.state.pool = pool
            yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/floor/counters")
    async def counters(organization_id: str, user_id: str = "") -> JSONResponse:
        """One counter row by primary key."""
        row = await app.state.pool.fetchrow(_LOOKUP, organization_id, user_id)
        # No row yet means no usage yet, as in the API.
        usage = dict(row) if row is not None else dict.fromkeys(METRICS, 0)
        return JSONResponse({"success": True, "usage": usage})

    @app.post("/floor/events")
    async def events(batch: FloorBatch) -> JSONResponse:
        """The batch's events, each at most once, with their deltas: one statement."""
        columns = [[getattr(e, c) for e in batch.events] for c in EVENT_COLUMNS]
        kb = _KNOWLEDGE_BASE
        columns[kb] = [bool(v) for v in columns[kb]]  # left out is false
        accepted = await app.state.pool.fetchval(_INSERT, *columns)
        return JSONResponse({"success": True, "accepted": accepted})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--log-level", default=os.environ.get("USAGE_API_LOG_LEVEL", "info"))
    args = parser.parse_args()
    # The same uvicorn.run call as `usage-api serve`.
    uvicorn.run(
        "bench.floor_app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
