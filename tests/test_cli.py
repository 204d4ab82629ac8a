"""The `usage-api` command line, run in-process against the test database.

Commands call `asyncio.run`, so async tests run them in a worker thread. Only what a
script wants (a key, a listing) goes to stdout; everything for humans goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from tests.support.answers import SEED_ORGANIZATION, SEED_USER
from tests.support.factories import make_organization, make_partner
from tests.support.servers import free_port
from usage_api.cli import app
from usage_api.config import get_settings
from usage_api.demo import ORGANIZATION_ID, USER_ID

KEY_LINE = re.compile(r"usk_[A-Za-z0-9_-]+\n")
USAGE = "/v1/analytics/usage"

Cli = Callable[..., Awaitable[Result]]


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """Run `usage-api ARGS...` on the test database; settings are read afresh."""
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    runner = CliRunner()

    async def invoke(*args: str) -> Result:
        return await asyncio.to_thread(lambda: runner.invoke(app, list(args)))

    yield invoke
    get_settings.cache_clear()


async def status_of(client: httpx.AsyncClient, key: str, organization_id: str) -> int:
    response = await client.get(
        USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    return response.status_code


async def test_migrate_exits_0(cli: Cli) -> None:
    result = await cli("migrate")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""


async def test_keys_create_prints_only_a_working_admin_key(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    result = await cli("keys", "create", "--scope", "admin", "--name", "ops")
    assert result.exit_code == 0, result.output
    assert KEY_LINE.fullmatch(result.stdout)
    assert "Store it now" in result.stderr
    assert await status_of(client, result.stdout.strip(), organization_id) == 200


async def test_keys_create_partner_write_key(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine)
    mine = await make_organization(engine, partner_id=partner_id)
    other = await make_organization(engine)
    result = await cli("keys", "create", "--scope", "partner", "--partner", partner_id, "--write")
    assert result.exit_code == 0, result.output
    assert KEY_LINE.fullmatch(result.stdout)
    key = result.stdout.strip()
    assert await status_of(client, key, mine) == 200
    assert await status_of(client, key, other) == 404
    response = await client.put(
        "/v1/organizations/new", json={"name": "New"}, headers={"X-API-Key": key}
    )
    assert response.status_code == 201


async def test_keys_create_organization_read_key(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    result = await cli(
        "keys", "create", "--scope", "organization", "--organization", organization_id
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert await status_of(client, key, organization_id) == 200
    response = await client.put(
        f"/v1/organizations/{organization_id}", json={"name": "X"}, headers={"X-API-Key": key}
    )
    assert response.status_code == 403


@pytest.mark.parametrize(
    "args",
    [
        ["--scope", "root"],
        ["--scope", "partner"],
        ["--scope", "organization"],
        ["--scope", "admin", "--partner", "p1"],
        ["--scope", "admin", "--organization", "o1"],
        ["--scope", "partner", "--partner", "p1", "--organization", "o1"],
        ["--scope", "organization", "--partner", "p1"],
        ["--scope", "admin", "--expires-in", "30"],
        ["--scope", "admin", "--expires-in", "0d"],
        ["--scope", "admin", "--expires-in", "2w"],
        [],
    ],
)
async def test_keys_create_rejects_invalid_combinations(cli: Cli, args: list[str]) -> None:
    result = await cli("keys", "create", *args)
    assert result.exit_code != 0
    assert result.stdout == ""


async def test_keys_create_with_expires_in_sets_the_expiry(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    before = datetime.now(UTC)
    result = await cli("keys", "create", "--scope", "admin", "--expires-in", "90d")
    assert result.exit_code == 0, result.output
    async with engine.connect() as conn:
        expires_at = await conn.scalar(text("SELECT expires_at FROM api_keys"))
    assert before + timedelta(days=90) <= expires_at <= datetime.now(UTC) + timedelta(days=90)
    assert await status_of(client, result.stdout.strip(), organization_id) == 200


@pytest.mark.parametrize("scope", ["partner", "organization"])
async def test_keys_create_for_an_unknown_target_fails(cli: Cli, scope: str) -> None:
    result = await cli("keys", "create", "--scope", scope, f"--{scope}", "no-such-id")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "could not create the key" in result.stderr


async def test_keys_list_shows_keys_but_never_the_keys_themselves(
    cli: Cli, engine: AsyncEngine
) -> None:
    partner_id = await make_partner(engine)
    admin = (await cli("keys", "create", "--scope", "admin", "--name", "ops")).stdout.strip()
    partner = (
        await cli("keys", "create", "--scope", "partner", "--partner", partner_id, "--write")
    ).stdout.strip()
    result = await cli("keys", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t")[2:] == [
        "admin", "-", "read", "active", "-", "never", "default", "ops"
    ]  # fmt: skip
    assert lines[1].split("\t")[2:] == [
        "partner",
        partner_id,
        "write",
        "active",
        "-",
        "never",
        "default",
        "",
    ]
    assert admin not in result.output
    assert partner not in result.output


async def test_keys_revoke_makes_the_key_invalid(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    key = (await cli("keys", "create", "--scope", "admin")).stdout.strip()
    key_id = (await cli("keys", "list")).stdout.split("\t")[0]
    result = await cli("keys", "revoke", key_id)
    assert result.exit_code == 0, result.output
    response = await client.get(
        USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    assert (response.status_code, response.json()) == (
        401,
        {"success": False, "error": "invalid API key"},
    )
    listing = (await cli("keys", "list")).stdout
    assert listing.split("\t")[5] == "revoked"


async def test_keys_revoke_of_an_unknown_id_fails(cli: Cli) -> None:
    result = await cli("keys", "revoke", "no-such-key")
    assert result.exit_code == 1
    assert "no key with id no-such-key" in result.stderr


async def key_rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT id, scope, organization_id, can_write, name, expires_at FROM api_keys"
                " ORDER BY created_at, id"
            )
        )
        return list(rows)


async def test_keys_rotate_replaces_a_key_and_keeps_the_old_one_for_the_grace_period(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = await make_organization(engine)
    created = await cli(
        "keys", "create", "--scope", "organization", "--organization", organization_id,
        "--write", "--name", "billing",
    )  # fmt: skip
    old_key = created.stdout.strip()
    [old] = await key_rows(engine)

    before = datetime.now(UTC)
    result = await cli("keys", "rotate", old.id, "--grace", "2h", "--expires-in", "90d")
    assert result.exit_code == 0, result.output
    assert KEY_LINE.fullmatch(result.stdout)
    new_key = result.stdout.strip()
    assert new_key != old_key
    [old_after, new] = await key_rows(engine)
    assert f"to replace {old.id}" in result.stderr
    # The same scope, target, permission and name; its own lifetime.
    assert (new.scope, new.organization_id, new.can_write, new.name) == (
        "organization",
        organization_id,
        True,
        "billing",
    )
    after = datetime.now(UTC)
    assert before + timedelta(days=90) <= new.expires_at <= after + timedelta(days=90)
    assert before + timedelta(hours=2) <= old_after.expires_at <= after + timedelta(hours=2)
    # Both work during the grace period.
    assert await status_of(client, old_key, organization_id) == 200
    assert await status_of(client, new_key, organization_id) == 200

    # Once it is over, only the new one does.
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": old.id},
        )
    assert await status_of(client, old_key, organization_id) == 401
    assert await status_of(client, new_key, organization_id) == 200
    listing = (await cli("keys", "list")).stdout.splitlines()
    assert [line.split("\t")[5] for line in listing] == ["expired", "active"]


async def test_keys_rotate_never_extends_the_old_key(cli: Cli, engine: AsyncEngine) -> None:
    await cli("keys", "create", "--scope", "admin", "--expires-in", "30m")
    [old] = await key_rows(engine)
    result = await cli("keys", "rotate", old.id, "--grace", "7d")
    assert result.exit_code == 0, result.output
    [old_after, new] = await key_rows(engine)
    assert old_after.expires_at == old.expires_at
    assert new.expires_at is None


@pytest.mark.parametrize("state", ["unknown", "revoked", "expired"])
async def test_keys_rotate_needs_a_live_key(cli: Cli, engine: AsyncEngine, state: str) -> None:
    await cli("keys", "create", "--scope", "admin")
    [key] = await key_rows(engine)
    key_id = "no-such-key" if state == "unknown" else key.id
    if state != "unknown":
        column = "revoked_at" if state == "revoked" else "expires_at"
        async with engine.begin() as conn:
            await conn.execute(text(f"UPDATE api_keys SET {column} = now()"))
    result = await cli("keys", "rotate", key_id)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"no live key with id {key_id}" in result.stderr
    assert len(await key_rows(engine)) == 1


async def test_keys_rotate_rejects_a_bad_grace(cli: Cli, engine: AsyncEngine) -> None:
    await cli("keys", "create", "--scope", "admin")
    [key] = await key_rows(engine)
    result = await cli("keys", "rotate", key.id, "--grace", "1w")
    assert result.exit_code == 2
    assert "--grace" in result.stderr
    assert len(await key_rows(engine)) == 1


async def test_demo_prints_a_key_that_reads_the_seed_numbers(
    cli: Cli, client: httpx.AsyncClient
) -> None:
    result = await cli("demo")
    assert result.exit_code == 0, result.output
    assert KEY_LINE.fullmatch(result.stdout)
    headers = {"X-API-Key": result.stdout.strip()}
    response = await client.get(USAGE, params={"organization_id": ORGANIZATION_ID}, headers=headers)
    assert response.json() == SEED_ORGANIZATION
    response = await client.get(USAGE, params={"user_id": USER_ID}, headers=headers)
    assert response.json() == SEED_USER
    # The key is a read key of the demo organization only.
    response = await client.put(
        f"/v1/organizations/{ORGANIZATION_ID}", json={"name": "X"}, headers=headers
    )
    assert response.status_code == 403


async def test_demo_is_idempotent(cli: Cli, client: httpx.AsyncClient) -> None:
    first = await cli("demo")
    second = await cli("demo")
    assert second.exit_code == 0, second.output
    assert second.stdout != first.stdout
    response = await client.get(
        USAGE,
        params={"organization_id": ORGANIZATION_ID},
        headers={"X-API-Key": second.stdout.strip()},
    )
    assert response.json()["usage"]["sms"] == {"outbound": 12450, "inbound": 3821, "total": 16271}


@pytest.mark.slow
async def test_console_script_prints_the_key_alone_on_stdout(
    database_url: str, client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """The installed `usage-api`, as a script calls it: stdout is the key and nothing else."""
    organization_id = await make_organization(engine)
    process = await asyncio.create_subprocess_exec(
        Path(sys.executable).with_name("usage-api"),
        *["keys", "create", "--scope", "admin"],
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert KEY_LINE.fullmatch(stdout.decode())
    assert await status_of(client, stdout.decode().strip(), organization_id) == 200


@pytest.mark.slow
async def test_serve_stops_its_embedded_database_on_sigterm(tmp_path: Path) -> None:
    """Without DATABASE_URL, `serve` owns an embedded server: SIGTERM stops both."""
    data_dir = tmp_path / "pg"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        Path(sys.executable).with_name("usage-api"),
        *["serve", "--port", str(port)],
        env={**env, "USAGE_API_DATA_DIR": str(data_dir), "USAGE_API_LOG_LEVEL": "warning"},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("serve did not become ready")
        assert (data_dir / "postmaster.pid").exists()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 128 + signal.SIGTERM
    finally:
        if process.returncode is None:
            process.kill()
    assert not (data_dir / "postmaster.pid").exists()
