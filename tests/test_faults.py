"""The database goes away and comes back, a statement runs too long, the server is stopped.

A live server (as in test_crash.py) runs on an embedded PostgreSQL of this module's own,
which the tests stop, kill and start again on the same port, with writers and readers on
it all along. While the database is away every answer is a quick 503 with Retry-After,
`/healthz` stays 200 and `/readyz` is 503; once it is back the service answers 200 again
within moments, by itself; and once clients have retried every batch that did not get a
200, with the same ids, the log holds every event exactly once and the counters equal it.

`scripts/fault-run` runs the restart scenario at a heavier load and prints its figures:
`python -m tests.test_faults --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy
from alembic import command
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import alembic_config
from tests.factories import (
    event,
    free_port,
    make_key,
    make_organization,
    make_user,
    sigkill_postmaster,
)
from tests.test_consistency import (
    Key,
    Metrics,
    api_totals,
    assert_snapshot_consistent,
    log_totals,
    sent_totals,
)
from tests.test_crash import Server
from usage_api import db
from usage_api.analytics.totals import metrics_of
from usage_api.app import create_app
from usage_api.config import Settings
from usage_api.db import create_engine
from usage_api.embedded import EmbeddedPostgres
from usage_api.errors import is_unavailable

UNAVAILABLE = {"success": False, "error": "service temporarily unavailable"}
# A client gives up after this long: an answer that needs it is a hang.
CLIENT_TIMEOUT_S = 10.0
# "Quick": every answer, 200 or 503, database up or down, comes within this.
MAX_ANSWER_S = 3.0
# Generous: in practice a request sent once the database accepts connections again gets a
# 200, within that request's own latency (0.1-0.25 s on a busy 2-CPU machine).
MAX_RECOVERY_S = 10.0


# --- the database of this module -------------------------------------------------------


class Database:
    """An embedded PostgreSQL, durable (fsync on), that keeps its port across restarts."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.server = EmbeddedPostgres(data_dir, port=self.port, fast=False)
        self.url = self.server.start()
        command.upgrade(alembic_config(self.url), "head")

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        """A fast shutdown: sessions are terminated, open transactions rolled back."""
        self.server.stop()

    def kill(self) -> None:
        """SIGKILL to the postmaster: the next start replays the WAL."""
        sigkill_postmaster(self.server.data_dir)
        # Its backends notice and exit on their own; a request is served by none of them.
        _wait_until_no_sessions(self.port)
        self.server.stop()  # only forgets it: nothing is left to stop

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """SIGSTOP to the postmaster and its backends: a hung host, or a network that drops
        every packet. Connections neither succeed nor fail; statements never end."""
        postmaster = int((self.server.data_dir / "postmaster.pid").read_text().split()[0])
        pids = [postmaster, *_children(postmaster)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)

    def close(self) -> None:
        self.server.stop()


def _children(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(ppid) == parent:
                children.append(int(entry.name))
    return children


def _wait_until_no_sessions(port: int, timeout: float = 5.0) -> None:
    """Until no TCP connection to `port` is established on the server side."""
    local = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
        if not any(row[1].endswith(local) and row[3] == "01" for row in rows):
            return
        time.sleep(0.005)
    raise AssertionError(f"sessions on port {port} outlived their postmaster")


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[AsyncEngine]:
    """A fresh engine of the test's own: pooled connections do not outlive a restart."""
    settings = replace(Settings.from_env(), rollup_interval_ms=0, pool_size=4)
    engine = create_engine(settings, url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def clean_database() -> None:
    """Overrides conftest's: these tests use a database of their own, and new tenants each."""


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = Database(tmp_path_factory.mktemp("faults") / "pgdata")
    try:
        yield db
    finally:
        db.close()


class Servers:
    """The service as a child process (as in test_crash.py) on the module's database: one
    shared by the tests, started again only when a test has stopped it."""

    def __init__(self, database: Database, directory: Path) -> None:
        self.database = database
        self.directory = directory
        self.started = 0
        self.server: Server | None = None

    async def running(self) -> Server:
        process = self.server.process if self.server is not None else None
        if self.server is None or process is None or process.returncode is not None:
            self.started += 1
            log_path = self.directory / f"server{self.started}.log"
            self.server = Server(self.database.url, free_port(), log_path)
            await self.server.start()
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
async def servers(
    database: Database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Servers]:
    servers = Servers(database, tmp_path_factory.mktemp("servers"))
    try:
        yield servers
    finally:
        await servers.close()


async def _tenants(engine: AsyncEngine) -> tuple[list[str], dict[str, list[str]], list[Key]]:
    organizations = [await make_organization(engine, f"Org {i}") for i in range(2)]
    users = {
        o: [await make_user(engine, o, f"U{i}", f"u{i}@example.com") for i in range(2)]
        for o in organizations
    }
    targets = [(o, "") for o in organizations] + [(o, u) for o in organizations for u in users[o]]
    return organizations, users, targets


# --- the restart scenario --------------------------------------------------------------


@dataclass(frozen=True)
class Load:
    writers: int = 4
    events_per_writer: int = 800
    batch_size: int = 100
    # Share of batches sent again after their 200, as a client does that lost the answer.
    resend_fraction: float = 0.2
    readers: int = 2
    restarts: int = 3
    down_s: float = 0.6
    up_s: float = 0.6


@dataclass(frozen=True)
class Answer:
    kind: str  # write, read (all time), range, healthz, readyz
    sent_at: float
    done_at: float
    status: int  # 0: no answer at all (client timeout or connection error)


@dataclass
class Outage:
    how: str  # "stop" (fast shutdown) or "kill" (SIGKILL to the postmaster)
    stopping_at: float
    writes_in_flight: int
    down_at: float = math.inf  # the database is gone: nothing can be served from here...
    starting_at: float = math.inf  # ...to here
    accepting_at: float = math.inf  # a connection to it first succeeds again
    up_at: float = math.inf  # EmbeddedPostgres.start() has returned


@dataclass
class Run:
    load: Load
    answers: list[Answer] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    malformed_503: int = 0  # a 503 without the contract's body or without Retry-After
    unexpected_writes: list[str] = field(default_factory=list)  # answers that make no sense
    half_batches: int = 0
    committed_unanswered: int = 0  # committed, but answered 503: the retry found duplicates
    retried: int = 0  # batches sent again after an answer other than 200
    resent: int = 0
    backwards_reads: int = 0
    events: int = 0
    lost: int = 0
    foreign: int = 0
    counted_twice: int = 0  # units counted beyond the Python sums
    counted_short: int = 0
    unfolded_after_s: float = 0.0
    server_errors_logged: int = 0

    def count(self, *statuses: int, kinds: tuple[str, ...] | None = None) -> int:
        return sum(
            1 for a in self.answers if a.status in statuses and (kinds is None or a.kind in kinds)
        )

    def while_down(self, answer: Answer) -> bool:
        return any(
            o.down_at <= answer.sent_at and answer.done_at <= o.starting_at for o in self.outages
        )

    def recovery_s(self) -> list[float]:
        """Per restart: from the database accepting connections again to the first 200 of a
        request sent since."""
        times = []
        for outage in self.outages:
            firsts = [
                a.done_at
                for a in self.answers
                if a.status == 200 and a.kind != "healthz" and a.sent_at >= outage.accepting_at
            ]
            times.append(min(firsts, default=math.inf) - outage.accepting_at)
        return times

    def after_recovery_503(self) -> int:
        """503s for requests sent after the first 200 that followed a restart, and answered
        before the next stop began."""
        count = 0
        for outage, took in zip(self.outages, self.recovery_s(), strict=True):
            recovered = outage.accepting_at + took
            following = [o.stopping_at for o in self.outages if o.stopping_at > recovered]
            until = min(following, default=math.inf)
            count += sum(
                1
                for a in self.answers
                if a.status == 503 and recovered <= a.sent_at and a.done_at < until
            )
        return count

    def problems(self) -> list[str]:
        found = []
        other = [a for a in self.answers if a.kind != "healthz" and a.status not in (200, 503)]
        if other:
            found.append(f"answers neither 200 nor 503: {Counter(a.status for a in other)}")
        if any(a.status != 200 for a in self.answers if a.kind == "healthz"):
            found.append("/healthz was not always 200")
        if self.malformed_503:
            found.append(f"{self.malformed_503} answers of 503 without the body or Retry-After")
        down = [a for a in self.answers if a.kind != "healthz" and self.while_down(a)]
        if any(a.status != 503 for a in down):
            found.append(f"while down, answers other than 503: {Counter(a.status for a in down)}")
        if len(self.outages) != self.load.restarts or not all(
            any(o.down_at <= a.sent_at and a.done_at <= o.starting_at for a in down)
            for o in self.outages
        ):
            found.append("an outage saw no request at all")
        slowest = max(a.done_at - a.sent_at for a in self.answers)
        if slowest > MAX_ANSWER_S:
            found.append(f"an answer took {slowest:.2f} s")
        if max(self.recovery_s()) > MAX_RECOVERY_S:
            found.append(f"recovery took {max(self.recovery_s()):.2f} s")
        if self.after_recovery_503():
            found.append(f"{self.after_recovery_503()} answers of 503 after recovering")
        for name in (
            "unexpected_writes",
            "half_batches",
            "backwards_reads",
            "lost",
            "foreign",
            "counted_twice",
            "counted_short",
            "server_errors_logged",
        ):
            if getattr(self, name):
                found.append(f"{name}: {getattr(self, name)}")
        return found

    def report(self) -> str:
        load = self.load
        kills = sum(o.how == "kill" for o in self.outages)
        recovery = self.recovery_s()
        down = [a for a in self.answers if a.kind != "healthz" and self.while_down(a)]
        readyz_down = [a for a in down if a.kind == "readyz"]
        stored = (
            "each event once"
            if not (self.lost or self.foreign)
            else f"{self.lost} events too few and {self.foreign} unknown ones"
        )
        agree = (
            "yes"
            if not (self.counted_twice or self.counted_short)
            else f"NO, {self.counted_twice} units over and {self.counted_short} under"
        )
        return "\n".join(
            [
                f"{load.writers} writers x {load.events_per_writer:,} events"
                f" with {load.resend_fraction:.0%} retried, the database restarted"
                f" {len(self.outages)} times: {self.lost:,} lost,"
                f" {self.counted_twice:,} counted twice,"
                f" {self.count(500):,} answers of 500",
                f"  restarts: {len(self.outages) - kills} fast shutdowns and {kills} SIGKILLs"
                f" of the postmaster, each down {load.down_s:g} s; {load.readers} readers;"
                " stopping took "
                + ", ".join(f"{(o.down_at - o.stopping_at) * 1000:.0f}" for o in self.outages)
                + " ms, starting "
                + ", ".join(f"{(o.up_at - o.starting_at) * 1000:.0f}" for o in self.outages)
                + " ms",
                f"  answers: {self.count(200):,} of 200, {self.count(503):,} of 503"
                f" ({self.malformed_503} without body or Retry-After), {self.count(500)} of 500,"
                f" {self.count(0)} client timeouts or connection errors;"
                f" slowest {max(a.done_at - a.sent_at for a in self.answers) * 1000:.0f} ms",
                f"  while the database was down: {len(down):,} answers,"
                f" {sum(a.status == 503 for a in down):,} of them 503"
                f" ({sum(a.status == 503 for a in readyz_down)}/{len(readyz_down)} of /readyz);"
                f" /healthz {self.count(200, kinds=('healthz',))}"
                f"/{sum(a.kind == 'healthz' for a in self.answers)} 200",
                "  database accepting connections again -> first 200: "
                + ", ".join(f"{t * 1000:.0f} ms" for t in recovery)
                + f" (max {max(recovery) * 1000:.0f} ms);"
                f" 503s after that: {self.after_recovery_503()}",
                "  writes in flight when the database went: "
                + ", ".join(str(o.writes_in_flight) for o in self.outages)
                + f"; batches committed whose 200 was lost: {self.committed_unanswered};"
                f" half-written batches: {self.half_batches}",
                f"  {self.events:,} events in {self.events // load.batch_size:,} batches:"
                f" {self.retried:,} retried after a 503, {self.resent:,} re-sent after their 200;"
                f" the log holds {stored}; counters == log == Python sums: {agree};"
                f" deltas all folded {self.unfolded_after_s:.1f} s after the load",
            ]
        )


async def _accepting(url: str, starting: asyncio.Task[None]) -> float:
    """When a connection to the database at `url` first succeeds, polling every 5 ms while
    `starting` (its start-up) runs."""
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = await asyncpg.connect(url, timeout=1)
        except (OSError, TimeoutError, asyncpg.PostgresError):
            if starting.done():
                starting.result()  # its failure, if it failed
            assert time.monotonic() < deadline, "the database did not come back"
            await asyncio.sleep(0.005)
            continue
        accepting_at = time.monotonic()
        await conn.close()
        return accepting_at


def _batches(
    load: Load, writer: int, organizations: list[str], users: dict[str, list[str]]
) -> list[list[dict[str, Any]]]:
    rng = random.Random(writer)
    batches = []
    for number in range(load.events_per_writer // load.batch_size):
        batch = []
        for i in range(load.batch_size):
            organization_id = rng.choice(organizations)
            type_ = rng.choice(["sms", "sms", "mms", "voice"])
            batch.append(
                event(
                    organization_id,
                    f"w{writer}-b{number}-e{i}",
                    type=type_,
                    direction=rng.choice(["outbound", "inbound"]),
                    quantity=rng.randrange(1, 300),
                    knowledge_base=rng.choice([None, False, True]) if type_ == "voice" else None,
                    user_id=rng.choice([*users[organization_id], None]),
                    occurred_at=f"2026-02-{rng.randrange(1, 29):02}T{rng.randrange(24):02}:"
                    f"{rng.randrange(60):02}:{rng.randrange(60):02}Z",
                )
            )
        batches.append(batch)
    return batches


async def ride_out_restarts(database: Database, server: Server, load: Load) -> Run:
    """Writers, readers and probes on `server` while `database` restarts `load.restarts` times."""
    run = Run(load)
    async with connected(database.url) as engine:
        organizations, users, targets = await _tenants(engine)
        write_key = await make_key(engine, write=True)
        read_key = await make_key(engine)
    all_batches = [_batches(load, w, organizations, users) for w in range(load.writers)]
    chaos_done = asyncio.Event()
    writes_in_flight = 0
    # Writers spread their batches over the planned restarts; once those are over, they hurry.
    planned_s = load.restarts * (load.up_s + load.down_s + 1.0) + load.up_s
    pace_s = planned_s / max(len(all_batches[0]), 1)

    async def call(
        http: httpx.AsyncClient, kind: str, method: str, url: str, **kwargs: Any
    ) -> httpx.Response | None:
        sent_at = time.monotonic()
        try:
            response = await http.request(method, url, timeout=CLIENT_TIMEOUT_S, **kwargs)
        except httpx.TransportError:
            run.answers.append(Answer(kind, sent_at, time.monotonic(), 0))
            return None
        run.answers.append(Answer(kind, sent_at, time.monotonic(), response.status_code))
        if response.status_code == 503 and (
            response.json() != UNAVAILABLE or int(response.headers.get("retry-after", 0)) <= 0
        ):
            run.malformed_503 += 1
        return response

    async def post_until_200(http: httpx.AsyncClient, batch: list[dict[str, Any]]) -> Any:
        """The batch's first 200 answer, and whether an attempt before it failed."""
        nonlocal writes_in_flight
        failed = False
        while True:
            writes_in_flight += 1
            try:
                response = await call(
                    http,
                    "write",
                    "POST",
                    "/v1/usage/events",
                    json={"events": batch},
                    headers={"X-API-Key": write_key},
                )
            finally:
                writes_in_flight -= 1
            if response is not None and response.status_code == 200:
                return response.json(), failed
            if not failed:
                run.retried += 1
            failed = True
            await asyncio.sleep(0.05 + random.random() * 0.05)

    async def writer(number: int) -> None:
        rng = random.Random(1000 + number)
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            for batch in all_batches[number]:
                if not chaos_done.is_set():
                    await asyncio.sleep(pace_s * rng.uniform(0.5, 1.5))
                size = len(batch)
                body, failed = await post_until_200(http, batch)
                if body["conflicts"] or body["accepted"] + body["duplicates"] != size:
                    run.unexpected_writes.append(f"{body}")
                elif body["accepted"] not in (0, size):
                    run.half_batches += 1
                elif body["accepted"] == 0:
                    if failed:
                        run.committed_unanswered += 1
                    else:
                        run.unexpected_writes.append(f"a new batch found as duplicates: {body}")
                if rng.random() < load.resend_fraction:
                    run.resent += 1
                    body, _ = await post_until_200(http, batch)
                    if body != {
                        "success": True,
                        "accepted": 0,
                        "duplicates": size,
                        "conflicts": [],
                    }:
                        run.unexpected_writes.append(f"a batch sent again after its 200: {body}")

    async def reader(number: int) -> None:
        rng = random.Random(2000 + number)
        seen: dict[Key, Metrics] = {}
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            while not (chaos_done.is_set() and writers_done.is_set()):
                organization_id, user_id = rng.choice(targets)
                params = {"user_id": user_id} if user_id else {"organization_id": organization_id}
                kind = "read"
                if rng.random() < 0.3:
                    kind = "range"
                    first, last = sorted(rng.sample(range(1, 29), 2))
                    params |= {
                        "start_date": f"2026-02-{first:02}T{rng.randrange(24):02}:30:00Z",
                        "end_date": f"2026-02-{last:02}",
                    }
                response = await call(
                    http, kind, "GET", "/v1/analytics/usage", params=params,
                    headers={"X-API-Key": read_key},
                )  # fmt: skip
                if kind == "read" and response is not None and response.status_code == 200:
                    now = metrics_of(response.json()["usage"])
                    before = seen.get((organization_id, user_id), now)
                    if any(a < b for a, b in zip(now, before, strict=True)):
                        run.backwards_reads += 1
                    seen[organization_id, user_id] = now
                await asyncio.sleep(0.01)

    async def prober() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
            while not (chaos_done.is_set() and writers_done.is_set()):
                await call(http, "healthz", "GET", "/healthz")
                await call(http, "readyz", "GET", "/readyz")
                await asyncio.sleep(0.05)

    async def chaos() -> None:
        for number in range(load.restarts):
            await asyncio.sleep(load.up_s)
            # Pull the database from under writes in flight, when there are any soon.
            deadline = time.monotonic() + 1
            while writes_in_flight == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            how = "kill" if number % 2 else "stop"
            outage = Outage(how, time.monotonic(), writes_in_flight)
            run.outages.append(outage)
            await asyncio.to_thread(database.kill if how == "kill" else database.stop)
            outage.down_at = time.monotonic()
            await asyncio.sleep(load.down_s)
            outage.starting_at = time.monotonic()
            starting = asyncio.create_task(asyncio.to_thread(database.start))
            outage.accepting_at = await _accepting(database.url, starting)
            await starting
            outage.up_at = time.monotonic()
        chaos_done.set()

    writers_done = asyncio.Event()

    async def writers() -> None:
        await asyncio.gather(*(writer(w) for w in range(load.writers)))
        writers_done.set()

    await asyncio.gather(
        chaos(),
        writers(),
        *(reader(r) for r in range(load.readers)),
        prober(),
    )
    loaded_at = time.monotonic()

    # --- after the storm: the log, the counters and the Python sums agree ---------------
    sent = [e for batches in all_batches for batch in batches for e in batch]
    expected = sent_totals(sent)
    run.events = len(sent)
    async with connected(database.url) as engine:
        # The server's folder rode out every restart: it empties the deltas by itself.
        while True:
            async with engine.connect() as conn:
                left = await conn.scalar(
                    text("SELECT count(*) FROM usage_deltas WHERE organization_id = ANY(:o)"),
                    {"o": organizations},
                )
            run.unfolded_after_s = time.monotonic() - loaded_at
            if left == 0 or run.unfolded_after_s > 10:
                break
            await asyncio.sleep(0.05)
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT organization_id, id FROM usage_events WHERE organization_id = ANY(:o)"
                ),
                {"o": organizations},
            )
            stored = {(row.organization_id, row.id) for row in rows}
            log = {k: v for k, v in (await log_totals(conn)).items() if k[0] in organizations}
            counters = await conn.execute(
                text(
                    "SELECT organization_id, user_id, sms_outbound, sms_inbound, mms_outbound,"
                    " mms_inbound, voice_seconds, voice_kb_seconds FROM usage_counters"
                    " WHERE organization_id = ANY(:o)"
                ),
                {"o": organizations},
            )
            folded = {(row[0], row[1]): tuple(row[2:]) for row in counters if any(row[2:])}
        await assert_snapshot_consistent(engine)
    ids = {(e["organization_id"], e["id"]) for e in sent}
    run.lost = len(ids - stored)
    run.foreign = len(stored - ids)
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False) as http:
        api = await api_totals(http, read_key, targets)
        everything = await api_totals(
            http, read_key, targets, start_date="2026-01-01", end_date="2026-12-31"
        )
    for totals in (log, folded, api, everything):
        for target in expected.keys() | totals.keys():
            for got, want in zip(
                totals.get(target, (0,) * 6), expected.get(target, (0,) * 6), strict=True
            ):
                run.counted_twice += max(0, got - want)
                run.counted_short += max(0, want - got)
    run.server_errors_logged = server.log_path.read_text().count("unhandled error")
    return run


async def test_the_service_rides_out_database_restarts_exactly_once(
    database: Database, servers: Servers
) -> None:
    server = await servers.running()
    run = await ride_out_restarts(database, server, Load())
    print(run.report())
    assert run.problems() == [], run.report()
    # The outages were felt: writes were refused and retried, /readyz said so.
    assert run.retried > 0 and run.count(503, kinds=("readyz",)) > 0


# --- a restart while nobody is looking -------------------------------------------------


async def test_a_restart_while_idle_costs_no_request(database: Database) -> None:
    """Pooled connections that died with the old server are replaced, not handed out.

    In-process, with no background fold: nothing but these requests touches the pool.
    """
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine)
    settings = replace(Settings.from_env(), rollup_interval_ms=0, pool_size=10)
    app = create_app(settings, database.url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def burst() -> list[int]:
            answers = await asyncio.gather(
                *(
                    http.get(
                        "/v1/analytics/usage",
                        params={"organization_id": organization_id},
                        headers={"X-API-Key": key},
                    )
                    for _ in range(10)
                )
            )
            return [a.status_code for a in answers]

        assert await burst() == [200] * 10
        assert app.state.services.databases.primary.pool.checkedin() == 10
        for how in ("stop", "kill"):
            await asyncio.to_thread(database.kill if how == "kill" else database.stop)
            await asyncio.to_thread(database.start)
            assert await burst() == [200] * 10, how


# --- a database that stops answering ---------------------------------------------------


async def test_a_database_that_stops_answering_is_a_503_soon_after_the_statement_timeout(
    database: Database,
) -> None:
    """Frozen, nothing fails and nothing ends by itself: our own timeouts must answer."""
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine)
    settings = replace(
        Settings.from_env(), rollup_interval_ms=0, pool_size=10, statement_timeout_ms=500
    )
    app = create_app(settings, database.url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http,
    ):

        async def burst() -> list[httpx.Response]:
            return await asyncio.gather(
                *(
                    http.get(
                        "/v1/analytics/usage",
                        params={"organization_id": organization_id},
                        headers={"X-API-Key": key},
                    )
                    for _ in range(10)
                )
            )

        assert [r.status_code for r in await burst()] == [200] * 10
        with database.frozen():
            started = time.monotonic()
            # In-process, no client timeout applies: this one turns a hang into a failure.
            answers = await asyncio.wait_for(burst(), timeout=CLIENT_TIMEOUT_S)
            took = time.monotonic() - started
            assert [(r.status_code, r.json()) for r in answers] == [(503, UNAVAILABLE)] * 10
            assert all(int(r.headers["retry-after"]) > 0 for r in answers)
            # statement_timeout (0.5 s) + 1 s of grace, and not the 2 s more SQLAlchemy
            # would spend closing each connection politely.
            print(f"frozen database, statement_timeout 500 ms: 10 x 503 after {took:.2f} s")
            assert 1.5 <= took < 2.5, took
            assert (await http.get("/healthz")).status_code == 200
        # The connections that timed out were dropped, not put back into the pool.
        assert [r.status_code for r in await burst()] == [200] * 10


# --- which errors mean "the database is away" -----------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.CannotConnectNowError("the database system is shutting down"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InterfaceError("cannot call fetch(): the underlying connection is closed"),
        # The server's error reached the connection, its close not yet.
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        PoolTimeoutError("QueuePool limit of size 10 overflow 10 reached"),
    ],
    ids=repr,
)  # fmt: skip
def test_errors_of_an_absent_database_are_unavailable(error: Exception) -> None:
    assert is_unavailable(error)
    # As SQLAlchemy wraps them once connected: the driver's error is `orig`, or its cause.
    assert is_unavailable(DBAPIError("SELECT 1", None, error))
    wrapper = Exception(str(error))
    wrapper.__cause__ = error
    assert is_unavailable(DBAPIError("SELECT 1", None, wrapper))


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint"),
        asyncpg.PostgresSyntaxError("syntax error at or near"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ValueError("a bug"),
        KeyError("a bug"),
    ],
    ids=repr,
)
def test_errors_of_a_wrong_request_or_a_bug_are_not_unavailable(error: Exception) -> None:
    assert not is_unavailable(error)
    assert not is_unavailable(DBAPIError("SELECT 1", None, error))


# --- statement timeout -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def locked(url: str, table: str) -> AsyncIterator[asyncpg.Connection]:
    """`table` locked ACCESS EXCLUSIVE by another session until the block ends."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield conn
    finally:
        await conn.close()


async def _waiting_on_locks(conn: asyncpg.Connection) -> int:
    # Inside a transaction, statistics views keep showing their first snapshot.
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = 'usage-api' AND wait_event_type = 'Lock'"
    )
    return count


async def test_a_statement_past_the_timeout_is_cut_and_answered_503(
    database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine, write=True)
    settings = replace(Settings.from_env(), rollup_interval_ms=0, statement_timeout_ms=300)
    app = create_app(settings, database.url)
    batch = [event(organization_id, f"slow-{i}", quantity=i + 1) for i in range(50)]
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"X-API-Key": key},
        ) as http,
    ):
        async with locked(database.url, "usage_events") as lock:
            started = time.monotonic()
            response = await http.post("/v1/usage/events", json={"events": batch})
            took = time.monotonic() - started
            assert (response.status_code, response.json()) == (503, UNAVAILABLE)
            assert int(response.headers["retry-after"]) > 0
            print(f"statement_timeout 300 ms: 503 after {took * 1000:.0f} ms")
            assert 0.3 <= took < 1.3, took  # the server's timeout, not our 1 s of grace
            # Cut by the server, not abandoned: no session of the service still waits.
            assert await _waiting_on_locks(lock) == 0
            # A range reads the log at its edges: cut too. All time reads only roll-ups.
            ranged = await http.get(
                "/v1/analytics/usage",
                params={"organization_id": organization_id, "start_date": "2026-02-10T12:30"},
            )
            assert (ranged.status_code, ranged.json()) == (503, UNAVAILABLE)
            all_time = await http.get(
                "/v1/analytics/usage", params={"organization_id": organization_id}
            )
            assert all_time.status_code == 200
            assert all_time.json()["usage"]["sms"] == {"outbound": 0, "inbound": 0, "total": 0}

        # Nothing of the batch was written, not even its deltas.
        async with connected(database.url) as engine, engine.connect() as conn:
            for table in ("usage_events", "usage_deltas", "usage_counters"):
                written = await conn.scalar(
                    text(f"SELECT count(*) FROM {table} WHERE organization_id = :o"),
                    {"o": organization_id},
                )
                assert written == 0, table

        response = await http.post("/v1/usage/events", json={"events": batch})
        assert response.json() == {
            "success": True,
            "accepted": 50,
            "duplicates": 0,
            "conflicts": [],
        }
    # A warning at most (the database is unavailable), never an unhandled error.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- graceful shutdown -----------------------------------------------------------------


async def test_sigterm_lets_requests_in_flight_finish(database: Database, servers: Servers) -> None:
    async with connected(database.url) as engine:
        organization_id = await make_organization(engine)
        key = await make_key(engine, write=True)
    server = await servers.running()
    assert server.process is not None
    headers = {"X-API-Key": key}
    batches = [[event(organization_id, f"term-{b}-{i}") for i in range(20)] for b in range(4)]
    async with httpx.AsyncClient(
        base_url=server.base_url, trust_env=False, timeout=CLIENT_TIMEOUT_S, headers=headers
    ) as http:
        async with locked(database.url, "usage_events") as lock:
            posts = [
                asyncio.create_task(http.post("/v1/usage/events", json={"events": b}))
                for b in batches
            ]
            deadline = time.monotonic() + 5
            while await _waiting_on_locks(lock) < len(batches):
                assert time.monotonic() < deadline, "the writes never reached the lock"
                await asyncio.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            assert server.process.returncode is None  # still serving what it holds
            with pytest.raises(httpx.ConnectError):  # but takes nothing new
                await http.get("/healthz")
        # The lock is gone: the writes go through.
        responses = await asyncio.gather(*posts)
    for response in responses:
        assert response.json() == {
            "success": True,
            "accepted": 20,
            "duplicates": 0,
            "conflicts": [],
        }
    # It exits by itself once they are answered: by the signal it was sent, re-raised after
    # the graceful shutdown, as uvicorn does since 0.29 (encode/uvicorn#1600), so that a
    # supervisor sees "terminated by SIGTERM" (exit status 143 in a shell), not a crash.
    answered_at = time.monotonic()
    returncode = await asyncio.wait_for(server.process.wait(), timeout=10)
    print(
        f"SIGTERM with 4 writes in flight: 4 x 200, exit status {returncode}"
        f" {(time.monotonic() - answered_at) * 1000:.0f} ms after the last answer"
    )
    async with connected(database.url) as engine, engine.connect() as conn:
        stored = await conn.scalar(
            text("SELECT count(*) FROM usage_events WHERE organization_id = :o"),
            {"o": organization_id},
        )
    assert stored == 80
    assert returncode == -signal.SIGTERM, server.log()
    assert "unhandled error" not in server.log()


# --- the heavier run: scripts/fault-run -------------------------------------------------


def _memory_gib() -> float:
    return int(Path("/proc/meminfo").read_text().split()[1]) / 2**20


async def _main(database: Database, load: Load, directory: Path) -> int:
    servers = Servers(database, directory)
    try:
        conn = await asyncpg.connect(database.url)
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
        run = await ride_out_restarts(database, await servers.running(), load)
    finally:
        await servers.close()
    print(
        f"machine: {os.cpu_count()} CPUs, {_memory_gib():.0f} GiB, PostgreSQL {version}"
        " (embedded, fsync on), one server process"
    )
    print(run.report())
    problems = run.problems()
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


async def _compare_pool_checks(database: Database) -> int:
    """Why no pool_pre_ping: what a checkout costs, and how many of 10 requests fail right
    after a restart, with no check, with pre-ping, and with the closed-connection check."""
    names = ("no check", "pool_pre_ping", "closed check (shipped)")
    settings = replace(Settings.from_env(), pool_size=10, rollup_interval_ms=0)
    engines = {name: create_engine(settings, database.url) for name in names}
    for name, engine in engines.items():
        if name != "closed check (shipped)":
            sqlalchemy.event.remove(engine.sync_engine, "checkout", db._drop_closed)
        engine.sync_engine.pool._pre_ping = name == "pool_pre_ping"

    async def select_1(engine: AsyncEngine) -> Any:
        async def work(conn: Any) -> Any:
            return await conn.scalar(text("SELECT 1"))

        return await db.run_autocommit(engine, work)

    async def fill(engine: AsyncEngine) -> None:
        await asyncio.gather(*(select_1(engine) for _ in range(10)))

    costs: dict[str, list[float]] = {name: [] for name in names}
    for engine in engines.values():
        await fill(engine)
    for _ in range(20):  # interleaved, against noise
        for name, engine in engines.items():
            started = time.perf_counter()
            for _ in range(300):
                await select_1(engine)
            costs[name].append((time.perf_counter() - started) / 300)
    failed: dict[str, int] = dict.fromkeys(names, 0)
    trials = 6
    for trial in range(trials):
        for engine in engines.values():
            await fill(engine)
        await asyncio.to_thread(database.kill if trial % 2 else database.stop)
        await asyncio.to_thread(database.start)
        for name, engine in engines.items():
            answers = await asyncio.gather(
                *(select_1(engine) for _ in range(10)), return_exceptions=True
            )
            failed[name] += sum(isinstance(a, Exception) for a in answers)
    for engine in engines.values():
        await engine.dispose()
    for name in names:
        print(
            f"{name:24} {statistics.median(costs[name]) * 1e6:5.0f} us per checkout + SELECT 1"
            f" (median of 20 x 300); after {trials} restarts (3 stops, 3 SIGKILLs):"
            f" {failed[name]} of {trials * 10} requests failed"
        )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description="The restart scenario at a heavier load.")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--events", type=int, default=5000, help="events per writer")
    parser.add_argument("--resend", type=float, default=0.2, help="share of batches re-sent")
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--down", type=float, default=2.0, help="seconds down per restart")
    parser.add_argument("--up", type=float, default=2.0, help="seconds up between restarts")
    parser.add_argument(
        "--compare-pool-checks",
        action="store_true",
        help="instead: the cost of pool_pre_ping and of the closed-connection check",
    )
    args = parser.parse_args()
    load = Load(
        writers=args.writers,
        events_per_writer=args.events,
        resend_fraction=args.resend,
        readers=args.readers,
        restarts=args.restarts,
        down_s=args.down,
        up_s=args.up,
    )
    with tempfile.TemporaryDirectory(prefix="usage-api-faults-") as tmp:
        # Migrating runs an event loop of its own: before ours.
        database = Database(Path(tmp) / "pgdata")
        try:
            if args.compare_pool_checks:
                status = asyncio.run(_compare_pool_checks(database))
            else:
                status = asyncio.run(_main(database, load, Path(tmp)))
        finally:
            database.close()
    sys.exit(status)


if __name__ == "__main__":
    main()
