"""The analytics routes: `GET /v1/analytics/usage` and its breakdown."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from usage_api.analytics.answers import (
    CSV_CONTENT,
    NOT_MODIFIED,
    csv_answer,
    csv_body,
    file_name,
    json_answer,
    metric_cells,
    series_answer,
    series_csv_rows,
    wants_csv,
)
from usage_api.analytics.breakdown import csv_rows, parse_breakdown_query, read_breakdown
from usage_api.analytics.query import parse_usage_query
from usage_api.analytics.schemas import (
    BreakdownResponse,
    UsageResponse,
    breakdown_parameters,
    usage_parameters,
)
from usage_api.analytics.series import read_series
from usage_api.analytics.totals import partner_visible, read_usage
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
    responses={
        200: {"model": UsageResponse, **CSV_CONTENT},
        304: NOT_MODIFIED,
        **error_responses(400, 401, 404, 429, 500, 503),
    },
)
async def get_usage(request: Request) -> Response:
    """Usage of an organization or a user: all time, over a date range, or as a series."""
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
    read = read_series if query.granularity is not None else read_usage
    key_id, usage = await read(reads, key_hash, query)
    request.state.key_id = key_id
    if usage is None:
        if query.partner_id is not None and not await partner_visible(
            reads, key_hash, query.partner_id
        ):
            raise not_found("partner")
        raise not_found(query.kind)
    if query.granularity is not None and wants_csv(request):
        rows = series_csv_rows(usage)
        filename = file_name("usage", query.user_id or query.organization_id, query.granularity)
        return csv_answer(request, filename, csv_body(["start", "end"], rows))
    if query.granularity is not None:
        return series_answer(request, usage, app.settings.powered_by)
    return json_answer(
        request, {"success": True, "usage": usage, "powered_by": app.settings.powered_by}
    )


@router.get(
    "/v1/analytics/usage/breakdown",
    operation_id="getUsageBreakdown",
    openapi_extra=breakdown_parameters(),
    responses={
        200: {"model": BreakdownResponse, **CSV_CONTENT},
        304: NOT_MODIFIED,
        **error_responses(400, 401, 404, 429, 500, 503),
    },
)
async def get_breakdown(request: Request) -> Response:
    """Usage of each organization of a partner, or each user of an organization, paged."""
    app = services(request)
    reads = app.databases.read
    api_key = request.headers.get("x-api-key")
    key_hash = presented_hash(api_key)
    try:
        query = parse_breakdown_query(request.query_params)
    except ApiError:
        request.state.key_id = (await authenticate(app.databases.primary, api_key)).key_id
        raise
    key_id, breakdown = await read_breakdown(reads, key_hash, query)
    request.state.key_id = key_id
    if breakdown is None:
        partner_id = query.usage.partner_id
        if partner_id is not None and not await partner_visible(reads, key_hash, partner_id):
            raise not_found("partner")
        raise not_found("organization" if query.group_by == "user" else "partner")
    if wants_csv(request):
        head, rows = csv_rows(query.group_by, breakdown["rows"])
        parent = query.usage.organization_id or query.usage.partner_id
        return csv_answer(
            request,
            file_name("breakdown", parent, query.group_by + "s"),
            csv_body(
                head,
                (
                    [*cells, *metric_cells(r)]
                    for cells, r in zip(rows, breakdown["rows"], strict=True)
                ),
            ),
        )
    return json_answer(
        request, {"success": True, "breakdown": breakdown, "powered_by": app.settings.powered_by}
    )
