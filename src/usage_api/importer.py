"""`usage-api import`: past usage from NDJSON or CSV, through ingestion's own code.

Every event goes through `ingest.parse_events` (the API's validation), the API's target
check and `ingest.ingest` in `transact`, as an admin: the operator running the command.
So a re-run records nothing twice, and an id stored with other content is a conflict.

The file is read once, a chunk at a time (bounded memory), and the whole import is ONE
transaction: each chunk is validated (its organizations and users included) and recorded
in it, and it commits after the last line. A bad line therefore rolls back everything
before it: nothing is half-written. While PostgreSQL records a chunk, a thread reads and
validates the next one, so that Python's work and the database's overlap. Standard input
is copied to a temporary file first, so that the progress can show a share and an ETA.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from sqlalchemy.ext.asyncio import AsyncConnection

from usage_api.auth import Principal
from usage_api.db import PrimaryEngine, run_autocommit, transact
from usage_api.errors import ApiError
from usage_api.ingest import MAX_EVENTS, IngestResult, ingest, parse_events
from usage_api.migrations import check_current
from usage_api.schemas import UsageEventIn

Format = Literal["ndjson", "csv"]

# Events per statement: large enough that a round trip is a small share of the work, small
# enough to keep memory modest (at most two chunks are in memory: one being recorded, the
# next being validated).
CHUNK = 5000
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
    # Bytes of the file read when the chunk was complete: the progress's share.
    position: int = 0


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


def _validated(items: list[tuple[int, Any]], position: int) -> _Chunk:
    """A chunk through `parse_events`, a batch of at most MAX_EVENTS at a time."""
    chunk = _Chunk(position=position)
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


def _refused(chunk: _Chunk, details: list[dict[str, Any]]) -> None:
    """Move the events that `details` (a 400's, by index into the events) name to the
    problems."""
    bad = {detail["index"]: detail for detail in details}
    for index, detail in bad.items():
        event = chunk.events[index]
        chunk.problems.append(
            Problem(chunk.lines[index], event.id, detail["field"], detail["error"])
        )
    kept = [i for i in range(len(chunk.events)) if i not in bad]
    chunk.events = [chunk.events[i] for i in kept]
    chunk.lines = [chunk.lines[i] for i in kept]


class _Progress:
    """Events done, events/s, the share of the file read and the ETA, on stderr."""

    def __init__(self, stream: TextIO, label: str, size: int) -> None:
        self.stream = stream
        self.label = label
        self.size = size
        self.terminal = stream.isatty()
        self.started = self.shown = time.monotonic()

    def update(self, done: int, position: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.shown < (_TERMINAL_EVERY if self.terminal else _PLAIN_EVERY):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        text = f"{self.label}: {done:,} events"
        share = min(position / self.size, 1.0) if self.size else 1.0
        text += f" ({100 * share:.0f} %), {rate:,.0f} events/s"
        if 0 < share < 1 and not final:
            text += f", ETA {elapsed * (1 - share) / share:,.0f} s"
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
    """The file, or standard input spooled to a temporary file (so that its size is known)."""

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

    def size(self) -> int:
        return self.path.stat().st_size

    def chunks(self, format: Format) -> Generator[_Chunk]:
        """The file's lines, CHUNK at a time, validated (not yet against the database)."""
        with self.path.open("rb") as raw:
            stream = io.TextIOWrapper(
                raw, encoding="utf-8", newline="" if format == "csv" else None
            )
            items = _csv_items(stream) if format == "csv" else _ndjson_items(stream)
            chunk: list[tuple[int, Any]] = []
            try:
                for item in items:
                    chunk.append(item)
                    if len(chunk) == CHUNK:
                        yield _validated(chunk, raw.tell())
                        chunk = []
            except UnicodeDecodeError as exc:
                raise ImportFailed(f"the file is not UTF-8 text: {exc}") from None
            if chunk:
                yield _validated(chunk, raw.tell())

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

    Raises ImportFailed at the first bad line unless `skip_invalid`; then nothing is
    recorded."""
    started = time.monotonic()
    # Resolved now, not as defaults: a test runner swaps the standard streams per command.
    stderr = stderr if stderr is not None else sys.stderr
    kind = format_of(source, format)
    origin = _Source(source, stdin if stdin is not None else sys.stdin)
    try:
        await run_autocommit(engine, check_current)
        summary = await transact(engine, _import_all, origin, kind, skip_invalid, report, stderr)
    finally:
        origin.close()
    summary.elapsed = max(time.monotonic() - started, 1e-9)
    return summary


async def _import_all(
    conn: AsyncConnection,
    origin: _Source,
    kind: Format,
    skip_invalid: bool,
    report_path: Path | None,
    stderr: TextIO,
) -> Summary:
    """The whole file in the caller's transaction, a chunk a statement.

    Chunks are read and validated in a thread, one ahead of the one being recorded: while
    this task waits on PostgreSQL, the thread has the interpreter. (Everything here starts
    afresh, the report included, if `transact` retries after a deadlock.)"""
    summary = Summary()
    progress = _Progress(stderr, "importing", origin.size())
    report = _Report(report_path)
    chunks = origin.chunks(kind)
    done = position = 0

    def following() -> _Chunk | None:
        return next(chunks, None)

    ahead = asyncio.ensure_future(asyncio.to_thread(following))
    try:
        while (chunk := await ahead) is not None:
            ahead = asyncio.ensure_future(asyncio.to_thread(following))
            result = await _record(conn, chunk, skip_invalid)
            for problem in chunk.problems:
                report.write(problem)
            summary.skipped += len({problem.line for problem in chunk.problems})
            summary.accepted += result.accepted
            summary.duplicates += result.duplicates
            summary.conflicts += len(result.conflicts)
            for event_id in result.conflicts:
                stderr.write(f"conflict: {event_id} is recorded with other content\n")
            done += len(chunk.events)
            position = chunk.position
            progress.update(done, position)
    finally:
        # The thread cannot be interrupted: let it finish its chunk before the file closes.
        with contextlib.suppress(Exception):
            await ahead
        chunks.close()
        report.close()
    progress.update(done, position, final=True)
    return summary


async def _record(conn: AsyncConnection, chunk: _Chunk, skipping: bool) -> IngestResult:
    """Record a validated chunk in the import's transaction: what was applied.

    `ingest` checks every event's organization and user and writes nothing unless all are
    found; the events it names join the problems and the rest are recorded. Unless
    `skipping`, the first problem (in line order, whatever made its line bad) stops the
    import: what this chunk or an earlier one wrote is then rolled back with the rest."""
    result = IngestResult()
    while chunk.events:
        try:
            result = await ingest(conn, OPERATOR, chunk.events)
            break
        except ApiError as exc:
            if not exc.details:
                raise ImportFailed(f"the database refused a chunk: {exc.message}") from None
            _refused(chunk, exc.details)
    chunk.problems.sort(key=lambda problem: problem.line)
    if chunk.problems and not skipping:
        raise _stop(chunk.problems[0])
    return result
