"""The database-restart scenario and what it runs on.

A database of its own (an embedded PostgreSQL, durable, that keeps its port across
restarts, stopped, killed and frozen at will), a live server on it, and the scenario:
writers and readers on the server while the database restarts, every answer recorded,
and a `Run` that says what went wrong. tests/test_faults.py runs it at a light load;
`scripts/fault-run` (tests/support/faultrun.py) at a heavier one, with its figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from alembic import command
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.database import alembic_config
from tests.support.factories import event, make_key, make_organization, make_user
from tests.support.oracle import (
    Key,
    Metrics,
    api_totals,
    assert_snapshot_consistent,
    log_totals,
    sent_totals,
)
from tests.support.servers import LiveServer, free_port, server_env, sigkill_postmaster
from usage_api.analytics.totals import metrics_of
from usage_api.config import Settings
from usage_api.db import create_engine
from usage_api.embedded import EmbeddedPostgres

UNAVAILABLE = {"success": False, "error": "service temporarily unavailable"}
# A client gives up after this long: an answer that needs it is a hang.
CLIENT_TIMEOUT_S = 10.0
# "Quick": every answer, 200 or 503, database up or down, comes within this.
MAX_ANSWER_S = 3.0
# Generous: in practice a request sent once the database accepts connections again gets a
# 200, within that request's own latency (0.1-0.25 s on a busy 2-CPU machine).
MAX_RECOVERY_S = 10.0


# --- a database of its own -------------------------------------------------------------


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


class Servers:
    """The service as a child process on the scenario's database: one
    shared by the tests, started again only when a test has stopped it."""

    def __init__(self, database: Database, directory: Path) -> None:
        self.database = database
        self.directory = directory
        self.started = 0
        self.server: LiveServer | None = None

    async def running(self) -> LiveServer:
        process = self.server.process if self.server is not None else None
        if self.server is None or process is None or process.returncode is not None:
            self.started += 1
            log_path = self.directory / f"server{self.started}.log"
            self.server = LiveServer(server_env(self.database.url), log_path)
            await self.server.start()
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(signal.SIGKILL)


async def tenants(engine: AsyncEngine) -> tuple[list[str], dict[str, list[str]], list[Key]]:
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


async def ride_out_restarts(database: Database, server: LiveServer, load: Load) -> Run:
    """Writers, readers and probes on `server` while `database` restarts `load.restarts` times."""
    run = Run(load)
    async with connected(database.url) as engine:
        organizations, users, targets = await tenants(engine)
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
