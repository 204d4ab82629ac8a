"""Operations: liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from starlette.requests import Request
from starlette.responses import Response

from usage_api.db import run_autocommit
from usage_api.http.deps import PrimaryDb, ReadDb, services
from usage_api.http.openapi import error_responses

router = APIRouter(tags=["operations"])


@router.get("/healthz", operation_id="getHealth")
async def healthz() -> dict[str, str]:
    """The process is alive (no database check)."""
    return {"status": "ok"}


@router.get("/readyz", operation_id="getReadiness", responses=error_responses(500, 503))
async def readyz(engine: PrimaryDb, reads: ReadDb) -> dict[str, Any]:
    """The database answers (and, with read replicas, how each one is doing)."""
    await run_autocommit(engine, _ping)
    if not reads.replicas:
        return {"status": "ready"}
    # A replica that is down does not make the service unready: the primary serves.
    return {"status": "ready", "replicas": reads.describe(), "fallbacks": reads.fallbacks}


async def _ping(conn: Any) -> None:
    await conn.execute(text("SELECT 1"))


# Included only when metrics are on; without them the path is unknown like any other.
metrics_router = APIRouter()


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (for scrapers; not to be exposed publicly)."""
    telemetry = services(request).telemetry
    assert telemetry is not None
    return Response(telemetry.render(), media_type=CONTENT_TYPE_LATEST)
