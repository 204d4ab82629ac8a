"""What goes over the wire: request bodies with the contract's limits, and the documented
shapes of the write-side answers and of errors (routes build their JSON by hand, in the
contract's key order, and the response models only describe it)."""

from __future__ import annotations

import sys
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails

from usage_api.dates import parse_instant
from usage_api.ids import id_pattern

# The seed's organization and user: the examples of the OpenAPI schema.
EXAMPLE_ORGANIZATION_ID = "1767623610019x414651971228139500"
EXAMPLE_USER_ID = "1768236789852x707565875153419434"

# The accepted forms as JSON Schema patterns, for the documentation only: the checks are the
# code's (ids.py, dates.py), so that every failure gets the contract's message. `[0-9]`, not
# `\d`, which some regex dialects take to mean any Unicode digit.
_DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME = r"T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})?"
DATE_PATTERN = f"^{_DATE}({_TIME})?$"
DATE_TIME_PATTERN = f"^{_DATE}{_TIME}$"
# What `EmailStr` (email-validator) takes beyond JSON Schema's `format: email`.
EMAIL_RULES = (
    "An address alone, without a display name, at a domain that could receive mail: one"
    " with a dot and a top-level domain ending in a letter, and not a special-use one"
    " (.arpa, .invalid, .local, .localhost, .onion, .test). The domain is kept in Unicode."
)
# Characters a name must not hold: controls (Cc), format characters (Cf: zero-width ones,
# right-to-left overrides that make a name read as something else), line and paragraph
# separators, and surrogates. Except the joiners that emoji sequences and some scripts
# (Persian, Indic) need: ZWNJ, ZWJ and the tag characters of flag emoji.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_JOINERS = frozenset({0x200C, 0x200D, *range(0xE0020, 0xE0080)})


def _not_in_names(code: int) -> bool:
    return code not in _JOINERS and unicodedata.category(chr(code)) in _NOT_IN_NAMES


def _excluded_ranges() -> str:
    """What `_not_in_names` excludes, as the ranges of a regex character class."""
    ranges: list[str] = []
    start = None
    for code in range(sys.maxunicode + 2):
        excluded = code <= sys.maxunicode and _not_in_names(code)
        if excluded and start is None:
            start = code
        elif not excluded and start is not None:
            last = code - 1
            ranges.append(_regex_char(start) + (f"-{_regex_char(last)}" if last > start else ""))
            start = None
    return "".join(ranges)


def _regex_char(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


# Names: none of what `_not_in_names` excludes (and not blank, which the pattern leaves out).
NAME_PATTERN = f"^[^{_excluded_ranges()}]*$"


def id_json_schema(max_length: int = 128, example: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "pattern": id_pattern(max_length)}
    if example is not None:
        schema["examples"] = [example]
    return schema


def date_json_schema(example: str) -> dict[str, Any]:
    return {"type": "string", "pattern": DATE_PATTERN, "examples": [example]}


def id_schema(max_length: int = 128, example: str | None = None) -> WithJsonSchema:
    """The documented schema of a caller-chosen id: 1 to `max_length` visible ASCII characters."""
    return WithJsonSchema(id_json_schema(max_length, example))


# Path parameters: routes take them as plain strings and check them with the contract's
# messages; these annotations only document them.
PartnerIdPath = Annotated[
    str, Path(description="Chosen by the caller."), id_schema(example="partner_acme")
]
OrganizationIdPath = Annotated[
    str, Path(description="Chosen by the caller."), id_schema(example=EXAMPLE_ORGANIZATION_ID)
]
UserIdPath = Annotated[
    str, Path(description="Chosen by the caller."), id_schema(example=EXAMPLE_USER_ID)
]


# Checked by pydantic-core's own regex, not a Python validator: a batch of 1000 events has
# 3000 ids, and a call back into Python for each costs more than the rest of the event.
_ID_MESSAGES = {id_pattern(n): f"must be 1 to {n} visible ASCII characters" for n in (128, 255)}


def _id(max_length: int) -> StringConstraints:
    return StringConstraints(pattern=id_pattern(max_length))


def error_message(error: ErrorDetails) -> str:
    """A validation error as the contract's messages say it."""
    if error["type"] == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern")
        if pattern in _ID_MESSAGES:
            return _ID_MESSAGES[pattern]
    # pydantic prefixes the message of our own validators' ValueErrors with "Value error, ".
    return error["msg"].removeprefix("Value error, ")


def _name(value: str) -> str:
    # Category Cc includes NUL, which PostgreSQL cannot store in text.
    if any(_not_in_names(ord(char)) for char in value):
        raise ValueError("must not contain control or format characters")
    if all(char.isspace() or ord(char) in _JOINERS for char in value):
        raise ValueError("must not be blank")
    return value


def _no_display_name(value: Any) -> Any:
    # EmailStr also takes `John <john@example.com>` and quietly keeps the address; an
    # email field wants the address alone. `<` and `>` are never part of a valid one here.
    if isinstance(value, str) and ("<" in value or ">" in value):
        raise ValueError("must be an email address alone, without a display name")
    return value


def _instant(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # let the strict datetime check reject it
    instant = parse_instant(value, require_time=True)
    if instant is None:
        raise ValueError("must be an ISO 8601 date-time, e.g. 2026-02-10T12:00:00Z")
    return instant.at


EventType = Literal["sms", "mms", "voice"]
Direction = Literal["outbound", "inbound"]
Id = Annotated[str, _id(128), id_schema(128)]
EventId = Annotated[str, _id(255), id_schema(255)]
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=255),
    AfterValidator(_name),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "maxLength": 255,
            "pattern": NAME_PATTERN,
            "description": "Not blank, and without control or format characters.",
        }
    ),
]
EventTime = Annotated[
    datetime,
    BeforeValidator(_instant),
    WithJsonSchema({"type": "string", "pattern": DATE_TIME_PATTERN}),
]


def _no_default(schema: dict[str, Any]) -> None:
    """The null default of a field that may be left out but not sent as null."""
    schema.pop("default", None)


class UsageEventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: EventId = Field(description="The idempotency key: unique within its organization.")
    organization_id: Id
    user_id: Id | None = Field(default=None, description="A user of the event's organization.")
    type: EventType
    direction: Direction
    # None stands for "left out"; an explicit null is refused (`quantity_errors`), so the
    # documented types are not nullable.
    segments: Annotated[
        Annotated[int, Field(ge=1, le=10_000)] | None,
        WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 10_000}),
    ] = Field(
        default=None,
        description="Required for sms and mms events, not allowed for voice.",
        json_schema_extra=_no_default,
    )
    seconds: Annotated[
        Annotated[int, Field(ge=0, le=1_000_000)] | None,
        WithJsonSchema({"type": "integer", "minimum": 0, "maximum": 1_000_000}),
    ] = Field(
        default=None,
        description="Required for voice events, not allowed for sms and mms.",
        json_schema_extra=_no_default,
    )
    knowledge_base: Annotated[bool | None, WithJsonSchema({"type": "boolean"})] = Field(
        default=None,
        description="Voice events only: the call used knowledge-base retrieval (default false).",
        json_schema_extra=_no_default,
    )
    occurred_at: EventTime = Field(
        description="ISO 8601 date-time (no offset means UTC), at most 5 minutes in the future."
    )

    def fits_its_type(self) -> bool:
        """`not self.quantity_errors()`, without building its list."""
        given = self.model_fields_set
        if self.type == "voice":
            return (
                self.seconds is not None
                and "segments" not in given
                and (self.knowledge_base is not None or "knowledge_base" not in given)
            )
        return (
            self.segments is not None and "seconds" not in given and "knowledge_base" not in given
        )

    def quantity_errors(self) -> list[tuple[str, str]]:
        """(field, error) for each field that does not fit the event's type."""
        errors: list[tuple[str, str]] = []
        if self.type == "voice":
            if self.seconds is None:
                errors.append(("seconds", "is required for voice events"))
            if self.segments is not None:
                errors.append(("segments", "is only allowed for sms and mms events"))
        else:
            if self.segments is None:
                errors.append(("segments", f"is required for {self.type} events"))
            if self.seconds is not None:
                errors.append(("seconds", "is only allowed for voice events"))
            if self.knowledge_base is not None:
                errors.append(("knowledge_base", "is only allowed for voice events"))
        # Left out means the default, but an explicit null is a mistake worth telling.
        named = {field for field, _ in errors}
        errors.extend(
            (field, "must not be null")
            for field in ("segments", "seconds", "knowledge_base")
            if field not in named
            and field in self.model_fields_set
            and getattr(self, field) is None
        )
        return errors


class UsageEventsIn(BaseModel):
    """The body of `POST /v1/usage/events` (documentation; validation is per event)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {
                            "id": "msg_8f2c:part1",
                            "organization_id": EXAMPLE_ORGANIZATION_ID,
                            "user_id": EXAMPLE_USER_ID,
                            "type": "sms",
                            "direction": "outbound",
                            "segments": 2,
                            "occurred_at": "2026-02-10T12:00:00Z",
                        },
                        {
                            "id": "call_77a1",
                            "organization_id": EXAMPLE_ORGANIZATION_ID,
                            "type": "voice",
                            "direction": "inbound",
                            "seconds": 125,
                            "knowledge_base": True,
                            "occurred_at": "2026-02-10T12:03:10.250Z",
                        },
                    ]
                }
            ]
        },
    )

    events: Annotated[list[UsageEventIn], Field(min_length=1, max_length=1000)]


class PartnerIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "Acme Reseller"}]}
    )

    name: Name


class OrganizationIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"name": "Acme Corp", "partner_id": None}]},
    )

    name: Name
    partner_id: Id | None = Field(
        default=None,
        description="The organization's partner (admin keys); left out: the partner stays.",
    )


class UserIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "organization_id": EXAMPLE_ORGANIZATION_ID,
                    "name": "John Smith",
                    "email": "john@example.com",
                }
            ]
        },
    )

    organization_id: Id = Field(description="Users never move to another organization.")
    name: Name
    email: Annotated[
        EmailStr, BeforeValidator(_no_display_name), StringConstraints(max_length=320)
    ] = Field(description=EMAIL_RULES)


# Responses. `extra="forbid"` makes the documented objects closed, so that the schema also
# says which keys an answer never has.


class ClosedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IngestResponse(ClosedModel):
    success: Literal[True]
    accepted: int = Field(ge=0, description="Events recorded by this request.")
    duplicates: int = Field(ge=0, description="Events already recorded with the same content.")
    conflicts: list[str] = Field(
        description="Ids already recorded with different content, not applied."
    )


class PartnerOut(ClosedModel):
    id: str
    name: str


class OrganizationOut(ClosedModel):
    id: str
    name: str
    partner_id: str | None


class UserOut(ClosedModel):
    id: str
    organization_id: str
    name: str
    email: str


class PartnerResponse(ClosedModel):
    success: Literal[True]
    partner: PartnerOut


class OrganizationResponse(ClosedModel):
    success: Literal[True]
    organization: OrganizationOut


class UserResponse(ClosedModel):
    success: Literal[True]
    user: UserOut


class EventError(ClosedModel):
    index: int = Field(ge=0, description="Position of the event in the batch.")
    field: str
    error: str


class ErrorResponse(ClosedModel):
    success: Literal[False]
    error: str
    details: list[EventError] | SkipJsonSchema[None] = Field(
        default=None, description="Rejected batches of events only: each bad event's problems."
    )
