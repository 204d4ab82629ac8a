"""`usage-api import` against HTTP batches, on the same machine and database, alternated.

    uv run python -m bench.import_rate [--events 200000] [--rounds 3]
        [--url postgresql://postgres@127.0.0.1:5432/importer] [--baseline-root DIR]

Each round imports a fresh NDJSON file of `--events` new events (`run_import` in a process
of its own, timed inside it from the call to the summary), then posts as many new events
to a live `usage-api serve --workers 2` in 1000-event batches from 4 concurrent clients.
The bodies are serialized before the clock starts, so the client's own JSON work is not
counted against the server. With `--baseline-root` (a checkout of another commit, e.g. a
worktree of main), each round also imports a file of as many new events with that
checkout's importer, in the same database. Before each measurement the server's fold is
left to drain and PostgreSQL checkpoints. Prints each round, with CPU microseconds an event
(the import process's own, or the server's process tree; and PostgreSQL's, its local
postmaster's process tree), and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
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
from usage_api.keys import create_key
from usage_api.schemas import OrganizationIn, UserIn

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
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


# Run with `PYTHONPATH=<root>/src`, so that the checkout under test is the one imported.
_IMPORT = """
import asyncio, io, sys, time
from usage_api.config import get_settings
from usage_api.db import PrimaryEngine, create_engine
from usage_api.importer import run_import

async def main(url, path, count):
    engine = PrimaryEngine(create_engine(get_settings(), url))
    try:
        started, cpu = time.monotonic(), time.process_time()
        summary = await run_import(engine, path, stderr=io.StringIO())
        elapsed, cpu = time.monotonic() - started, time.process_time() - cpu
    finally:
        await engine.dispose()
    assert summary.accepted == count, summary
    print(count / elapsed, cpu)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def import_rate(root: Path, url: str, path: Path, count: int) -> tuple[float, float]:
    """Events/s of `usage-api import` from the checkout at `root`, and its CPU seconds."""
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(root / "src")}
    command = [sys.executable, "-c", _IMPORT, url, str(path), str(count)]
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, check=True, capture_output=True, text=True
    )
    rate, cpu = done.stdout.split()[-2:]
    return float(rate), float(cpu)


def _cpu(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process and of its children it has waited for)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])
    return int(fields[1]), ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by `root` and its children, live or ended."""
    total = _cpu(root)[1]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent, seconds = _cpu(int(entry.name))
            except (OSError, ValueError):
                continue
            if parent == root:
                total += seconds
    return total


async def postmaster(url: str) -> int:
    """The pid of the (local) PostgreSQL server's postmaster: its backends' parent."""
    conn = await asyncpg.connect(url)
    try:
        return _cpu(int(await conn.fetchval("SELECT pg_backend_pid()")))[0]
    finally:
        await conn.close()


async def settle(url: str) -> None:
    """Wait for the server's fold to take in every delta (at most a minute), then
    checkpoint: each measurement starts with no background work left by the one before."""
    conn = await asyncpg.connect(url)
    try:
        for _ in range(600):
            if not await conn.fetchval("SELECT EXISTS (SELECT FROM usage_deltas)"):
                break
            await asyncio.sleep(0.1)
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


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
    parser.add_argument("--baseline-root", type=Path, default=None)
    args = parser.parse_args(argv)
    key = await prepare(args.url)
    env = {**os.environ, "DATABASE_URL": args.url, "USAGE_API_LOG_LEVEL": "warning"}
    command = [BIN / "usage-api", "serve", "--port", str(args.port), "--workers", "2"]
    server = await asyncio.to_thread(subprocess.Popen, command, env=env)
    imported: list[float] = []
    based: list[float] = []
    posted: list[float] = []
    pg = await postmaster(args.url)
    # Microseconds of CPU an event, (client or server, PostgreSQL), per case and round.
    cpu: dict[str, list[tuple[float, float]]] = {"import": [], "baseline": [], "http": []}
    try:
        await wait_ready(args.port)
        with tempfile.TemporaryDirectory() as tmp:
            for round in range(1, args.rounds + 1):
                # Alternated within the round as well, so that neither import always
                # follows the HTTP load's fold.
                cases: list[tuple[str, Path, list[float]]] = [("import", ROOT, imported)]
                if args.baseline_root is not None:
                    cases.append(("baseline import", args.baseline_root, based))
                if round % 2 == 0:
                    cases.reverse()
                for name, root, rates in cases:
                    path = write_events(Path(tmp), f"{name.split()[0]}-{round}", args.events)
                    await settle(args.url)
                    before = tree_cpu(pg)
                    rate, client = await import_rate(root, args.url, path, args.events)
                    rates.append(rate)
                    used = (client, tree_cpu(pg) - before)
                    cpu[name.split()[0]].append(tuple(1e6 * x / args.events for x in used))
                await settle(args.url)
                before, served = tree_cpu(pg), tree_cpu(server.pid)
                made = events(f"http-{round}", args.events)
                posted.append(await http_rate(args.port, key, made))
                used = (tree_cpu(server.pid) - served, tree_cpu(pg) - before)
                cpu["http"].append(tuple(1e6 * x / args.events for x in used))

                def us(case: str) -> str:
                    app, database = cpu[case][-1]
                    return f" ({app:,.0f} + {database:,.0f} us CPU an event)"

                line = f"round {round}: import {imported[-1]:,.0f} events/s{us('import')}"
                if based:
                    line += f", baseline import {based[-1]:,.0f} events/s{us('baseline')}"
                print(f"{line}, HTTP batches {posted[-1]:,.0f} events/s{us('http')}", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    http = statistics.median(posted)
    line = f"median of {args.rounds}, {args.events:,} events each: import"
    line += (
        f" {statistics.median(imported):,.0f} events/s ({statistics.median(imported) / http:.2f}x)"
    )
    if based:
        base = statistics.median(based)
        line += f", baseline import {base:,.0f} events/s ({base / http:.2f}x)"
    print(
        f"{line}, HTTP batches ({BATCH} a request, {CLIENTS} clients, 2 workers)"
        f" {http:,.0f} events/s"
    )
    for case, used in cpu.items():
        if used:
            app = statistics.median(u[0] for u in used)
            database = statistics.median(u[1] for u in used)
            print(
                f"median CPU an event, {case}: {app:,.0f} us client/server"
                f" + {database:,.0f} us PostgreSQL"
            )


def write_events(directory: Path, prefix: str, count: int) -> Path:
    path = directory / f"{prefix}.ndjson"
    with path.open("w") as out:
        for event in events(prefix, count):
            out.write(json.dumps(event) + "\n")
    return path


if __name__ == "__main__":
    asyncio.run(main())
