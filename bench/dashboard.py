"""The dashboard in headless Chromium on the demo data: time from navigation to a rendered
365-day daily chart of Acme Corp (p50 of several loads), and bytes transferred per view.

    uv run python -m bench.dashboard [--loads 9]     # writes bench/DASHBOARD.md

It starts an embedded PostgreSQL in a temporary directory, loads the demo, and serves the
app with `usage-api serve` on a free port of 127.0.0.1. Needs Debian's `chromium`.
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

from usage_api import demo
from usage_api.cli import migrate_to_head
from usage_api.config import Settings
from usage_api.db import PrimaryEngine, create_engine, transact
from usage_api.embedded import EmbeddedPostgres
from usage_api.keys import create_key

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


async def _load(url: str) -> str:
    engine = PrimaryEngine(create_engine(Settings.from_env(), url))
    try:
        await demo.load_demo(engine)

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
    }


def _measure(browser: Browser, base: str, key: str, loads: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    today, year_ago = now.date(), (now - timedelta(days=364)).date()
    rows = []
    for name, path in _views(today.isoformat(), year_ago.isoformat()).items():
        samples = []
        for _ in range(loads):
            # A fresh context each load: no cache, as a first visit.
            context = browser.new_context()
            # Signed in outside the page, so that the view is the first page it loads.
            context.request.post(
                f"{base}/dashboard/sign-in", form={"key": key}, headers={"Origin": base}
            )
            page = context.new_page()
            page.goto(base + path)
            page.wait_for_selector("#data svg path")
            samples.append(page.evaluate(_TIMING))
            context.close()
        rows.append(
            {
                "view": name,
                "p50_ms": statistics.median(s["ms"] for s in samples),
                "server_p50_ms": statistics.median(s["server_ms"] for s in samples),
                "bytes": statistics.median(s["bytes"] for s in samples),
                "html_bytes": statistics.median(s["html_bytes"] for s in samples),
                "requests": samples[0]["requests"],
            }
        )
        print(rows[-1], file=sys.stderr)
    return rows


def _report(rows: list[dict[str, Any]], loads: int) -> str:
    lines = [
        "# Dashboard benchmark",
        "",
        f"Generated by `python -m bench.dashboard` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC,"
        f" {loads} loads per view, each in a fresh browser context (no cache), headless",
        "Chromium against `usage-api serve` (one worker) on the demo data.",
        "",
        "| view | navigation to rendered chart, p50 | of which server (request to last byte)"
        " | bytes transferred (first load) | of which the page | requests |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['view']} | {row['p50_ms']:.0f} ms | {row['server_p50_ms']:.0f} ms"
            f" | {row['bytes'] / 1024:.1f} KB | {row['html_bytes'] / 1024:.1f} KB"
            f" | {row['requests']} |"
        )
    lines += [
        "",
        "Pages are rendered on the server and gzip-compressed; the stylesheet, the script and",
        "the icon are three more requests, cached for an hour. The budget is 150 KB for a",
        "first load. The series and its totals are one read of the API's series; each table",
        "row is one range read. A shared 2-core machine: compare figures of one run only.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--loads", type=int, default=9)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("Chromium is not installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="usage-api-bench-") as tmp:
        # As root the server runs as another account, which must be able to enter it.
        os.chmod(tmp, 0o755)
        with EmbeddedPostgres(Path(tmp) / "pgdata", fast=True) as url:
            _run(url, chromium, args.loads)


def _run(url: str, chromium: str, loads: int) -> None:
    migrate_to_head(url)
    key = asyncio.run(_load(url))
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": url, "USAGE_API_LOG_LEVEL": "warning"}
    server = subprocess.Popen(
        [Path(sys.executable).with_name("usage-api"), "serve", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        _wait_ready(base)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            rows = _measure(browser, base, key, loads)
            browser.close()
    finally:
        server.terminate()
        server.wait(20)
    OUT.write_text(_report(rows, loads))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
