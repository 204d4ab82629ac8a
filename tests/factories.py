"""Plain async factories for test data, going through the service's own code paths."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from usage_api.auth import KeyScope, Principal, create_key
from usage_api.db import transact
from usage_api.directory import put_organization, put_partner, put_user
from usage_api.ids import new_id
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


# The public docs' two example responses, which the demo reproduces exactly.
SEED_ORGANIZATION: dict[str, Any] = {
    "success": True,
    "usage": {
        "organization_id": "1767623610019x414651971228139500",
        "organization_name": "Acme Corp",
        "sms": {"outbound": 12450, "inbound": 3821, "total": 16271},
        "mms": {"outbound": 245, "inbound": 67, "total": 312},
        "voice": {"seconds": 45678, "kb_seconds": 12345, "total_seconds": 58023},
        "period": "all_time",
    },
    "powered_by": "Teli",
}

SEED_USER: dict[str, Any] = {
    "success": True,
    "usage": {
        "user_id": "1768236789852x707565875153419434",
        "user_name": "John Smith",
        "user_email": "john@example.com",
        "sms": {"outbound": 1234, "inbound": 567, "total": 1801},
        "mms": {"outbound": 89, "inbound": 12, "total": 101},
        "voice": {"seconds": 5678, "kb_seconds": 1234, "total_seconds": 6912},
        "period": "all_time",
    },
    "powered_by": "Teli",
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a live server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], log_path: Path, workers: int = 2
) -> AsyncIterator[tuple[asyncio.subprocess.Process, httpx.AsyncClient]]:
    """`usage-api serve --workers N` on a free port, its stderr in `log_path`, stopped by
    SIGTERM at the end; with a client that opens a connection per request, so that every
    worker gets some."""
    port = free_port()
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            Path(sys.executable).with_name("usage-api"),
            *["serve", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", limits=limits, trust_env=False
        ) as http:
            yield process, http
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)


def sigkill_postmaster(data_dir: Path, timeout: float = 5.0) -> None:
    """SIGKILL the PostgreSQL server of `data_dir`, and wait until it is gone (kill()
    returns before that; without a reaping init the process stays a zombie)."""
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.005)
