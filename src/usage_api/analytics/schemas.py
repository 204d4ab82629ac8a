"""The documented shapes of the analytics answers and parameters (the OpenAPI schema's; the
routes build their JSON by hand, in the contract's key order, and these only describe it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from usage_api.schemas import (
    EXAMPLE_ORGANIZATION_ID,
    EXAMPLE_USER_ID,
    ClosedModel,
    date_json_schema,
    id_json_schema,
)

# The query parameters of `GET /v1/analytics/usage`, which the route reads itself and
# checks in order (key, ids, dates) with the contract's messages: documented here only.
_USAGE_QUERY = (
    (
        "organization_id",
        "The organization whose usage to read.",
        id_json_schema(example=EXAMPLE_ORGANIZATION_ID),
    ),
    (
        "user_id",
        "The user whose usage to read; with `organization_id`, one of its users.",
        id_json_schema(example=EXAMPLE_USER_ID),
    ),
    (
        "partner_id",
        "The partner whose usage to read: its organizations' of now, summed; with"
        " `organization_id`, one of them.",
        id_json_schema(),
    ),
    (
        "start_date",
        "Inclusive start: a date (00:00) or a date-time; without an offset it is read in"
        " `timezone` (default UTC).",
        date_json_schema("2026-02-10T00:00:00Z"),
    ),
    (
        "end_date",
        "Inclusive end, through the unit of its finest field: `2026-03-12` covers the whole"
        " (local) day, `2026-03-12T23:59` the whole minute; with a fraction, that instant.",
        date_json_schema("2026-03-12"),
    ),
    (
        "timezone",
        "IANA time zone in which dates without an offset are read and buckets are cut"
        " (default UTC). A local time in a gap is read as if the clock had not changed yet;"
        " one that occurs twice is the earlier one.",
        {"type": "string", "maxLength": 255, "examples": ["Europe/Berlin"]},
    ),
    (
        "granularity",
        "A series: one bucket per local hour, day, ISO week or calendar month of"
        " `timezone` (needs `start_date`; at most 1000 buckets).",
        {"type": "string", "enum": ["hour", "day", "week", "month"]},
    ),
    (
        "format",
        "`csv`: a series as CSV (as `Accept: text/csv`), one row per bucket.",
        {"type": "string", "enum": ["json", "csv"]},
    ),
)


def usage_parameters() -> dict[str, Any]:
    """`openapi_extra` documenting the usage read's key and optional query parameters."""
    return {
        "security": [{"ApiKey": []}],
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": {**schema, "title": name.replace("_", " ").title()},
                "description": description,
            }
            for name, description, schema in _USAGE_QUERY
        ]
        + [
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "An ETag of an earlier answer: 304 without a body if it is"
                " still current.",
            }
        ],
    }


class Counts(ClosedModel):
    outbound: int = Field(ge=0)
    inbound: int = Field(ge=0)
    total: int = Field(ge=0, description="outbound + inbound")


class VoiceSeconds(ClosedModel):
    seconds: int = Field(ge=0, description="Calls without knowledge-base retrieval.")
    kb_seconds: int = Field(ge=0, description="Calls with knowledge-base retrieval.")
    total_seconds: int = Field(ge=0, description="seconds + kb_seconds")


class Bucket(ClosedModel):
    start: datetime = Field(description="Inclusive, with the zone's offset at that instant.")
    end: datetime = Field(description="Exclusive: the next bucket's start.")
    sms: Counts
    mms: Counts
    voice: VoiceSeconds


_TIMEZONE = "The `timezone` of the request, when it gave one (range answers only)."
_GRANULARITY = "With `granularity`: the series' unit."
_BUCKETS = "With `granularity`: every bucket of the range, in order, zeros included."
Granularity = Literal["hour", "day", "week", "month"]
_START_ECHO = "With `custom`: the start in UTC, null when open."
_END_ECHO = "With `custom`: the last instant covered, in UTC; null when open."
Period = Literal["all_time", "custom"]


class OrganizationUsage(ClosedModel):
    organization_id: str
    organization_name: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)
    timezone: str | None = Field(default=None, description=_TIMEZONE)
    granularity: Granularity | None = Field(default=None, description=_GRANULARITY)
    buckets: list[Bucket] | None = Field(default=None, description=_BUCKETS)


class UserUsage(ClosedModel):
    user_id: str
    user_name: str
    user_email: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)
    timezone: str | None = Field(default=None, description=_TIMEZONE)
    granularity: Granularity | None = Field(default=None, description=_GRANULARITY)
    buckets: list[Bucket] | None = Field(default=None, description=_BUCKETS)


class PartnerUsage(ClosedModel):
    partner_id: str
    partner_name: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)
    timezone: str | None = Field(default=None, description=_TIMEZONE)
    granularity: Granularity | None = Field(default=None, description=_GRANULARITY)
    buckets: list[Bucket] | None = Field(default=None, description=_BUCKETS)


class UsageResponse(ClosedModel):
    success: Literal[True]
    usage: OrganizationUsage | UserUsage | PartnerUsage
    powered_by: str


_BREAKDOWN_QUERY = (
    (
        "partner_id",
        "Rows: the partner's organizations (with `organization_id` too: that organization's"
        " users, if it is the partner's).",
        id_json_schema(),
    ),
    (
        "organization_id",
        "Rows: the organization's users, and its usage without a user when not zero.",
        id_json_schema(example=EXAMPLE_ORGANIZATION_ID),
    ),
    *(entry for entry in _USAGE_QUERY if entry[0] in ("start_date", "end_date", "timezone")),
    (
        "group_by",
        "`organization` (with `partner_id` alone) or `user` (with `organization_id`);"
        " the one that fits by default.",
        {"type": "string", "enum": ["organization", "user"]},
    ),
    (
        "sort",
        "`id` (default), `name` or a metric (`sms.total`, `voice.kb_seconds`, ...);"
        " `-` in front for descending. Ties: id ascending.",
        {"type": "string", "maxLength": 64, "examples": ["-voice.total_seconds"]},
    ),
    (
        "limit",
        "Rows a page, 1 to 1000 (default 100).",
        {"type": "integer", "minimum": 1, "maximum": 1000, "examples": [100]},
    ),
    (
        "cursor",
        "The previous page's `next_cursor`.",
        {"type": "string", "maxLength": 2048},
    ),
    (
        "format",
        "`csv`: the page as CSV (as `Accept: text/csv`), one row per member.",
        {"type": "string", "enum": ["json", "csv"]},
    ),
)


def breakdown_parameters() -> dict[str, Any]:
    """`openapi_extra` documenting the breakdown's key and query parameters."""
    extra = usage_parameters()
    return {
        **extra,
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": False,
                "schema": {**schema, "title": name.replace("_", " ").title()},
                "description": description,
            }
            for name, description, schema in _BREAKDOWN_QUERY
        ]
        + [p for p in extra["parameters"] if p["in"] == "header"],
    }


class UserRow(ClosedModel):
    user_id: str | None = Field(description="null: the organization's usage without a user.")
    user_name: str | None
    user_email: str | None
    sms: Counts
    mms: Counts
    voice: VoiceSeconds


class OrganizationRow(ClosedModel):
    organization_id: str
    organization_name: str
    sms: Counts
    mms: Counts
    voice: VoiceSeconds


class Breakdown(ClosedModel):
    partner_id: str | None = None
    partner_name: str | None = None
    organization_id: str | None = None
    organization_name: str | None = None
    sms: Counts
    mms: Counts
    voice: VoiceSeconds
    period: Period
    start_date: datetime | None = Field(default=None, description=_START_ECHO)
    end_date: datetime | None = Field(default=None, description=_END_ECHO)
    timezone: str | None = Field(default=None, description=_TIMEZONE)
    group_by: Literal["organization", "user"]
    rows: list[UserRow] | list[OrganizationRow]
    next_cursor: str | None = Field(description="null on the last page.")


class BreakdownResponse(ClosedModel):
    success: Literal[True]
    breakdown: Breakdown
    powered_by: str
