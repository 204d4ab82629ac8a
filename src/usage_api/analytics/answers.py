"""How an analytics answer goes out: JSON or CSV, with a strong ETag and 304 (contract 2.7)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.responses import Response

CSV_METRICS = (
    "sms_outbound",
    "sms_inbound",
    "sms_total",
    "mms_outbound",
    "mms_inbound",
    "mms_total",
    "voice_seconds",
    "voice_kb_seconds",
    "voice_total_seconds",
)


# OpenAPI: a series (or a breakdown) also answers CSV; every 200 may be a 304.
CSV_CONTENT: dict[str, Any] = {
    "content": {
        "text/csv": {
            "schema": {"type": "string"},
            "example": "start,end,sms_outbound,...\r\n2026-03-01T00:00:00+01:00,...\r\n",
        }
    },
}
NOT_MODIFIED: dict[str, Any] = {
    "description": "The client's copy (`If-None-Match`) is current: no body.",
}
_UNSAFE_IN_FILE_NAME = re.compile(r"[^A-Za-z0-9._-]")


def file_name(*parts: str | None) -> str:
    """A download's name from ids (visible ASCII, so `"` or `\\` could occur): safe to quote."""
    return "-".join(_UNSAFE_IN_FILE_NAME.sub("_", part) for part in parts if part) + ".csv"


def wants_csv(request: Request) -> bool:
    """`format=csv`, or `text/csv` among the media types `Accept` lists (not at q=0)."""
    if request.query_params.get("format") == "csv":
        return True
    for item in request.headers.get("accept", "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        refused = any(_is_q_zero(p) for p in params)
        if media.lower() == "text/csv" and not refused:
            return True
    return False


def _is_q_zero(param: str) -> bool:
    name, _, value = param.replace(" ", "").partition("=")
    try:
        return name.lower() == "q" and float(value) == 0
    except ValueError:
        return False


def metric_cells(usage: Mapping[str, Any]) -> list[int]:
    sms, mms, voice = usage["sms"], usage["mms"], usage["voice"]
    return [
        sms["outbound"],
        sms["inbound"],
        sms["total"],
        mms["outbound"],
        mms["inbound"],
        mms["total"],
        voice["seconds"],
        voice["kb_seconds"],
        voice["total_seconds"],
    ]


def csv_body(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """RFC 4180: CRLF line ends, a header row first, fields quoted where they must be."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([*head, *CSV_METRICS])
    for row in rows:
        writer.writerow(["" if cell is None else cell for cell in row])
    return out.getvalue().encode()


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:40] + '"'


def _matches(if_none_match: str, etag: str) -> bool:
    # If-None-Match compares weakly (RFC 9110 13.1.2): W/"x" matches "x".
    candidates = (tag.strip().removeprefix("W/") for tag in if_none_match.split(","))
    return any(tag in ("*", etag) for tag in candidates)


def conditional(request: Request, response: Response) -> Response:
    """The response with its ETag, or a 304 without a body when the client has it."""
    etag = _etag(bytes(response.body))
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    response.raw_headers.append((b"etag", etag.encode()))
    return response


def json_answer(request: Request, content: Any) -> Response:
    return conditional(request, JSONResponse(content))


def _json(value: Any) -> str:
    # As JSONResponse renders.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# A bucket's labels are ISO 8601 (digits, "-", ":", "T", "+"), nothing to escape.
_BUCKET = (
    '{{"start":"{}","end":"{}","sms":{{"outbound":{},"inbound":{},"total":{}}},'
    '"mms":{{"outbound":{},"inbound":{},"total":{}}},'
    '"voice":{{"seconds":{},"kb_seconds":{},"total_seconds":{}}}}}'
).format


def series_answer(request: Request, usage: dict[str, Any], powered_by: str) -> Response:
    """`json_answer` of a series, byte for byte, with the buckets (up to 1000 objects of
    three objects each) written by one format string each, straight from the series'
    columns: json.dumps took most of the Python time of a 743-bucket answer."""
    head = {name: value for name, value in usage.items() if name != "buckets"}
    labels = usage["buckets"].labels
    buckets = ",".join(
        [
            _BUCKET(start, end, so, si, so + si, mo, mi, mo + mi, v, kb, v + kb)
            for start, end, so, si, mo, mi, v, kb in zip(
                labels[:-1], labels[1:], *usage["buckets"].columns, strict=True
            )
        ]
    )
    body = (
        f'{{"success":true,"usage":{_json(head)[:-1]},"buckets":[{buckets}]}},'
        f'"powered_by":{_json(powered_by)}}}'
    )
    return conditional(request, Response(body.encode(), media_type="application/json"))


def series_csv_rows(usage: dict[str, Any]) -> Iterator[list[Any]]:
    """A series' CSV rows: start, end and the nine metric cells of each bucket."""
    for start, end, (so, si, mo, mi, v, kb) in usage["buckets"]:
        yield [start, end, so, si, so + si, mo, mi, mo + mi, v, kb, v + kb]


def csv_answer(request: Request, filename: str, body: bytes) -> Response:
    response = Response(
        body,
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
    return conditional(request, response)
