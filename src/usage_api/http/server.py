"""The HTTP server: uvicorn (uvloop + httptools) with the limits a public port needs.

uvicorn bounds idle keep-alive connections, but not how large a request head may grow, how
long a client may take to send it or its body, nor how many connections a process holds.
`LimitedHttpToolsProtocol` adds those to uvicorn's own protocol, per connection:

- the head (request line and header fields) may have `max_head_bytes` bytes and
  `max_header_fields` fields; past either: 431, before the rest is read;
- it must arrive within `head_timeout_s` of the connection being opened, or of its first
  byte on a kept-alive connection; the body within `body_timeout_s` of the head: else 408
  (or, if nothing came, the connection is closed);
- at most `max_connections` connections per process: one more first closes the connection
  idle for the longest (waiting between requests or for a head), and when none is idle,
  is answered 503.

Each answer is the contract's JSON error and closes the connection; each time a limit bites
it is logged (`usage_api.server`, at most a line a second per limit, counting the rest).
WebSocket handling is off and the `server` header is not sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
import weakref
from asyncio import TimerHandle
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState
from uvicorn.supervisors import Multiprocess

from usage_api.config import Settings
from usage_api.logs import logging_config

log = logging.getLogger("usage_api.server")

# How long a closed connection keeps draining what its client still sends, so that the
# client reads our answer rather than a reset (nginx's lingering close, shorter).
_LINGER_S = 2.0
# File descriptors a process needs besides its client connections: the database pools,
# the listening socket, logs, metrics files.
_SPARE_FDS = 64


@dataclass(frozen=True)
class ServerLimits:
    max_head_bytes: int
    max_header_fields: int
    head_timeout_s: float
    body_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerLimits:
        return cls(
            max_head_bytes=settings.max_head_bytes,
            max_header_fields=settings.max_header_fields,
            head_timeout_s=settings.head_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
        )


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration with our limits, which reach worker processes with it."""

    def __init__(self, *args: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits


class _LimitLog:
    """One line per limit and second at most: a flood must not become a flood of logs."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def bite(self, limit: str, message: str, client: tuple[str, int] | None) -> None:
        now = time.monotonic()
        if now - self.last.get(limit, -1.0) < 1.0:
            self.suppressed[limit] = self.suppressed.get(limit, 0) + 1
            return
        self.last[limit] = now
        log.warning(
            message,
            extra={
                "limit": limit,
                "client_ip": client[0] if client else None,
                "suppressed": self.suppressed.pop(limit, 0),
            },
        )


@dataclass
class _Shared:
    """What the connections of one server share."""

    # Connections waiting for a request (for its head, or between two), oldest first.
    idle: dict[LimitedHttpToolsProtocol, None] = field(default_factory=dict)
    log: _LimitLog = field(default_factory=_LimitLog)


_shared: weakref.WeakKeyDictionary[ServerState, _Shared] = weakref.WeakKeyDictionary()


class _HeadTooLarge(Exception):
    pass


def _json_answer(status: int, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = json.dumps({"success": False, "error": message}).encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"content-type: application/json\r\n")
    if status == 503:
        head.append(b"retry-after: 2\r\n")
    head += [b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n"]
    return b"".join([*head, body])


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of this module's docstring."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, ServerConfig)
        self.limits = config.limits
        shared = _shared.get(self.server_state)
        if shared is None:
            shared = _shared[self.server_state] = _Shared()
        self.shared = shared
        self.in_head = True  # reading a head (or waiting for one), not a body
        self.head_bytes = 0
        self.heads = 0  # heads completed on this connection
        self.timer: TimerHandle | None = None
        self.closing = False

    # The connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            victim = next(iter(self.shared.idle), None)
            if victim is None:
                self.shared.log.bite(
                    "max_connections", "connection limit reached, none idle: 503", self.client
                )
                self._answer_and_close(503, "service temporarily unavailable")
                return
            self.shared.log.bite(
                "max_connections",
                "connection limit reached: closed the connection idle the longest",
                victim.client,
            )
            self.shared.idle.pop(victim)
            victim._close()
        self.shared.idle[self] = None
        self._arm(self.limits.head_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.idle.pop(self, None)
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # draining after our answer
        self._unset_keepalive_if_required()
        while data:
            heads = self.heads
            if self.in_head:
                # Never hand the parser more than the head may hold: httptools buffers a
                # header field whole before it reports it.
                room = self.limits.max_head_bytes - self.head_bytes
                chunk, data = (data, b"") if len(data) <= room else (data[:room], data[room:])
                self.head_bytes += len(chunk)
            else:
                chunk, data = data, b""
            if not self._feed(chunk):
                return
            if (
                self.heads == heads
                and self.in_head
                and self.head_bytes >= self.limits.max_head_bytes
            ):
                self._head_too_large("head_bytes")
                return
        if self.timer is None:
            if not self.in_head:
                self._arm(self.limits.body_timeout_s, self._body_timeout)
            elif self.head_bytes:
                self._arm(self.limits.head_timeout_s, self._head_timeout)

    def _feed(self, chunk: bytes) -> bool:
        try:
            self.parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            # WebSocket is off (and CONNECT is not ours): the request was answered as plain
            # HTTP; the parser reads nothing more on this connection.
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
            else:
                self._close()
            return False
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large("header_fields")
            else:
                self.shared.log.bite("invalid_request", "invalid HTTP request: 400", self.client)
                self._answer_and_close(400, "invalid HTTP request")
            return False
        return True

    # Parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_header_fields:
            raise _HeadTooLarge
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self.heads += 1
        self.in_head = False
        self.shared.idle.pop(self, None)
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # now waiting for the next request
            self.shared.idle[self] = None

    def _unsupported_upgrade_warning(self) -> None:
        pass  # uvicorn's would suggest installing a WebSocket library

    # Limits biting

    def _head_too_large(self, limit: str) -> None:
        self.shared.log.bite(limit, "request head too large: 431", self.client)
        self._answer_and_close(431, "request header fields too large")

    def _head_timeout(self) -> None:
        self.timer = None
        if self.head_bytes == 0:
            self.shared.log.bite("head_timeout", "no request in time: closed", self.client)
            self._close()
        else:
            self.shared.log.bite("head_timeout", "request head too slow: 408", self.client)
            self._answer_and_close(408, "request timeout")

    def _body_timeout(self) -> None:
        self.timer = None
        self.shared.log.bite("body_timeout", "request body too slow: 408", self.client)
        cycle = self.cycle
        if cycle is None or cycle.response_started:
            self._close()
            return
        # The app is waiting for the rest of the body: it will read a disconnect, and its
        # answer goes nowhere (ours is on the wire). Imported here: a worker process loads
        # this module before it first answers its supervisor, and `errors` is not light.
        from usage_api.errors import ANSWERED_STATUS

        cycle.scope["state"][ANSWERED_STATUS] = 408
        self._answer_and_close(408, "request timeout")
        cycle.disconnected = True
        cycle.message_event.set()

    def _answer_and_close(self, status: int, message: str) -> None:
        self.transport.write(_json_answer(status, message, self.server_state.default_headers))
        self.closing = True
        self.shared.idle[self] = None  # nothing more to serve: the first to go at the cap
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._disarm()
        self._arm(_LINGER_S, self._close)

    def _close(self) -> None:
        self.timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self.timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _fit_fd_limit(max_connections: int) -> int:
    """Raise the process' open-file limit to what `max_connections` needs, as far as the
    hard limit allows; the number of connections it leaves room for."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + _SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        soft = new_soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(1, soft - _SPARE_FDS)
        log.warning(
            "USAGE_API_MAX_CONNECTIONS=%d needs %d open files, the limit is %d: capping at %d",
            max_connections,
            wanted,
            soft,
            fitted,
        )
        return fitted
    return max_connections


def server_config(settings: Settings, host: str, port: int, workers: int) -> ServerConfig:
    limits = ServerLimits.from_settings(settings)
    # uvicorn's `trace` level logs every ASGI message, query strings included.
    log_level = "debug" if settings.log_level.lower() == "trace" else settings.log_level
    return ServerConfig(
        "usage_api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=LimitedHttpToolsProtocol,
        ws="none",
        server_header=False,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        log_level=log_level,
        log_config=logging_config(log_level),
        # The app writes its own access line (usage_api.access), with the key's id and
        # without the query string.
        access_log=False,
        timeout_graceful_shutdown=10,
        # A worker imports the whole app before it first answers the supervisor; on a
        # busy 2-core host that alone can take longer than uvicorn's 5 s default.
        timeout_worker_healthcheck=30,
        limits=limits,
    )


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    """Serve the API until interrupted (what `uvicorn.run` does, with our configuration)."""
    config = server_config(settings, host, port, workers)
    limits = config.limits
    fitted = _fit_fd_limit(limits.max_connections)
    if fitted != limits.max_connections:
        config.limits = replace(limits, max_connections=fitted)
    server = uvicorn.Server(config)
    try:
        if workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            config.load_app()
            server.run()
    except KeyboardInterrupt:
        pass
    if workers == 1 and not server.started:
        raise SystemExit(3)  # uvicorn's start-up failure status
