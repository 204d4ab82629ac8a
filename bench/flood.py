"""What a flood of made-up API keys costs the database, against a live `usage-api serve`.

    DATABASE_URL=postgresql://... uv run python -m bench.flood [--seconds 5] [--clients 16]

Two runs of the same length on the same database, each a server started and stopped (so
that every backend has flushed its statistics): a good key reading every 10 ms alone, then
the same with `--clients` clients sending random `usk_` keys as fast as they can. Printed:
requests and answers of each, and the transactions PostgreSQL committed during each
(`pg_stat_database.xact_commit`); the difference is what the flood cost. The database is
migrated and gets one organization and one key; nothing else is touched.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx

from bench.loadgen import Connection

CLI = [sys.executable, "-c", "from usage_api.cli import main; main()"]
USAGE = "/v1/analytics/usage"
ORGANIZATION = "flood-org"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def commits(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return value
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def server(env: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *CLI,
        *["serve", "--port", str(port)],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get("/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not become ready")
                await asyncio.sleep(0.1)
            yield http
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)


async def partner(http: httpx.AsyncClient, key: str, stop: float) -> collections.Counter[int]:
    """The good key, every 10 ms."""
    answers: collections.Counter[int] = collections.Counter()
    while time.monotonic() < stop:
        response = await http.get(
            USAGE, params={"organization_id": ORGANIZATION}, headers={"X-API-Key": key}
        )
        answers[response.status_code] += 1
        await asyncio.sleep(0.01)
    return answers


async def flooder(port: int, stop: float) -> collections.Counter[tuple[int, str]]:
    """Made-up keys, back to back, raw HTTP/1.1 on a keep-alive socket: httpx would cost
    the client more CPU than the server spends."""
    answers: collections.Counter[tuple[int, str]] = collections.Counter()
    connection = Connection("127.0.0.1", port)
    try:
        while time.monotonic() < stop:
            made_up = "usk_" + secrets.token_urlsafe(32)
            status, body = await connection.request(
                f"GET {USAGE}?organization_id={ORGANIZATION} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\nX-API-Key: {made_up}\r\n\r\n".encode()
            )
            answers[status, body.decode()] += 1
    finally:
        await connection.close()
    return answers


@dataclass(frozen=True)
class Phase:
    good: collections.Counter[int]
    made_up: collections.Counter[tuple[int, str]]
    transactions: int

    def report(self, clients: int, seconds: float) -> str:
        return (
            f"{clients} flooders, {seconds:g} s: good key {dict(self.good)}; made-up keys"
            f" {self.made_up.total()} {dict(self.made_up)}; transactions {self.transactions}"
        )


async def phase(env: dict[str, str], url: str, key: str, seconds: float, clients: int) -> Phase:
    before = await commits(url)
    async with server(env) as http:
        stop = time.monotonic() + seconds
        good, *flooded = await asyncio.gather(
            partner(http, key, stop),
            *[flooder(http.base_url.port or 80, stop) for _ in range(clients)],
        )
    await asyncio.sleep(0.5)
    return Phase(good, sum(flooded, collections.Counter()), await commits(url) - before)


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("set DATABASE_URL")
    # No rate limit: the good key must never be refused, whatever it costs.
    env = {**os.environ, "USAGE_API_RATE_LIMIT": "0", "USAGE_API_LOG_LEVEL": "warning"}
    subprocess.run([*CLI, "migrate"], env=env, check=True, capture_output=True)
    created = subprocess.run(
        [*CLI, "keys", "create", "--scope", "admin", "--write", "--name", "flood"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = created.stdout.strip()

    async def setup_and_run() -> None:
        async with server(env) as http:
            response = await http.put(
                f"/v1/organizations/{ORGANIZATION}",
                json={"name": "Flood"},
                headers={"X-API-Key": key},
            )
            assert response.status_code in (200, 201), response.text
        alone = await phase(env, url, key, args.seconds, 0)
        print(alone.report(0, args.seconds), flush=True)
        flood = await phase(env, url, key, args.seconds, args.clients)
        print(flood.report(args.clients, args.seconds))
        # Each good request is one read; the rest of the run alone is background work
        # (syncs, the fold, start-up), the same in both runs.
        background = alone.transactions - alone.good.total()
        cost = flood.transactions - flood.good.total() - background
        print(
            f"the flood: {flood.made_up.total()} made-up keys, about {cost} transactions"
            f" ({cost / max(1, flood.made_up.total()):.2f} each)"
        )

    asyncio.run(setup_and_run())


if __name__ == "__main__":
    main()
