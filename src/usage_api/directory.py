"""The directory: `PUT` upserts of partners, organizations and users, inside a key's scope.

What a key may not see reads as unknown (404), as everywhere. A partner key creates and
updates organizations of its own partner; an organization key may only rename its own
organization; only admin keys manage partners or move an organization between partners.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import VISIBLE_ORGANIZATION, Principal
from usage_api.errors import ApiError, not_found
from usage_api.schemas import OrganizationIn, PartnerIn, UserIn

# `xmax = 0` holds for a row this statement inserted, not for one it updated.
_UPSERT_PARTNER = text("""
INSERT INTO partners (id, name) VALUES (:id, :name)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, updated_at = now()
RETURNING id, name, (xmax = 0) AS created
""")

_ORGANIZATION_SCOPE = text(f"""
SELECT o.partner_id, {VISIBLE_ORGANIZATION} AS visible FROM organizations o WHERE o.id = :id
""")

_PARTNER_EXISTS = text("SELECT 1 FROM partners WHERE id = :id")

_UPSERT_ORGANIZATION = text("""
INSERT INTO organizations (id, name, partner_id) VALUES (:id, :name, :partner_id)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, partner_id = excluded.partner_id,
    updated_at = now()
RETURNING id, name, partner_id, (xmax = 0) AS created
""")

_VISIBLE_ORGANIZATION = text(f"""
SELECT 1 FROM organizations o WHERE o.id = :id AND {VISIBLE_ORGANIZATION}
""")

_UPSERT_USER = text("""
INSERT INTO users (organization_id, id, name, email) VALUES (:organization_id, :id, :name, :email)
ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email, updated_at = now()
WHERE users.organization_id = excluded.organization_id
RETURNING id, organization_id, name, email, (xmax = 0) AS created
""")

_USER_ORGANIZATION = text(f"""
SELECT u.organization_id, {VISIBLE_ORGANIZATION} AS visible
FROM users u JOIN organizations o ON o.id = u.organization_id WHERE u.id = :id
""")


def _admin_only(principal: Principal) -> None:
    if principal.scope != "admin":
        raise ApiError(403, "API key does not have admin scope")


async def put_partner(
    conn: AsyncConnection, principal: Principal, partner_id: str, body: PartnerIn
) -> tuple[bool, dict[str, Any]]:
    _admin_only(principal)
    row = (await conn.execute(_UPSERT_PARTNER, {"id": partner_id, "name": body.name})).one()
    return row.created, {"id": row.id, "name": row.name}


async def put_organization(
    conn: AsyncConnection, principal: Principal, organization_id: str, body: OrganizationIn
) -> tuple[bool, dict[str, Any]]:
    scope = principal.scope_params()
    existing = (await conn.execute(_ORGANIZATION_SCOPE, {"id": organization_id, **scope})).first()
    if (existing is not None and not existing.visible) or (
        existing is None and principal.scope == "organization"
    ):
        raise not_found("organization")
    if principal.scope == "partner":
        partner_allowed = body.partner_id == principal.partner_id
    elif principal.scope == "organization":
        partner_allowed = existing is not None and body.partner_id == existing.partner_id
    else:
        partner_allowed = body.partner_id is None or (
            await conn.scalar(_PARTNER_EXISTS, {"id": body.partner_id}) is not None
        )
    if not partner_allowed:
        raise not_found("partner")
    row = (
        await conn.execute(
            _UPSERT_ORGANIZATION,
            {"id": organization_id, "name": body.name, "partner_id": body.partner_id},
        )
    ).one()
    return row.created, {"id": row.id, "name": row.name, "partner_id": row.partner_id}


async def put_user(
    conn: AsyncConnection, principal: Principal, user_id: str, body: UserIn
) -> tuple[bool, dict[str, Any]]:
    scope = principal.scope_params()
    visible = await conn.scalar(_VISIBLE_ORGANIZATION, {"id": body.organization_id, **scope})
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
