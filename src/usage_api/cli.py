"""`usage-api`: serve, migrate, load the demo, manage keys."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import KeyScope
from usage_api.config import ConfigError, get_settings
from usage_api.dates import utc_now
from usage_api.db import PrimaryEngine, create_engine, transact
from usage_api.embedded import EmbeddedError, EmbeddedPostgres
from usage_api.errors import ServiceUnavailable
from usage_api.keys import create_key, list_keys, revoke_key, rotate_key, set_limit
from usage_api.migrations import SchemaNotCurrent, check_current, migrate_to_head

T = TypeVar("T")
P = ParamSpec("P")

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
app.add_typer(keys_app, name="keys")

_FOREIGN_KEY_VIOLATION = "23503"


def _say(message: str) -> None:
    """Human-facing output goes to stderr, so stdout carries only what a script wants."""
    typer.echo(message, err=True)


class Failed(Exception):
    """A command cannot do what it was asked; the message says why, in one line."""


def _reported(command: Callable[P, None]) -> Callable[P, None]:
    """Known failures end the command with their message and status 1, never a traceback."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except (Failed, ConfigError, EmbeddedError, SchemaNotCurrent) as exc:
            _say(str(exc))
            raise typer.Exit(1) from None
        except ServiceUnavailable:
            _say("the database does not answer (see DATABASE_URL)")
            raise typer.Exit(1) from None

    return run


@contextlib.contextmanager
def database() -> Iterator[str]:
    """The configured database, or the embedded one: joined here (started if no other process
    of ours runs it) and left on exit (stopped if no other process uses it)."""
    settings = get_settings()
    if settings.database_url:
        yield settings.database_url
        return
    if not settings.embedded_database:
        raise Failed(
            "DATABASE_URL is not set, and the embedded PostgreSQL is turned off here"
            " (USAGE_API_EMBEDDED_DATABASE=false, as in the container image):"
            " set DATABASE_URL=postgresql://user:password@host:5432/database"
        )
    server = EmbeddedPostgres(settings.data_dir)
    url = server.start()
    how = "started" if server.started else "already running, shared"
    _say(f"DATABASE_URL is not set: embedded PostgreSQL in {server.data_dir} ({how}): {url}")
    try:
        yield url
    finally:
        server.stop()


def _with_engine(url: str, work: Callable[[PrimaryEngine], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = PrimaryEngine(create_engine(get_settings(), url))
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _in_transaction(url: str, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """`work` in one transaction, on a database that must be at the latest migration: only
    `serve`, `migrate` and `demo` change the schema."""

    async def checked(conn: AsyncConnection) -> T:
        await check_current(conn)
        return await work(conn)

    return _with_engine(url, lambda engine: transact(engine, checked))


def _load_demo(url: str) -> str:
    # Imported here, as uvicorn is in `serve`: the key commands never use them, and they are
    # 5-6 % each of this module's import (python -X importtime: ~0.6 s and ~0.4 s of ~9 s on
    # a loaded 2-core host), which every command pays.
    from usage_api.demo import demo_key, load_demo

    async def run(engine: PrimaryEngine) -> str:
        await load_demo(engine)
        return await transact(engine, demo_key)

    return _with_engine(url, run)


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, metrics live in files that any worker's `/metrics` sums up:
    a fresh directory for this run, unless PROMETHEUS_MULTIPROC_DIR names one already.
    Set before anything imports prometheus_client, which reads it once."""
    if workers == 1 or get_settings().metrics_dir:
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


def _check_port(host: str, port: int) -> None:
    """Fail early, before touching any database, when something listens on the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server's own socket will: a port left in TIME_WAIT is not in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Failed(
                    f"port {port} on {host} is already in use: stop what listens there,"
                    " or choose another with --port"
                ) from None
            # Anything else (an unknown host, say) is for the server to report.


@app.command()
@_reported
def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: Annotated[int, typer.Option(min=1)] = 1,
    demo: Annotated[bool, typer.Option(help="Load the demo data and print a key.")] = False,
) -> None:
    """Apply pending migrations, then serve the API."""
    _check_port(host, port)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it into the handler it found.
    # Python's default would end the process on the spot, skipping the `finally` that leaves
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
        from usage_api.http.server import serve as run_server

        run_server(get_settings(), host=host, port=port, workers=workers)


@app.command()
@_reported
def migrate() -> None:
    """Apply pending migrations to DATABASE_URL."""
    with database() as url:
        migrate_to_head(url)
    _say("Database is at the latest migration.")


@app.command("demo")
@_reported
def demo_command() -> None:
    """Load the demo data (idempotent) and print a read key for it."""
    with database() as url:
        migrate_to_head(url)
        key = _load_demo(url)
    typer.echo(key)


_DURATION_UNITS = {"d": timedelta(days=1), "h": timedelta(hours=1), "m": timedelta(minutes=1)}
# The rate_limit column is a PostgreSQL integer.
_MAX_RATE_LIMIT = 2**31 - 1


def parse_duration(text: str, option: str = "--expires-in") -> timedelta:
    """`90d`, `12h`, `30m`: a positive whole number of days, hours or minutes."""
    number, unit = text[:-1], text[-1:]
    if unit not in _DURATION_UNITS or not number.isdigit() or int(number) == 0:
        raise typer.BadParameter("must look like 90d, 12h or 30m", param_hint=option)
    return int(number) * _DURATION_UNITS[unit]


def _expiry(expires_in: str | None) -> datetime | None:
    """When a key made now with `--expires-in` ends; None: until revoked."""
    return utc_now() + parse_duration(expires_in) if expires_in is not None else None


@keys_app.command("create")
@_reported
def keys_create(
    scope: Annotated[KeyScope, typer.Option(help="Whose data the key reaches.")],
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
    expires_at = _expiry(expires_in)
    if (scope == "partner") != (partner is not None):
        raise typer.BadParameter("--partner goes with --scope partner (and only with it)")
    if (scope == "organization") != (organization is not None):
        raise typer.BadParameter("--organization goes with --scope organization (and only with it)")

    async def work(conn: AsyncConnection) -> tuple[str, str]:
        return await create_key(
            conn,
            scope=scope,
            partner_id=partner,
            organization_id=organization,
            can_write=write,
            name=name,
            expires_at=expires_at,
            rate_limit=rate_limit,
        )

    with database() as url:
        try:
            key_id, key = _in_transaction(url, work)
        except IntegrityError as exc:
            # The only foreign key of a key is its partner's or its organization's.
            if getattr(exc.orig, "sqlstate", None) != _FOREIGN_KEY_VIOLATION:
                raise
            target = f"partner {partner}" if scope == "partner" else f"organization {organization}"
            raise Failed(f"could not create the key: there is no {target}") from None
    _say(f"Created key {key_id}. Store it now: it cannot be shown again.")
    typer.echo(key)


@keys_app.command("rotate")
@_reported
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
    grace_period = parse_duration(grace, "--grace")
    expires_at = _expiry(expires_in)

    async def work(conn: AsyncConnection) -> tuple[str, str, datetime] | None:
        return await rotate_key(conn, key_id, grace_period, expires_at)

    with database() as url:
        rotated = _in_transaction(url, work)
    if rotated is None:
        raise Failed(f"no live key with id {key_id}")
    new_key_id, key, old_expires_at = rotated
    _say(
        f"Created key {new_key_id} to replace {key_id}, which stops working at"
        f" {old_expires_at.isoformat(timespec='seconds')}. Store the new key now:"
        " it cannot be shown again."
    )
    typer.echo(key)


@keys_app.command("list")
@_reported
def keys_list() -> None:
    """List keys (never the keys themselves), a line each: id, prefix, scope, target,
    permission, state, expiry, last use (to the minute), rate limit, name; tab-separated."""
    with database() as url:
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
@_reported
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
    rate_limit = _parse_rate_limit(limit)

    async def work(conn: AsyncConnection) -> bool:
        return await set_limit(conn, key_id, rate_limit)

    with database() as url:
        found = _in_transaction(url, work)
    if not found:
        raise Failed(f"no key with id {key_id}")
    _say(f"Key {key_id} now has the rate limit {_rate_limit(rate_limit)}.")


@keys_app.command("revoke")
@_reported
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id; it is rejected from then on."""

    async def work(conn: AsyncConnection) -> bool:
        return await revoke_key(conn, key_id)

    with database() as url:
        found = _in_transaction(url, work)
    if not found:
        raise Failed(f"no key with id {key_id}")
    _say(f"Revoked key {key_id}.")


def main(argv: Any = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:])
