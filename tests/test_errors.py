"""Every row of the contract's error table (2.4), and the order in which checks run.

Each test asserts the exact status and the exact body `{"success": false, "error": ...}`,
and the headers the contract promises.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import DATE_MESSAGE, error
from tests.support.factories import event, make_key, make_organization, make_user
from usage_api.dates import utc_now

USAGE = "/v1/analytics/usage"


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert (response.status_code, response.json()) == (status, error(message))
    assert response.headers["content-type"] == "application/json"


@pytest.fixture
async def key(engine: AsyncEngine) -> str:
    return await make_key(engine)


@pytest.fixture
async def organization_id(engine: AsyncEngine) -> str:
    return await make_organization(engine, "Acme Corp")


async def usage(client: httpx.AsyncClient, key: str | None, **params: str) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return await client.get(USAGE, params=params, headers=headers)


async def answers(
    client: httpx.AsyncClient, key: str, queries: dict[str, str]
) -> dict[str, tuple[int, Any]]:
    """`(status, body)` of the usage read with each raw query string, by name."""
    results = {}
    for name, query in queries.items():
        response = await client.get(f"{USAGE}?{query}", headers={"X-API-Key": key})
        results[name] = (response.status_code, response.json())
    return results


# 400: missing ids


async def test_usage_without_ids_is_400(client: httpx.AsyncClient, key: str) -> None:
    queries = ["", "organization_id=", "organization_id=&user_id=", "org_id=x&start_date=y"]
    assert await answers(client, key, dict(zip(queries, queries, strict=True))) == {
        query: (400, error("organization_id or user_id is required")) for query in queries
    }


# 400: malformed ids

MALFORMED_IDS = {
    "space-inside": "a b",
    "space-only": " ",
    "leading-space": " 1767623610019x414651971228139500",
    "129-chars": "x" * 129,
    "tab": "a\tb",
    "newline": "a\nb",
    "del": "a\x7fb",
    "non-ascii": "caf\u00e9",
    "emoji": "\U0001f600",
}


@pytest.mark.parametrize("field", ["organization_id", "user_id"])
async def test_malformed_id_is_400(client: httpx.AsyncClient, key: str, field: str) -> None:
    queries = {name: urlencode({field: value}) for name, value in MALFORMED_IDS.items()}
    # Percent-encoded NUL, invalid UTF-8 and non-ASCII.
    queries |= {raw: f"{field}={raw}" for raw in ["%00", "a%00b", "%FF", "%C3%A9"]}
    assert await answers(client, key, queries) == {
        name: (400, error(f"invalid {field}")) for name in queries
    }


async def test_id_of_128_visible_characters_is_well_formed(
    client: httpx.AsyncClient, key: str
) -> None:
    longest = "!~" * 64
    assert_error(await usage(client, key, organization_id=longest), 404, "organization not found")


# 400: malformed dates, empty range

MALFORMED_DATES = [
    "yesterday",
    "2026-02-30",
    "2026-13-01",
    "2026-2-1",
    "20260210",
    "2026-02-10 00:00:00",
    "2026-02-10T24:00:00Z",
    "2026-02-10T00:00:00+25:00",
    "2026-02-10T00",
    "2026-02-10T00:00:00ZZ",
    "1770681600",
]


@pytest.mark.parametrize("field", ["start_date", "end_date"])
async def test_malformed_date_is_400(
    client: httpx.AsyncClient, key: str, organization_id: str, field: str
) -> None:
    queries = {
        value: urlencode({"organization_id": organization_id, field: value})
        for value in MALFORMED_DATES
    }
    assert await answers(client, key, queries) == {
        value: (400, error(DATE_MESSAGE.format(field))) for value in MALFORMED_DATES
    }


async def test_start_date_is_checked_before_end_date(
    client: httpx.AsyncClient, key: str, organization_id: str
) -> None:
    response = await usage(
        client, key, organization_id=organization_id, start_date="x", end_date="y"
    )
    assert_error(response, 400, DATE_MESSAGE.format("start_date"))


EMPTY_RANGES = [
    ("2026-03-12", "2026-03-11"),
    ("2026-03-12T00:00:01Z", "2026-03-12T00:00:00.5Z"),
    ("2026-03-12T10:00:00.5Z", "2026-03-12T10:00:00.4Z"),
    ("2026-03-12T10:00:00+01:00", "2026-03-12T08:59:59Z"),
]


async def test_empty_range_is_400(
    client: httpx.AsyncClient, key: str, organization_id: str
) -> None:
    queries = {
        f"{start}..{end}": urlencode(
            {"organization_id": organization_id, "start_date": start, "end_date": end}
        )
        for start, end in EMPTY_RANGES
    }
    assert await answers(client, key, queries) == {
        name: (400, error("start_date must not be after end_date")) for name in queries
    }


async def test_range_of_one_day_or_one_second_is_not_empty(
    client: httpx.AsyncClient, key: str, organization_id: str
) -> None:
    echoes = {}
    for start, end in [("2026-03-12", "2026-03-12"), ("2026-03-12T10:00:00Z",) * 2]:
        response = await usage(
            client, key, organization_id=organization_id, start_date=start, end_date=end
        )
        got = response.json()["usage"]
        echoes[start, end] = (response.status_code, got["start_date"], got["end_date"])
    assert echoes == {
        ("2026-03-12", "2026-03-12"): (200, "2026-03-12T00:00:00Z", "2026-03-12T23:59:59Z"),
        ("2026-03-12T10:00:00Z",) * 2: (200, "2026-03-12T10:00:00Z", "2026-03-12T10:00:00Z"),
    }


# 401: no key, unknown, revoked or expired key


async def test_missing_key_is_401(client: httpx.AsyncClient, organization_id: str) -> None:
    response = await usage(client, None, organization_id=organization_id)
    assert_error(response, 401, "X-API-Key header is required")


async def test_empty_key_header_is_like_a_missing_one(
    client: httpx.AsyncClient, organization_id: str
) -> None:
    response = await usage(client, "", organization_id=organization_id)
    assert_error(response, 401, "X-API-Key header is required")


async def test_unknown_revoked_and_expired_keys_are_401(
    client: httpx.AsyncClient, engine: AsyncEngine, organization_id: str
) -> None:
    expired = await make_key(engine, expires_at=utc_now() - timedelta(seconds=1))
    revoked = await make_key(engine)
    await _revoke(engine, revoked)
    for key in ["usk_unknown", "not even a key", expired, revoked]:
        response = await usage(client, key, organization_id=organization_id)
        assert_error(response, 401, "invalid API key")


async def _revoke(engine: AsyncEngine, key: str) -> None:
    from sqlalchemy import text

    from usage_api.auth import hash_key

    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :hash"),
            {"hash": hash_key(key)},
        )


# 403: read key on a write route

WRITE_ROUTES = [
    ("POST", "/v1/usage/events"),
    ("PUT", "/v1/partners/p1"),
    ("PUT", "/v1/organizations/o1"),
    ("PUT", "/v1/users/u1"),
]


@pytest.mark.parametrize(("method", "path"), WRITE_ROUTES)
async def test_read_key_on_write_route_is_403(
    client: httpx.AsyncClient, key: str, method: str, path: str
) -> None:
    # The permission is checked before the body is looked at: this one is not even JSON.
    response = await client.request(
        method, path, content=b"{", headers={"X-API-Key": key, "Content-Type": "application/json"}
    )
    assert_error(response, 403, "API key does not have write permission")


# 404: unknown ids, unknown routes


async def test_unknown_organization_is_404(client: httpx.AsyncClient, key: str) -> None:
    assert_error(await usage(client, key, organization_id="nope"), 404, "organization not found")


async def test_unknown_user_is_404(
    client: httpx.AsyncClient, key: str, organization_id: str
) -> None:
    assert_error(await usage(client, key, user_id="nope"), 404, "user not found")
    response = await usage(client, key, user_id="nope", organization_id=organization_id)
    assert_error(response, 404, "user not found")


async def test_user_of_another_organization_is_404(
    client: httpx.AsyncClient, engine: AsyncEngine, key: str, organization_id: str
) -> None:
    other = await make_organization(engine, "Other")
    user_id = await make_user(engine, other)
    response = await usage(client, key, user_id=user_id, organization_id=organization_id)
    assert_error(response, 404, "user not found")
    response = await usage(client, key, user_id=user_id, organization_id="nope")
    assert_error(response, 404, "user not found")


UNKNOWN_ROUTES = [
    ("GET", "/"),
    ("GET", "/nope"),
    ("GET", "/v1"),
    ("GET", "/v1/analytics"),
    ("GET", "/v1/analytics/usage/extra"),
    ("POST", "/v2/usage/events"),
    ("PUT", "/v1/teams/t1"),
    ("DELETE", "/v1/nope"),
]


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    results = {}
    for method, path in UNKNOWN_ROUTES:
        response = await client.request(method, path)
        results[method, path] = (response.status_code, response.json())
    assert results == {route: (404, error("not found")) for route in UNKNOWN_ROUTES}


# 405: wrong method


WRONG_METHODS = [
    # HEAD is answered like GET, without the body, on every GET route.
    ("DELETE", USAGE, "GET, HEAD"),
    ("POST", USAGE, "GET, HEAD"),
    ("PUT", USAGE, "GET, HEAD"),
    ("GET", "/v1/usage/events", "POST"),
    ("PATCH", "/v1/usage/events", "POST"),
    ("PATCH", "/v1/partners/p1", "GET, HEAD, PUT"),
    ("POST", "/v1/organizations/o1", "GET, HEAD, PUT"),
    ("DELETE", "/v1/users/u1", "GET, HEAD, PUT"),
    ("POST", "/v1/organizations", "GET, HEAD"),
    ("POST", "/healthz", "GET, HEAD"),
]


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    results = {}
    for method, path, _ in WRONG_METHODS:
        response = await client.request(method, path)
        allowed = set(response.headers["allow"].split(", "))
        results[method, path] = (response.status_code, response.json(), allowed)
    assert results == {
        (method, path): (405, error("method not allowed"), set(allow.split(", ")))
        for method, path, allow in WRONG_METHODS
    }


# 413: body over 1 MiB


async def test_body_over_one_mib_is_413(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    key = await make_key(engine, write=True)
    body = b"{" + b" " * (1024 * 1024) + b"}"
    response = await client.post(
        "/v1/usage/events",
        content=body,
        headers={"X-API-Key": key, "Content-Type": "application/json"},
    )
    assert_error(response, 413, "request body too large")


async def test_streamed_body_over_one_mib_is_413(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Without a Content-Length the limit is enforced while the body is read."""
    key = await make_key(engine, write=True)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b" " * 65536

    response = await client.post(
        "/v1/usage/events",
        content=chunks(),
        headers={"X-API-Key": key, "Content-Type": "application/json"},
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "request body too large")


async def test_body_of_exactly_one_mib_is_read(
    client: httpx.AsyncClient, engine: AsyncEngine, organization_id: str
) -> None:
    key = await make_key(engine, write=True)
    body = httpx.Request("POST", "/", json={"events": [event(organization_id)]}).content
    body += b" " * (1024 * 1024 - len(body))
    response = await client.post(
        "/v1/usage/events",
        content=body,
        headers={"X-API-Key": key, "Content-Type": "application/json"},
    )
    assert response.json() == {"success": True, "accepted": 1, "duplicates": 0, "conflicts": []}


# 503: database unavailable


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"{USAGE}?organization_id=o1", None),
        ("POST", "/v1/usage/events", {"events": [event("o1")]}),
        ("PUT", "/v1/organizations/o1", {"name": "Acme Corp"}),
        ("GET", "/readyz", None),
    ],
)
async def test_unreachable_database_is_503_with_retry_after(
    unavailable_client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await unavailable_client.request(
        method, path, json=body, headers={"X-API-Key": "usk_anything"}
    )
    assert_error(response, 503, "service temporarily unavailable")
    assert int(response.headers["retry-after"]) > 0


async def test_healthz_answers_without_the_database(
    unavailable_client: httpx.AsyncClient,
) -> None:
    response = await unavailable_client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_answers_when_the_database_does(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


# 500: anything unexpected


@pytest.fixture
def error_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger="usage_api"):
        yield caplog


async def test_unexpected_error_is_500_without_details(
    failing_client: httpx.AsyncClient, engine: AsyncEngine, error_log: pytest.LogCaptureFixture
) -> None:
    response = await failing_client.get("/v1/boom", headers={"X-API-Key": await make_key(engine)})
    assert_error(response, 500, "internal error")
    assert response.content == b'{"success":false,"error":"internal error"}'
    # The details are in the server log only.
    assert "Traceback" in error_log.text
    assert "secret detail" in error_log.text


async def test_unexpected_error_in_a_usage_read_is_500(
    failing_client: httpx.AsyncClient,
    engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
    error_log: pytest.LogCaptureFixture,
) -> None:
    async def broken(*_: Any) -> None:
        raise ValueError("secret detail")

    key = await make_key(engine)
    monkeypatch.setattr("usage_api.analytics.routes.read_usage", broken)
    response = await failing_client.get(
        USAGE, params={"organization_id": "o1"}, headers={"X-API-Key": key}
    )
    assert_error(response, 500, "internal error")
    assert "secret detail" in error_log.text


# The order of checks: key, then ids, then dates, then lookup.


async def test_key_is_checked_before_ids(client: httpx.AsyncClient) -> None:
    response = await usage(client, None, organization_id="a b")
    assert_error(response, 401, "X-API-Key header is required")
    response = await usage(client, "usk_unknown", user_id="a b", start_date="x")
    assert_error(response, 401, "invalid API key")


async def test_key_is_checked_before_missing_ids(client: httpx.AsyncClient) -> None:
    assert_error(await usage(client, "usk_unknown"), 401, "invalid API key")


async def test_ids_are_checked_before_dates(client: httpx.AsyncClient, key: str) -> None:
    response = await usage(client, key, organization_id="a b", start_date="x")
    assert_error(response, 400, "invalid organization_id")
    response = await usage(client, key, start_date="x")
    assert_error(response, 400, "organization_id or user_id is required")


async def test_organization_id_is_checked_before_user_id(
    client: httpx.AsyncClient, key: str
) -> None:
    response = await usage(client, key, organization_id="a b", user_id="c d")
    assert_error(response, 400, "invalid organization_id")


async def test_dates_are_checked_before_lookup(client: httpx.AsyncClient, key: str) -> None:
    response = await usage(client, key, organization_id="nope", end_date="x")
    assert_error(response, 400, DATE_MESSAGE.format("end_date"))
    response = await usage(
        client, key, user_id="nope", start_date="2026-03-12", end_date="2026-03-11"
    )
    assert_error(response, 400, "start_date must not be after end_date")


async def test_write_permission_is_checked_before_the_body(
    client: httpx.AsyncClient, key: str
) -> None:
    response = await client.post(
        "/v1/usage/events", json={"events": []}, headers={"X-API-Key": key}
    )
    assert_error(response, 403, "API key does not have write permission")


# What a client gets for requests that are not what they seem (a trailing slash, two keys,
# a body that does not say it is JSON, an object with a key twice)


async def test_a_trailing_slash_or_a_missing_one_is_404_never_a_redirect(
    client: httpx.AsyncClient, key: str
) -> None:
    headers = {"X-API-Key": key, "Host": "evil.example"}
    for path in (
        f"{USAGE}/",
        f"{USAGE}/breakdown/",
        "/v1/partners",
        "/v1/usage/events/",
    ):
        response = await client.get(path, headers=headers)
        assert (response.status_code, response.json()) == (404, error("not found")), path
        assert "location" not in response.headers, path


async def test_two_api_keys_are_refused_whichever_comes_first(
    client: httpx.AsyncClient, key: str, organization_id: str
) -> None:
    two = [("X-API-Key", key), ("X-API-Key", "usk_other")]
    for headers in (two, two[::-1]):
        for method, path, body in (
            ("GET", f"{USAGE}?organization_id={organization_id}", None),
            ("PUT", "/v1/partners/p1", {"name": "P"}),
        ):
            response = await client.request(method, path, json=body, headers=headers)
            assert (response.status_code, response.json()) == (
                400,
                error("X-API-Key header must be sent once"),
            ), (method, headers)


NOT_DECLARED_JSON = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]


@pytest.mark.parametrize("content_type", NOT_DECLARED_JSON)
async def test_a_body_not_declared_as_json_is_415_and_writes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine, content_type: str | None
) -> None:
    """A cross-site form (or any "simple request") cannot write: it cannot say JSON."""
    write = await make_key(engine, write=True)
    organization_id = await make_organization(engine)
    headers = {"X-API-Key": write} | ({"Content-Type": content_type} if content_type else {})
    bodies = {
        "/v1/usage/events": {"events": [event(organization_id)]},
        "/v1/partners/p1": {"name": "P"},
        "/v1/organizations/o1": {"name": "O"},
    }
    for path, body in bodies.items():
        method = "POST" if path == "/v1/usage/events" else "PUT"
        content = json.dumps(body).encode()
        response = await client.request(method, path, content=content, headers=headers)
        assert (response.status_code, response.json()) == (
            415,
            error("Content-Type must be application/json"),
        ), path
    answer = await usage(client, write, organization_id=organization_id)
    assert answer.json()["usage"]["sms"] == {"outbound": 0, "inbound": 0, "total": 0}


async def test_json_with_a_charset_is_json(client: httpx.AsyncClient, engine: AsyncEngine) -> None:
    write = await make_key(engine, write=True)
    response = await client.put(
        "/v1/partners/p1",
        content=b'{"name": "P"}',
        headers={"X-API-Key": write, "Content-Type": "Application/JSON; charset=utf-8"},
    )
    assert (response.status_code, response.json()) == (
        201,
        {"success": True, "partner": {"id": "p1", "name": "P"}},
    )


async def test_an_object_that_repeats_a_key_is_400_and_writes_nothing(
    client: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    write = await make_key(engine, write=True)
    mine, other = await make_organization(engine), await make_organization(engine)
    one = json.dumps(event(other, "e1"))
    # The last `organization_id` would win in most parsers: the event would go to `mine`.
    repeated = one[:-1] + f', "organization_id": "{mine}"}}'
    response = await client.post(
        "/v1/usage/events",
        content=f'{{"events": [{repeated}]}}'.encode(),
        headers={"X-API-Key": write, "Content-Type": "application/json"},
    )
    assert (response.status_code, response.json()) == (
        400,
        error('request body must not repeat a key: "organization_id"'),
    )
    for organization_id in (mine, other):
        answer = await usage(client, write, organization_id=organization_id)
        assert answer.json()["usage"]["sms"]["total"] == 0
