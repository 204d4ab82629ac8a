"""`usage-api import`: past usage from NDJSON or CSV, run through the real command line on
the test database, with what was recorded read back through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner, Result

from tests.support.factories import event, make_key, make_organization, make_user
from usage_api import importer
from usage_api.cli import app
from usage_api.config import get_settings

SUMMARY = re.compile(
    r"imported: (\d+) accepted, (\d+) duplicates, (\d+) conflicts, (\d+) skipped"
    r" in [0-9.]+ s \([0-9,]+ events/s\)\n$"
)


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    async def __call__(self, *args: str, input: str | None = None) -> Result:
        return await asyncio.to_thread(lambda: self.runner.invoke(app, list(args), input=input))


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    monkeypatch.setenv("DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield Cli()
    get_settings.cache_clear()


def summary_of(result: Result) -> tuple[int, int, int, int]:
    """(accepted, duplicates, conflicts, skipped) of the summary, the last line of stderr."""
    assert result.exit_code == 0, result.output
    match = SUMMARY.search(result.stderr)
    assert match is not None, result.stderr
    accepted, duplicates, conflicts, skipped = (int(group) for group in match.groups())
    return accepted, duplicates, conflicts, skipped


async def usage(client: httpx.AsyncClient, key: str, organization_id: str) -> dict[str, Any]:
    response = await client.get(
        "/v1/analytics/usage",
        params={"organization_id": organization_id},
        headers={"X-API-Key": key},
    )
    assert response.status_code == 200, response.text
    body = response.json()["usage"]
    return {kind: body[kind] for kind in ("sms", "mms", "voice")}


def metrics(sms: tuple[int, int], mms: tuple[int, int], voice: tuple[int, int]) -> dict[str, Any]:
    return {
        "sms": {"outbound": sms[0], "inbound": sms[1], "total": sum(sms)},
        "mms": {"outbound": mms[0], "inbound": mms[1], "total": sum(mms)},
        "voice": {"seconds": voice[0], "kb_seconds": voice[1], "total_seconds": sum(voice)},
    }


NOTHING = metrics((0, 0), (0, 0), (0, 0))


class World:
    def __init__(self, organization_id: str, user_id: str, key: str) -> None:
        self.organization_id = organization_id
        self.user_id = user_id
        self.key = key

    def events(self) -> list[dict[str, Any]]:
        """Three events: 2 outbound sms segments (with a user), 1 inbound mms, 60 s of
        voice with knowledge base, 30 s without."""
        org = self.organization_id
        return [
            event(org, "e1", quantity=2, user_id=self.user_id),
            event(org, "e2", type="mms", direction="inbound"),
            event(org, "e3", type="voice", quantity=60, knowledge_base=True),
            event(org, "e4", type="voice", direction="inbound", quantity=30),
        ]


EXPECTED = metrics((2, 0), (0, 1), (30, 60))


@pytest.fixture
async def world(engine: AsyncEngine) -> World:
    organization_id = await make_organization(engine, "Acme Corp")
    user_id = await make_user(engine, organization_id, "John Smith", "john@example.com")
    return World(organization_id, user_id, await make_key(engine))


def ndjson(events: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(e) + "\n" for e in events)


def write(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return str(path)


async def stored_events(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(text("SELECT count(*) FROM usage_events")) or 0)


async def test_ndjson_is_imported_and_counted(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    path = write(tmp_path, "events.ndjson", ndjson(world.events()))
    result = await cli("import", path)
    assert result.stdout == ""
    assert summary_of(result) == (4, 0, 0, 0)
    assert await usage(client, world.key, world.organization_id) == EXPECTED


async def test_csv_with_the_same_columns_is_imported_and_empty_cells_are_left_out(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    org, user = world.organization_id, world.user_id
    content = (
        "id,organization_id,user_id,type,direction,segments,seconds,knowledge_base,occurred_at\n"
        f"e1,{org},{user},sms,outbound,2,,,2026-02-10T12:00:00Z\n"
        f"e2,{org},,mms,inbound,1,,,2026-02-10T12:00:00Z\n"
        f"e3,{org},,voice,outbound,,60,true,2026-02-10T12:00:00Z\n"
        f"e4,{org},,voice,inbound,,30,,2026-02-10T12:00:00Z\n"
    )
    result = await cli("import", write(tmp_path, "events.csv", content))
    assert summary_of(result) == (4, 0, 0, 0)
    assert await usage(client, world.key, world.organization_id) == EXPECTED


async def test_a_rerun_imports_nothing_twice(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    path = write(tmp_path, "events.ndjson", ndjson(world.events()))
    assert summary_of(await cli("import", path)) == (4, 0, 0, 0)
    assert summary_of(await cli("import", path)) == (0, 4, 0, 0)
    assert await usage(client, world.key, world.organization_id) == EXPECTED


async def test_an_id_recorded_with_other_content_is_a_listed_conflict(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    assert summary_of(await cli("import", write(tmp_path, "a.ndjson", ndjson(world.events()))))
    changed = world.events()
    changed[1]["segments"] = 5
    changed.append(event(world.organization_id, "e5", quantity=7))
    result = await cli("import", write(tmp_path, "b.ndjson", ndjson(changed)))
    assert summary_of(result) == (1, 3, 1, 0)
    assert "conflict: e2 is recorded with other content\n" in result.stderr
    assert await usage(client, world.key, world.organization_id) == metrics(
        (9, 0), (0, 1), (30, 60)
    )


async def test_a_bad_line_stops_the_import_with_its_number_and_writes_nothing(
    cli: Cli, client: httpx.AsyncClient, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    events = world.events()
    del events[2]["seconds"]
    # A blank line still counts: the number is the file's own line number.
    content = ndjson(events[:1]) + "\n" + ndjson(events[1:])
    result = await cli("import", write(tmp_path, "events.ndjson", content))
    assert result.exit_code == 1
    assert result.stderr == (
        "line 4 (event e3): seconds is required for voice events; nothing was imported"
        " (--skip-invalid imports the valid lines and reports the others)\n"
    )
    assert await stored_events(engine) == 0
    assert await usage(client, world.key, world.organization_id) == NOTHING


async def test_skip_invalid_goes_on_and_reports_what_it_skipped(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    events = world.events()
    events[0]["segments"] = 0
    content = ndjson(events[:2]) + "not json\n" + ndjson(events[2:])
    report = tmp_path / "skipped.ndjson"
    result = await cli(
        "import",
        write(tmp_path, "events.ndjson", content),
        "--skip-invalid",
        "--report",
        str(report),
    )
    assert summary_of(result) == (3, 0, 0, 2)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert lines == [
        {
            "line": 1,
            "id": "e1",
            "field": "segments",
            "error": "Input should be greater than or equal to 1",
        },
        {
            "line": 3,
            "id": None,
            "field": "line",
            "error": "is not valid JSON: Expecting value: line 1 column 1 (char 0)",
        },
    ]
    assert await usage(client, world.key, world.organization_id) == metrics(
        (0, 0), (0, 1), (30, 60)
    )


@pytest.mark.parametrize(
    "chunk",
    [
        pytest.param(importer.CHUNK, id="one-chunk"),
        # Two events a statement: the bad line comes after chunks already recorded, which
        # must be rolled back with it.
        pytest.param(2, id="after-recorded-chunks"),
    ],
)
async def test_an_unknown_organization_is_refused_and_nothing_is_imported(
    cli: Cli,
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    world: World,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
) -> None:
    monkeypatch.setattr(importer, "CHUNK", chunk)
    events = [*world.events(), event("no-such-org", "e9")]
    result = await cli("import", write(tmp_path, "events.ndjson", ndjson(events)))
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "line 5 (event e9): organization_id organization not found; nothing was imported"
    )
    assert await stored_events(engine) == 0
    assert await usage(client, world.key, world.organization_id) == NOTHING


async def test_a_user_of_another_organization_is_refused(
    cli: Cli, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    other = await make_organization(engine, "Other")
    events = [event(other, "e1", user_id=world.user_id)]
    result = await cli("import", write(tmp_path, "events.ndjson", ndjson(events)))
    assert result.exit_code == 1
    assert result.stderr.startswith("line 1 (event e1): user_id user not found;")
    assert await stored_events(engine) == 0


async def test_standard_input_is_read_with_a_dash(
    cli: Cli, client: httpx.AsyncClient, world: World
) -> None:
    result = await cli("import", "-", input=ndjson(world.events()))
    assert summary_of(result) == (4, 0, 0, 0)
    assert await usage(client, world.key, world.organization_id) == EXPECTED


async def test_csv_from_standard_input_needs_the_format(
    cli: Cli, client: httpx.AsyncClient, world: World
) -> None:
    org = world.organization_id
    content = (
        "id,organization_id,type,direction,segments,occurred_at\n"
        f"e1,{org},sms,outbound,3,2026-02-10T12:00:00Z\n"
    )
    result = await cli("import", "-", "--format", "csv", input=content)
    assert summary_of(result) == (1, 0, 0, 0)
    assert await usage(client, world.key, world.organization_id) == metrics((3, 0), (0, 0), (0, 0))


async def test_a_csv_header_with_an_unknown_column_is_refused(
    cli: Cli, engine: AsyncEngine, tmp_path: Path
) -> None:
    result = await cli("import", write(tmp_path, "e.csv", "id,colour\nx,red\n"))
    assert result.exit_code == 1
    assert "line 1: the header must name distinct columns" in result.stderr
    assert "unknown: colour" in result.stderr


async def test_the_report_is_csv_for_a_csv_path_and_an_unknown_user_is_skipped(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    events = world.events()
    events[0]["user_id"] = "no-such-user"
    report = tmp_path / "skipped.csv"
    result = await cli(
        "import",
        write(tmp_path, "events.ndjson", ndjson(events)),
        "--skip-invalid",
        "--report",
        str(report),
    )
    assert summary_of(result) == (3, 0, 0, 1)
    assert report.read_bytes() == b"line,id,field,error\r\n1,e1,user_id,user not found\r\n"
    assert await usage(client, world.key, world.organization_id) == metrics(
        (0, 0), (0, 1), (30, 60)
    )


async def test_a_report_without_skip_invalid_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, "events.ndjson", "")
    result = await cli("import", path, "--report", str(tmp_path / "r.ndjson"))
    assert result.exit_code == 2
    assert "--report goes with --skip-invalid" in result.stderr


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two events a statement, so that a four-event file spans several chunks."""
    monkeypatch.setattr(importer, "CHUNK", 2)


@pytest.mark.usefixtures("small_chunks")
async def test_the_first_bad_line_of_a_chunk_is_named_whatever_made_it_bad(
    cli: Cli, engine: AsyncEngine, world: World, tmp_path: Path
) -> None:
    events = world.events()
    events[2]["user_id"] = "no-such-user"
    del events[3]["seconds"]
    result = await cli("import", write(tmp_path, "events.ndjson", ndjson(events)))
    assert result.exit_code == 1
    assert result.stderr.startswith("line 3 (event e3): user_id user not found;")
    assert await stored_events(engine) == 0


@pytest.mark.usefixtures("small_chunks")
async def test_an_id_repeated_in_a_later_chunk_is_a_duplicate_or_a_conflict(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    events = world.events()
    changed = dict(events[1], segments=5)
    content = ndjson([*events, events[0], changed])
    result = await cli("import", write(tmp_path, "events.ndjson", content))
    assert summary_of(result) == (4, 1, 1, 0)
    assert "conflict: e2 is recorded with other content\n" in result.stderr
    assert await usage(client, world.key, world.organization_id) == EXPECTED


@pytest.mark.usefixtures("small_chunks")
async def test_skip_invalid_over_several_chunks_reports_every_skipped_line(
    cli: Cli, client: httpx.AsyncClient, world: World, tmp_path: Path
) -> None:
    events = world.events()
    events[2]["organization_id"] = "no-such-org"
    content = ndjson(events[:3]) + "[]\n" + ndjson(events[3:])
    report = tmp_path / "skipped.ndjson"
    path = write(tmp_path, "events.ndjson", content)
    result = await cli("import", path, "--skip-invalid", "--report", str(report))
    assert summary_of(result) == (3, 0, 0, 2)
    assert [json.loads(line) for line in report.read_text().splitlines()] == [
        {"line": 3, "id": "e3", "field": "organization_id", "error": "organization not found"},
        {"line": 4, "id": None, "field": "event", "error": "must be an object"},
    ]
    assert await usage(client, world.key, world.organization_id) == metrics((2, 0), (0, 1), (30, 0))
    # A re-run skips the same lines and records nothing twice.
    result = await cli("import", path, "--skip-invalid", "--report", str(report))
    assert summary_of(result) == (0, 3, 0, 2)


async def test_the_progress_ends_with_the_whole_file_read(
    cli: Cli, world: World, tmp_path: Path
) -> None:
    result = await cli("import", write(tmp_path, "events.ndjson", ndjson(world.events())))
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"importing: 4 events \(100 %\), [0-9,]+ events/s", lines[-2])
    assert summary_of(result) == (4, 0, 0, 0)
