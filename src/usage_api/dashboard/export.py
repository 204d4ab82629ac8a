"""CSV downloads of what a view shows, in the API's CSV columns (contract 2.7)."""

from __future__ import annotations

from usage_api.analytics.answers import csv_body
from usage_api.dashboard.figures import Bucket, Row


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


def series_csv(buckets: list[Bucket]) -> str:
    return csv_body(
        ("start", "end"),
        (
            [bucket.start.isoformat(), bucket.end.isoformat(), *_flat(bucket.values)]
            for bucket in buckets
        ),
    ).decode()


def table_csv(member_kind: str, rows: list[Row]) -> str:
    if member_kind == "organization":
        return csv_body(
            ("organization_id", "organization_name"),
            ([row.member.id, row.member.name, *_flat(row.values)] for row in rows),
        ).decode()
    return csv_body(
        ("user_id", "user_name", "user_email"),
        ([row.member.id, row.member.name, row.member.email, *_flat(row.values)] for row in rows),
    ).decode()
