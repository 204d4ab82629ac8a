"""The HTTP server's limits, against a live `usage-api serve` on 127.0.0.1 (raw sockets):
what a client that sends too much, too slowly, or nothing at all gets, what is logged, and
that everyone else is still answered meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tests.support.factories import make_key
from tests.support.servers import free_port
from usage_api.config import Settings
from usage_api.db import create_engine

pytestmark = pytest.mark.slow

HEAD_TIMEOUT_S = 2
BODY_TIMEOUT_S = 3
KEEP_ALIVE_TIMEOUT_S = 1
MAX_CONNECTIONS = 20
TOO_LARGE = {"success": False, "error": "request header fields too large"}
TIMED_OUT = {"success": False, "error": "request timeout"}
EVENTS_HEAD = (
    b"POST /v1/usage/events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\nX-API-Key: %s\r\n\r\n"
)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body)


class RawServer:
    """A live `usage-api serve`, spoken to over raw sockets, and its stderr."""

    def __init__(self, port: int, log_path: Path) -> None:
        self.port = port
        self.log_path = log_path

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def lines(self, since: int = 0) -> list[dict[str, Any]]:
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode()
        # The last line may be half written.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    async def wait_for_line(
        self, matches: Callable[[dict[str, Any]], bool], since: int, within_s: float = 5
    ) -> dict[str, Any]:
        deadline = time.monotonic() + within_s
        while True:
            found = [line for line in self.lines(since) if matches(line)]
            if found:
                return found[0]
            assert time.monotonic() < deadline, self.lines(since)
            await asyncio.sleep(0.05)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, raw: bytes, within_s: float = 10) -> Answer:
        """Send `raw` on a new connection, read until the server closes it."""
        reader, writer = await self.open()
        try:
            with contextlib.suppress(ConnectionError):
                writer.write(raw)
                await writer.drain()
            return parse(await asyncio.wait_for(read_to_end(reader), within_s))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def get(self, target: str = "/healthz", headers: bytes = b"") -> Answer:
        request = b"GET %s HTTP/1.1\r\nHost: t\r\n%sConnection: close\r\n\r\n"
        return await self.exchange(request % (target.encode(), headers))

    async def assert_serving(self) -> None:
        """An ordinary request, on a new connection, is answered normally."""
        answer = await self.get()
        assert (answer.status, answer.json()) == (200, {"status": "ok"})

    async def metric(self, series: str) -> float:
        text = (await self.get("/metrics")).body.decode()
        match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            data += chunk
    return data


async def answer_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """All the server sends until it closes, if it starts within `seconds`; else None.
    (One `read` under the timeout: cancelled, it leaves what arrived in the buffer.)"""
    try:
        first = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return None
    return first + await read_to_end(reader)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """How long until the server closes the connection (fails past `seconds`)."""
    started = time.monotonic()
    await asyncio.wait_for(read_to_end(reader), seconds)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def connections(server: RawServer, count: int) -> AsyncIterator[list[Any]]:
    opened = [await server.open() for _ in range(count)]
    try:
        yield opened
    finally:
        for _, writer in opened:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def bites(limit: str) -> Callable[[dict[str, Any]], bool]:
    def matches(line: dict[str, Any]) -> bool:
        return line["logger"] == "usage_api.server" and line.get("limit") == limit

    return matches


async def quiet_limit_log() -> None:
    """The server logs a limit at most once a second: let the previous test's line pass."""
    await asyncio.sleep(1.1)


@pytest.fixture(scope="module")
async def server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[RawServer]:
    log_path = tmp_path_factory.mktemp("server") / "stderr.log"
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "USAGE_API_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "USAGE_API_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "USAGE_API_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_TIMEOUT_S),
        "USAGE_API_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        "USAGE_API_LOG_LEVEL": "info",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            Path(sys.executable).with_name("usage-api"),
            *["serve", "--port", str(port)],
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    live = RawServer(port, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.returncode is None, log_path.read_text()
            with contextlib.suppress(OSError):
                if (await live.get("/healthz")).status == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.1)
        yield live
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)


@pytest.fixture
async def write_key(database_url: str, settings: Settings) -> AsyncIterator[str]:
    engine = create_engine(replace(settings, pool_size=1), database_url)
    try:
        yield await make_key(engine, "admin", write=True)
    finally:
        await engine.dispose()


# The request head


async def test_a_head_over_16_kib_is_answered_431_before_the_rest_is_read(
    server: RawServer,
) -> None:
    since = server.mark()
    # Just under the limit is served.
    fits = await server.get(headers=b"X-Padding: %s\r\n" % (b"a" * 15_000))
    assert fits.status == 200

    async def attack() -> Answer:
        return await server.exchange(
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (8 * 1024 * 1024)
        )

    attacking = asyncio.create_task(attack())
    await server.assert_serving()
    answer = await attacking
    assert (answer.status, answer.json()) == (431, TOO_LARGE)
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    line = await server.wait_for_line(bites("head_bytes"), since)
    assert (line["level"], line["client_ip"]) == ("WARNING", "127.0.0.1")
    await server.assert_serving()


async def test_more_than_100_header_fields_are_answered_431(server: RawServer) -> None:
    since = server.mark()
    # Host and Connection are two more: 98 + 2 = 100 fields pass, 99 + 2 do not.
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(98))
    assert (await server.get(headers=fields)).status == 200
    answer = await server.get(headers=fields + b"X-One-Too-Many: v\r\n")
    assert (answer.status, answer.json()) == (431, TOO_LARGE)
    many = await server.get(headers=b"".join(b"X-F%d: v\r\n" % i for i in range(5000)))
    assert (many.status, many.json()) == (431, TOO_LARGE)
    await server.wait_for_line(bites("header_fields"), since)
    await server.assert_serving()


# Slow and silent clients


async def test_a_head_sent_a_byte_a_second_is_cut_off_with_408(server: RawServer) -> None:
    await quiet_limit_log()
    since = server.mark()
    reader, writer = await server.open()
    started = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: yes\r\n\r\n"
    received = b""
    try:
        for byte in head:
            writer.write(bytes([byte]))
            if (answer := await answer_within(reader, 1)) is not None:
                received = answer
                break
            await server.assert_serving()
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert (parse(received).status, parse(received).json()) == (408, TIMED_OUT)
    # Cut off at the head timeout, long before the whole head (47 bytes, 47 s) was sent.
    assert HEAD_TIMEOUT_S <= elapsed < HEAD_TIMEOUT_S + 3
    line = await server.wait_for_line(bites("head_timeout"), since)
    assert line["message"] == "request head too slow: 408"
    await server.assert_serving()


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    server: RawServer,
) -> None:
    await quiet_limit_log()
    since = server.mark()
    async with connections(server, 1) as [(reader, _)]:
        await server.assert_serving()
        elapsed = await closed_within(reader, HEAD_TIMEOUT_S + 3)
    assert elapsed >= HEAD_TIMEOUT_S - 0.5
    line = await server.wait_for_line(bites("head_timeout"), since)
    assert line["message"] == "no request in time: closed"


async def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout(
    server: RawServer,
) -> None:
    async with connections(server, 1) as [(reader, writer)]:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert parse(head).status == 200
        await reader.readexactly(int(parse(head).headers["content-length"]))
        elapsed = await closed_within(reader, KEEP_ALIVE_TIMEOUT_S + 3)
    assert elapsed >= KEEP_ALIVE_TIMEOUT_S - 0.5


async def test_a_body_sent_too_slowly_is_cut_off_with_408_and_counted_so(
    server: RawServer, write_key: str
) -> None:
    series = 'usage_api_http_requests_total{method="POST",route="/v1/usage/events",status="408"}'
    before = await server.metric(series)
    since = server.mark()
    reader, writer = await server.open()
    started = time.monotonic()
    received = b""
    try:
        writer.write(EVENTS_HEAD % write_key.encode())
        for _ in range(20):
            writer.write(b" ")
            if (answer := await answer_within(reader, 1)) is not None:
                received = answer
                break
            await server.assert_serving()
    finally:
        writer.close()
    elapsed = time.monotonic() - started
    assert (parse(received).status, parse(received).json()) == (408, TIMED_OUT)
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 3
    await server.wait_for_line(bites("body_timeout"), since)
    assert await server.metric(series) == before + 1


# Connections per process


async def test_past_the_connection_cap_the_longest_idle_connection_makes_room(
    server: RawServer,
) -> None:
    await quiet_limit_log()
    since = server.mark()
    async with connections(server, 2 * MAX_CONNECTIONS) as silent:
        # Everyone else is still served: each new connection closes an idle one.
        for _ in range(3):
            await server.assert_serving()
        closed = 0
        for reader, _ in silent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(read_to_end(reader), 0.05)
                closed += 1
        # The oldest went first: at most the cap is open at any time.
        assert closed >= MAX_CONNECTIONS
        assert all(reader.at_eof() for reader, _ in silent[:MAX_CONNECTIONS])
    line = await server.wait_for_line(bites("max_connections"), since)
    assert line["message"] == "connection limit reached: closed the connection idle the longest"


async def test_past_the_connection_cap_with_none_idle_a_client_gets_503(
    server: RawServer, write_key: str
) -> None:
    await quiet_limit_log()
    since = server.mark()
    async with connections(server, MAX_CONNECTIONS) as busy:
        # Each is in the middle of a body: none is idle.
        for _, writer in busy:
            writer.write(EVENTS_HEAD % write_key.encode() + b'{"events": [')
            await writer.drain()
        await asyncio.sleep(0.3)
        answer = await server.get()
        assert (answer.status, answer.json()) == (
            503,
            {"success": False, "error": "service temporarily unavailable"},
        )
        assert answer.headers["retry-after"] == "2"
        line = await server.wait_for_line(bites("max_connections"), since)
        assert line["message"] == "connection limit reached, none idle: 503"
    # Once they are gone (here: closed by their clients), clients are served again.
    deadline = time.monotonic() + 5
    while (await server.get()).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


# What the server does not do, and does not say


async def test_a_websocket_upgrade_is_answered_as_plain_http_and_no_query_is_logged(
    server: RawServer,
) -> None:
    secret = "s3cr3t-query-value"
    since = server.mark()
    answer = await server.exchange(
        b"GET /ws?token=%s HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"X-Request-ID: websocket-probe\r\n\r\n" % secret.encode()
    )
    assert (answer.status, answer.json()) == (404, {"success": False, "error": "not found"})
    assert "upgrade" not in answer.headers
    # Other requests with the secret in their query string: a read and a refused head.
    read = await server.get(
        f"/v1/analytics/usage?organization_id=x&api_key={secret}",
        b"X-Request-ID: query-probe\r\n",
    )
    assert read.status == 401
    refused = await server.get(f"/healthz?key={secret}", b"X-Big: %s\r\n" % (b"a" * 20_000))
    assert refused.status == 431
    access = [
        await server.wait_for_line(lambda line, rid=rid: line.get("request_id") == rid, since)
        for rid in ("websocket-probe", "query-probe")
    ]
    assert [(line["logger"], line["route"], line["status"]) for line in access] == [
        ("usage_api.access", None, 404),
        ("usage_api.access", "/v1/analytics/usage", 401),
    ]
    await asyncio.sleep(0.2)
    assert secret not in server.log_path.read_text()


async def test_no_answer_names_the_server(server: RawServer) -> None:
    assert "server" not in (await server.get()).headers
    refused = await server.get(headers=b"X-Big: %s\r\n" % (b"a" * 20_000))
    assert refused.status == 431
    assert "server" not in refused.headers


async def test_a_client_leaving_mid_body_is_logged_without_traceback_and_counted_499(
    server: RawServer, write_key: str
) -> None:
    route = 'method="POST",route="/v1/usage/events"'
    aborted = f'usage_api_http_requests_total{{{route},status="499"}}'
    failed = f'usage_api_http_requests_total{{{route},status="500"}}'
    before = await server.metric(aborted)
    since = server.mark()
    async with connections(server, 1) as [(_, writer)]:
        writer.write(EVENTS_HEAD % write_key.encode() + b'{"events": [')
        await writer.drain()
        await asyncio.sleep(0.3)
    line = await server.wait_for_line(
        lambda line: line["message"].startswith("client disconnected"), since
    )
    assert (line["logger"], line["level"]) == ("usage_api", "INFO")
    access = await server.wait_for_line(
        lambda line: line["logger"] == "usage_api.access" and line["status"] == 499, since
    )
    assert access["route"] == "/v1/usage/events"
    assert await server.metric(aborted) == before + 1
    assert await server.metric(failed) == 0
    assert not [entry for entry in server.lines(since) if "exception" in entry]
    assert not [entry for entry in server.lines(since) if entry["level"] == "ERROR"]
    await server.assert_serving()
