"""CSV downloads of what a view shows, in the API's CSV columns (contract 2.7)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence

from usage_api.dashboard.figures import Bucket, Row

METRIC_HEADER = (
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


def _flat(values: tuple[int, ...]) -> list[int]:
    sms_out, sms_in, mms_out, mms_in, voice, voice_kb = values
    return [
        sms_out,
        sms_in,
        sms_out + sms_in,
        mms_out,
        mms_in,
        mms_out + mms_in,
        voice,
        voice_kb,
        voice + voice_kb,
    ]


def _csv(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def series_csv(buckets: list[Bucket]) -> str:
    return _csv(
        ("start", "end", *METRIC_HEADER),
        (
            [bucket.start.isoformat(), bucket.end.isoformat(), *_flat(bucket.values)]
            for bucket in buckets
        ),
    )


def table_csv(member_kind: str, rows: list[Row]) -> str:
    if member_kind == "organization":
        return _csv(
            ("organization_id", "organization_name", *METRIC_HEADER),
            ([row.member.id, row.member.name, *_flat(row.values)] for row in rows),
        )
    return _csv(
        ("user_id", "user_name", "user_email", *METRIC_HEADER),
        (
            [row.member.id or "", row.member.name or "", row.member.email or "", *_flat(row.values)]
            for row in rows
        ),
    )
