"""Process tools: a free port, the live-server harness, SIGKILL to a postmaster."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def server_env(database_url: str) -> dict[str, str]:
    """The environment of a live server on `database_url`, its background fold every 50 ms."""
    return {**os.environ, "DATABASE_URL": database_url, "USAGE_API_ROLLUP_INTERVAL_MS": "50"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, for a live server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class LiveServer:
    """The service as a child process on 127.0.0.1, the leader of its own session (a stop
    signals its whole process group), its stderr appended to `log_path`.

    With `workers`, it is `usage-api serve --workers N` (migrations, the HTTP server and its
    limits, as shipped). Without, it is the app factory under uvicorn in one process: what
    `serve` runs once migrations are applied (they are, by the fixtures); importing alembic
    too would double a start-up that a test restarting the server pays every time.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        *,
        workers: int | None = None,
        port: int | None = None,
    ) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.workers = workers
        self.port = port if port is not None else free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        if self.workers is not None:
            serve = ["serve", "--port", str(self.port), "--workers", str(self.workers)]
            return [str(Path(sys.executable).with_name("usage-api")), *serve]
        return [
            *[sys.executable, "-m", "uvicorn", "usage_api.app:create_app", "--factory"],
            *["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
        ]

    async def start(self, *, ready: bool = True) -> None:
        """Start the process; with `ready`, return only once /readyz answers 200."""
        program, *args = self._command()
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                program,
                *args,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        if ready:
            await self._wait_until_ready()

    async def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(base_url=self.base_url, trust_env=False) as http:
            while True:
                assert self.process.returncode is None, self.log()
                try:
                    if (await http.get("/readyz", timeout=1)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, f"server did not start:\n{self.log()}"
                await asyncio.sleep(0.05)

    async def stop(self, sig: signal.Signals) -> None:
        """Send `sig` to the process group, if it still runs, and wait for the process."""
        if self.process is not None:
            if self.process.returncode is None:
                os.killpg(self.process.pid, sig)
            await self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]


@contextlib.asynccontextmanager
async def serving(
    env: dict[str, str], log_path: Path, workers: int = 2
) -> AsyncIterator[tuple[asyncio.subprocess.Process, httpx.AsyncClient]]:
    """`usage-api serve --workers N` on a free port (a `LiveServer`, not waited for), stopped
    by SIGTERM at the end; with a client that opens a connection per request, so that every
    worker gets some."""
    server = LiveServer(env, log_path, workers=workers)
    await server.start(ready=False)
    assert server.process is not None
    process = server.process
    try:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=limits, trust_env=False
        ) as http:
            yield process, http
    finally:
        async with asyncio.timeout(20):
            await server.stop(signal.SIGTERM)


def sigkill_postmaster(data_dir: Path, timeout: float = 5.0) -> None:
    """SIGKILL the PostgreSQL server of `data_dir`, and wait until it is gone (kill()
    returns before that; without a reaping init the process stays a zombie)."""
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.005)
