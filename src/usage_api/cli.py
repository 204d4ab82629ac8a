"""`usage-api`: serve, migrate, load the demo, manage keys."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.config import get_settings
from usage_api.db import PrimaryEngine
from usage_api.logs import logging_config

T = TypeVar("T")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
app.add_typer(keys_app, name="keys")


def _say(message: str) -> None:
    """Human-facing output goes to stderr, so stdout carries only what a script wants."""
    typer.echo(message, err=True)


@contextlib.contextmanager
def database() -> Iterator[str]:
    """The configured database, or the embedded one (started here, stopped on exit)."""
    settings = get_settings()
    if settings.database_url:
        yield settings.database_url
        return
    from usage_api.embedded import EmbeddedPostgres, default_data_dir

    data_dir = default_data_dir()
    _say(f"DATABASE_URL is not set: using the embedded PostgreSQL in {data_dir}")
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def migrate_to_head(url: str) -> None:
    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parents[2]
    ini = Path("alembic.ini") if Path("alembic.ini").exists() else root / "alembic.ini"
    config = Config(str(ini))
    config.attributes["database_url"] = url
    command.upgrade(config, "head")


def _with_engine(url: str, work: Callable[[PrimaryEngine], Awaitable[T]]) -> T:
    from usage_api.db import create_engine

    async def run() -> T:
        engine = PrimaryEngine(create_engine(get_settings(), url))
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _in_transaction(url: str, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    from usage_api.db import transact

    return _with_engine(url, lambda engine: transact(engine, work))


def _load_demo(url: str) -> str:
    from usage_api.demo import demo_key, load_demo

    async def run(engine: PrimaryEngine) -> str:
        await load_demo(engine)
        from usage_api.db import transact

        return await transact(engine, demo_key)

    return _with_engine(url, run)


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, metrics live in files that any worker's `/metrics` sums up:
    a fresh directory for this run, unless PROMETHEUS_MULTIPROC_DIR names one already.
    Set before anything imports prometheus_client, which reads it once."""
    if workers == 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="usage-api-metrics-") as path:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


@app.command()
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1)] = 1,
    demo: Annotated[bool, typer.Option(help="Load the demo data and print a key.")] = False,
) -> None:
    """Apply pending migrations, then serve the API."""
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then re-raises it into the handler it found.
    # Python's default would end the process on the spot, skipping the `finally` that stops
    # the embedded database; this one unwinds instead, with the conventional status.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with _metrics_dir(workers), database() as url:
        migrate_to_head(url)
        if demo:
            key = _load_demo(url)
            _say(f"Demo data loaded. Read key for Acme Corp: {key}")
            _say(
                "Try:\n  curl "
                f'"http://{host}:{port}/v1/analytics/usage?organization_id='
                f'1767623610019x414651971228139500" -H "X-API-Key: {key}"'
            )
        # Worker processes read their database from the environment.
        os.environ["DATABASE_URL"] = url
        get_settings.cache_clear()
        log_level = get_settings().log_level
        uvicorn.run(
            "usage_api.app:create_app",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=log_level,
            log_config=logging_config(log_level),
            # The app writes its own access line (usage_api.access), with the key's id.
            access_log=False,
            timeout_graceful_shutdown=10,
            # A worker imports the whole app before it first answers the supervisor; on a
            # busy 2-core host that alone can take longer than uvicorn's 5 s default.
            timeout_worker_healthcheck=30,
        )


@app.command()
def migrate() -> None:
    """Apply pending migrations to DATABASE_URL."""
    with database() as url:
        migrate_to_head(url)
    _say("Database is at the latest migration.")


@app.command("demo")
def demo_command() -> None:
    """Load the demo data (idempotent) and print a read key for it."""
    with database() as url:
        migrate_to_head(url)
        key = _load_demo(url)
    typer.echo(key)


# A key's rate limit is a PostgreSQL integer.
_MAX_RATE_LIMIT = 2**31 - 1

_DURATION_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}


def parse_duration(text: str, option: str = "--expires-in") -> timedelta:
    """`90d`, `12h`, `30m`: a positive whole number of days, hours or minutes."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter("must look like 90d, 12h or 30m", param_hint=option)
    return int(number) * _DURATION_UNITS[unit]


def _expiry(expires_in: str | None) -> datetime | None:
    """When a key made now with `--expires-in` ends; None: until revoked."""
    from usage_api.dates import utc_now

    return utc_now() + parse_duration(expires_in) if expires_in is not None else None


@keys_app.command("create")
def keys_create(
    scope: Annotated[str, typer.Option(help="admin, partner or organization")],
    partner: Annotated[str | None, typer.Option(help="Partner id, for --scope partner.")] = None,
    organization: Annotated[
        str | None, typer.Option(help="Organization id, for --scope organization.")
    ] = None,
    write: Annotated[bool, typer.Option(help="Allow ingestion and directory writes.")] = False,
    name: Annotated[str | None, typer.Option(help="A label to recognise the key by.")] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="Lifetime, e.g. 90d, 12h or 30m; none: until revoked.")
    ] = None,
    rate_limit: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=_MAX_RATE_LIMIT,
            help="Requests per window for this key (0: unlimited); none: USAGE_API_RATE_LIMIT.",
        ),
    ] = None,
) -> None:
    """Create a key and print it (it is shown only this once)."""
    from usage_api.keys import create_key

    expires_at = _expiry(expires_in)

    if scope not in ("admin", "partner", "organization"):
        raise typer.BadParameter("must be admin, partner or organization", param_hint="--scope")
    if (scope == "partner") != (partner is not None):
        raise typer.BadParameter("--partner goes with --scope partner (and only with it)")
    if (scope == "organization") != (organization is not None):
        raise typer.BadParameter("--organization goes with --scope organization (and only with it)")

    async def work(conn: AsyncConnection) -> tuple[str, str]:
        return await create_key(
            conn,
            scope=scope,  # type: ignore[arg-type]
            partner_id=partner,
            organization_id=organization,
            can_write=write,
            name=name,
            expires_at=expires_at,
            rate_limit=rate_limit,
        )

    with database() as url:
        migrate_to_head(url)
        try:
            key_id, key = _in_transaction(url, work)
        except Exception as exc:  # an unknown partner or organization, mostly
            _say(f"could not create the key: {getattr(exc, 'orig', exc)}")
            raise typer.Exit(1) from None
    _say(f"Created key {key_id}. Store it now: it cannot be shown again.")
    typer.echo(key)


@keys_app.command("rotate")
def keys_rotate(
    key_id: str,
    grace: Annotated[
        str, typer.Option(help="How long the old key keeps working, e.g. 24h, 7d or 30m.")
    ] = "24h",
    expires_in: Annotated[
        str | None,
        typer.Option(help="Lifetime of the new key, e.g. 90d; none: until revoked."),
    ] = None,
) -> None:
    """Replace a key: print a new one with the same scope, permission and rate limit; the
    old one keeps working for the grace period, so that clients can switch without a gap."""
    from usage_api.keys import rotate_key

    grace_period = parse_duration(grace, "--grace")
    expires_at = _expiry(expires_in)

    async def work(conn: AsyncConnection) -> tuple[str, str, datetime] | None:
        return await rotate_key(conn, key_id, grace_period, expires_at)

    with database() as url:
        migrate_to_head(url)
        rotated = _in_transaction(url, work)
    if rotated is None:
        _say(f"no live key with id {key_id}")
        raise typer.Exit(1)
    new_key_id, key, old_expires_at = rotated
    _say(
        f"Created key {new_key_id} to replace {key_id}, which stops working at"
        f" {old_expires_at.isoformat(timespec='seconds')}. Store the new key now:"
        " it cannot be shown again."
    )
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves), a line each: id, prefix, scope, target,
    permission, state, expiry, last use (to the minute), rate limit, name; tab-separated."""
    from usage_api.dates import utc_now
    from usage_api.keys import list_keys

    with database() as url:
        migrate_to_head(url)
        keys = _in_transaction(url, list_keys)
    now = utc_now()
    for key in keys:
        target = key.partner_id or key.organization_id or "-"
        permission = "write" if key.can_write else "read"
        if key.revoked_at is not None:
            state = "revoked"
        elif key.expires_at is not None and key.expires_at <= now:
            state = "expired"
        else:
            state = "active"
        typer.echo(
            f"{key.id}\t{key.prefix}…\t{key.scope}\t{target}\t{permission}\t{state}"
            f"\t{_when(key.expires_at, '-')}\t{_when(key.last_used_at, 'never')}"
            f"\t{_rate_limit(key.rate_limit)}\t{key.name or ''}"
        )


def _when(moment: datetime | None, absent: str) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else absent


def _rate_limit(limit: int | None) -> str:
    """`default` (USAGE_API_RATE_LIMIT of the serving process), `unlimited`, or the number."""
    if limit is None:
        return "default"
    return "unlimited" if limit == 0 else str(limit)


def _parse_rate_limit(text: str) -> int | None:
    if text == "default":
        return None
    if not text.isdigit() or int(text) > _MAX_RATE_LIMIT:
        raise typer.BadParameter(
            f"must be a whole number from 0 (unlimited) to {_MAX_RATE_LIMIT}, or default",
            param_hint="LIMIT",
        )
    return int(text)


@keys_app.command("set-limit")
def keys_set_limit(
    key_id: str,
    limit: Annotated[
        str,
        typer.Argument(
            metavar="LIMIT",
            help="Requests per window (0: unlimited), or default for USAGE_API_RATE_LIMIT.",
        ),
    ],
) -> None:
    """Set a key's rate limit; every server applies it from its next sync (100 ms)."""
    from usage_api.keys import set_limit

    rate_limit = _parse_rate_limit(limit)

    async def work(conn: AsyncConnection) -> bool:
        return await set_limit(conn, key_id, rate_limit)

    with database() as url:
        migrate_to_head(url)
        found = _in_transaction(url, work)
    if not found:
        _say(f"no key with id {key_id}")
        raise typer.Exit(1)
    _say(f"Key {key_id} now has the rate limit {_rate_limit(rate_limit)}.")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; it is rejected from then on."""
    from usage_api.keys import revoke_key

    async def work(conn: AsyncConnection) -> bool:
        return await revoke_key(conn, key_id)

    with database() as url:
        migrate_to_head(url)
        found = _in_transaction(url, work)
    if not found:
        _say(f"no key with id {key_id}")
        raise typer.Exit(1)
    _say(f"Revoked key {key_id}.")


def main(argv: Any = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:])
