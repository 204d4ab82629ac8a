"""The embedded PostgreSQL starts, persists data across restarts and survives a killed server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support.servers import sigkill_postmaster
from usage_api.embedded import EmbeddedPostgres, default_data_dir

pytestmark = pytest.mark.slow


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


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One initdb (the slow part, ~1.5 s) shared by the tests; each leaves the server stopped.
    path = tmp_path_factory.mktemp("embedded") / "pg"
    with EmbeddedPostgres(path, fast=True):
        pass
    yield path


def test_start_gives_working_url_and_data_survives_restart(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir, fast=True)
    url = server.start()
    try:
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert url.endswith("/usage_api")
        assert server.start() == url  # already running: same server
        assert _query(url, "SELECT current_database()") == "usage_api"
        assert _query(url, "SHOW max_connections") == "200"
        assert _query(url, "SHOW fsync") == "off"
        _query(url, "CREATE TABLE kept (v text)", "INSERT INTO kept VALUES ('across restarts')")
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not (data_dir / "postmaster.pid").exists()
    assert data_dir.with_name("pg.log").stat().st_size > 0

    with EmbeddedPostgres(data_dir) as url:
        assert _query(url, "SELECT v FROM kept") == "across restarts"
        assert _query(url, "SHOW fsync") == "on"


def test_start_after_postmaster_was_sigkilled(data_dir: Path) -> None:
    # Durable commits (fast=False), so the killed server's last write must be recovered.
    killed = EmbeddedPostgres(data_dir)
    url = killed.start()
    _query(url, "CREATE TABLE crash (v int)", "INSERT INTO crash VALUES (1)")
    sigkill_postmaster(data_dir)
    killed.stop()  # server already gone: must not raise
    assert (data_dir / "postmaster.pid").exists()  # stale lock left behind

    with EmbeddedPostgres(data_dir, fast=True) as url:
        assert _query(url, "SELECT count(*) FROM crash") == 1


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("USAGE_API_DATA_DIR", str(tmp_path / "explicit"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("USAGE_API_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "usage-api" / "postgres"
    monkeypatch.setenv("XDG_DATA_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "usage-api" / "postgres"
