"""The dashboard in a real headless Chromium, driven by Playwright, against `usage-api
serve` on 127.0.0.1: sign-in by keyboard, numbers equal to the API's, filters in the URL,
CSV, the key nowhere, no request to another origin, no console error, axe-core, 360 px.

Without Chromium (Debian: `apt-get install chromium`) or axe-core (`npm install axe-core`,
found through `AXE_CORE_PATH` or in ~/.cache/usage-api-browser) these tests skip, saying
so; with `REQUIRE_BROWSER=1` (as CI sets) a missing one fails them instead.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import event, make_key, make_user
from tests.support.servers import LiveServer
from tests.test_dashboard import (
    BERLIN_WEEK,
    METRICS,
    Page,
    Tenants,
    api_rows,
    assert_page_equals_api,
    make_tenants,
    post_events,
)
from usage_api.auth import hash_key

pytestmark = pytest.mark.slow

try:
    from playwright.async_api import Browser, BrowserContext, async_playwright
    from playwright.async_api import Page as BrowserPage
except ImportError:  # pragma: no cover - the dev dependencies are not installed
    async_playwright = None  # type: ignore[assignment]

CHROMIUM_ARGS = [
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
]
AXE_DEFAULT = Path.home() / ".cache/usage-api-browser/node_modules/axe-core/axe.min.js"


def _missing(what: str) -> None:
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"{what} (REQUIRE_BROWSER=1)")
    pytest.skip(what)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if async_playwright is None or chromium is None:
        _missing(
            "no Chromium for the browser tests: install it (Debian: apt-get install chromium)"
            " and the dev dependencies (uv sync)"
        )
    assert chromium is not None
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


@pytest.fixture(scope="session")
def axe_source() -> str:
    """axe-core's script."""
    path = Path(os.environ.get("AXE_CORE_PATH") or AXE_DEFAULT)
    if not path.is_file():
        _missing(
            f"no axe-core at {path}: npm install --prefix ~/.cache/usage-api-browser axe-core"
            " (or set AXE_CORE_PATH)"
        )
    return path.read_text()


@pytest.fixture
async def tenants(client: httpx.AsyncClient, engine: AsyncEngine) -> Tenants:
    return await make_tenants(client, engine)


@pytest.fixture(scope="module")
async def live(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """The service on a free port of 127.0.0.1, on the test database."""
    env = {**os.environ, "DATABASE_URL": database_url, "USAGE_API_LOG_LEVEL": "warning"}
    server = LiveServer(env, tmp_path_factory.mktemp("live") / "stderr.log")
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            yield http
    finally:
        await server.stop(signal.SIGTERM)


@dataclass
class Visit:
    """A browser context on the live server, recording what the pages did."""

    context: BrowserContext
    page: BrowserPage
    base: str
    requests: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    contents: list[str] = field(default_factory=list)

    async def goto(self, path: str, status: int = 200) -> None:
        response = await self.page.goto(self.base + path)
        await self.settled()
        assert response is not None and response.status == status, path
        if status != 200:
            # Chromium reports every error page it loads; this one was asked for.
            expected = (
                "console error: Failed to load resource:"
                f" the server responded with a status of {status}"
            )
            self.problems = [p for p in self.problems if not p.startswith(expected)]

    async def settled(self) -> None:
        await self.page.wait_for_load_state("load")
        if await self.page.locator("[data-needs-tz]").count():
            await self.page.wait_for_url("**tz=**")
        self.contents.append(await self.page.content())

    async def sign_in(self, key: str) -> None:
        await self.goto("/dashboard/sign-in")
        await self.page.fill("#key", key)
        await self.page.click("form.signin button[type=submit]")
        await self.settled()

    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.page.url).query)


@pytest.fixture
async def visit(browser: Browser, live: httpx.AsyncClient) -> AsyncIterator[Visit]:
    context = await browser.new_context(
        timezone_id="Europe/Berlin", viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    page = await context.new_page()
    seen = Visit(context, page, str(live.base_url).rstrip("/"))
    page.on("request", lambda request: seen.requests.append(request.url))
    page.on(
        "console",
        lambda message: (
            seen.problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda error: seen.problems.append(f"page error: {error}"))
    yield seen
    await context.close()
    # Every test: nothing left the origin, and the console stayed clean.
    assert [url for url in seen.requests if not url.startswith(seen.base + "/")] == []
    assert seen.problems == []


async def read_numbers(page: BrowserPage) -> Page:
    """The totals, the series table and the breakdown table, as the browser shows them."""
    found = await page.evaluate(
        """() => {
        const numbers = (root) => Object.fromEntries(
            [...root.querySelectorAll('[data-metric]')].map(
                (cell) => [cell.dataset.metric, Number(cell.textContent.replaceAll(',', ''))]));
        return {
            totals: numbers(document.querySelector('.cards')),
            buckets: [...document.querySelectorAll('#series-table tr[data-start]')].map(
                (row) => [row.dataset.start, row.dataset.end, numbers(row)]),
            rows: [...document.querySelectorAll('#breakdown-table tr[data-id]')].map(
                (row) => [row.dataset.id, numbers(row)]),
            text: document.body.innerText,
        };
    }"""
    )
    return Page(
        totals=found["totals"],
        buckets=[tuple(bucket) for bucket in found["buckets"]],
        rows=[tuple(row) for row in found["rows"]],
        text=found["text"],
    )


async def test_signing_in_by_keyboard_lands_on_the_keys_organization_in_the_browsers_zone(
    visit: Visit, engine: AsyncEngine, tenants: Tenants
) -> None:
    key = await make_key(engine, "organization", organization_id=tenants.organization_id)
    await visit.goto("/dashboard")
    assert urlsplit(visit.page.url).path == "/dashboard/sign-in"
    # Tab to the key field; every stop on the way shows where the focus is.
    for _ in range(10):
        await visit.page.keyboard.press("Tab")
        focus = await visit.page.evaluate(
            """() => {
                const e = document.activeElement, s = getComputedStyle(e);
                return {id: e.id, outline: s.outlineStyle, width: parseFloat(s.outlineWidth)};
            }"""
        )
        assert focus["outline"] != "none" and focus["width"] >= 2, focus
        if focus["id"] == "key":
            break
    else:
        pytest.fail("the key field is not reachable by keyboard")
    await visit.page.keyboard.type(key)
    await visit.page.keyboard.press("Enter")
    await visit.page.wait_for_selector("#data")
    await visit.settled()
    assert urlsplit(visit.page.url).path == f"/dashboard/organizations/{tenants.organization_id}"
    assert visit.query()["tz"] == ["Europe/Berlin"]
    assert "Europe/Berlin" in await visit.page.inner_text("#asof")

    cookies = await visit.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"], c["path"]) for c in cookies] == [
        ("usage_session", True, "Strict", "/dashboard")
    ]
    assert await visit.page.evaluate("document.cookie") == ""
    storage = await visit.page.evaluate(
        "() => JSON.stringify([Object.entries(localStorage), Object.entries(sessionStorage)])"
    )
    assert storage == "[[],[]]"
    # The key went out once, in the sign-in form's body, and shows up nowhere after.
    assert not [url for url in visit.requests if key in url]
    assert not [html for html in visit.contents if key in html]
    assert cookies[0]["value"] != key


async def test_the_browser_shows_the_apis_numbers_and_filters_live_in_the_url(
    visit: Visit, live: httpx.AsyncClient, tenants: Tenants
) -> None:
    await visit.sign_in(tenants.admin_key)
    assert "Northwind" in await visit.page.inner_text("main")  # the admin's picker
    await visit.page.click("text=Acme Corp")
    await visit.settled()
    page = visit.page
    await page.select_option("#period", "custom")
    await page.fill("#start", BERLIN_WEEK["start"])
    await page.fill("#end", BERLIN_WEEK["end"])
    await page.select_option("#granularity", "day")
    await page.click("form.filters button[type=submit]")
    await visit.settled()
    query = visit.query()
    assert {name: query[name] for name in ("period", "start", "end", "granularity", "tz")} == {
        name: [value] for name, value in BERLIN_WEEK.items()
    }
    shown = await read_numbers(page)
    assert len(shown.buckets) == 7
    await assert_page_equals_api(
        live,
        tenants.admin_key,
        shown,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )

    # Granularity.
    await page.select_option("#granularity", "hour")
    await page.click("form.filters button[type=submit]")
    await visit.settled()
    assert visit.query()["granularity"] == ["hour"]
    hourly = await read_numbers(page)
    assert len(hourly.buckets) == 7 * 24 - 1
    assert hourly.totals == shown.totals
    await assert_page_equals_api(
        live,
        tenants.admin_key,
        hourly,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )

    # Time zone.
    await page.fill("#tz", "UTC")
    await page.select_option("#granularity", "day")
    await page.click("form.filters button[type=submit]")
    await visit.settled()
    assert visit.query()["tz"] == ["UTC"]
    utc = await read_numbers(page)
    assert utc.totals["sms.outbound"] != shown.totals["sms.outbound"]
    assert utc.buckets[0][0] == "2026-03-27T00:00:00+00:00"
    await assert_page_equals_api(
        live,
        tenants.admin_key,
        utc,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )

    # Sort: a column heading's link, twice.
    await page.click("#breakdown-table thead >> text=Voice total s")
    await visit.settled()
    assert visit.query()["sort"] == ["-voice.total_seconds"]
    ranked = await read_numbers(page)
    seconds = [values["voice.total_seconds"] for _, values in ranked.rows]
    assert seconds == sorted(seconds, reverse=True)
    await page.click("#breakdown-table thead >> text=Voice total s")
    await visit.settled()
    assert visit.query()["sort"] == ["voice.total_seconds"]
    ranked = await read_numbers(page)
    assert [values["voice.total_seconds"] for _, values in ranked.rows] == sorted(seconds)

    # A user's own view, reached from the table, keeps the filters.
    await page.click("#breakdown-table >> text=Anna")
    await visit.settled()
    assert urlsplit(page.url).path == f"/dashboard/users/{tenants.user_ids[0]}"
    assert visit.query()["tz"] == ["UTC"] and visit.query()["start"] == ["2026-03-27"]
    await assert_page_equals_api(
        live,
        tenants.admin_key,
        await read_numbers(page),
        "user",
        tenants.user_ids[0],
        "2026-03-27",
        "2026-04-02",
    )


async def test_the_table_pages_by_keyboard_through_the_breakdowns_cursor(
    visit: Visit, live: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    for n in range(30):
        await make_user(engine, tenants.organization_id, f"Member {n:02d}")
    await visit.sign_in(tenants.admin_key)
    query = "&".join(f"{k}={v}" for k, v in BERLIN_WEEK.items()).replace("/", "%2F")
    await visit.goto(f"/dashboard/organizations/{tenants.organization_id}?{query}&sort=name")
    first = await read_numbers(visit.page)
    # By keyboard alone: focus the link, as Tab would reach it, and press Enter.
    await visit.page.focus("a[rel=next]")
    await visit.page.keyboard.press("Enter")
    await visit.settled()
    assert visit.query()["page"] == ["2"]
    second = await read_numbers(visit.page)
    assert "Page 2 · 32 users in all" in second.text
    assert await visit.page.locator("a[rel=next]").count() == 0
    question = {
        "organization_id": tenants.organization_id,
        "start_date": BERLIN_WEEK["start"],
        "end_date": BERLIN_WEEK["end"],
        "timezone": BERLIN_WEEK["tz"],
        "sort": "name",
        "limit": "25",
    }
    pages = []
    for cursor in (None, visit.query()["cursor"][0]):
        response = await live.get(
            "/v1/analytics/usage/breakdown",
            params={**question, **({"cursor": cursor} if cursor else {})},
            headers={"X-API-Key": tenants.admin_key},
        )
        pages.append(api_rows(response.json()["breakdown"]))
    assert [first.rows, second.rows] == pages
    assert len(first.rows) + len(second.rows) == 33  # 32 users and the usage without one
    await visit.page.focus("text=First page")
    await visit.page.keyboard.press("Enter")
    await visit.settled()
    assert "cursor" not in visit.query()
    assert (await read_numbers(visit.page)).rows == first.rows


async def test_csv_downloads_hold_what_the_page_shows(visit: Visit, tenants: Tenants) -> None:
    await visit.sign_in(tenants.admin_key)
    query = "&".join(f"{k}={v}" for k, v in BERLIN_WEEK.items()).replace("/", "%2F")
    await visit.goto(f"/dashboard/partners/{tenants.partner_id}?{query}")
    shown = await read_numbers(visit.page)
    for link, expected in (
        ("Download the series as CSV", [(start, values) for start, _, values in shown.buckets]),
        ("Download the table as CSV", [(member, values) for member, values in shown.rows]),
    ):
        async with visit.page.expect_download() as waiting:
            await visit.page.click(f"text={link}")
        download = await waiting.value
        rows = list(
            csv.DictReader(
                io.StringIO(await asyncio.to_thread(Path(await download.path()).read_text))
            )
        )
        first = "start" if "series" in link else "organization_id"
        got = [
            (row[first], {metric: int(row[metric.replace(".", "_")]) for metric in METRICS})
            for row in rows
        ]
        assert got == expected


async def test_a_revoked_keys_session_shows_no_data_on_the_next_load(
    visit: Visit, engine: AsyncEngine, tenants: Tenants
) -> None:
    key = await make_key(engine, "partner", partner_id=tenants.partner_id)
    await visit.sign_in(key)
    # A partner key lands on its partner, whose table holds its organizations and no other.
    assert urlsplit(visit.page.url).path == f"/dashboard/partners/{tenants.partner_id}"
    shown = await read_numbers(visit.page)
    assert sorted(member for member, _ in shown.rows) == sorted(
        [tenants.organization_id, tenants.other_organization_id]
    )
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h"), {"h": hash_key(key)}
        )
    await visit.page.reload()
    await visit.settled()
    assert urlsplit(visit.page.url).path == "/dashboard/sign-in"
    assert await visit.page.locator("#data").count() == 0
    assert "Your session has ended" in await visit.page.inner_text("main")
    assert await visit.context.cookies() == []


async def test_signing_out_in_the_browser(visit: Visit, tenants: Tenants) -> None:
    await visit.sign_in(tenants.admin_key)
    await visit.page.click("text=Sign out")
    await visit.settled()
    assert "You are signed out." in await visit.page.inner_text("main")
    await visit.goto(f"/dashboard/organizations/{tenants.organization_id}?tz=UTC")
    assert urlsplit(visit.page.url).path == "/dashboard/sign-in"


async def test_live_refresh_shows_new_usage_without_a_reload(
    visit: Visit, live: httpx.AsyncClient, tenants: Tenants
) -> None:
    await visit.page.clock.install()
    await visit.sign_in(tenants.admin_key)
    # Yesterday to tomorrow: the event sent "now" lands inside even at midnight.
    today = datetime.now(UTC).date()
    days = f"start={today - timedelta(days=1)}&end={today + timedelta(days=1)}"
    await visit.goto(
        f"/dashboard/organizations/{tenants.organization_id}?period=custom&{days}&tz=UTC"
    )
    await visit.page.check("#live")
    await visit.page.click("form.filters button[type=submit]")
    await visit.settled()
    assert visit.query()["live"] == ["1"]
    before = (await read_numbers(visit.page)).totals["sms.outbound"]
    await visit.page.evaluate("document.body.dataset.marker = 'same document'")
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    await post_events(
        live,
        tenants.admin_key,
        [event(tenants.organization_id, "live-1", quantity=7, occurred_at=now)],
    )
    await visit.page.clock.run_for(16_000)
    await visit.page.wait_for_function(
        """(want) => document.querySelector('[data-metric="sms.outbound"]')
                        .textContent.replaceAll(',', '') === want""",
        arg=str(before + 7),
    )
    assert await visit.page.evaluate("document.body.dataset.marker") == "same document"


VIEWS = (
    ("/dashboard/sign-in", 200),
    ("/dashboard", 200),
    ("/dashboard/partners/{partner}?period=12m&tz=Europe%2FBerlin", 200),
    (
        "/dashboard/organizations/{organization}?period=custom&start=2026-01-01&end=2026-12-31"
        "&granularity=day&tz=Asia%2FKolkata",
        200,
    ),
    ("/dashboard/users/{user}?period=7d&tz=UTC", 200),
    ("/dashboard/organizations/{organization}?tz=Mars%2FOlympus", 400),
    ("/dashboard/organizations/unknown?tz=UTC", 404),
)


@pytest.mark.parametrize("width", [360, 1280])
async def test_every_view_passes_axe_and_fits_the_screen(
    visit: Visit, axe_source: str, tenants: Tenants, width: int
) -> None:
    await visit.page.set_viewport_size({"width": width, "height": 800})
    await visit.sign_in(tenants.admin_key)
    for template, status in VIEWS:
        path = template.format(
            partner=tenants.partner_id,
            organization=tenants.organization_id,
            user=tenants.user_ids[0],
        )
        await visit.goto(path, status)
        # The charts' tables open too, so that axe checks them.
        for details in await visit.page.locator("details").all():
            await details.evaluate("d => d.open = true")
        widths = await visit.page.evaluate(
            "() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]"
        )
        assert widths[0] <= widths[1], (path, widths)
        # Evaluated through the driver: a script tag would be (rightly) refused by the CSP.
        await visit.page.evaluate(axe_source)
        result: dict[str, Any] = await visit.page.evaluate(
            "async () => await axe.run(document, {resultTypes: ['violations']})"
        )
        serious = [
            (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
            for v in result["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert serious == [], path
