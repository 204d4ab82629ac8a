"""`usage-api keys`: each key's own rate limit, given at creation, kept by rotation,
changed by `keys set-limit` while servers run, and shown by `keys list`.

Commands run in-process against the test database (in a worker thread: they call
`asyncio.run`); the app they affect is the test's own, with its own limiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from tests.support.factories import make_organization
from usage_api.cli import app as cli_app
from usage_api.config import Settings, get_settings

USAGE = "/v1/analytics/usage"


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    async def __call__(self, *args: str) -> Result:
        return await asyncio.to_thread(lambda: self.runner.invoke(cli_app, list(args)))

    async def create(self, *args: str) -> str:
        """A new admin key made with `keys create ARGS...`."""
        result = await self("keys", "create", "--scope", "admin", *args)
        assert result.exit_code == 0, result.output
        return result.stdout.strip()

    async def listing(self) -> list[list[str]]:
        result = await self("keys", "list")
        assert result.exit_code == 0, result.output
        return [line.split("\t") for line in result.stdout.splitlines()]


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield Cli()
    get_settings.cache_clear()


async def policy_of(client: httpx.AsyncClient, key: str, organization_id: str) -> str | None:
    response = await client.get(
        USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    assert response.status_code == 200, response.text
    return response.headers.get("ratelimit-policy")


async def rate_limits(engine: AsyncEngine) -> list[int | None]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT rate_limit FROM api_keys ORDER BY created_at, id"))
        return [row.rate_limit for row in rows]


# The listing's columns: id, prefix, scope, target, permission, state, expiry, last use,
# rate limit, name.
RATE_LIMIT = 8


async def test_keys_create_gives_a_key_its_own_limit_or_the_default(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    organization_id = await make_organization(engine)
    pipeline = await cli.create("--rate-limit", "100000", "--write", "--name", "pipeline")
    unlimited = await cli.create("--rate-limit", "0")
    dashboard = await cli.create()

    assert await rate_limits(engine) == [100_000, 0, None]
    listing = await cli.listing()
    assert [line[RATE_LIMIT] for line in listing] == ["100000", "unlimited", "default"]
    assert listing[0][RATE_LIMIT + 1] == "pipeline"

    assert await policy_of(client, pipeline, organization_id) == '"per-key";q=100000;w=60'
    assert await policy_of(client, unlimited, organization_id) is None
    assert await policy_of(client, dashboard, organization_id) == (
        f'"per-key";q={settings.rate_limit};w=60'
    )


@pytest.mark.parametrize("value", ["-1", "x", "2147483648"])
async def test_keys_create_rejects_a_bad_rate_limit(
    cli: Cli, engine: AsyncEngine, value: str
) -> None:
    result = await cli("keys", "create", "--scope", "admin", "--rate-limit", value)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--rate-limit" in result.stderr
    assert await rate_limits(engine) == []


async def test_keys_rotate_keeps_the_rate_limit(cli: Cli, engine: AsyncEngine) -> None:
    await cli.create("--rate-limit", "42")
    await cli.create()
    [first, second] = await cli.listing()
    for old in (first, second):
        result = await cli("keys", "rotate", old[0])
        assert result.exit_code == 0, result.output
    assert await rate_limits(engine) == [42, None, 42, None]


async def test_keys_set_limit_applies_to_a_running_server_from_its_next_sync(
    cli: Cli, app: FastAPI, client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    organization_id = await make_organization(engine)
    key = await cli.create()
    [[key_id, *_]] = await cli.listing()
    assert await policy_of(client, key, organization_id) == (
        f'"per-key";q={settings.rate_limit};w=60'
    )

    for value, shown, policy in [
        ("50", "50", '"per-key";q=50;w=60'),
        ("0", "unlimited", None),
        ("100000", "100000", '"per-key";q=100000;w=60'),
        ("default", "default", f'"per-key";q={settings.rate_limit};w=60'),
    ]:
        result = await cli("keys", "set-limit", key_id, value)
        assert result.exit_code == 0, result.output
        assert f"now has the rate limit {shown}" in result.stderr
        assert [line[RATE_LIMIT] for line in await cli.listing()] == [shown]
        await app.state.services.limiter.sync(engine)
        assert await policy_of(client, key, organization_id) == policy


async def test_keys_set_limit_of_an_unknown_key_fails(cli: Cli) -> None:
    result = await cli("keys", "set-limit", "no-such-key", "10")
    assert result.exit_code == 1
    assert "no key with id no-such-key" in result.stderr


@pytest.mark.parametrize("value", ["-1", "ten", "2147483648", ""])
async def test_keys_set_limit_rejects_a_bad_limit(
    cli: Cli, engine: AsyncEngine, value: str
) -> None:
    await cli.create("--rate-limit", "7")
    [[key_id, *_]] = await cli.listing()
    result = await cli("keys", "set-limit", key_id, value)
    assert result.exit_code == 2
    assert "LIMIT" in result.stderr
    assert await rate_limits(engine) == [7]
