"""What operators see: the access log, request ids, metrics, security headers, docs switch.

Log lines are asserted as the JSON objects the service writes (its own formatter), metrics
as a scraper parses them. Each app has its own metrics registry, so counts are exact.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.apps import asgi_client
from tests.support.factories import event, make_key, make_organization
from tests.support.servers import serving
from usage_api.app import create_app
from usage_api.auth import KeyScope
from usage_api.config import Settings
from usage_api.db import transact
from usage_api.keys import create_key
from usage_api.logs import JsonFormatter

USAGE = "/v1/analytics/usage"
EVENTS = "/v1/usage/events"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class JsonLines(logging.Handler):
    """Every record, as the JSON object the service's formatter writes for it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []
        self.text: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.text.append(line)
        self.lines.append(json.loads(line))

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["logger"] == "usage_api.access"]


@pytest.fixture
def logs() -> Iterator[JsonLines]:
    handler = JsonLines()
    logger = logging.getLogger("usage_api")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def key_and_id(engine: AsyncEngine, scope: KeyScope = "admin", write: bool = False) -> Any:
    """`(key, key_id)` of a new key."""

    async def work(conn: Any) -> tuple[str, str]:
        return await create_key(conn, scope=scope, can_write=write)

    key_id, key = await transact(engine, work)
    return key, key_id


def access_line(
    method: str, route: str | None, status: int, key_id: str | None, request_id: str
) -> dict[str, Any]:
    message_route = route or "unmatched"
    return {
        "time": ANY,
        "level": "INFO",
        "logger": "usage_api.access",
        "message": f"{method} {message_route} {status}",
        "pid": os.getpid(),
        "method": method,
        "route": route,
        "status": status,
        "duration_ms": ANY,
        "key_id": key_id,
        "request_id": request_id,
        "client_ip": "127.0.0.1",
    }


# The access log: one JSON line per request


async def test_a_read_logs_one_line_with_route_template_and_key_id(
    client: httpx.AsyncClient, engine: AsyncEngine, logs: JsonLines
) -> None:
    organization_id = await make_organization(engine)
    key, key_id = await key_and_id(engine)
    response = await client.get(
        USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
    )
    assert response.status_code == 200
    [line] = logs.access()
    assert line == access_line("GET", USAGE, 200, key_id, response.headers["x-request-id"])
    assert TIME.fullmatch(line["time"])
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    # Neither the raw path nor the query string: only the route template.
    assert organization_id not in logs.text[0]


async def test_path_parameters_are_logged_as_their_template(
    client: httpx.AsyncClient, engine: AsyncEngine, logs: JsonLines
) -> None:
    key, key_id = await key_and_id(engine, write=True)
    response = await client.put(
        "/v1/partners/partner-7f3a", json={"name": "P"}, headers={"X-API-Key": key}
    )
    assert response.status_code == 201
    request_id = response.headers["x-request-id"]
    assert logs.access() == [
        access_line("PUT", "/v1/partners/{partner_id}", 201, key_id, request_id)
    ]
    assert "partner-7f3a" not in logs.text[0]


async def test_a_rejected_key_is_logged_without_key_id(
    client: httpx.AsyncClient, logs: JsonLines
) -> None:
    response = await client.get(
        USAGE, params={"organization_id": "o1"}, headers={"X-API-Key": "usk_nope"}
    )
    assert response.status_code == 401
    assert logs.access() == [access_line("GET", USAGE, 401, None, response.headers["x-request-id"])]


async def test_an_unknown_route_is_logged_as_unmatched(
    client: httpx.AsyncClient, logs: JsonLines
) -> None:
    response = await client.get("/v1/nope/secret-looking-path")
    assert response.status_code == 404
    assert logs.access() == [access_line("GET", None, 404, None, response.headers["x-request-id"])]
    assert "secret-looking-path" not in logs.text[0]


async def test_a_500_is_logged_with_its_key_id_and_request_id_on_the_traceback(
    failing_client: httpx.AsyncClient, engine: AsyncEngine, logs: JsonLines
) -> None:
    key, key_id = await key_and_id(engine)
    response = await failing_client.get("/v1/boom", headers={"X-API-Key": key})
    assert (response.status_code, response.json()) == (
        500,
        {"success": False, "error": "internal error"},
    )
    request_id = response.headers["x-request-id"]
    assert logs.access() == [access_line("GET", "/v1/boom", 500, key_id, request_id)]
    [error] = [line for line in logs.lines if line["level"] == "ERROR"]
    assert error["request_id"] == request_id
    assert "RuntimeError: secret detail" in error["exception"]


async def test_no_log_record_ever_holds_a_key_or_a_query_string(
    failing_client: httpx.AsyncClient, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    organization_id = await make_organization(engine)
    key = await make_key(engine)
    formatter = JsonFormatter()
    with caplog.at_level(logging.DEBUG):
        for path in [USAGE, "/v1/boom", EVENTS, "/v1/nope"]:
            for sent in [key, key + "x"]:
                await failing_client.get(
                    path,
                    params={"organization_id": organization_id, "token": "s3cret-query"},
                    headers={"X-API-Key": sent},
                )
        await failing_client.post(EVENTS, json={"events": []}, headers={"X-API-Key": key})
    # httpx logs the URLs it requests: that is the client's log, not the service's.
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert any(r.name == "usage_api.access" for r in server_records)
    for record in server_records:
        written = formatter.format(record) + repr(vars(record))
        assert key not in written, record.name
        assert "s3cret-query" not in written, record.name


# X-Request-ID


async def every_kind_of_answer(
    client: httpx.AsyncClient,
    failing_client: httpx.AsyncClient,
    unavailable_client: httpx.AsyncClient,
    key: str,
    headers: dict[str, Any],
) -> list[httpx.Response]:
    """A 200, 401, 404, 405, 413, 500 and 503, each sent with `headers`."""
    return [
        await client.get("/healthz", headers=headers),
        await client.get(USAGE, params={"organization_id": "o1"}, headers=headers),
        await client.get("/nope", headers=headers),
        await client.delete(USAGE, headers=headers),
        await client.post(EVENTS, content=b"x" * (1024 * 1024 + 1), headers=headers),
        await failing_client.get("/v1/boom", headers={**headers, "X-API-Key": key}),
        await unavailable_client.get("/readyz", headers=headers),
    ]


ALL_STATUSES = [200, 401, 404, 405, 413, 500, 503]


async def test_a_valid_request_id_is_echoed_on_every_answer(
    client: httpx.AsyncClient,
    failing_client: httpx.AsyncClient,
    unavailable_client: httpx.AsyncClient,
    engine: AsyncEngine,
    logs: JsonLines,
) -> None:
    request_id = "!req-42~" + "x" * 120  # 128 visible ASCII characters
    responses = await every_kind_of_answer(
        client,
        failing_client,
        unavailable_client,
        await make_key(engine),
        {"X-Request-ID": request_id},
    )
    assert [r.status_code for r in responses] == ALL_STATUSES
    assert [r.headers["x-request-id"] for r in responses] == [request_id] * len(ALL_STATUSES)
    access = logs.access()
    assert [line["status"] for line in access] == ALL_STATUSES
    assert {line["request_id"] for line in access} == {request_id}


@pytest.mark.parametrize(
    "invalid",
    [b"", b"a b", b"x" * 129, b"caf\xc3\xa9", b"a\tb", b"a\x7fb"],
    ids=["empty", "space", "129-chars", "non-ascii", "tab", "del"],
)
async def test_an_invalid_request_id_is_replaced(
    client: httpx.AsyncClient, invalid: bytes, logs: JsonLines
) -> None:
    response = await client.get("/healthz", headers={"X-Request-ID": invalid})
    request_id = response.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id)
    assert [line["request_id"] for line in logs.access()] == [request_id]


async def test_without_a_request_id_each_answer_gets_a_new_one(
    client: httpx.AsyncClient,
    failing_client: httpx.AsyncClient,
    unavailable_client: httpx.AsyncClient,
    engine: AsyncEngine,
) -> None:
    responses = await every_kind_of_answer(
        client, failing_client, unavailable_client, await make_key(engine), {}
    )
    assert [r.status_code for r in responses] == ALL_STATUSES
    request_ids = [r.headers["x-request-id"] for r in responses]
    assert all(GENERATED_ID.fullmatch(request_id) for request_id in request_ids)
    assert len(set(request_ids)) == len(ALL_STATUSES)


# Security headers

COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}
CSP = {"content-security-policy": "default-src 'none'; frame-ancestors 'none'"}
NO_STORE = {"cache-control": "no-store"}


def security_headers(response: httpx.Response) -> dict[str, str]:
    names = [*COMMON_HEADERS, *CSP, *NO_STORE]
    return {name: response.headers[name] for name in names if name in response.headers}


async def test_security_headers_on_api_answers_and_errors(
    client: httpx.AsyncClient,
    failing_client: httpx.AsyncClient,
    unavailable_client: httpx.AsyncClient,
    engine: AsyncEngine,
) -> None:
    organization_id = await make_organization(engine)
    key = await make_key(engine)
    responses = [
        await client.get(
            USAGE, params={"organization_id": organization_id}, headers={"X-API-Key": key}
        ),
        await client.get(USAGE),
        await client.post(EVENTS, content=b"x" * (1024 * 1024 + 1)),
        await failing_client.get("/v1/boom", headers={"X-API-Key": key}),
        await unavailable_client.get(USAGE, headers={"X-API-Key": "usk_any"}),
    ]
    assert [r.status_code for r in responses] == [200, 401, 413, 500, 503]
    for response in responses:
        assert security_headers(response) == COMMON_HEADERS | CSP | NO_STORE


async def test_security_headers_outside_the_api_and_the_docs_load_only_from_here(
    client: httpx.AsyncClient,
) -> None:
    for path in ["/healthz", "/openapi.json", "/metrics", "/nope"]:
        response = await client.get(path)
        assert security_headers(response) == COMMON_HEADERS | CSP, path
    # Swagger UI comes from the process itself (it works offline), and may load nothing else.
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert security_headers(docs) == COMMON_HEADERS | {
        "content-security-policy": "default-src 'self'; script-src 'self' 'unsafe-inline';"
        " style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
    }
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert sorted(assets) == [
        "/docs/assets/favicon.png",
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
    ]
    for asset in assets:
        loaded = await client.get(asset)
        assert (loaded.status_code, len(loaded.content) > 1000) == (200, True), asset
    assert "openapi.json" in docs.text


# /docs and /openapi.json


async def test_docs_and_openapi_are_404_when_disabled(
    database_url: str, settings: Settings
) -> None:
    app = create_app(replace(settings, docs_enabled=False), database_url)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        for path in ["/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"]:
            response = await client.get(path)
            assert (response.status_code, response.json()) == (
                404,
                {"success": False, "error": "not found"},
            ), path


async def test_openapi_does_not_list_metrics(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/metrics" not in paths
    assert USAGE in paths


# Metrics


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


async def test_metrics_count_requests_events_and_read_the_pool(
    client: httpx.AsyncClient, engine: AsyncEngine, settings: Settings
) -> None:
    organization_id = await make_organization(engine)
    key = await make_key(engine, write=True)
    headers = {"X-API-Key": key}
    for _ in range(2):
        await client.get(USAGE, params={"organization_id": organization_id}, headers=headers)
    await client.get(USAGE, params={"organization_id": organization_id})
    # HEAD is answered as GET, and counted under its own method and the route it reached.
    head = await client.head(USAGE, params={"organization_id": organization_id}, headers=headers)
    assert head.status_code == 200
    await client.get("/nope")
    await client.request("BREW", "/healthz")
    first, second = event(organization_id, "e1"), event(organization_id, "e2")
    batches = [[first, second], [first, {**second, "segments": 7}, event(organization_id, "e3")]]
    for batch in batches:
        response = await client.post(EVENTS, json={"events": batch}, headers=headers)
        assert response.status_code == 200

    response = await client.get("/metrics")  # no key needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    metrics = samples(response.text)

    def requests(method: str, route: str, status: str) -> float:
        return metrics[
            ("usage_api_http_requests_total", labels(method=method, route=route, status=status))
        ]

    assert requests("GET", USAGE, "200") == 2
    assert requests("HEAD", USAGE, "200") == 1
    assert requests("GET", USAGE, "401") == 1
    assert requests("GET", "unmatched", "404") == 1
    assert requests("other", "/healthz", "405") == 1
    assert requests("POST", EVENTS, "200") == 2
    read = labels(method="GET", route=USAGE, status="200")
    assert metrics[("usage_api_http_request_duration_seconds_count", read)] == 2
    assert metrics[("usage_api_http_request_duration_seconds_bucket", read | {("le", "+Inf")})] == 2
    assert metrics[("usage_api_http_request_duration_seconds_sum", read)] > 0
    assert {
        outcome: metrics[("usage_api_events_total", labels(outcome=outcome))]
        for outcome in ["accepted", "duplicate", "conflicting"]
    } == {"accepted": 3, "duplicate": 1, "conflicting": 1}
    assert {
        name: metrics[(f"usage_api_db_pool_{name}", labels())]
        for name in ["size", "checked_out", "overflow"]
    } == {"size": settings.pool_size, "checked_out": 0, "overflow": 0}


async def test_metrics_can_be_turned_off(database_url: str, settings: Settings) -> None:
    app = create_app(replace(settings, metrics_enabled=False), database_url)
    async with app.router.lifespan_context(app), asgi_client(app) as client:
        response = await client.get("/metrics")
        assert (response.status_code, response.json()) == (
            404,
            {"success": False, "error": "not found"},
        )
        assert response.headers["x-request-id"]


# `usage-api serve`: JSON logs on stderr, and metrics shared by several workers


def metrics_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("usage-api-metrics-*"))


@pytest.mark.slow
async def test_serve_with_workers_logs_json_and_sums_metrics_over_workers(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "TMPDIR": str(tmp_path),
        "USAGE_API_POOL_SIZE": "3",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "stderr.log"
    async with serving(env, log_path) as (process, http):
        # uvicorn replaces a worker that is slow to start: allow for one or two.
        deadline = time.monotonic() + 60
        while True:
            assert process.returncode is None, log_path.read_text()
            try:
                scrape = samples((await http.get("/metrics", timeout=1)).text)
                # Each worker publishes its pool once started: both are up.
                if scrape.get(("usage_api_db_pool_size", labels())) == 2 * 3:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        for _ in range(20):
            assert (await http.get("/healthz")).status_code == 200
        healthz = (
            "usage_api_http_requests_total",
            labels(method="GET", route="/healthz", status="200"),
        )
        for _ in range(6):
            scrape = samples((await http.get("/metrics")).text)
            assert scrape[healthz] == 20
        [metrics_dir] = metrics_dirs(tmp_path)
        # Files per worker process (and per replaced one), in the directory serve made.
        assert len({file.stem.rsplit("_", 1)[1] for file in metrics_dir.glob("*.db")}) >= 2
    assert metrics_dirs(tmp_path) == []
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    access = [line for line in lines if line["logger"] == "usage_api.access"]
    assert [line["route"] for line in access].count("/healthz") == 20
    assert not [line for line in lines if line["logger"] == "uvicorn.access"]
    assert any(line["logger"] == "uvicorn.error" for line in lines)
