"""Who the dashboard shows: partners, organizations and users the session's key may see.

Names and membership only; every number comes from the API's own reads (`figures`).
Out of scope reads as unknown, as everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import Principal
from usage_api.sql import visible_organization

VISIBLE_ORGANIZATION = visible_organization()

ADMIN_PAGE_SIZE = 50


@dataclass(frozen=True)
class Tenant:
    """A partner, an organization or a user, with its parent when the key may see it."""

    kind: str  # "partner" | "organization" | "user"
    id: str
    name: str
    email: str | None = None
    parent: Tenant | None = None


@dataclass(frozen=True)
class Member:
    """A row of a breakdown: an organization of a partner, a user of an organization, or
    (id None) an organization's usage without a user."""

    id: str | None
    name: str | None
    email: str | None = None


async def _rows(conn: AsyncConnection, sql: str, params: dict[str, Any]) -> list[Any]:
    return list(await conn.execute(text(sql), params))


def _can_see_partner(principal: Principal, partner_id: str) -> bool:
    return principal.scope == "admin" or principal.partner_id == partner_id


async def find_partner(
    conn: AsyncConnection, principal: Principal, partner_id: str
) -> Tenant | None:
    if not _can_see_partner(principal, partner_id):
        return None
    rows = await _rows(conn, "SELECT id, name FROM partners WHERE id = :id", {"id": partner_id})
    return Tenant("partner", rows[0].id, rows[0].name) if rows else None


async def find_organization(
    conn: AsyncConnection, principal: Principal, organization_id: str
) -> Tenant | None:
    rows = await _rows(
        conn,
        "SELECT o.id, o.name, p.id AS partner_id, p.name AS partner_name FROM organizations o"
        f" LEFT JOIN partners p ON p.id = o.partner_id WHERE o.id = :id AND {VISIBLE_ORGANIZATION}",
        {"id": organization_id, **principal.scope_params()},
    )
    if not rows:
        return None
    row = rows[0]
    parent = None
    if row.partner_id is not None and _can_see_partner(principal, row.partner_id):
        parent = Tenant("partner", row.partner_id, row.partner_name)
    return Tenant("organization", row.id, row.name, parent=parent)


async def find_user(conn: AsyncConnection, principal: Principal, user_id: str) -> Tenant | None:
    rows = await _rows(
        conn,
        "SELECT u.id, u.name, u.email, u.organization_id FROM users u"
        " JOIN organizations o ON o.id = u.organization_id"
        f" WHERE u.id = :id AND {VISIBLE_ORGANIZATION}",
        {"id": user_id, **principal.scope_params()},
    )
    if not rows:
        return None
    organization = await find_organization(conn, principal, rows[0].organization_id)
    return Tenant("user", rows[0].id, rows[0].name, rows[0].email, parent=organization)


async def member_count(conn: AsyncConnection, principal: Principal, tenant: Tenant) -> int:
    """How many organizations a partner has, or users an organization: the table's members
    (its rows are the breakdown's, read in `figures`)."""
    if tenant.kind == "partner":
        sql = (
            "SELECT count(*) FROM organizations o"
            f" WHERE o.partner_id = :id AND {VISIBLE_ORGANIZATION}"
        )
        params = {"id": tenant.id, **principal.scope_params()}
    else:
        sql, params = "SELECT count(*) FROM users WHERE organization_id = :id", {"id": tenant.id}
    count: int = (await conn.execute(text(sql), params)).scalar_one()
    return count


async def admin_lists(conn: AsyncConnection, page: int) -> tuple[list[Tenant], list[Tenant], int]:
    """What an admin key picks from: a page of partners and of organizations, and how many
    pages the longer list has."""
    offset = (page - 1) * ADMIN_PAGE_SIZE
    params = {"limit": ADMIN_PAGE_SIZE, "offset": offset}
    partners = await _rows(
        conn, "SELECT id, name FROM partners ORDER BY name, id LIMIT :limit OFFSET :offset", params
    )
    organizations = await _rows(
        conn,
        "SELECT o.id, o.name, p.id AS partner_id, p.name AS partner_name FROM organizations o"
        " LEFT JOIN partners p ON p.id = o.partner_id ORDER BY o.name, o.id"
        " LIMIT :limit OFFSET :offset",
        params,
    )
    counts = (
        await conn.execute(
            text("SELECT (SELECT count(*) FROM partners), (SELECT count(*) FROM organizations)")
        )
    ).one()
    pages = max(1, -(-max(counts[0], counts[1]) // ADMIN_PAGE_SIZE))
    return (
        [Tenant("partner", row.id, row.name) for row in partners],
        [
            Tenant(
                "organization",
                row.id,
                row.name,
                parent=Tenant("partner", row.partner_id, row.partner_name)
                if row.partner_id
                else None,
            )
            for row in organizations
        ],
        pages,
    )
