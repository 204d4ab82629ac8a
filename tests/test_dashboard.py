"""The dashboard over HTTP: sessions, what each key sees, and every number on a page
equal to the JSON API's answer to the same question (contract 7).

The browser-level checks (script, accessibility, layout) are in test_dashboard_browser.py.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html import unescape
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.factories import (
    ADMIN,
    event,
    make_key,
    make_organization,
    make_partner,
    make_user,
)
from usage_api.auth import hash_key
from usage_api.dashboard.filters import METRIC_COLUMNS
from usage_api.db import transact
from usage_api.directory import put_organization
from usage_api.schemas import OrganizationIn

USAGE = "/v1/analytics/usage"
BREAKDOWN = "/v1/analytics/usage/breakdown"
METRICS = [name for name, _, _ in METRIC_COLUMNS]
BERLIN_WEEK = {
    "period": "custom",
    "start": "2026-03-27",
    "end": "2026-04-02",
    "granularity": "day",
    "tz": "Europe/Berlin",
}


# What a page shows, read back from its HTML.


@dataclass
class Page:
    totals: dict[str, int] = field(default_factory=dict)
    buckets: list[tuple[str, str, dict[str, int]]] = field(default_factory=list)
    rows: list[tuple[str, dict[str, int]]] = field(default_factory=list)
    text: str = ""


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = Page()
        self.metric: str | None = None
        self.row: dict[str, int] | None = None
        self.texts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "tr" and "data-start" in found:
            self.row = {}
            self.page.buckets.append((found["data-start"] or "", found["data-end"] or "", self.row))
        elif tag == "tr" and "data-id" in found:
            self.row = {}
            self.page.rows.append((found["data-id"] or "", self.row))
        if "data-metric" in found:
            self.metric = found["data-metric"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self.row = None

    def handle_data(self, data: str) -> None:
        self.texts.append(data)
        if self.metric is not None:
            value = int(data.replace(",", ""))
            (self.row if self.row is not None else self.page.totals)[self.metric] = value
            self.metric = None


def read_page(html: str) -> Page:
    parser = _PageParser()
    parser.feed(html)
    parser.page.text = " ".join(" ".join(parser.texts).split())
    return parser.page


def flat(usage: dict[str, Any]) -> dict[str, int]:
    """A usage object's nine numbers under the page's metric names."""
    return {name: usage[path[0]][path[1]] for name, _, path in METRIC_COLUMNS}


def flat_csv(row: dict[str, str]) -> dict[str, int]:
    """A CSV row's nine numbers under the page's metric names."""
    return {name: int(row[name.replace(".", "_")]) for name in METRICS}


def last_instant(end: str) -> str:
    """An exclusive ISO end as the API's inclusive end: the microsecond before it."""
    at = datetime.fromisoformat(end) - timedelta(microseconds=1)
    return at.isoformat(timespec="microseconds")


# Talking to the service.


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post(
        "/dashboard/sign-in", data={"key": key}, headers={"Origin": str(client.base_url)}
    )


async def api_usage(client: httpx.AsyncClient, key: str, **params: str) -> dict[str, Any]:
    response = await client.get(USAGE, params=params, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    usage: dict[str, Any] = response.json()["usage"]
    return usage


async def assert_page_equals_api(
    client: httpx.AsyncClient,
    key: str,
    page: Page,
    kind: str,
    tenant_id: str,
    first: str,
    last: str,
) -> None:
    """Totals, every bucket and every table row are the API's answers for the same range."""
    ids = {f"{kind}_id": tenant_id}
    start = page.buckets[0][0]
    end = last_instant(page.buckets[-1][1])
    assert start.startswith(first) and end.startswith(last)
    assert page.totals == flat(await api_usage(client, key, **ids, start_date=start, end_date=end))
    for bucket_start, bucket_end, values in page.buckets:
        usage = await api_usage(
            client, key, **ids, start_date=bucket_start, end_date=last_instant(bucket_end)
        )
        assert values == flat(usage), bucket_start
    member = "user_id" if kind == "organization" else "organization_id"
    for member_id, values in page.rows:
        if member_id:
            usage = await api_usage(
                client, key, **{member: member_id}, start_date=start, end_date=end
            )
            assert values == flat(usage), member_id


@dataclass(frozen=True)
class Tenants:
    partner_id: str
    organization_id: str
    other_organization_id: str
    user_ids: list[str]
    admin_key: str


async def post_events(client: httpx.AsyncClient, key: str, events: list[dict[str, Any]]) -> None:
    response = await client.post(
        "/v1/usage/events", json={"events": events}, headers={"X-API-Key": key}
    )
    assert response.status_code == 200, response.text


@pytest.fixture
async def tenants(client: httpx.AsyncClient, engine: AsyncEngine) -> Tenants:
    return await make_tenants(client, engine)


async def make_tenants(client: httpx.AsyncClient, engine: AsyncEngine) -> Tenants:
    """A partner with two organizations; the first has two users and usage around the
    spring DST change in Berlin (2026-03-29), with and without a user."""
    partner_id = await make_partner(engine, "Northwind")
    organization_id = await make_organization(engine, "Acme Corp", partner_id=partner_id)
    other = await make_organization(engine, "Globex", partner_id=partner_id)
    anna = await make_user(engine, organization_id, "Anna", "anna@example.com")
    ben = await make_user(engine, organization_id, "Ben", "ben@example.com")
    admin_key = await make_key(engine, write=True)
    events = []
    times = [
        "2026-03-26T22:59:59Z",  # 23:59:59 in Berlin on the 26th: outside the week
        "2026-03-26T23:00:00Z",  # Berlin's midnight of the 27th: the first instant
        "2026-03-28T22:59:59Z",
        "2026-03-28T23:00:00Z",  # the 29th, a 23-hour day
        "2026-03-29T21:59:59Z",
        "2026-03-29T22:00:00Z",  # the 30th: the offset is +02:00 now
        "2026-04-02T21:59:59Z",  # the last second of the week
        "2026-04-02T22:00:00Z",  # outside it
    ]
    for n, at in enumerate(times):
        owner = [anna, ben, None][n % 3]
        events.append(
            event(organization_id, f"s{n}", quantity=n + 1, user_id=owner, occurred_at=at)
        )
        events.append(
            event(
                organization_id,
                f"i{n}",
                direction="inbound",
                quantity=2,
                user_id=owner,
                occurred_at=at,
            )
        )
        events.append(
            event(
                organization_id,
                f"v{n}",
                type="voice",
                quantity=60 + n,
                knowledge_base=n % 2 == 0,
                user_id=owner,
                occurred_at=at,
            )
        )
        events.append(event(other, f"o{n}", type="mms", quantity=n + 3, occurred_at=at))
    await post_events(client, admin_key, events)
    return Tenants(partner_id, organization_id, other, [anna, ben], admin_key)


# Sessions


def cookie_attributes(response: httpx.Response) -> dict[str, str]:
    header = response.headers["set-cookie"]
    parts = [part.strip() for part in header.split(";")]
    name, _, value = parts[0].partition("=")
    attributes = {"name": name, "value": value}
    for part in parts[1:]:
        key, _, val = part.partition("=")
        attributes[key.lower()] = val
    return attributes


async def test_signing_in_exchanges_the_key_for_an_httponly_strict_cookie(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await sign_in(client, tenants.admin_key)
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard"
    cookie = cookie_attributes(response)
    assert cookie["name"] == "usage_session"
    assert "httponly" in cookie and cookie["samesite"].lower() == "strict"
    assert cookie["path"] == "/dashboard"
    assert "secure" not in cookie  # plain HTTP here
    assert 43190 <= int(cookie["max-age"]) <= 43200
    assert tenants.admin_key not in cookie["value"]
    assert tenants.admin_key not in str(response.headers)


async def test_over_https_the_cookie_is_secure(app: Any, tenants: Tenants) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        response = await sign_in(client, tenants.admin_key)
    assert response.status_code == 303
    assert "secure" in cookie_attributes(response)


async def test_a_session_never_outlives_its_key(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    key = await make_key(engine, expires_at=datetime.now(UTC) + timedelta(hours=1))
    response = await sign_in(client, key)
    assert 3590 <= int(cookie_attributes(response)["max-age"]) <= 3600
    async with engine.connect() as conn:
        session_end, key_end = (
            await conn.execute(
                text(
                    "SELECT s.expires_at, k.expires_at FROM dashboard_sessions s"
                    " JOIN api_keys k ON k.id = s.key_id"
                )
            )
        ).one()
    assert session_end == key_end


async def test_a_wrong_key_is_told_in_words(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    wrong = "usk_not-a-key-at-all"
    response = await sign_in(client, wrong)
    assert response.status_code == 401
    assert "set-cookie" not in response.headers
    assert "That key was not accepted: it is unknown, revoked or expired." in response.text
    assert wrong not in response.text
    response = await sign_in(client, "")
    assert response.status_code == 401
    assert "Paste a key to sign in." in response.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://test"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://test"},
    ],
)
async def test_cross_site_sign_in_and_sign_out_are_refused(
    client: httpx.AsyncClient, tenants: Tenants, headers: dict[str, str]
) -> None:
    response = await client.post(
        "/dashboard/sign-in", data={"key": tenants.admin_key}, headers=headers
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    await sign_in(client, tenants.admin_key)
    response = await client.post("/dashboard/sign-out", headers=headers)
    assert response.status_code == 403
    assert (await client.get("/dashboard")).status_code == 200  # still signed in


async def test_signing_out_ends_the_session(client: httpx.AsyncClient, tenants: Tenants) -> None:
    await sign_in(client, tenants.admin_key)
    token = client.cookies["usage_session"]
    response = await client.post("/dashboard/sign-out", headers={"Origin": "http://test"})
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/sign-in?signed_out=1"
    assert 'usage_session=""' in response.headers["set-cookie"]
    # The old token no longer opens anything, even if a browser kept it.
    client.cookies.clear()
    response = await client.get("/dashboard", headers={"Cookie": f"usage_session={token}"})
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/sign-in?ended=1"


async def test_revoking_the_key_ends_its_sessions_at_once(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    key = await make_key(engine, "organization", organization_id=tenants.organization_id)
    await sign_in(client, key)
    view = f"/dashboard/organizations/{tenants.organization_id}?tz=UTC"
    assert (await client.get(view)).status_code == 200
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h"), {"h": hash_key(key)}
        )
    response = await client.get(view)
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert location.path == "/dashboard/sign-in"
    assert parse_qs(location.query) == {"next": [view], "ended": ["1"]}
    response = await client.get(response.headers["location"])
    assert "Your session has ended" in response.text
    assert "Acme Corp" not in response.text


async def test_the_session_cookie_does_not_open_the_api(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(USAGE, params={"organization_id": tenants.organization_id})
    assert response.status_code == 401
    assert response.json() == {"success": False, "error": "X-API-Key header is required"}


async def test_pages_without_a_session_lead_to_sign_in(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    view = f"/dashboard/organizations/{tenants.organization_id}?tz=UTC&period=7d"
    response = await client.get(view)
    assert response.status_code == 303
    location = urlsplit(response.headers["location"])
    assert parse_qs(location.query) == {"next": [view]}
    # Signing in from there lands on the page asked for; never on another site.
    response = await client.post(
        "/dashboard/sign-in",
        data={"key": tenants.admin_key, "next": view},
        headers={"Origin": "http://test"},
    )
    assert response.headers["location"] == view
    for target in ("https://evil.example/", "//evil.example/dashboard", "/dashboardx"):
        response = await client.post(
            "/dashboard/sign-in",
            data={"key": tenants.admin_key, "next": target},
            headers={"Origin": "http://test"},
        )
        assert response.headers["location"] == "/dashboard"


async def test_dashboard_pages_allow_only_their_own_origin_and_the_api_keeps_none(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    response = await client.get("/dashboard/sign-in")
    assert response.headers["content-security-policy"] == (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    assert response.headers["cache-control"] == "no-store"
    response = await client.get(USAGE)
    assert (
        response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    )


# What each key sees


async def test_each_key_scope_sees_only_what_it_may(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    stranger_partner = await make_partner(engine, "Elsewhere")
    stranger = await make_organization(engine, "Stranger Inc", partner_id=stranger_partner)
    stranger_user = await make_user(engine, stranger, "Mallory")
    organization_key = await make_key(
        engine, "organization", organization_id=tenants.organization_id
    )
    partner_key = await make_key(engine, "partner", partner_id=tenants.partner_id)

    async def status(path: str) -> int:
        return (await client.get(path + "?tz=UTC")).status_code

    client.cookies.clear()
    await sign_in(client, organization_key)
    response = await client.get("/dashboard?tz=Asia/Kolkata")
    assert response.headers["location"] == (
        f"/dashboard/organizations/{tenants.organization_id}?tz=Asia%2FKolkata"
    )
    assert await status(f"/dashboard/organizations/{tenants.organization_id}") == 200
    assert await status(f"/dashboard/users/{tenants.user_ids[0]}") == 200
    for path in (
        f"/dashboard/organizations/{tenants.other_organization_id}",
        f"/dashboard/partners/{tenants.partner_id}",
        f"/dashboard/users/{stranger_user}",
        "/dashboard/organizations/unknown",
        "/dashboard/organizations/bad%20id",
    ):
        assert await status(path) == 404, path
    other = await client.get(f"/dashboard/organizations/{stranger}?tz=UTC")
    unknown = await client.get("/dashboard/organizations/unknown?tz=UTC")
    assert "Stranger Inc" not in other.text
    assert other.text.replace(stranger, "unknown") == unknown.text.replace("unknown", "unknown")

    client.cookies.clear()
    await sign_in(client, partner_key)
    response = await client.get("/dashboard")
    assert response.headers["location"] == f"/dashboard/partners/{tenants.partner_id}"
    assert await status(f"/dashboard/partners/{tenants.partner_id}") == 200
    assert await status(f"/dashboard/organizations/{tenants.other_organization_id}") == 200
    for path in (
        f"/dashboard/partners/{stranger_partner}",
        f"/dashboard/organizations/{stranger}",
        f"/dashboard/users/{stranger_user}",
    ):
        assert await status(path) == 404, path
    page = read_page((await client.get(f"/dashboard/partners/{tenants.partner_id}?tz=UTC")).text)
    assert sorted(member for member, _ in page.rows) == sorted(
        [tenants.organization_id, tenants.other_organization_id]
    )

    client.cookies.clear()
    await sign_in(client, tenants.admin_key)
    picker = await client.get("/dashboard")
    assert picker.status_code == 200
    for name in ("Northwind", "Elsewhere", "Acme Corp", "Globex", "Stranger Inc"):
        assert name in picker.text
    assert await status(f"/dashboard/partners/{stranger_partner}") == 200


# Numbers


async def test_a_view_shows_the_apis_numbers_for_local_days(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.organization_id}", params=BERLIN_WEEK
    )
    assert response.status_code == 200
    page = read_page(response.text)
    starts = [start for start, _, _ in page.buckets]
    assert starts == [
        "2026-03-27T00:00:00+01:00",
        "2026-03-28T00:00:00+01:00",
        "2026-03-29T00:00:00+01:00",
        "2026-03-30T00:00:00+02:00",
        "2026-03-31T00:00:00+02:00",
        "2026-04-01T00:00:00+02:00",
        "2026-04-02T00:00:00+02:00",
    ]
    assert page.buckets[-1][1] == "2026-04-03T00:00:00+02:00"
    # Six of the eight events lie inside the week: quantities 2..7.
    assert page.totals["sms.outbound"] == 2 + 3 + 4 + 5 + 6 + 7
    assert [values["sms.outbound"] for _, _, values in page.buckets] == [2, 3, 4 + 5, 6, 0, 0, 7]
    await assert_page_equals_api(
        client,
        tenants.admin_key,
        page,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )
    # Users and the usage without a user add up to the organization's total.
    assert [member for member, _ in page.rows if not member] == [""]
    for metric in METRICS:
        assert sum(values[metric] for _, values in page.rows) == page.totals[metric]


async def test_a_partners_view_adds_up_its_organizations(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(f"/dashboard/partners/{tenants.partner_id}", params=BERLIN_WEEK)
    page = read_page(response.text)
    assert len(page.rows) == 2
    for metric in METRICS:
        assert sum(values[metric] for _, values in page.rows) == page.totals[metric]
        assert sum(values[metric] for _, _, values in page.buckets) == page.totals[metric]
    for member_id, values in page.rows:
        usage = await api_usage(
            client,
            tenants.admin_key,
            organization_id=member_id,
            start_date="2026-03-27T00:00:00+01:00",
            end_date="2026-04-02T23:59:59.999999+02:00",
        )
        assert values == flat(usage)


async def test_a_users_view_is_the_users_usage(client: httpx.AsyncClient, tenants: Tenants) -> None:
    await sign_in(client, tenants.admin_key)
    user_id = tenants.user_ids[1]
    response = await client.get(
        f"/dashboard/users/{user_id}", params={**BERLIN_WEEK, "granularity": "hour"}
    )
    page = read_page(response.text)
    assert len(page.buckets) == 7 * 24 - 1  # the 29th has 23 hours
    assert page.rows == []
    await assert_page_equals_api(
        client, tenants.admin_key, page, "user", user_id, "2026-03-27", "2026-04-02"
    )
    assert "Acme Corp" in page.text  # the way back to its organization


async def test_the_hour_repeated_when_clocks_go_back_is_listed_twice(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.organization_id}",
        params={**BERLIN_WEEK, "start": "2026-10-25", "end": "2026-10-25", "granularity": "hour"},
    )
    starts = [start for start, _, _ in read_page(response.text).buckets]
    assert len(starts) == 25
    assert starts[1:5] == [
        "2026-10-25T01:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T03:00:00+01:00",
    ]


@pytest.mark.parametrize(
    ("granularity", "starts"),
    [
        ("week", ["2026-03-27T00:00:00+01:00", "2026-03-30T00:00:00+02:00"]),
        ("month", ["2026-03-27T00:00:00+01:00", "2026-04-01T00:00:00+02:00"]),
    ],
)
async def test_weeks_start_on_monday_and_months_on_the_first(
    client: httpx.AsyncClient, tenants: Tenants, granularity: str, starts: list[str]
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.organization_id}",
        params={**BERLIN_WEEK, "granularity": granularity},
    )
    page = read_page(response.text)
    assert [start for start, _, _ in page.buckets] == starts
    await assert_page_equals_api(
        client,
        tenants.admin_key,
        page,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )


async def test_the_time_zone_changes_the_days(client: httpx.AsyncClient, tenants: Tenants) -> None:
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    berlin = read_page((await client.get(path, params=BERLIN_WEEK)).text)
    utc = read_page((await client.get(path, params={**BERLIN_WEEK, "tz": "UTC"})).text)
    # 2026-03-26T23:00Z is the 27th in Berlin but the 26th in UTC, so outside the UTC week;
    # 2026-04-02T22:00Z is inside it.
    assert berlin.totals["sms.outbound"] == 27
    assert utc.totals["sms.outbound"] == 27 - 2 + 8
    await assert_page_equals_api(
        client,
        tenants.admin_key,
        utc,
        "organization",
        tenants.organization_id,
        "2026-03-27",
        "2026-04-02",
    )


async def test_presets_cover_whole_local_days(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    expected = {"today": 24, "7d": 7, "this-month": None, "last-month": None, "12m": 12}
    for period, count in expected.items():
        response = await client.get(path, params={"period": period, "tz": "Asia/Kathmandu"})
        assert response.status_code == 200, period
        page = read_page(response.text)
        if count is not None:
            assert len(page.buckets) == count, period
        assert all(start.endswith("+05:45") for start, _, _ in page.buckets)
        first = page.buckets[0][0][:10]
        last = last_instant(page.buckets[-1][1])[:10]
        await assert_page_equals_api(
            client, tenants.admin_key, page, "organization", tenants.organization_id, first, last
        )


def next_page(html: str) -> str | None:
    """The table's "Next page" link, as the browser would follow it."""
    found = re.search(r'<a href="([^"]*)" rel="next">', html)
    return unescape(found.group(1)) if found else None


def cursor_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["cursor"][0]


async def walk_table(
    client: httpx.AsyncClient, path: str, params: dict[str, str]
) -> list[tuple[Page, str | None]]:
    """Every page of a view's table, following its "Next page" links: each page with
    the link it gave to the next."""
    pages = []
    response = await client.get(path, params=params)
    while True:
        assert response.status_code == 200, response.text
        link = next_page(response.text)
        pages.append((read_page(response.text), link))
        if link is None:
            return pages
        response = await client.get(link)


async def api_breakdown(client: httpx.AsyncClient, key: str, **params: str) -> dict[str, Any]:
    response = await client.get(BREAKDOWN, params=params, headers={"X-API-Key": key})
    assert response.status_code == 200, response.text
    breakdown: dict[str, Any] = response.json()["breakdown"]
    return breakdown


def api_rows(breakdown: dict[str, Any]) -> list[tuple[str, dict[str, int]]]:
    """A breakdown page's rows as the page shows them: member id ('' for none), numbers."""
    member = f"{breakdown['group_by']}_id"
    return [(row[member] or "", flat(row)) for row in breakdown["rows"]]


async def test_sorting_and_paging_the_table(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    user_ids = [
        await make_user(engine, tenants.organization_id, f"User {n:02d}") for n in range(30)
    ]
    events = [
        event(
            tenants.organization_id,
            f"many-{n}",
            type="voice",
            quantity=100 + (n % 7),
            user_id=user_id,
            occurred_at="2026-03-30T10:00:00Z",
        )
        for n, user_id in enumerate(user_ids)
    ]
    await post_events(client, tenants.admin_key, events)
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    params = {**BERLIN_WEEK, "sort": "-voice.total_seconds"}
    response = await client.get(path, params=params)
    assert 'aria-sort="descending"' in response.text
    assert "Page 1 · 32 users in all" in read_page(response.text).text
    assert "First page" not in response.text
    assert "sort=voice.total_seconds" in response.text  # the heading's link turns it around
    link = next_page(response.text)
    assert link is not None and "page=2" in link
    second = await client.get(link)
    assert "Page 2 · 32 users in all" in read_page(second.text).text
    assert next_page(second.text) is None
    assert "First page" in second.text
    rows = read_page(response.text).rows + read_page(second.text).rows
    assert len(read_page(response.text).rows) == 25 and len(rows) == 33  # and no user's
    ranked = [(-values["voice.total_seconds"], member) for member, values in rows]
    assert ranked == sorted(ranked)  # descending, ties by id
    by_name = read_page((await client.get(path, params={**BERLIN_WEEK, "sort": "name"})).text)
    assert by_name.rows[0][0] == ""  # the usage without a user has no name: first
    assert by_name.rows[1][0] == tenants.user_ids[0]  # Anna


@pytest.mark.parametrize(
    "sort", ["-sms.total", "name", "id", "voice.kb_seconds", "-mms.inbound", "-voice.seconds"]
)
async def test_paging_the_table_by_its_cursor_lists_every_member_once_as_the_api_does(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants, sort: str
) -> None:
    organization_id = await make_organization(engine, "Initech", partner_id=tenants.partner_id)
    # 61 users, three pages of 25; every sort meets ties, and some users used nothing.
    users = [
        await make_user(engine, organization_id, f"Member {n % 17:02d}", f"m{n}@example.com")
        for n in range(61)
    ]
    expected = {user_id: [0] * 6 for user_id in [*users, ""]}
    events = []
    for n, user_id in enumerate([*users, None, None]):
        if n % 10 == 3:
            continue  # no usage at all: a row of zeros
        kinds = (
            ("sms", "outbound", None, 1 + n % 5, 0),
            ("sms", "inbound", None, 1 + n % 3, 1),
            ("mms", "inbound", None, n % 4 + 1, 3),
            ("voice", "outbound", False, 60 * (n % 6), 4),
            ("voice", "inbound", True, 30 * (n % 4), 5),
        )
        for m, (kind, direction, kb, quantity, column) in enumerate(kinds):
            # Inside Berlin's week, and once more the hour before it starts: not counted.
            for at, counted in (("2026-03-30T10:00:00Z", True), ("2026-03-26T22:30:00Z", False)):
                events.append(
                    event(
                        organization_id,
                        f"e{n}-{m}-{counted}",
                        type=kind,
                        direction=direction,
                        knowledge_base=kb,
                        quantity=quantity,
                        user_id=user_id,
                        occurred_at=at,
                    )
                )
                if counted:
                    expected[user_id or ""][column] += quantity
    await post_events(client, tenants.admin_key, events)
    await sign_in(client, tenants.admin_key)

    path = f"/dashboard/organizations/{organization_id}"
    pages = await walk_table(client, path, {**BERLIN_WEEK, "sort": sort})
    assert len(pages) == 3
    # Each page is the API's breakdown page for the same question, cursor for cursor.
    question = {
        "organization_id": organization_id,
        "start_date": BERLIN_WEEK["start"],
        "end_date": BERLIN_WEEK["end"],
        "timezone": BERLIN_WEEK["tz"],
        "sort": sort,
        "limit": "25",
    }
    cursor = None
    for page, link in pages:
        answer = await api_breakdown(
            client, tenants.admin_key, **question, **({"cursor": cursor} if cursor else {})
        )
        assert page.rows == api_rows(answer)
        assert (cursor_of(link) if link else None) == answer["next_cursor"]
        cursor = answer["next_cursor"]
    # Every member once, the usage without a user too, with exactly its sums.
    rows = [row for page, _ in pages for row in page.rows]
    assert [len(page.rows) for page, _ in pages] == [25, 25, 12]
    assert sorted(member for member, _ in rows) == sorted(expected)

    def nine(values: list[int]) -> dict[str, int]:
        sms_out, sms_in, mms_out, mms_in, voice, voice_kb = values
        usage = {
            "sms": {"outbound": sms_out, "inbound": sms_in, "total": sms_out + sms_in},
            "mms": {"outbound": mms_out, "inbound": mms_in, "total": mms_out + mms_in},
            "voice": {"seconds": voice, "kb_seconds": voice_kb, "total_seconds": voice + voice_kb},
        }
        return flat(usage)

    assert dict(rows) == {member: nine(values) for member, values in expected.items()}
    # Sorted as the API sorts: by the column, ties by id ascending.
    field = sort.removeprefix("-")
    names = {user_id: f"Member {n % 17:02d}" for n, user_id in enumerate(users)}
    if field in ("id", "name"):
        keys = [(names.get(m, "") if field == "name" else m, m) for m, _ in rows]
        assert keys == sorted(keys, reverse=sort.startswith("-"))
    else:
        sign = -1 if sort.startswith("-") else 1
        assert [(sign * v[field], m) for m, v in rows] == sorted(
            (sign * v[field], m) for m, v in rows
        )
    # The rows add up to the period's totals, the API's breakdown's and the page's.
    totals = flat(await api_breakdown(client, tenants.admin_key, **question))
    for metric in METRICS:
        assert sum(values[metric] for _, values in rows) == totals[metric]
        assert pages[0][0].totals[metric] == totals[metric]


async def test_a_partners_table_pages_its_organizations_by_the_cursor(
    client: httpx.AsyncClient, engine: AsyncEngine, tenants: Tenants
) -> None:
    organizations = [
        await make_organization(engine, f"Branch {n:02d}", partner_id=tenants.partner_id)
        for n in range(28)
    ]
    events = [
        event(organization_id, f"b{n}", quantity=n % 4 + 1, occurred_at="2026-03-30T10:00:00Z")
        for n, organization_id in enumerate(organizations)
    ]
    await post_events(client, tenants.admin_key, events)
    await sign_in(client, tenants.admin_key)
    pages = await walk_table(
        client, f"/dashboard/partners/{tenants.partner_id}", {**BERLIN_WEEK, "sort": "-sms.total"}
    )
    assert [len(page.rows) for page, _ in pages] == [25, 5]
    assert "Page 1 · 30 organizations in all" in pages[0][0].text
    rows = [row for page, _ in pages for row in page.rows]
    question = {
        "partner_id": tenants.partner_id,
        "start_date": BERLIN_WEEK["start"],
        "end_date": BERLIN_WEEK["end"],
        "timezone": BERLIN_WEEK["tz"],
        "sort": "-sms.total",
        "limit": "1000",
    }
    answer = await api_breakdown(client, tenants.admin_key, **question)
    assert rows == api_rows(answer)
    assert sorted(member for member, _ in rows) == sorted(
        [*organizations, tenants.organization_id, tenants.other_organization_id]
    )
    for metric in METRICS:
        assert sum(values[metric] for _, values in rows) == flat(answer)[metric]


@pytest.mark.parametrize(
    "change",
    [
        {"sort": "name"},  # the cursor was made for another sort
        {"tz": "UTC"},  # another zone: other days
        {"cursor": "not-a-cursor"},
    ],
)
async def test_a_cursor_for_another_question_shows_the_first_page_and_says_so(
    client: httpx.AsyncClient, tenants: Tenants, change: dict[str, str]
) -> None:
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    params = {**BERLIN_WEEK, "sort": "id"}
    api = await api_breakdown(
        client,
        tenants.admin_key,
        organization_id=tenants.organization_id,
        start_date=BERLIN_WEEK["start"],
        end_date=BERLIN_WEEK["end"],
        timezone=BERLIN_WEEK["tz"],
        sort="id",
        limit="1",
    )
    assert api["next_cursor"] is not None
    response = await client.get(
        path, params={**params, "cursor": api["next_cursor"], "page": "2", **change}
    )
    assert response.status_code == 200
    page = read_page(response.text)
    assert "The table&#39;s page link was made for other filters" in response.text
    assert "Page 1 · 2 users in all" in page.text
    first = await client.get(
        path, params={**params, **{k: v for k, v in change.items() if k != "cursor"}}
    )
    assert page.rows == read_page(first.text).rows


async def test_csv_downloads_are_what_the_page_shows(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    page = read_page((await client.get(path, params=BERLIN_WEEK)).text)
    response = await client.get(path, params={**BERLIN_WEEK, "download": "series"})
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        'attachment; filename="organization-series-2026-03-27-2026-04-02.csv"'
    )
    assert response.text.startswith(
        "start,end,sms_outbound,sms_inbound,sms_total,mms_outbound,mms_inbound,mms_total,"
        "voice_seconds,voice_kb_seconds,voice_total_seconds\r\n"
    )
    series = list(csv.DictReader(io.StringIO(response.text)))
    assert [(row["start"], row["end"]) for row in series] == [(s, e) for s, e, _ in page.buckets]
    columns = [name.replace(".", "_").replace("outbound", "outbound") for name in METRICS]
    assert columns[6:] == ["voice_seconds", "voice_kb_seconds", "voice_total_seconds"]
    for row, (_, _, values) in zip(series, page.buckets, strict=True):
        assert [int(row[c]) for c in columns] == [values[m] for m in METRICS]
    response = await client.get(path, params={**BERLIN_WEEK, "download": "table"})
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert list(table[0])[:3] == ["user_id", "user_name", "user_email"]
    assert [row["user_id"] for row in table] == [member for member, _ in page.rows]
    for row, (_, values) in zip(table, page.rows, strict=True):
        assert [int(row[c]) for c in columns] == [values[m] for m in METRICS]
    # Byte for byte the API's CSV of the same breakdown.
    api = await client.get(
        BREAKDOWN,
        params={
            "organization_id": tenants.organization_id,
            "start_date": BERLIN_WEEK["start"],
            "end_date": BERLIN_WEEK["end"],
            "timezone": BERLIN_WEEK["tz"],
            "sort": "-sms.total",
            "format": "csv",
        },
        headers={"X-API-Key": tenants.admin_key},
    )
    assert response.text == api.text


async def test_the_tables_csv_holds_every_page_of_the_table(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    tenants: Tenants,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for n in range(5):
        await make_user(engine, tenants.organization_id, f"Extra {n}")
    # Pages of 2 rows, so that the download walks the breakdown's cursor four times.
    monkeypatch.setattr("usage_api.dashboard.figures.MAX_LIMIT", 2)
    await sign_in(client, tenants.admin_key)
    path = f"/dashboard/organizations/{tenants.organization_id}"
    params = {**BERLIN_WEEK, "sort": "name"}
    response = await client.get(path, params={**params, "download": "table"})
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert len(table) == 8  # Anna, Ben, five more, and the usage without a user
    shown = read_page((await client.get(path, params=params)).text).rows
    assert [(row["user_id"], flat_csv(row)) for row in table] == shown


# Words for every state


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"tz": "Mars/Olympus"},
            "Unknown time zone &#39;Mars/Olympus&#39;: use an IANA name such as Europe/Berlin.",
        ),
        (
            {"tz": "UTC", "granularity": "minute"},
            "Granularity must be one of hour, day, week, month.",
        ),
        (
            {"tz": "UTC", "period": "12m", "granularity": "hour"},
            "Too many buckets: at most 1000 (use a coarser granularity or a shorter range).",
        ),
        (
            {"tz": "UTC", "period": "custom", "start": "2026-02-30", "end": "2026-03-01"},
            "The start date must be a date",
        ),
        (
            {"tz": "UTC", "period": "custom", "start": "2026-03-02", "end": "2026-03-01"},
            "The start date must not be after the end date.",
        ),
        ({"tz": "UTC", "period": "forever"}, "Unknown period"),
        ({"tz": "UTC", "sort": "-colour"}, "Unknown sort"),
    ],
)
async def test_bad_filters_are_told_in_words(
    client: httpx.AsyncClient, tenants: Tenants, params: dict[str, str], message: str
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.organization_id}", params=params
    )
    assert response.status_code == 400
    assert message in response.text
    assert 'role="alert"' in response.text


async def test_an_empty_period_says_so(client: httpx.AsyncClient, tenants: Tenants) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.other_organization_id}",
        params={**BERLIN_WEEK, "start": "2025-01-01", "end": "2025-01-31"},
    )
    assert "No usage in this period." in response.text
    assert "This organization has no users and no usage in this period." in response.text


async def test_without_a_time_zone_the_page_asks_the_browser(
    client: httpx.AsyncClient, tenants: Tenants
) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(f"/dashboard/organizations/{tenants.organization_id}?period=12m")
    assert response.status_code == 200
    assert "data-needs-tz" in response.text
    assert "Loading usage in your time zone" in response.text
    assert re.search(r'href="[^"]*period=12m&amp;tz=UTC"', response.text)


async def test_pages_are_compressed_and_small(client: httpx.AsyncClient, tenants: Tenants) -> None:
    await sign_in(client, tenants.admin_key)
    response = await client.get(
        f"/dashboard/organizations/{tenants.organization_id}",
        params={
            "period": "custom",
            "start": "2026-01-01",
            "end": "2026-12-31",
            "granularity": "day",
            "tz": "UTC",
        },
        headers={"Accept-Encoding": "gzip"},
    )
    assert response.headers["content-encoding"] == "gzip"
    assert len(read_page(response.text).buckets) == 365
    assert int(response.headers["content-length"]) < 100_000


async def test_the_key_never_reaches_the_log(
    client: httpx.AsyncClient, tenants: Tenants, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    await sign_in(client, tenants.admin_key)
    await client.get(f"/dashboard/organizations/{tenants.organization_id}", params=BERLIN_WEEK)
    await sign_in(client, tenants.admin_key + "x")  # a wrong one neither
    access = [record for record in caplog.records if record.name == "usage_api.access"]
    assert len(access) == 3
    assert access[1].__dict__["key_id"] is not None  # the page names its key by id
    for record in caplog.records:
        assert tenants.admin_key not in repr(record.__dict__)


async def test_ids_with_url_characters_reach_their_views(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    organization_id = "acme/eu?x=1#top%20"
    await transact(engine, put_organization, ADMIN, organization_id, OrganizationIn(name="Acme EU"))
    user_id = await make_user(engine, organization_id, "Zoë")
    key = await make_key(engine, "organization", organization_id=organization_id)
    await sign_in(client, key)
    response = await client.get("/dashboard?tz=UTC")
    assert response.headers["location"] == (
        "/dashboard/organizations/acme%2Feu%3Fx%3D1%23top%2520?tz=UTC"
    )
    response = await client.get(response.headers["location"])
    assert response.status_code == 200
    assert "Acme EU" in response.text
    assert f'href="/dashboard/users/{user_id}?' in response.text
    assert 'action="/dashboard/organizations/acme%2Feu%3Fx%3D1%23top%2520"' in response.text
    assert 'href="/dashboard/organizations/acme%2Feu%3Fx%3D1%23top%2520?period=7d' in response.text


async def test_a_database_away_is_told_in_words(unavailable_client: httpx.AsyncClient) -> None:
    client = unavailable_client
    response = await sign_in(client, "usk_whatever")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "2"
    assert "cannot reach its database just now" in response.text
    response = await client.get(
        "/dashboard/organizations/o1?tz=UTC", headers={"Cookie": "usage_session=token"}
    )
    assert response.status_code == 503
    assert "Temporarily unavailable" in response.text
