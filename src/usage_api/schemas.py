"""Request bodies: what the service accepts, with the contract's limits."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    EmailStr,
    Field,
    StringConstraints,
)

from usage_api.dates import parse_instant
from usage_api.ids import is_valid_id


def _id(max_length: int) -> Any:
    def check(value: str) -> str:
        if not is_valid_id(value, max_length):
            raise ValueError(f"must be 1 to {max_length} visible ASCII characters")
        return value

    return AfterValidator(check)


def _name(value: str) -> str:
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise ValueError("must not contain control characters")
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
Id = Annotated[str, _id(128)]
EventId = Annotated[str, _id(255)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_name)]
Instant = Annotated[datetime, BeforeValidator(_instant)]


class UsageEventIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: EventId
    organization_id: Id
    user_id: Id | None = None
    type: EventType
    direction: Direction
    segments: Annotated[int, Field(ge=1, le=10_000)] | None = None
    seconds: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    knowledge_base: bool | None = None
    occurred_at: Instant

    def quantity_errors(self) -> list[tuple[str, str]]:
        """(field, error) for each field that does not fit the event's type."""
        errors = []
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
        return errors


class UsageEventsIn(BaseModel):
    """The body of `POST /v1/usage/events` (documentation; validation is per event)."""

    events: Annotated[list[UsageEventIn], Field(min_length=1, max_length=1000)]


class PartnerIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name


class OrganizationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    partner_id: Id | None = None


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    organization_id: Id
    name: Name
    email: Annotated[EmailStr, BeforeValidator(_no_display_name), StringConstraints(max_length=320)]
