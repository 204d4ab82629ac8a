"""What routes get from the app: its services, the engines, and the caller's key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from usage_api.auth import Principal, authenticate
from usage_api.config import Settings
from usage_api.db import Databases, PrimaryEngine
from usage_api.errors import bad_request
from usage_api.http.telemetry import Telemetry
from usage_api.ratelimit import RateLimiter
from usage_api.replicas import Reads

if TYPE_CHECKING:
    from usage_api.ingest import Writer


@dataclass(frozen=True)
class Services:
    """Everything a request may need besides itself: the app's typed state."""

    settings: Settings
    databases: Databases
    limiter: RateLimiter
    telemetry: Telemetry | None
    writer: Writer


def services(request: Request) -> Services:
    found: Services = request.app.state.services
    return found


# async, though they await nothing: FastAPI runs a plain `def` dependency in a thread.
async def _services(request: Request) -> Services:
    return services(request)


async def _primary(request: Request) -> PrimaryEngine:
    return services(request).databases.primary


async def _read(request: Request) -> Reads:
    return services(request).databases.read


ServicesDep = Annotated[Services, Depends(_services)]
PrimaryDb = Annotated[PrimaryEngine, Depends(_primary)]
ReadDb = Annotated[Reads, Depends(_read)]

# Documents the key as the OpenAPI security scheme; auto_error=False so that a missing key
# is our own 401 with the contract's body, not FastAPI's.
_API_KEY = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKey",
    description="An API key (`usk_...`): its scope and permission decide what it may see and do.",
    auto_error=False,
)


def presented_key(request: Request) -> str | None:
    """The request's `X-API-Key`; 400 when it came more than once (proxies and servers
    disagree on which of several one would take)."""
    keys = request.headers.getlist("x-api-key")
    if len(keys) > 1:
        raise bad_request("X-API-Key header must be sent once")
    return keys[0] if keys else None


async def _current_key(
    request: Request,
    engine: PrimaryDb,
    _documented: Annotated[str | None, Security(_API_KEY)],
) -> Principal:
    # Keys are looked up on the primary: a key created a moment ago works at once.
    principal = await authenticate(engine, presented_key(request))
    # For the access log, which names a key by its id only.
    request.state.key_id = principal.key_id
    return principal


CurrentKey = Annotated[Principal, Depends(_current_key)]
