"""OpenAPI plumbing: the documented errors of each route, request bodies that routes parse
themselves, and the finishing touches on FastAPI's schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from usage_api.schemas import (
    ErrorResponse,
    OrganizationIn,
    PartnerIn,
    UsageEventsIn,
    UserIn,
)

_ERRORS = {
    400: "Malformed request: ids, dates or body",
    401: "No `X-API-Key`, or an unknown, revoked or expired key",
    403: "The key may not do this (write permission, admin scope)",
    404: "Unknown id, or one outside the key's scope",
    409: "The user belongs to another organization",
    413: "Request body too large",
    415: "The request body is not declared as `application/json`",
    429: "The key's rate limit is spent: retry after `Retry-After` seconds",
    500: "Unexpected error (details only in the server log)",
    503: "Database unavailable or too slow: retry after `Retry-After` seconds",
}


_RETRY_AFTER = {"description": "Seconds to wait", "schema": {"type": "integer"}}
_RATE_LIMIT_HEADERS = {
    "RateLimit-Policy": {
        "description": 'The key\'s quota `q` per window of `w` seconds: `"per-key";q=6000;w=60`',
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "Requests `r` left in this window, which ends in `t` seconds",
        "schema": {"type": "string"},
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` documenting a route's errors, all `{"success": false, "error": ...}`."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        response: dict[str, Any] = {"model": ErrorResponse, "description": _ERRORS[status]}
        if status in (429, 503):
            response["headers"] = {"Retry-After": _RETRY_AFTER}
        if status == 429:
            response["headers"].update(_RATE_LIMIT_HEADERS)
        responses[status] = response
    return responses


def upsert_responses(model: type[BaseModel], *errors: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a directory `PUT`: 201 when created, 200 when updated."""
    return {
        200: {"model": model, "description": "Updated"},
        201: {"model": model, "description": "Created"},
        **error_responses(*errors),
    }


_COMPONENT = "#/components/schemas/{model}"
_REQUEST_MODELS = (UsageEventsIn, PartnerIn, OrganizationIn, UserIn)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that the route parses itself, for the contract's
    error messages (see `complete_openapi`)."""
    content = {"application/json": {"schema": {"$ref": _COMPONENT.format(model=model.__name__)}}}
    return {"requestBody": {"required": True, "content": content}}


def complete_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Finish FastAPI's OpenAPI schema: add the request bodies of `request_body`, and drop the
    422 it documents for every route with parameters: a malformed request is a 400 here."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in _REQUEST_MODELS:
        definition = model.model_json_schema(ref_template=_COMPONENT)
        components.update(definition.pop("$defs", {}))
        components[model.__name__] = definition
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
    return schema
