"""Real streaming replication for tests: a hot standby of an embedded PostgreSQL.

`Standby.of(primary_url, directory)` copies the primary with the bundled `pg_basebackup -R`
(which writes `primary_conninfo` and `standby.signal` into the copy), then runs the copy as
an `EmbeddedPostgres` on a port of its own, fixed for its lifetime so that a restarted
standby is found at the same URL. The primary needs nothing special: initdb's defaults
(`wal_level = replica`, `max_wal_senders = 10`, and with `--auth=trust` a
`host replication all 127.0.0.1/32 trust` line in pg_hba.conf) already allow it.

Replay can be paused (`pg_wal_replay_pause()`) and resumed, and the standby stopped and
started again, to put the service's read path through each way a replica falls behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.servers import free_port
from usage_api.embedded import DATABASE_NAME, POSTGRES_BIN_PATH, ROOT_RUN_AS, EmbeddedPostgres

_HOST = "127.0.0.1"


def _run(name: str, args: list[str]) -> str:
    """Run one of the bundled PostgreSQL programs (as the caller); its stdout."""
    return subprocess.run(
        [str(POSTGRES_BIN_PATH / name), *args],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout


def psql(url: str, sql: str) -> str:
    """Run `sql` with the bundled psql; its unaligned, tuples-only output, stripped."""
    parts = urlsplit(url)
    return _run(
        "psql",
        [
            "--no-psqlrc",
            "--quiet",
            "--no-align",
            "--tuples-only",
            "--set=ON_ERROR_STOP=1",
            f"--host={parts.hostname}",
            f"--port={parts.port}",
            f"--username={parts.username}",
            f"--dbname={parts.path.lstrip('/')}",
            f"--command={sql}",
        ],
    ).strip()


class Standby:
    """A hot standby streaming from a primary, started and stopped by the test process."""

    def __init__(self, primary_url: str, data_dir: Path, *, fast: bool = True) -> None:
        self.primary_url = primary_url
        self.data_dir = data_dir
        self.port = free_port()
        self.server = EmbeddedPostgres(data_dir, port=self.port, fast=fast)
        self.url = f"postgresql://postgres@{_HOST}:{self.port}/{DATABASE_NAME}"

    @classmethod
    def of(cls, primary_url: str, data_dir: Path, *, fast: bool = True) -> Standby:
        """A new standby of `primary_url` in `data_dir` (which must not exist), running;
        `fast` as for `EmbeddedPostgres`."""
        standby = cls(primary_url, data_dir, fast=fast)
        standby.base_backup()
        standby.start()
        return standby

    def base_backup(self) -> None:
        parts = urlsplit(self.primary_url)
        self.data_dir.mkdir(mode=0o700, parents=True)
        _run(
            "pg_basebackup",
            [
                f"--dbname=host={parts.hostname} port={parts.port} user={parts.username}",
                f"--pgdata={self.data_dir}",
                "--write-recovery-conf",
                "--wal-method=stream",
                "--checkpoint=fast",
                "--no-sync",
            ],
        )
        if os.geteuid() == 0:
            # Copied as root; the server runs as the account EmbeddedPostgres drops to.
            account = pwd.getpwnam(ROOT_RUN_AS)
            for path in (self.data_dir, *self.data_dir.rglob("*")):
                os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)

    def start(self) -> None:
        """Start (or start again) at the same port; returns once it accepts reads."""
        self.server.start()
        self.wait_until(lambda: psql(self.url, "SELECT pg_is_in_recovery()") == "t")

    def stop(self) -> None:
        self.server.stop()

    @property
    def running(self) -> bool:
        return self.server._server_running()

    def pause_replay(self) -> None:
        psql(self.url, "SELECT pg_wal_replay_pause()")
        # Pausing is requested, then happens at the next record: wait until it has.
        self.wait_until(
            lambda: psql(self.url, "SELECT pg_get_wal_replay_pause_state()") == "paused"
        )

    def resume_replay(self) -> None:
        psql(self.url, "SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> str:
        return psql(self.url, "SELECT pg_last_wal_replay_lsn()")

    def catch_up(self, timeout_s: float = 30.0) -> None:
        """Wait until the standby has replayed everything the primary has written so far (the
        primary runs with synchronous_commit off: its flush position may lag its commits)."""
        target = psql(self.primary_url, "SELECT pg_current_wal_insert_lsn()")
        self.wait_until(
            lambda: psql(self.url, f"SELECT pg_last_wal_replay_lsn() >= '{target}'") == "t",
            timeout_s,
        )

    @staticmethod
    def wait_until(condition: object, timeout_s: float = 30.0) -> None:
        assert callable(condition)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if condition():
                    return
            except subprocess.CalledProcessError:
                pass  # not accepting connections yet
            if time.monotonic() > deadline:
                raise TimeoutError("standby did not get there in time")
            time.sleep(0.05)


@contextlib.contextmanager
def replicated_postgres(directory: Path, *, fast: bool = True) -> Iterator[tuple[str, Standby]]:
    """A fresh embedded primary and one hot standby of it: `(primary_url, standby)`."""
    # As root the servers run as another account, which must be able to enter it.
    directory.chmod(0o755)
    with EmbeddedPostgres(directory / "primary", fast=fast) as primary_url:
        standby = Standby.of(primary_url, directory / "standby", fast=fast)
        try:
            yield primary_url, standby
        finally:
            standby.stop()
