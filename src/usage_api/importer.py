"""`usage-api import`: past usage from NDJSON or CSV, through ingestion's own code.

Every event goes through `ingest.parse_events` (the API's validation), the API's target
check and `ingest.ingest` in `transact`, as an admin: the operator running the command.
So a re-run records nothing twice, and an id stored with other content is a conflict.

The file is read twice, a chunk at a time (bounded memory): the first pass validates every
line, the events' organizations and users included, and writes nothing; the second records
the events, a transaction per chunk. A bad line therefore stops the import before anything
is written. Standard input is copied to a temporary file first, so that it can be read twice.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import Principal
from usage_api.db import PrimaryEngine, run_autocommit, transact
from usage_api.errors import ApiError
from usage_api.ingest import MAX_EVENTS, IngestResult, _check_targets, ingest, parse_events
from usage_api.migrations import check_current
from usage_api.schemas import UsageEventIn

Format = Literal["ndjson", "csv"]

# Events per transaction of the second pass: large enough that a round trip and a commit
# are a small share of the work, small enough to keep memory and lock time modest.
CHUNK = 5000
# Chunks written at once: measured on 2 cores, 4 kept PostgreSQL busy (bench/NOTES.md).
WRITERS = 4
OPERATOR = Principal("cli-import", "admin", None, None, can_write=True)
CSV_COLUMNS = tuple(UsageEventIn.model_fields)
_INTEGER_COLUMNS = ("segments", "seconds")
# How often the progress shows: redrawn on a terminal, a plain line otherwise.
_TERMINAL_EVERY = 0.2
_PLAIN_EVERY = 5.0


class ImportFailed(Exception):
    """The import cannot go on; the message says why (and at which line)."""


@dataclass(frozen=True)
class Problem:
    """What is wrong with one line of the file."""

    line: int
    id: str | None
    field: str
    error: str


@dataclass
class Summary:
    accepted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    skipped: int = 0
    elapsed: float = 0.0

    def line(self) -> str:
        rate = (self.accepted + self.duplicates + self.conflicts) / self.elapsed
        return (
            f"imported: {self.accepted} accepted, {self.duplicates} duplicates,"
            f" {self.conflicts} conflicts, {self.skipped} skipped"
            f" in {self.elapsed:.1f} s ({rate:,.0f} events/s)"
        )


@dataclass
class _Chunk:
    """Up to CHUNK lines of the file: the valid events with their line numbers, and the
    problems of the others."""

    events: list[UsageEventIn] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def format_of(source: str, given: str | None) -> Format:
    if given == "ndjson":
        return "ndjson"
    if given == "csv":
        return "csv"
    if given is not None:
        raise ImportFailed(f"--format must be ndjson or csv, not {given}")
    return "csv" if source.lower().endswith(".csv") else "ndjson"


def _ndjson_items(stream: TextIO) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON or a Problem) of each non-blank line."""
    for number, text in enumerate(stream, start=1):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except ValueError as exc:
            yield number, Problem(number, None, "line", f"is not valid JSON: {exc}")


def _csv_value(column: str, cell: str) -> Any:
    """A cell as the JSON value it stands for: numbers and booleans are typed; anything
    else stays text, for validation to refuse with the API's message."""
    if column in _INTEGER_COLUMNS and cell.lstrip("-").isdigit():
        return int(cell)
    if column == "knowledge_base" and cell.lower() in ("true", "false"):
        return cell.lower() == "true"
    return cell


def _csv_items(stream: TextIO) -> Iterator[tuple[int, Any]]:
    """(line number, event object) of each row; an empty cell leaves its field out."""
    reader = csv.reader(stream)
    header = next(reader, None)
    if header is None:
        return
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if unknown or len(set(header)) != len(header):
        raise ImportFailed(
            f"line 1: the header must name distinct columns among {', '.join(CSV_COLUMNS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    start = reader.line_num + 1
    for row in reader:
        number, start = start, reader.line_num + 1
        if not any(row):
            continue
        if len(row) != len(header):
            yield number, Problem(number, None, "line", f"has {len(row)} cells, not {len(header)}")
            continue
        yield (
            number,
            {name: _csv_value(name, cell) for name, cell in zip(header, row, strict=True) if cell},
        )


def _validated(items: list[tuple[int, Any]]) -> _Chunk:
    """A chunk through `parse_events`, a batch of at most MAX_EVENTS at a time."""
    chunk = _Chunk()
    for start in range(0, len(items), MAX_EVENTS):
        batch = items[start : start + MAX_EVENTS]
        good = [(n, raw) for n, raw in batch if not isinstance(raw, Problem)]
        chunk.problems.extend(raw for _, raw in batch if isinstance(raw, Problem))
        try:
            events = parse_events([raw for _, raw in good]) if good else []
        except ApiError as exc:
            bad = set()
            for detail in exc.details or []:
                number, raw = good[detail["index"]]
                bad.add(detail["index"])
                chunk.problems.append(_problem(number, raw, detail))
            good = [item for index, item in enumerate(good) if index not in bad]
            # The rest were valid in this batch and stay so on their own.
            events = parse_events([raw for _, raw in good]) if good else []
        chunk.events.extend(events)
        chunk.lines.extend(number for number, _ in good)
    return chunk


def _problem(number: int, raw: Any, detail: dict[str, Any]) -> Problem:
    event_id = raw.get("id") if isinstance(raw, dict) else None
    return Problem(
        number, event_id if isinstance(event_id, str) else None, detail["field"], detail["error"]
    )


async def _without_unknown_targets(conn: AsyncConnection, chunk: _Chunk) -> None:
    """Move the events whose organization or user does not exist to the problems."""
    if not chunk.events:
        return
    try:
        await _check_targets(conn, OPERATOR, chunk.events)
    except ApiError as exc:
        bad = {detail["index"]: detail for detail in exc.details or []}
        for index, detail in bad.items():
            event = chunk.events[index]
            chunk.problems.append(
                Problem(chunk.lines[index], event.id, detail["field"], detail["error"])
            )
        kept = [i for i in range(len(chunk.events)) if i not in bad]
        chunk.events = [chunk.events[i] for i in kept]
        chunk.lines = [chunk.lines[i] for i in kept]
    chunk.problems.sort(key=lambda problem: problem.line)


class _Progress:
    """Events done, events/s and, once the total is known, the ETA, on stderr."""

    def __init__(self, stream: TextIO, label: str, total: int | None) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.terminal = stream.isatty()
        self.started = self.shown = time.monotonic()

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.shown < (_TERMINAL_EVERY if self.terminal else _PLAIN_EVERY):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        text = f"{self.label}: {done:,}"
        if self.total:
            text += f" / {self.total:,} events ({100 * done / self.total:.0f} %)"
        else:
            text += " events"
        text += f", {rate:,.0f} events/s"
        if self.total and rate > 0 and not final:
            text += f", ETA {(self.total - done) / rate:,.0f} s"
        if self.terminal:
            self.stream.write(f"\r\x1b[K{text}" + ("\n" if final else ""))
        elif final or done:
            self.stream.write(text + "\n")
        self.stream.flush()


class _Report:
    """What `--skip-invalid` skipped: NDJSON, or CSV for a `.csv` path."""

    def __init__(self, path: Path | None) -> None:
        self.file = path.open("w", newline="", encoding="utf-8") if path else None
        self.csv = csv.writer(self.file) if self.file and path and path.suffix == ".csv" else None
        if self.csv:
            self.csv.writerow(["line", "id", "field", "error"])

    def write(self, problem: Problem) -> None:
        if self.csv:
            self.csv.writerow([problem.line, problem.id or "", problem.field, problem.error])
        elif self.file:
            record = {"line": problem.line, "id": problem.id}
            record |= {"field": problem.field, "error": problem.error}
            self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.file:
            self.file.close()


class _Source:
    """The file, or standard input spooled to a temporary file: it is read twice."""

    def __init__(self, source: str, stdin: TextIO) -> None:
        self.temporary: Path | None = None
        if source == "-":
            with tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", prefix="usage-api-import-", delete=False
            ) as copy:
                shutil.copyfileobj(stdin, copy)
            self.path = self.temporary = Path(copy.name)
        else:
            self.path = Path(source)
            if not self.path.is_file():
                raise ImportFailed(f"no such file: {source}")

    def chunks(self, format: Format) -> Iterator[list[tuple[int, Any]]]:
        with self.path.open(encoding="utf-8", newline="" if format == "csv" else None) as stream:
            items = _csv_items(stream) if format == "csv" else _ndjson_items(stream)
            chunk: list[tuple[int, Any]] = []
            try:
                for item in items:
                    chunk.append(item)
                    if len(chunk) == CHUNK:
                        yield chunk
                        chunk = []
            except UnicodeDecodeError as exc:
                raise ImportFailed(f"the file is not UTF-8 text: {exc}") from None
            if chunk:
                yield chunk

    def close(self) -> None:
        if self.temporary is not None:
            self.temporary.unlink(missing_ok=True)


def _stop(problem: Problem) -> ImportFailed:
    which = f" (event {problem.id})" if problem.id else ""
    return ImportFailed(
        f"line {problem.line}{which}: {problem.field} {problem.error}; nothing was imported"
        " (--skip-invalid imports the valid lines and reports the others)"
    )


async def run_import(
    engine: PrimaryEngine,
    source: str,
    *,
    format: str | None = None,
    skip_invalid: bool = False,
    report: Path | None = None,
    stderr: TextIO | None = None,
    stdin: TextIO | None = None,
) -> Summary:
    """Import `source` (a path, or `-` for standard input); the summary of what happened.

    Raises ImportFailed at the first bad line unless `skip_invalid`."""
    started = time.monotonic()
    # Resolved now, not as defaults: a test runner swaps the standard streams per command.
    stderr = stderr if stderr is not None else sys.stderr
    kind = format_of(source, format)
    origin = _Source(source, stdin if stdin is not None else sys.stdin)
    summary = Summary()
    try:
        await run_autocommit(engine, check_current)
        total = await run_autocommit(
            engine, _check_all, origin, kind, skip_invalid, _Report(report), stderr
        )
        summary.skipped = total[1]
        progress = _Progress(stderr, "importing", total[0])
        await _write_all(engine, origin, kind, summary, progress, stderr)
    finally:
        origin.close()
    summary.elapsed = max(time.monotonic() - started, 1e-9)
    return summary


async def _record(conn: AsyncConnection, chunk: _Chunk, skipping: bool) -> IngestResult:
    """Record a chunk; with lines skipped, first leave out again the events whose
    organization or user the first pass did not find (already in the report)."""
    if skipping:
        await _without_unknown_targets(conn, chunk)
    return await ingest(conn, OPERATOR, chunk.events) if chunk.events else IngestResult()


async def _write_all(
    engine: PrimaryEngine,
    origin: _Source,
    kind: Format,
    summary: Summary,
    progress: _Progress,
    stderr: TextIO,
) -> None:
    """The second pass: each chunk in a transaction of its own, WRITERS of them at once.

    The time of a chunk is mostly PostgreSQL's, so one writer would leave a core idle; the
    API's batches are written concurrently as well, and ingestion is built for it (writers
    only insert, in key order). At most WRITERS + 1 chunks are in memory."""
    slots = asyncio.Semaphore(WRITERS)
    done = 0

    async def write(chunk: _Chunk) -> None:
        nonlocal done
        try:
            # Lines the first pass found bad are bad again (validation only gets more
            # lenient with time); a target deleted since is refused here by `ingest`.
            result = await transact(engine, _record, chunk, summary.skipped > 0)
        except ApiError as exc:
            raise ImportFailed(
                f"a chunk was refused after the check ({exc.message}): the chunks recorded"
                f" before it stay ({done} events); a re-run records nothing twice"
            ) from None
        finally:
            slots.release()
        summary.accepted += result.accepted
        summary.duplicates += result.duplicates
        summary.conflicts += len(result.conflicts)
        for event_id in result.conflicts:
            stderr.write(f"conflict: {event_id} is recorded with other content\n")
        done += len(chunk.events)
        progress.update(done)

    try:
        async with asyncio.TaskGroup() as group:
            for items in origin.chunks(kind):
                chunk = _validated(items)
                if chunk.events:
                    await slots.acquire()
                    group.create_task(write(chunk))
    except ExceptionGroup as failed:
        # The first writer's failure, as a single writer would have raised it (a refused
        # chunk, an unreachable database): the others were cancelled because of it.
        raise failed.exceptions[0] from None
    progress.update(done, final=True)


async def _check_all(
    conn: AsyncConnection,
    origin: _Source,
    kind: Format,
    skip_invalid: bool,
    report: _Report,
    stderr: TextIO,
) -> tuple[int, int]:
    """The first pass: (valid events, skipped lines); writes nothing to the database."""
    progress = _Progress(stderr, "checking", None)
    valid = skipped = 0
    try:
        for items in origin.chunks(kind):
            chunk = _validated(items)
            await _without_unknown_targets(conn, chunk)
            if chunk.problems and not skip_invalid:
                raise _stop(chunk.problems[0])
            for problem in chunk.problems:
                report.write(problem)
            skipped += len({problem.line for problem in chunk.problems})
            valid += len(chunk.events)
            progress.update(valid + skipped)
    finally:
        report.close()
    return valid, skipped
