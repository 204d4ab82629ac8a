"""The analytics routes: `GET /v1/analytics/usage`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from usage_api.analytics.query import parse_usage_query
from usage_api.analytics.schemas import UsageResponse, usage_parameters
from usage_api.analytics.totals import read_usage
from usage_api.auth import authenticate, presented_hash
from usage_api.errors import ApiError, not_found
from usage_api.http.deps import presented_key, services
from usage_api.http.openapi import error_responses
from usage_api.http.params import FastRoute

router = APIRouter(tags=["analytics"], route_class=FastRoute)


@router.get(
    "/v1/analytics/usage",
    operation_id="getUsage",
    openapi_extra=usage_parameters(),
    responses={200: {"model": UsageResponse}, **error_responses(400, 401, 404, 429, 500, 503)},
)
async def get_usage(request: Request) -> JSONResponse:
    """Usage of an organization or a user: all time, or over a date range."""
    app = services(request)
    reads = app.databases.read
    api_key = presented_key(request)
    key_hash = presented_hash(api_key)
    try:
        query = parse_usage_query(request.query_params)
    except ApiError:
        # A bad key outranks bad parameters.
        request.state.key_id = (await authenticate(app.databases.primary, api_key)).key_id
        raise
    # The key is checked in the same statement as the read: one round trip.
    key_id, usage = await read_usage(reads, key_hash, query)
    request.state.key_id = key_id
    if usage is None:
        raise not_found("user" if query.user_id is not None else "organization")
    return JSONResponse({"success": True, "usage": usage, "powered_by": app.settings.powered_by})
