"""Plain async factories for test data, going through the service's own code paths."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from usage_api.auth import KeyScope, Principal
from usage_api.db import transact
from usage_api.directory import put_organization, put_partner, put_user
from usage_api.ids import new_id
from usage_api.keys import create_key
from usage_api.schemas import OrganizationIn, PartnerIn, UserIn

ADMIN = Principal("test-admin", "admin", None, None, can_write=True)


async def make_partner(engine: AsyncEngine, name: str = "Partner") -> str:
    partner_id = new_id()
    await transact(engine, put_partner, ADMIN, partner_id, PartnerIn(name=name))
    return partner_id


async def make_organization(
    engine: AsyncEngine, name: str = "Org", partner_id: str | None = None
) -> str:
    organization_id = new_id()
    await transact(
        engine,
        put_organization,
        ADMIN,
        organization_id,
        OrganizationIn(name=name, partner_id=partner_id),
    )
    return organization_id


async def make_user(
    engine: AsyncEngine,
    organization_id: str,
    name: str = "User",
    email: str = "user@example.com",
) -> str:
    user_id = new_id()
    await transact(
        engine,
        put_user,
        ADMIN,
        user_id,
        UserIn(organization_id=organization_id, name=name, email=email),
    )
    return user_id


async def make_key(
    engine: AsyncEngine,
    scope: KeyScope = "admin",
    *,
    partner_id: str | None = None,
    organization_id: str | None = None,
    write: bool = False,
    expires_at: datetime | None = None,
) -> str:
    async def work(conn: Any) -> tuple[str, str]:
        return await create_key(
            conn,
            scope=scope,
            partner_id=partner_id,
            organization_id=organization_id,
            can_write=write,
            expires_at=expires_at,
        )

    _, key = await transact(engine, work)
    return key


@dataclass(frozen=True)
class Tenant:
    """An organization (Acme Corp) with one user (John Smith), and a write key that reads too."""

    organization_id: str
    user_id: str
    key: str  # an admin write key: it ingests and reads


async def make_tenant(engine: AsyncEngine) -> Tenant:
    organization_id = await make_organization(engine, "Acme Corp")
    user_id = await make_user(engine, organization_id, "John Smith", "john@example.com")
    return Tenant(organization_id, user_id, await make_key(engine, write=True))


def event(
    organization_id: str,
    event_id: str | None = None,
    *,
    type: str = "sms",
    direction: str = "outbound",
    quantity: int = 1,
    knowledge_base: bool | None = None,
    user_id: str | None = None,
    occurred_at: str = "2026-02-10T12:00:00Z",
) -> dict[str, Any]:
    """One event as a client sends it (JSON-ready)."""
    body: dict[str, Any] = {
        "id": event_id or new_id(),
        "organization_id": organization_id,
        "type": type,
        "direction": direction,
        "occurred_at": occurred_at,
    }
    if user_id is not None:
        body["user_id"] = user_id
    if type == "voice":
        body["seconds"] = quantity
        if knowledge_base is not None:
            body["knowledge_base"] = knowledge_base
    else:
        body["segments"] = quantity
    return body
