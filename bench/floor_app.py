"""The floor app: the least an HTTP counter read can cost on this stack.

One FastAPI route doing one asyncpg primary-key lookup of `usage_counters`; no key
check, no ORM layer. It runs under the same uvicorn settings, worker count and pool size
as the API, so the API's counter reads can be judged against it in the same run.

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

from usage_api.models import METRICS

_LOOKUP = (
    f"SELECT {', '.join(METRICS)} FROM usage_counters WHERE organization_id = $1 AND user_id = $2"
)


def create_app() -> FastAPI:
    url = os.environ["DATABASE_URL"]
    # As many connections per worker as the API's pool (USAGE_API_POOL_SIZE, no overflow).
    pool_size = int(os.environ.get("USAGE_API_POOL_SIZE") or 10)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with asyncpg.create_pool(url, min_size=1, max_size=pool_size) as pool:
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
