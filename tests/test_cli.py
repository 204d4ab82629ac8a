"""The `usage-api` command line, run in-process against the test database, and as real
processes sharing an embedded database with a live `usage-api serve`.

Commands call `asyncio.run`, so async tests run them in a worker thread. Only what a
script wants (a key, a listing) goes to stdout; everything for humans goes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from tests.support.answers import SEED_ORGANIZATION, SEED_USER
from tests.support.factories import make_organization, make_partner
from tests.support.servers import free_port
from usage_api.cli import app
from usage_api.config import get_settings
from usage_api.demo import ORGANIZATION_ID, USER_ID
from usage_api.migrations import alembic_config

KEY_LINE = re.compile(r"usk_[A-Za-z0-9_-]+\n")
USAGE = "/v1/analytics/usage"
_SCRIPTS = ScriptDirectory.from_config(alembic_config())
HEAD = _SCRIPTS.get_current_head()
BEFORE_HEAD = _SCRIPTS.get_revision(HEAD).down_revision
USAGE_API = Path(sys.executable).with_name("usage-api")

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


def _url_of(database_url: str, database: str) -> str:
    return make_url(database_url).set(database=database).render_as_string(hide_password=False)


async def _scalar(url: str, query: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own on the test server."""
    name = f"usage_api_cli_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_url_of(database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _url_of(database_url, name)
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def status_of(client: httpx.AsyncClient, key: str, organization_id: str) -> int:
    response = await client.get(
        USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    return response.status_code


async def test_migrate_brings_a_fresh_database_to_the_latest_migration(
    cli: Cli, fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    result = await cli("migrate")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == "Database is at the latest migration.\n"
    assert await _scalar(fresh_database, "SELECT version_num FROM alembic_version") == HEAD


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "list"],
        ["keys", "revoke", "some-id"],
        ["keys", "rotate", "some-id"],
        ["keys", "create", "--scope", "admin"],
    ],
)
async def test_key_commands_refuse_a_schema_behind_the_code_and_leave_it_as_is(
    cli: Cli, fresh_database: str, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    await asyncio.to_thread(command.upgrade, alembic_config(fresh_database), BEFORE_HEAD)
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    result = await cli(*args)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"the database schema is behind this version of usage-api (at {BEFORE_HEAD},"
        f" code at {HEAD}): run `usage-api migrate` first\n"
    )
    assert await _scalar(fresh_database, "SELECT version_num FROM alembic_version") == BEFORE_HEAD


async def test_key_commands_refuse_a_database_without_schema(
    cli: Cli, fresh_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", fresh_database)
    result = await cli("keys", "list")
    assert result.exit_code == 1
    assert result.stderr == "the database has no schema yet: run `usage-api migrate` first\n"
    assert await _scalar(fresh_database, "SELECT to_regclass('alembic_version')::text") is None


NO_EMBEDDED_DATABASE = (
    "DATABASE_URL is not set, and the embedded PostgreSQL is turned off here"
    " (USAGE_API_EMBEDDED_DATABASE=false, as in the container image):"
    " set DATABASE_URL=postgresql://user:password@host:5432/database\n"
)


async def test_without_database_url_where_the_embedded_database_is_off_commands_refuse(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("USAGE_API_EMBEDDED_DATABASE", "false")
    for args in (["keys", "list"], ["migrate"], ["demo"]):
        result = await cli(*args)
        assert result.exit_code == 1, (args, result.exception)
        assert result.stdout == ""
        assert result.stderr == NO_EMBEDDED_DATABASE


@pytest.mark.slow
async def test_serve_without_database_url_where_the_embedded_database_is_off_refuses(
    data_dir: Path,
) -> None:
    env = {"USAGE_API_EMBEDDED_DATABASE": "false"}
    assert await usage_api(data_dir, "serve", "--port", str(free_port()), env=env) == (
        1,
        "",
        NO_EMBEDDED_DATABASE,
    )
    assert _postmaster_pid(data_dir) is None


async def test_a_setting_that_cannot_be_used_is_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USAGE_API_POOL_SIZE", "ten")
    result = await cli("keys", "list")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "USAGE_API_POOL_SIZE must be an integer, got 'ten'\n"


async def test_a_database_that_does_not_answer_is_one_line(
    cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    result = await cli("keys", "list")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "the database does not answer (see DATABASE_URL)\n"


@pytest.mark.parametrize("scope", ["partner", "organization"])
async def test_keys_create_for_an_unknown_target_says_it_does_not_exist(
    cli: Cli, engine: AsyncEngine, scope: str
) -> None:
    result = await cli("keys", "create", "--scope", scope, f"--{scope}", "NOPE")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"could not create the key: there is no {scope} NOPE\n"
    assert await key_rows(engine) == []


async def test_keys_create_offers_the_scopes_as_a_choice(cli: Cli) -> None:
    result = await cli("keys", "create", "--scope", "root")
    assert result.exit_code == 2
    # The error is drawn in a box, wrapped: compare the words.
    words = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())
    assert "'root' is not one of 'admin', 'partner', 'organization'." in words


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
    assert result.stderr == "no key with id no-such-key\n"


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
    assert result.stderr == f"no live key with id {key_id}\n"
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


# --- real processes on a shared embedded database ----------------------------------------


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """An embedded database's data dir, in a directory that the server account can enter even
    as root (pytest's own are 0700, and the embedded server never widens permissions)."""
    directory = Path(tempfile.mkdtemp(prefix="usage-api-cli-"))
    directory.chmod(0o755)
    yield directory / "pg"
    shutil.rmtree(directory, ignore_errors=True)


def _embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return env | {"USAGE_API_DATA_DIR": str(data_dir), "USAGE_API_LOG_LEVEL": "warning"}


def _postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


class Serve:
    """`usage-api serve` on the embedded database of `data_dir`, its stderr in a file."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log_path = data_dir.parent / f"serve-{self.port}-{uuid.uuid4().hex[:6]}.log"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> Serve:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                USAGE_API,
                *["serve", "--port", str(self.port)],
                env=_embedded_env(self.data_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def readyz(self) -> int | None:
        """/readyz's status; None when nothing answers."""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            try:
                return (await client.get("/readyz", timeout=5)).status_code
            except httpx.TransportError:
                return None

    async def ready(self) -> Serve:
        assert self.process is not None
        for _ in range(1200):
            assert self.process.returncode is None, f"serve ended:\n{self.log}"
            if await self.readyz() == 200:
                return self
            await asyncio.sleep(0.1)
        pytest.fail(f"serve did not become ready:\n{self.log}")

    async def exited(self) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout=60)

    async def end(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), timeout=60)


@pytest.fixture
async def serves() -> AsyncIterator[list[Serve]]:
    """Every Serve a test appends here is killed at its end, whatever happens."""
    started: list[Serve] = []
    yield started
    for serve in started:
        if serve.process is not None and serve.process.returncode is None:
            serve.process.kill()
            await serve.process.wait()


async def usage_api(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run the installed `usage-api` on the embedded database of `data_dir`."""
    process = await asyncio.create_subprocess_exec(
        USAGE_API,
        *args,
        env=_embedded_env(data_dir) | (env or {}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def _no_server_left(data_dir: Path) -> None:
    """The embedded server of data_dir has stopped (the last process out stops it)."""
    for _ in range(100):
        if _postmaster_pid(data_dir) is None:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"the embedded PostgreSQL of {data_dir} is still running")


@pytest.mark.slow
async def test_commands_while_serving_use_its_database_and_leave_it_running(
    data_dir: Path, serves: list[Serve]
) -> None:
    serve = await Serve(data_dir).start()
    serves.append(serve)
    await serve.ready()
    pid = _postmaster_pid(data_dir)
    [url] = re.findall(r"postgresql://postgres@127\.0\.0\.1:\d+/usage_api", serve.log)
    assert f"embedded PostgreSQL in {data_dir} (started): {url}" in serve.log

    code, key, stderr = await usage_api(data_dir, "keys", "create", "--scope", "admin")
    assert code == 0, stderr
    assert KEY_LINE.fullmatch(key)
    assert f"embedded PostgreSQL in {data_dir} (already running, shared): {url}" in stderr
    code, listing, stderr = await usage_api(data_dir, "keys", "list")
    assert code == 0, stderr
    assert listing.split("\t")[2:6] == ["admin", "-", "read", "active"]
    code, _, stderr = await usage_api(data_dir, "migrate")
    assert code == 0, stderr

    # The server's database is the one the commands used, and it is still up.
    assert await serve.readyz() == 200
    assert _postmaster_pid(data_dir) == pid
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{serve.port}") as client:
        response = await client.get(
            USAGE, params={"organization_id": "nope"}, headers={"X-API-Key": key.strip()}
        )
    assert (response.status_code, response.json()) == (
        404,
        {"success": False, "error": "organization not found"},
    )
    # `serve` is the last one out: SIGTERM stops it and its database.
    assert await serve.end() == 128 + signal.SIGTERM
    await _no_server_left(data_dir)


@pytest.mark.slow
async def test_a_second_serve_shares_the_data_dir_and_one_on_a_busy_port_refuses(
    data_dir: Path, serves: list[Serve]
) -> None:
    first = await Serve(data_dir).start()
    serves.append(first)
    await first.ready()
    pid = _postmaster_pid(data_dir)

    busy = await Serve(data_dir, port=first.port).start()
    serves.append(busy)
    assert await busy.exited() == 1
    assert busy.log == (
        f"port {first.port} on 127.0.0.1 is already in use: stop what listens there,"
        " or choose another with --port\n"
    )
    assert await first.readyz() == 200

    second = await Serve(data_dir).start()
    serves.append(second)
    await second.ready()
    assert "(already running, shared)" in second.log
    assert _postmaster_pid(data_dir) == pid
    # The one that started the database leaves first: the other keeps it.
    assert await first.end() == 128 + signal.SIGTERM
    assert await second.readyz() == 200
    assert _postmaster_pid(data_dir) == pid
    assert await second.end() == 128 + signal.SIGTERM
    await _no_server_left(data_dir)


@pytest.mark.slow
async def test_serves_started_at_once_share_one_database(
    data_dir: Path, serves: list[Serve]
) -> None:
    both = [await Serve(data_dir).start(), await Serve(data_dir).start()]
    serves.extend(both)
    for serve in both:
        await serve.ready()
    logs = [serve.log for serve in both]
    assert sorted("(started)" in log for log in logs) == [False, True]
    assert not any("Traceback" in log for log in logs)
    for serve in both:
        assert await serve.readyz() == 200
        assert await serve.end() == 128 + signal.SIGTERM
    await _no_server_left(data_dir)


@pytest.mark.slow
async def test_a_sigkilled_serve_leaves_the_database_to_the_others_then_the_next_adopts_it(
    data_dir: Path, serves: list[Serve]
) -> None:
    owner = await Serve(data_dir).start()
    serves.append(owner)
    await owner.ready()
    other = await Serve(data_dir).start()
    serves.append(other)
    await other.ready()
    pid = _postmaster_pid(data_dir)

    assert await owner.end(signal.SIGKILL) == -signal.SIGKILL
    assert await other.readyz() == 200
    code, _, stderr = await usage_api(data_dir, "keys", "list")
    assert code == 0, stderr
    assert await other.readyz() == 200
    assert _postmaster_pid(data_dir) == pid

    # Killed too: nobody uses the database now, and nobody stopped it.
    assert await other.end(signal.SIGKILL) == -signal.SIGKILL
    assert _postmaster_pid(data_dir) == pid
    recovered = await Serve(data_dir).start()
    serves.append(recovered)
    await recovered.ready()
    assert "(already running, shared)" in recovered.log
    assert _postmaster_pid(data_dir) == pid
    assert await recovered.end() == 128 + signal.SIGTERM
    await _no_server_left(data_dir)
