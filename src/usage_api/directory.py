"""The directory: `PUT` upserts of partners, organizations and users, inside a key's scope,
and their reads (`GET` one, lists of organizations and users in pages by id).

What a key may not see reads as unknown (404), as everywhere. A partner key creates and
updates organizations of its own partner; an organization key may only rename its own
organization; only admin keys manage partners or move an organization between partners.
An organization body without `partner_id` keeps the partner it has (on creation: the
partner of a partner key, none for an admin key).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.analytics.breakdown import page_cursor, parse_limit, read_page_cursor
from usage_api.auth import Principal
from usage_api.db import transact
from usage_api.errors import ApiError, not_found
from usage_api.http.deps import CurrentKey, PrimaryDb, ReadDb
from usage_api.http.openapi import error_responses, request_body, upsert_responses
from usage_api.http.params import blank_as_none, checked_id, parse_body
from usage_api.replicas import Reads
from usage_api.schemas import (
    ClosedModel,
    OrganizationIdPath,
    OrganizationIn,
    OrganizationOut,
    OrganizationResponse,
    PartnerIdPath,
    PartnerIn,
    PartnerResponse,
    UserIdPath,
    UserIn,
    UserOut,
    UserResponse,
)
from usage_api.sql import visible_organization

_IN_SCOPE = visible_organization()

# `xmax = 0` holds for a row this statement inserted, not for one it updated.
_UPSERT_PARTNER = text("""
INSERT INTO partners (id, name) VALUES (:id, :name)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = now()
RETURNING id, name, (xmax = 0) AS created
""")

_ORGANIZATION_SCOPE = text(f"""
SELECT o.partner_id, {_IN_SCOPE} AS visible FROM organizations o WHERE o.id = :id
""")

_PARTNER_EXISTS = text("SELECT 1 FROM partners WHERE id = :id")

# The WHERE re-checks the scope on the row being updated: an organization another tenant
# created since `_ORGANIZATION_SCOPE` looked is left alone (no row comes back).
_UPSERT_ORGANIZATION = text(f"""
INSERT INTO organizations AS o (id, name, partner_id) VALUES (:id, :name, :partner_id)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, partner_id = excluded.partner_id,
    updated_at = now()
WHERE {_IN_SCOPE}
RETURNING id, name, partner_id, (xmax = 0) AS created
""")

_VISIBLE = text(f"""
SELECT 1 FROM organizations o WHERE o.id = :id AND {_IN_SCOPE}
""")

_UPSERT_USER = text("""
INSERT INTO users (organization_id, id, name, email) VALUES (:organization_id, :id, :name, :email)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, updated_at = now()
WHERE users.organization_id = excluded.organization_id
RETURNING id, organization_id, name, email, (xmax = 0) AS created
""")

_USER_ORGANIZATION = text(f"""
SELECT u.organization_id, {_IN_SCOPE} AS visible
FROM users u JOIN organizations o ON o.id = u.organization_id WHERE u.id = :id
""")


async def put_partner(
    conn: AsyncConnection, principal: Principal, partner_id: str, body: PartnerIn
) -> tuple[bool, dict[str, Any]]:
    principal.require_admin()
    row = (await conn.execute(_UPSERT_PARTNER, {"id": partner_id, "name": body.name})).one()
    return row.created, {"id": row.id, "name": row.name}


async def _partner_for(
    conn: AsyncConnection, principal: Principal, existing: Any, body: OrganizationIn
) -> str | None:
    """The partner the organization will have, if this key may give it that one."""
    current = existing.partner_id if existing is not None else principal.partner_id
    if "partner_id" not in body.model_fields_set:
        return current
    requested = body.partner_id
    if principal.scope == "admin":
        if requested is not None and await conn.scalar(_PARTNER_EXISTS, {"id": requested}) is None:
            raise not_found("partner")
        return requested
    if requested == current:
        return requested
    if requested is None:
        raise ApiError(403, "only admin keys may change an organization's partner")
    # Partners other than its own do not exist for a partner or organization key.
    raise not_found("partner")


async def put_organization(
    conn: AsyncConnection, principal: Principal, organization_id: str, body: OrganizationIn
) -> tuple[bool, dict[str, Any]]:
    scope = principal.scope_params()
    if principal.scope == "partner":
        # Every organization a partner key may write has the key's partner, so the partner
        # it asks for is judged before the organization is looked up: an id outside the
        # scope and one never seen answer alike.
        partner_id = await _partner_for(conn, principal, None, body)
    existing = (await conn.execute(_ORGANIZATION_SCOPE, {"id": organization_id, **scope})).first()
    if (existing is not None and not existing.visible) or (
        existing is None and principal.scope == "organization"
    ):
        raise not_found("organization")
    if principal.scope != "partner":
        partner_id = await _partner_for(conn, principal, existing, body)
    row = (
        await conn.execute(
            _UPSERT_ORGANIZATION,
            {"id": organization_id, "name": body.name, "partner_id": partner_id, **scope},
        )
    ).first()
    if row is None:
        raise not_found("organization")
    return row.created, {"id": row.id, "name": row.name, "partner_id": row.partner_id}


async def put_user(
    conn: AsyncConnection, principal: Principal, user_id: str, body: UserIn
) -> tuple[bool, dict[str, Any]]:
    scope = principal.scope_params()
    visible = await conn.scalar(_VISIBLE, {"id": body.organization_id, **scope})
    if visible is None:
        raise not_found("organization")
    row = (
        await conn.execute(
            _UPSERT_USER,
            {
                "organization_id": body.organization_id,
                "id": user_id,
                "name": body.name,
                "email": body.email,
            },
        )
    ).first()
    if row is None:
        # The id is taken by a user of another organization. Say so only to a key that
        # can see that organization; for any other the user simply does not exist.
        other = (await conn.execute(_USER_ORGANIZATION, {"id": user_id, **scope})).one()
        if other.visible:
            raise ApiError(409, "user belongs to another organization")
        raise not_found("user")
    return row.created, {
        "id": row.id,
        "organization_id": row.organization_id,
        "name": row.name,
        "email": row.email,
    }


router = APIRouter(tags=["directory"])


def _upserted(kind: str, created: bool, entity: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"success": True, kind: entity}, status_code=201 if created else 200)


@router.put(
    "/v1/partners/{partner_id:id}",
    operation_id="putPartner",
    openapi_extra=request_body(PartnerIn),
    responses=upsert_responses(PartnerResponse, 400, 401, 403, 413, 415, 429, 500, 503),
)
async def put_partner_route(
    request: Request, engine: PrimaryDb, principal: CurrentKey, partner_id: PartnerIdPath
) -> JSONResponse:
    """Create or rename a partner (admin keys)."""
    principal.require_write()
    principal.require_admin()
    checked_id(partner_id, "partner_id")
    body = await parse_body(request, PartnerIn)
    created, entity = await transact(engine, put_partner, principal, partner_id, body)
    return _upserted("partner", created, entity)


@router.put(
    "/v1/organizations/{organization_id:id}",
    operation_id="putOrganization",
    openapi_extra=request_body(OrganizationIn),
    responses=upsert_responses(OrganizationResponse, 400, 401, 403, 404, 413, 415, 429, 500, 503),
)
async def put_organization_route(
    request: Request,
    engine: PrimaryDb,
    principal: CurrentKey,
    organization_id: OrganizationIdPath,
) -> JSONResponse:
    """Create or update an organization in the key's scope (no `partner_id`: keep it)."""
    principal.require_write()
    checked_id(organization_id, "organization_id")
    body = await parse_body(request, OrganizationIn)
    created, entity = await transact(engine, put_organization, principal, organization_id, body)
    return _upserted("organization", created, entity)


@router.put(
    "/v1/users/{user_id:id}",
    operation_id="putUser",
    openapi_extra=request_body(UserIn),
    responses=upsert_responses(UserResponse, 400, 401, 403, 404, 409, 413, 415, 429, 500, 503),
)
async def put_user_route(
    request: Request, engine: PrimaryDb, principal: CurrentKey, user_id: UserIdPath
) -> JSONResponse:
    """Create or update a user of an organization inside the key's scope."""
    principal.require_write()
    checked_id(user_id, "user_id")
    body = await parse_body(request, UserIn)
    created, entity = await transact(engine, put_user, principal, user_id, body)
    return _upserted("user", created, entity)


# -- reads (any key, inside its scope) -----------------------------------------------------

_PARTNER_READ = text("""
SELECT p.id, p.name FROM partners p
WHERE p.id = :id AND (:scope = 'admin' OR p.id = :scope_partner_id)
""")
_ORGANIZATION_READ = text(f"""
SELECT o.id, o.name, o.partner_id FROM organizations o WHERE o.id = :id AND {_IN_SCOPE}
""")
_USER_READ = text(f"""
SELECT u.id, u.organization_id, u.name, u.email FROM users u
JOIN organizations o ON o.id = u.organization_id
WHERE u.id = :id AND {_IN_SCOPE}
""")
_ORGANIZATIONS = text(f"""
SELECT o.id, o.name, o.partner_id FROM organizations o
WHERE {_IN_SCOPE} AND (CAST(:partner_id AS text) IS NULL OR o.partner_id = :partner_id)
  AND o.id > :after
ORDER BY o.id LIMIT :limit
""")
_USERS = text(f"""
SELECT u.id, u.organization_id, u.name, u.email FROM users u
JOIN organizations o ON o.id = u.organization_id
WHERE {_IN_SCOPE}
  AND (CAST(:organization_id AS text) IS NULL OR u.organization_id = :organization_id)
  AND u.id > :after
ORDER BY u.id LIMIT :limit
""")


async def _one(conn: AsyncConnection, statement: Any, principal: Principal, id: str) -> Any:
    return (await conn.execute(statement, {"id": id, **principal.scope_params()})).first()


async def get_entity(
    conn: AsyncConnection, principal: Principal, kind: str, id: str
) -> dict[str, Any]:
    """One partner, organization or user as its upsert answers it; 404 outside the scope."""
    statement = {"partner": _PARTNER_READ, "organization": _ORGANIZATION_READ}.get(kind, _USER_READ)
    row = await _one(conn, statement, principal, id)
    if row is None:
        raise not_found(kind)
    return dict(row._mapping)


async def list_entities(
    conn: AsyncConnection,
    principal: Principal,
    kind: str,
    parent: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None]:
    """A page of the organizations (of a partner) or users (of an organization) the key
    may see, by id; the filter names something in scope or it is a 404."""
    parent_kind = "partner" if kind == "organization" else "organization"
    binding = f"{kind}:{parent or ''}"
    after = read_page_cursor(cursor, binding) if cursor is not None else ""
    if parent is not None:
        await get_entity(conn, principal, parent_kind, parent)
    statement = _ORGANIZATIONS if kind == "organization" else _USERS
    params = {f"{parent_kind}_id": parent, "after": after, "limit": limit + 1}
    rows = [
        dict(r._mapping)
        for r in await conn.execute(statement, {**params, **principal.scope_params()})
    ]
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, page_cursor(rows[-1]["id"], binding) if more else None


def _entity_answer(kind: str, entity: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"success": True, kind: entity})


@router.get(
    "/v1/partners/{partner_id:id}",
    operation_id="getPartner",
    responses={200: {"model": PartnerResponse}, **error_responses(400, 401, 404, 429, 500, 503)},
)
async def get_partner_route(
    engine: ReadDb, principal: CurrentKey, partner_id: PartnerIdPath
) -> JSONResponse:
    """One partner (admin keys, or the partner's own)."""
    checked_id(partner_id, "partner_id")
    entity = await engine.run(get_entity, principal, "partner", partner_id)
    return _entity_answer("partner", entity)


@router.get(
    "/v1/organizations/{organization_id:id}",
    operation_id="getOrganization",
    responses={
        200: {"model": OrganizationResponse},
        **error_responses(400, 401, 404, 429, 500, 503),
    },
)
async def get_organization_route(
    engine: ReadDb, principal: CurrentKey, organization_id: OrganizationIdPath
) -> JSONResponse:
    """One organization inside the key's scope."""
    checked_id(organization_id, "organization_id")
    entity = await engine.run(get_entity, principal, "organization", organization_id)
    return _entity_answer("organization", entity)


@router.get(
    "/v1/users/{user_id:id}",
    operation_id="getUser",
    responses={200: {"model": UserResponse}, **error_responses(400, 401, 404, 429, 500, 503)},
)
async def get_user_route(
    engine: ReadDb, principal: CurrentKey, user_id: UserIdPath
) -> JSONResponse:
    """One user inside the key's scope."""
    checked_id(user_id, "user_id")
    entity = await engine.run(get_entity, principal, "user", user_id)
    return _entity_answer("user", entity)


class OrganizationsResponse(ClosedModel):
    success: Literal[True]
    organizations: list[OrganizationOut]
    next_cursor: str | None


class UsersResponse(ClosedModel):
    success: Literal[True]
    users: list[UserOut]
    next_cursor: str | None


_LIMIT = Query(
    description="Rows a page, 1 to 1000 (default 100).",
    json_schema_extra={"type": "integer", "minimum": 1, "maximum": 1000},
)
_CURSOR = Query(description="The previous page's `next_cursor`.", max_length=2048)


@router.get(
    "/v1/organizations",
    operation_id="listOrganizations",
    responses={
        200: {"model": OrganizationsResponse},
        **error_responses(400, 401, 404, 429, 500, 503),
    },
)
async def list_organizations_route(
    engine: ReadDb,
    principal: CurrentKey,
    partner_id: Annotated[str | None, Query(description="Only this partner's.")] = None,
    limit: Annotated[str | None, _LIMIT] = None,
    cursor: Annotated[str | None, _CURSOR] = None,
) -> JSONResponse:
    """The organizations the key may see, by id, in pages."""
    return await _page(engine, principal, "organization", ("partner_id", partner_id), limit, cursor)


@router.get(
    "/v1/users",
    operation_id="listUsers",
    responses={200: {"model": UsersResponse}, **error_responses(400, 401, 404, 429, 500, 503)},
)
async def list_users_route(
    engine: ReadDb,
    principal: CurrentKey,
    organization_id: Annotated[str | None, Query(description="Only this organization's.")] = None,
    limit: Annotated[str | None, _LIMIT] = None,
    cursor: Annotated[str | None, _CURSOR] = None,
) -> JSONResponse:
    """The users the key may see, by id, in pages."""
    parent = ("organization_id", organization_id)
    return await _page(engine, principal, "user", parent, limit, cursor)


async def _page(
    engine: Reads,
    principal: Principal,
    kind: str,
    parent: tuple[str, str | None],
    limit: str | None,
    cursor: str | None,
) -> JSONResponse:
    """A page of a list route's answer: `kind`s under the optional parent (name, id)."""
    parent_id = checked_id(blank_as_none(parent[1]), parent[0])
    rows, next_cursor = await engine.run(
        list_entities, principal, kind, parent_id, parse_limit(limit), blank_as_none(cursor)
    )
    return JSONResponse({"success": True, f"{kind}s": rows, "next_cursor": next_cursor})
