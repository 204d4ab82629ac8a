"""`usage-api import` against HTTP batches, on the same machine and database, alternated.

    uv run python -m bench.import_rate [--events 200000] [--rounds 3]
        [--url postgresql://postgres@127.0.0.1:5432/importer]

Each round imports a fresh NDJSON file of `--events` new events (in-process `run_import`,
both passes: the check and the writes), then posts as many new events to a live
`usage-api serve --workers 2` in 1000-event batches from 4 concurrent clients. The bodies
are serialized before the clock starts, so the client's own JSON work is not counted
against the server. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from usage_api.auth import Principal
from usage_api.config import get_settings
from usage_api.db import PrimaryEngine, create_engine, transact
from usage_api.directory import put_organization, put_user
from usage_api.importer import run_import
from usage_api.keys import create_key
from usage_api.schemas import OrganizationIn, UserIn

BIN = Path(sys.executable).parent
ADMIN = Principal("bench", "admin", None, None, can_write=True)
ORGANIZATIONS = 10
USERS = 20
BATCH = 1000
CLIENTS = 4


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    """Count new events spread over the organizations, users, kinds and a year of hours."""
    made = []
    for n in range(count):
        org = n % ORGANIZATIONS
        kind = ("sms", "mms", "voice")[n % 3]
        event: dict[str, Any] = {
            "id": f"{prefix}-{n}",
            "organization_id": f"bench-org-{org}",
            "type": kind,
            "direction": ("outbound", "inbound")[n // 3 % 2],
            "occurred_at": f"2025-{1 + n % 12:02d}-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00Z",
        }
        if n % 2:
            event["user_id"] = f"bench-user-{org}-{n % USERS}"
        if kind == "voice":
            event["seconds"] = 1 + n % 600
            event["knowledge_base"] = n % 5 == 0
        else:
            event["segments"] = 1 + n % 3
        made.append(event)
    return made


async def prepare(url: str) -> str:
    """A fresh, migrated database with the organizations and users; an admin write key."""
    parsed = make_url(url)
    admin = await asyncpg.connect(
        parsed.set(database="postgres").render_as_string(hide_password=False)
    )
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{parsed.database}"')
    finally:
        await admin.close()
    env = {**os.environ, "DATABASE_URL": url}
    await asyncio.to_thread(subprocess.run, [BIN / "usage-api", "migrate"], env=env, check=True)
    engine = PrimaryEngine(create_engine(get_settings(), url))
    try:
        for org in range(ORGANIZATIONS):
            org_id = f"bench-org-{org}"
            await transact(engine, put_organization, ADMIN, org_id, OrganizationIn(name=org_id))
            for user in range(USERS):
                body = UserIn(organization_id=org_id, name="U", email="u@example.com")
                await transact(engine, put_user, ADMIN, f"bench-user-{org}-{user}", body)

        async def key(conn: Any) -> tuple[str, str]:
            return await create_key(conn, scope="admin", can_write=True)

        return (await transact(engine, key))[1]
    finally:
        await engine.dispose()


async def import_rate(url: str, path: Path, count: int) -> float:
    engine = PrimaryEngine(create_engine(get_settings(), url))
    try:
        started = time.monotonic()
        summary = await run_import(engine, str(path), stderr=io.StringIO())
        elapsed = time.monotonic() - started
    finally:
        await engine.dispose()
    assert summary.accepted == count, summary
    return count / elapsed


async def http_rate(port: int, key: str, made: list[dict[str, Any]]) -> float:
    bodies = [
        json.dumps({"events": made[i : i + BATCH]}).encode() for i in range(0, len(made), BATCH)
    ]
    queue = list(reversed(bodies))
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    accepted = 0

    async def client() -> None:
        nonlocal accepted
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            while queue:
                response = await http.post("/v1/usage/events", content=queue.pop(), headers=headers)
                response.raise_for_status()
                accepted += response.json()["accepted"]

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    elapsed = time.monotonic() - started
    assert accepted == len(made), accepted
    return len(made) / elapsed


async def wait_ready(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(600):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not come up")


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=18_431)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/importer")
    args = parser.parse_args(argv)
    key = await prepare(args.url)
    env = {**os.environ, "DATABASE_URL": args.url, "USAGE_API_LOG_LEVEL": "warning"}
    command = [BIN / "usage-api", "serve", "--port", str(args.port), "--workers", "2"]
    server = await asyncio.to_thread(subprocess.Popen, command, env=env)
    imported: list[float] = []
    posted: list[float] = []
    try:
        await wait_ready(args.port)
        with tempfile.TemporaryDirectory() as tmp:
            for round in range(1, args.rounds + 1):
                path = Path(tmp) / "events.ndjson"
                with path.open("w") as out:
                    for event in events(f"import-{round}", args.events):
                        out.write(json.dumps(event) + "\n")
                imported.append(await import_rate(args.url, path, args.events))
                posted.append(await http_rate(args.port, key, events(f"http-{round}", args.events)))
                print(
                    f"round {round}: import {imported[-1]:,.0f} events/s,"
                    f" HTTP batches {posted[-1]:,.0f} events/s",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
    ratio = statistics.median(imported) / statistics.median(posted)
    print(
        f"median of {args.rounds}, {args.events:,} events each: import"
        f" {statistics.median(imported):,.0f} events/s, HTTP batches ({BATCH} a request,"
        f" {CLIENTS} clients, 2 workers) {statistics.median(posted):,.0f} events/s: {ratio:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
