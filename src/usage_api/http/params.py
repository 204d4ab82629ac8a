"""Reading requests: ids in paths, JSON bodies, and the one route class that skips FastAPI's
request machinery.

Routes parse their own input so that every failure is a 400 with the contract's message
(FastAPI's validation would answer 422 in its own shape).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.responses import Response
from starlette.routing import Match, Route, request_response
from starlette.types import Scope

from usage_api.errors import ApiError, bad_request
from usage_api.ids import is_valid_id
from usage_api.schemas import error_message

M = TypeVar("M", bound=BaseModel)


class _IdConvertor(PathConvertor):
    """A caller's id in a path (`{name:id}`): anything, newlines included, for `checked_id`
    to judge. With `path` (`.*`), Starlette's route pattern, which ends in `$`, would match
    `/v1/users/u1%0A` as user `u1`: `$` also matches before a trailing newline."""

    regex = "(?s:.*)"


register_url_convertor("id", _IdConvertor())


class FastRoute(APIRoute):
    """A route whose endpoint takes the `Request` alone and is called with it directly.

    FastAPI's handling of a request (dependency solving, parameter parsing, response
    serialization, the exit stacks that dependencies with `yield` need) is about a seventh
    of a counter read's CPU: the request goes through Starlette's plain request/response
    wrapper instead (bodies are limited by `BodySizeLimit`). The route is still an
    `APIRoute`, so it is registered once and documented from `openapi_extra`; since nothing
    of the signature would be run, an endpoint asking for more than the request is refused.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        dependant = self.dependant
        if (
            dependant.dependencies
            or dependant.path_params
            or dependant.query_params
            or dependant.header_params
            or dependant.cookie_params
            or dependant.body_params
        ):
            raise TypeError(f"{path}: a FastRoute endpoint takes the Request and nothing else")
        self.app = request_response(self.endpoint)

    # Starlette's own matching and handling: FastAPI's look on every request for the router
    # inclusion a route was reached through, and ours are put on the app as they are
    # (`app._add_routes`).
    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = Route.matches(self, scope)
        if match is not Match.NONE:
            child_scope["route"] = self  # as FastAPI's router expects of its routes
        return match, child_scope

    handle = Route.handle

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint


def blank_as_none(value: str | None) -> str | None:
    """An empty query parameter (`?start_date=`) counts as absent, as forms send them."""
    return value if value else None


def checked_id(value: str | None, name: str) -> str | None:
    """`value` when it is a valid id (or None); else 400 `invalid <name>`."""
    if value is not None and not is_valid_id(value):
        raise bad_request(f"invalid {name}")
    return value


async def json_body(request: Request) -> Any:
    """The request's body as JSON: 415 unless it says it is JSON (so that no HTML form or
    other cross-site "simple request" can write), 400 when it is not JSON or an object in
    it repeats a key (which of the two a reader takes is up to the reader)."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    try:
        return json.loads(
            await request.body(),
            parse_constant=_reject_constant,
            object_pairs_hook=_object_without_repeats,
        )
    except _RepeatedKey as exc:
        raise bad_request(f"request body must not repeat a key: {exc.key}") from None
    except (ValueError, RecursionError):
        # RecursionError: nesting deep enough to exhaust the parser's stack is not a
        # document any client means to send.
        raise bad_request("request body must be valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                # Quoted as JSON: a key may hold any character.
                raise _RepeatedKey(json.dumps(key))
            seen.add(key)
    return result


async def parse_body(request: Request, model: type[M]) -> M:
    """The request's JSON body as `model`; 400 `invalid <field>: <reason>` otherwise."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        raise bad_request(f"invalid {field}: {error_message(first)}") from None
