"""The dashboard in headless Chromium on the demo data: time from navigation to a rendered
365-day daily chart of Acme Corp (p50 of several loads), and bytes transferred per view;
beside the demo, an organization of 10,000 users whose table is the breakdown's first page.

    uv run python -m bench.dashboard [--loads 9]     # writes bench/DASHBOARD.md
    uv run python -m bench.dashboard --loads 3 --baseline-root /tmp/usage-api-before

It starts an embedded PostgreSQL in a temporary directory, loads the demo, and serves the
app with `usage-api serve` on a free port of 127.0.0.1. With `--baseline-root` (a copy of
the repository at another commit, e.g. `git archive COMMIT | tar -x -C DIR`) it serves that
code too, on the same database, and loads each view from both in turn, so the two are
measured side by side in one run. CPU per load is the server's and PostgreSQL's own
(bench/servers.py's meter). Needs Debian's `chromium`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, sync_playwright
from sqlalchemy import text

from bench.servers import CpuMeter
from usage_api import demo
from usage_api.analytics.rollup import fold_all
from usage_api.auth import Principal
from usage_api.cli import migrate_to_head
from usage_api.config import Settings
from usage_api.db import PrimaryEngine, create_engine, transact
from usage_api.embedded import EmbeddedPostgres
from usage_api.ingest import ingest
from usage_api.keys import create_key
from usage_api.schemas import UsageEventIn

OUT = Path(__file__).with_name("DASHBOARD.md")
CHROMIUM_ARGS = [
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
]
# What the page's own timing says: from the start of navigation to the end of the load
# event, when the server-rendered chart is on screen; and every byte that crossed the wire.
_TIMING = """() => {
    const nav = performance.getEntriesByType('navigation')[0];
    const resources = performance.getEntriesByType('resource');
    return {
        ms: nav.loadEventEnd - nav.startTime,
        server_ms: nav.responseEnd - nav.requestStart,
        bytes: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0),
        html_bytes: nav.transferSize,
        requests: 1 + resources.length,
    };
}"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# An organization of 10,000 users, without a partner (so the partner's figures stay the
# demo's), with three events a user over the last days: the table's worst case.
WIDE_ID = "1767623610099x414651971228139599"
WIDE_USERS = 10_000
_BENCH_ADMIN = Principal("bench", "admin", None, None, can_write=True)


def _wide_events(now: datetime) -> list[UsageEventIn]:
    events = []
    for n in range(WIDE_USERS * 3):
        user = n % WIDE_USERS
        kind = ("sms", "mms", "voice")[n % 3]
        quantity = 1 + (n * 7919) % 5 if kind != "voice" else 30 + (n * 7919) % 600
        events.append(
            UsageEventIn(
                id=f"wide-{n}",
                organization_id=WIDE_ID,
                user_id=f"1768236789900x{user:018d}",
                type=kind,
                direction="outbound" if n % 4 else "inbound",
                segments=None if kind == "voice" else quantity,
                seconds=quantity if kind == "voice" else None,
                knowledge_base=(n % 5 == 0) if kind == "voice" else None,
                occurred_at=now - timedelta(minutes=1 + (n * 37) % (5 * 24 * 60)),
            )
        )
    return events


async def _load_wide(engine: PrimaryEngine) -> None:
    async def directory(conn: Any) -> None:
        await conn.execute(
            text("INSERT INTO organizations (id, name) VALUES (:id, 'Wide Co')"), {"id": WIDE_ID}
        )
        await conn.execute(
            text(
                "INSERT INTO users (organization_id, id, name, email)"
                " SELECT :id, '1768236789900x' || lpad(n::text, 18, '0'), 'User ' || n,"
                " 'user' || n || '@example.com' FROM generate_series(0, :users - 1) n"
            ),
            {"id": WIDE_ID, "users": WIDE_USERS},
        )

    await transact(engine, directory)
    events = _wide_events(datetime.now(UTC))
    for start in range(0, len(events), 1000):
        await transact(engine, ingest, _BENCH_ADMIN, events[start : start + 1000])
    await fold_all(engine)


async def _load(url: str) -> str:
    engine = PrimaryEngine(create_engine(Settings.from_env(), url))
    try:
        await demo.load_demo(engine)
        await _load_wide(engine)

        async def admin_key(conn: Any) -> str:
            _, key = await create_key(conn, scope="admin", name="bench")
            return key

        return await transact(engine, admin_key)
    finally:
        await engine.dispose()


def _wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server did not become ready")


def _views(today: str, year_ago: str) -> dict[str, str]:
    org = f"/dashboard/organizations/{demo.ORGANIZATION_ID}"
    return {
        "organization, 365 days by day (UTC)": (
            f"{org}?period=custom&start={year_ago}&end={today}&granularity=day&tz=UTC"
        ),
        "organization, last 7 days by day": f"{org}?period=7d&tz=Europe%2FBerlin",
        "organization, last 12 months by month": f"{org}?period=12m&tz=Europe%2FBerlin",
        "partner, last 12 months by week": (
            f"/dashboard/partners/{demo.PARTNER_ID}?period=12m&granularity=week&tz=Europe%2FBerlin"
        ),
        "user, last 7 days by day": f"/dashboard/users/{demo.USER_ID}?period=7d&tz=UTC",
        "organization of 10,000 users, last 7 days, table by -sms.total": (
            f"/dashboard/organizations/{WIDE_ID}?period=7d&tz=UTC"
        ),
    }


def _load_once(browser: Browser, base: str, key: str, path: str) -> dict[str, Any]:
    # A fresh context each load: no cache, as a first visit.
    context = browser.new_context()
    # Signed in outside the page, so that the view is the first page it loads.
    context.request.post(f"{base}/dashboard/sign-in", form={"key": key}, headers={"Origin": base})
    page = context.new_page()
    page.goto(base + path, timeout=300_000)
    page.wait_for_selector("#data svg path")
    timing: dict[str, Any] = page.evaluate(_TIMING)
    context.close()
    return timing


def _measure(
    browser: Browser, servers: dict[str, tuple[str, int]], key: str, loads: int, meter: CpuMeter
) -> list[dict[str, Any]]:
    """Each view `loads` times from each server, in turn, each going first in turn; CPU
    per load of each server process and of PostgreSQL while it was loaded."""
    now = datetime.now(UTC)
    today, year_ago = now.date(), (now - timedelta(days=364)).date()
    rows = []
    for name, path in _views(today.isoformat(), year_ago.isoformat()).items():
        samples: dict[str, list[dict[str, Any]]] = {code: [] for code in servers}
        cpu = {code: {"server_s": 0.0, "postgres_s": 0.0, "others": 0.0} for code in servers}
        for n in range(loads):
            # Each goes first in turn: the first load of a round pays for the other's.
            order = list(servers.items())
            for code, (base, pid) in order[n % len(order) :] + order[: n % len(order)]:
                since = meter.sample(pid)
                samples[code].append(_load_once(browser, base, key, path))
                spent = meter.usage(since, pid)
                for part in cpu[code]:
                    cpu[code][part] += spent[part] / loads
        for code in servers:
            rows.append(
                {
                    "view": name,
                    "code": code,
                    "p50_ms": statistics.median(s["ms"] for s in samples[code]),
                    "server_p50_ms": statistics.median(s["server_ms"] for s in samples[code]),
                    "bytes": statistics.median(s["bytes"] for s in samples[code]),
                    "html_bytes": statistics.median(s["html_bytes"] for s in samples[code]),
                    "requests": samples[code][0]["requests"],
                    **cpu[code],
                }
            )
            print(rows[-1], file=sys.stderr)
    return rows


def _report(rows: list[dict[str, Any]], loads: int, baseline: str | None) -> str:
    lines = [
        "# Dashboard benchmark",
        "",
        f"Generated by `python -m bench.dashboard` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC,"
        f" {loads} loads per view, each in a fresh browser context (no cache), headless",
        "Chromium against `usage-api serve` (one worker) on the demo data and an organization",
        f"of {WIDE_USERS:,} users ({WIDE_USERS * 3:,} events over the last 5 days)."
        + (
            f" `this tree` and `baseline` ({baseline}) served the same database, loaded in turn."
            if baseline
            else ""
        ),
        "",
        "| view | code | navigation to rendered chart, p50 | of which server (request to last"
        " byte) | CPU a load: server / PostgreSQL | bytes transferred (first load)"
        " | of which the page | requests | others' CPU |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['view']} | {row['code']} | {row['p50_ms']:.0f} ms"
            f" | {row['server_p50_ms']:.0f} ms"
            f" | {row['server_s'] * 1000:.0f} / {row['postgres_s'] * 1000:.0f} ms"
            f" | {row['bytes'] / 1024:.1f} KB | {row['html_bytes'] / 1024:.1f} KB"
            f" | {row['requests']} | {row['others']:.0%} |"
        )
    lines += [
        "",
        "Pages are rendered on the server and gzip-compressed; the stylesheet, the script and",
        "the icon are three more requests, cached for an hour. The budget is 150 KB for a",
        "first load. The series and its totals are one read of the API's series; the table",
        "is one read of the API's breakdown (its first page of 25 rows). CPU a load is that",
        "of the server process and of PostgreSQL during the load (Chromium's is not counted);",
        "others' CPU is the share of the machine other processes took meanwhile. A shared",
        "2-core machine: compare figures of one run only.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loads", type=int, default=9)
    parser.add_argument(
        "--baseline-root",
        type=Path,
        help="a copy of the repository at another commit, served beside this tree",
    )
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="usage-api-bench-") as tmp:
        # As root the server runs as another account, which must be able to enter it.
        os.chmod(tmp, 0o755)
        data_dir = Path(tmp) / "pgdata"
        with EmbeddedPostgres(data_dir, fast=True) as url:
            postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
            _run(url, chromium, args.loads, args.baseline_root, CpuMeter(postmaster))


def _serve(url: str, port: int, root: Path | None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DATABASE_URL": url, "USAGE_API_LOG_LEVEL": "warning"}
    if root is not None:
        # The other code first on the path (alembic.ini puts the cwd's src/ first, too).
        env["PYTHONPATH"] = str(root / "src")
    return subprocess.Popen(
        [Path(sys.executable).with_name("usage-api"), "serve", "--port", str(port)],
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
    )


def _run(url: str, chromium: str, loads: int, baseline: Path | None, meter: CpuMeter) -> None:
    migrate_to_head(url)
    key = asyncio.run(_load(url))
    roots = {"this tree": None, **({"baseline": baseline} if baseline else {})}
    processes = {}
    servers = {}
    try:
        for code, root in roots.items():
            port = _free_port()
            processes[code] = _serve(url, port, root)
            servers[code] = (f"http://127.0.0.1:{port}", processes[code].pid)
        for base, _ in servers.values():
            _wait_ready(base)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            rows = _measure(browser, servers, key, loads, meter)
            browser.close()
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(20)
    OUT.write_text(_report(rows, loads, str(baseline) if baseline else None))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
