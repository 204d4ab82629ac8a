"""Properties that hold for any input, checked by Hypothesis on many generated ones.

Dates: any instant written in any accepted form parses back to that instant in UTC and to
the unit of its finest field; a range echoes its end as the last instant it covers; no
string, however odd, makes the parser raise.

Requests: whatever a client sends (random JSON for every field of an event; NUL bytes,
lone surrogates, right-to-left marks, combining characters, emoji, SQL, huge numbers as
ids, names, emails, dates, query parameters and keys), the answer is a 200 or a clean 4xx
with the contract's JSON, never a 5xx, and a rejected batch writes nothing.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.answers import bad_date, error
from tests.support.factories import (
    Tenant,
    event,
    make_tenant,
)
from usage_api.dates import MAX_INSTANT, Instant, make_range, parse_instant
from usage_api.ids import new_id
from usage_api.schemas import DATE_PATTERN

T = TypeVar("T")
DAY, MINUTE, SECOND = timedelta(days=1), timedelta(minutes=1), timedelta(seconds=1)
USAGE = "/v1/analytics/usage"
EVENTS = "/v1/usage/events"

# Deterministic: the same examples on every run and machine, and no example database.
PURE = settings(max_examples=400, deadline=None, derandomize=True, database=None)
# Each example of these is a request or two against the database; the fixtures are shared
# by all the examples of a test on purpose (nothing that one example writes changes what
# the next one should get).
REQUESTS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# --- dates ----------------------------------------------------------------------------

WALL_TIMES = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59))
FORMS = ("date", "minute", "second", "fraction")


@dataclass(frozen=True)
class Written:
    """An instant written in one of the contract's forms, and what it must parse to."""

    text: str
    at: datetime | None  # None: the UTC instant lies outside years 1 to 9999
    unit: timedelta | None  # None: fractional seconds, an exact instant


@st.composite
def written_instants(draw: st.DrawFn, forms: tuple[str, ...] = FORMS) -> Written:
    wall = draw(WALL_TIMES)
    form = draw(st.sampled_from(forms))
    date = f"{wall.year:04d}-{wall.month:02d}-{wall.day:02d}"
    if form == "date":
        return Written(date, datetime(wall.year, wall.month, wall.day, tzinfo=UTC), DAY)
    written = f"{date}T{wall.hour:02d}:{wall.minute:02d}"
    local = wall.replace(second=0, microsecond=0)
    unit: timedelta | None = MINUTE
    if form in ("second", "fraction"):
        written += f":{wall.second:02d}"
        local = local.replace(second=wall.second)
        unit = SECOND
    if form == "fraction":
        digits = draw(st.text("0123456789", min_size=1, max_size=12))
        written += f".{digits}"
        # Time is kept in microseconds: finer digits are truncated.
        local = local.replace(microsecond=int(digits[:6].ljust(6, "0")))
        unit = None
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    suffix = draw(st.sampled_from(["", "Z", "offset"]))
    if suffix == "offset":
        sign = "-" if minutes < 0 else "+"
        written += f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    else:
        written += suffix
        minutes = 0  # no offset means UTC
    try:
        at = local.replace(tzinfo=timezone(timedelta(minutes=minutes))).astimezone(UTC)
    except OverflowError:
        return Written(written, None, unit)
    return Written(written, at, unit)


def parsed(written: Written) -> Instant:
    instant = parse_instant(written.text)
    assert instant is not None, written
    return instant


@PURE
@given(written_instants())
def test_every_accepted_form_parses_to_its_utc_instant_and_unit(written: Written) -> None:
    instant = parse_instant(written.text)
    if written.at is None:
        assert instant is None
        return
    assert instant == Instant(written.at, written.unit)
    assert re.fullmatch(DATE_PATTERN, written.text, re.ASCII)


@PURE
@given(written_instants())
def test_events_need_a_time_and_take_every_form_with_one(written: Written) -> None:
    instant = parse_instant(written.text, require_time=True)
    if written.unit == DAY:
        assert instant is None
    else:
        assert instant == parse_instant(written.text)


def echoed(echo: str | None) -> datetime:
    """The instant a response echoes: UTC, with `Z`, in whole seconds or microseconds."""
    assert echo is not None and re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z", echo, re.ASCII
    ), echo
    return datetime.fromisoformat(echo)


@PURE
@given(written_instants().filter(lambda w: w.at is not None))
def test_the_end_is_echoed_as_the_last_instant_it_covers(written: Written) -> None:
    end = parsed(written)
    span = make_range(None, end)
    assert span is not None
    last = echoed(span.end_echo)
    if end.unit is None:
        # With a fraction: exactly that instant, the only one of its microsecond.
        assert last == end.at
        assert span.end_exclusive == min(end.at + timedelta(microseconds=1), MAX_INSTANT)
    else:
        # Without: the last whole second of the unit (of the day, minute or second).
        assert last == end.at + end.unit - SECOND
        if end.at + end.unit <= MAX_INSTANT:
            assert span.end_exclusive == last + SECOND
        else:  # past the last instant any event can have: the range stops there
            assert span.end_exclusive == MAX_INSTANT


@PURE
@given(written_instants().filter(lambda w: w.at is not None))
def test_the_start_is_echoed_as_itself(written: Written) -> None:
    start = parsed(written)
    span = make_range(start, None)
    assert span is not None
    assert echoed(span.start_echo) == start.at
    assert span.start == min(start.at, MAX_INSTANT)


@PURE
@given(
    written_instants().filter(lambda w: w.at is not None),
    written_instants().filter(lambda w: w.at is not None),
)
def test_a_range_is_empty_exactly_when_the_start_is_not_before_the_end(
    start_written: Written, end_written: Written
) -> None:
    start, end = parsed(start_written), parsed(end_written)
    covered_until = end.at + (end.unit or timedelta(microseconds=1))  # no overflow: year 9999
    assert (make_range(start, end) is None) == (start.at >= covered_until)


# Near misses of the accepted forms: right shape, any digits (month 13, hour 24, offset
# +99:99, day 0, year 0), and any character inserted anywhere into an accepted form.
NEAR_MISSES = st.from_regex(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})?)?",
    fullmatch=True,
)
ANY_CHARACTER = st.characters(exclude_categories=())  # surrogates included


@st.composite
def with_an_inserted_character(draw: st.DrawFn) -> str:
    written = draw(written_instants()).text
    position = draw(st.integers(0, len(written)))
    return written[:position] + draw(ANY_CHARACTER) + written[position:]


@PURE
@given(st.text(ANY_CHARACTER) | NEAR_MISSES | with_an_inserted_character())
def test_no_string_makes_the_date_parser_raise(value: str) -> None:
    instant = parse_instant(value)
    # Whatever it takes has the documented shape, in ASCII digits only.
    assert instant is None or re.fullmatch(DATE_PATTERN, value, re.ASCII)


# The contract's rules restated independently of the service's parsers, as the oracles of
# the request properties below (section 1: ids; section 2.3: dates).


def is_contract_id(value: str) -> bool:
    """1 to 128 visible ASCII characters (0x21-0x7E)."""
    return 1 <= len(value) <= 128 and all("!" <= char <= "~" for char in value)


_CONTRACT_DATE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:T([0-9]{2}):([0-9]{2})(?::([0-9]{2})(?:\.[0-9]+)?)?(Z|([+-])([0-9]{2}):([0-9]{2}))?)?"
)


def is_contract_date(value: str) -> bool:
    """A date or date-time of the accepted forms that names a real instant: the fields in
    range, the offset under 24 hours, and the instant in years 1 to 9999 once in UTC."""
    form = _CONTRACT_DATE.fullmatch(value)
    if form is None:
        return False
    year, month, day, hour, minute, second, _, sign, off_h, off_m = form.groups()
    try:
        local = datetime(
            int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0)
        )
        if sign is not None:
            if int(off_h) > 23 or int(off_m) > 59:
                return False
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            local -= offset if sign == "+" else -offset
    except (ValueError, OverflowError):
        return False
    return True


# --- requests: the values -------------------------------------------------------------

# Odd values a client may send anywhere; the strategies below mix them with random ones.
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x00" * 3,
    "\t\r\n",
    "u1\n",  # a trailing newline: Starlette's `$` would match before it
    "a\nb/c",
    "\x7f\x85",
    "\ud800",  # a lone surrogate: valid as a JSON escape, not encodable in UTF-8
    "a\udfffb",
    "\u202eevil",  # right-to-left override
    "\u200f\u200e",  # right-to-left and left-to-right marks
    "e\u0301",  # e and a combining acute accent
    "\u0301",
    "😀",
    "👩‍👩‍👧",  # a family: emoji joined by zero-width joiners
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "'; DROP TABLE usage_events; --",
    "x'||pg_sleep(10)||'",
    "1 OR 1=1",
    "%00",
    "%",
    "../../etc/passwd",
    "\\",
    '"',
    "<script>alert(1)</script>",
    "${jndi:ldap://x}",
    "a" * 129,
    "a" * 256,
    "9" * 5000,
    str(2**63),
    "1e308",
    "-0",
    "NaN",
    "null",
    "0001-01-01T00:00:00+23:59",
    "9999-12-31T23:59:59-23:59",
    "2026-02-30",
    "2026-02-10T24:00",
    "\uff12\uff10\uff12\uff16-\uff10\uff12-\uff11\uff10",  # 2026-02-10 in fullwidth digits
]
ODD_NUMBERS = [2**63, -(2**63) - 1, 2**64, 10**30, 1e308, -1e308, 5e-324, -0.0, 0, -1, 0.5]
ODD_TEXT = st.sampled_from(ODD_STRINGS) | st.text(ANY_CHARACTER, max_size=20)


def with_every_odd_string(argument: str) -> Callable[[T], T]:
    """Run a property on each of ODD_STRINGS first, then on generated values."""

    def decorate(test: T) -> T:
        for value in ODD_STRINGS:
            test = example(**{argument: value})(test)
        return test

    return decorate


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(ODD_NUMBERS)
    | ODD_TEXT,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(ANY_CHARACTER, max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def as_json(body: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as `\ud800` escapes, as any JSON encoder may send them.
    return json.dumps(body).encode()


def quoted(value: str) -> str:
    """Every byte percent-encoded (lone surrogates as their UTF-8-like bytes)."""
    return "".join(f"%{byte:02X}" for byte in value.encode("utf-8", "surrogatepass"))


def as_received(value: str) -> str:
    """The value the service reads from a query parameter or a path segment."""
    return unquote(quoted(value), errors="replace")


JOINERS = {"\u200c", "\u200d", *(chr(code) for code in range(0xE0020, 0xE0080))}


def is_valid_name(value: str) -> bool:
    """1 to 255 characters, not only white space and joiners, with no control, format (but
    the joiners emoji and some scripts need), line or paragraph separator characters (nor
    lone surrogates, which JSON text cannot carry through)."""
    return (
        1 <= len(value) <= 255
        and not all(char.isspace() or char in JOINERS for char in value)
        and not any(
            unicodedata.category(char) in ("Cc", "Cf", "Cs", "Zl", "Zp") and char not in JOINERS
            for char in value
        )
    )


@pytest.fixture
async def tenant(engine: AsyncEngine) -> Tenant:
    return await make_tenant(engine)


async def stored(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        events = await conn.scalar(text("SELECT count(*) FROM usage_events"))
        deltas = await conn.scalar(text("SELECT count(*) FROM usage_deltas"))
    return int(events or 0), int(deltas or 0)


# --- requests: events -------------------------------------------------------------------

EVENT_FIELDS = (
    "id",
    "organization_id",
    "user_id",
    "type",
    "direction",
    "segments",
    "seconds",
    "knowledge_base",
    "occurred_at",
)
_DELETE = object()


@st.composite
def events(draw: st.DrawFn, tenant: Tenant) -> dict[str, Any]:
    """A valid event of the tenant's organization, then zero to three fields replaced by
    random JSON values, removed, or added."""
    kind = draw(st.sampled_from(["sms", "mms", "voice"]))
    body = event(
        tenant.organization_id,
        f"ev-{draw(st.uuids()).hex}",  # may repeat: a duplicate or a conflict then
        type=kind,
        quantity=draw(st.integers(1, 100)),
        user_id=draw(st.sampled_from([None, tenant.user_id])),
    )
    changes = draw(
        st.dictionaries(
            st.sampled_from(EVENT_FIELDS) | st.text(ANY_CHARACTER, max_size=8),
            st.just(_DELETE) | JSON_VALUES,
            max_size=3,
        )
    )
    for field, value in changes.items():
        if value is _DELETE:
            body.pop(field, None)
        else:
            body[field] = value
    return body


def assert_rejected_batch(response: httpx.Response, batch_size: int) -> None:
    body = response.json()
    assert list(body) == ["success", "error", "details"], body
    assert body["success"] is False and body["error"] == "invalid events"
    assert body["details"], body
    for detail in body["details"]:
        assert list(detail) == ["index", "field", "error"], detail
        assert 0 <= detail["index"] < batch_size
        assert isinstance(detail["field"], str) and isinstance(detail["error"], str)


@REQUESTS
@given(data=st.data())
async def test_any_event_is_recorded_or_rejected_with_details_and_nothing_written(
    client: httpx.AsyncClient, engine: AsyncEngine, tenant: Tenant, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(events(tenant), min_size=1, max_size=3))
    before = await stored(engine)

    response = await client.post(
        EVENTS,
        content=as_json({"events": batch}),
        headers={"X-API-Key": tenant.key, "Content-Type": "application/json"},
    )

    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert_rejected_batch(response, len(batch))
        assert await stored(engine) == before
    else:
        body = response.json()
        assert list(body) == ["success", "accepted", "duplicates", "conflicts"]
        # Each event is accepted, a duplicate or a conflict; a conflicting id is listed once.
        applied = body["accepted"] + body["duplicates"] + len(body["conflicts"])
        ids = [e["id"] for e in batch]
        assert applied == len(batch) if len(set(ids)) == len(ids) else applied <= len(batch)
        assert set(body["conflicts"]) <= set(ids)
        assert (await stored(engine))[0] == before[0] + body["accepted"]


@with_every_odd_string("value")
@REQUESTS
@given(value=ODD_TEXT | JSON_VALUES)
async def test_odd_values_in_every_event_field_are_rejected_with_details(
    client: httpx.AsyncClient, engine: AsyncEngine, tenant: Tenant, value: Any
) -> None:
    batch = [
        {**event(tenant.organization_id, new_id(), type="voice", quantity=1), field: value}
        for field in EVENT_FIELDS
    ]
    before = await stored(engine)

    response = await client.post(
        EVENTS,
        content=as_json({"events": batch}),
        headers={"X-API-Key": tenant.key, "Content-Type": "application/json"},
    )

    # No value fits both `type` and `direction`: every batch has a bad event.
    assert response.status_code == 400, response.text
    assert_rejected_batch(response, len(batch))
    assert await stored(engine) == before


RAW_BODIES = [
    b"",
    b"\x00",
    b'{"events": [\x00]}',
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",  # a byte order mark
    b'{"events": NaN}',
    b'{"events": [{"segments": Infinity}]}',
    b'{"events": [{"segments": 1e400}]}',
    b'{"events": [{"segments": ' + b"9" * 5000 + b"}]}",
    b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"events": "\\ud800"}',
    b'{"events": [], "\\ud800": 1}',
    b'{"\\u0000events": []}',
    b"'; DROP TABLE usage_events; --",
]


@pytest.mark.parametrize("body", RAW_BODIES, ids=range(len(RAW_BODIES)))
async def test_any_body_that_is_not_a_batch_is_a_clean_400(
    client: httpx.AsyncClient, engine: AsyncEngine, tenant: Tenant, body: bytes
) -> None:
    response = await client.post(
        EVENTS, content=body, headers={"X-API-Key": tenant.key, "Content-Type": "application/json"}
    )

    assert response.status_code == 400, response.text
    assert list(response.json()) in (["success", "error"], ["success", "error", "details"])
    assert response.json()["success"] is False
    assert await stored(engine) == (0, 0)


# --- requests: query parameters, path segments, names, emails, keys ---------------------


async def usage(client: httpx.AsyncClient, key: str, **params: str) -> httpx.Response:
    query = "&".join(f"{name}={quoted(value)}" for name, value in params.items())
    return await client.get(f"{USAGE}?{query}", headers={"X-API-Key": key})


@with_every_odd_string("value")
@REQUESTS
@given(value=ODD_TEXT)
async def test_odd_ids_in_the_query_are_a_400_or_a_404(
    client: httpx.AsyncClient, tenant: Tenant, value: str
) -> None:
    received = as_received(value)
    for name, kind in (("organization_id", "organization"), ("user_id", "user")):
        response = await usage(client, tenant.key, **{name: value})
        if not received:
            expected = (400, error("organization_id or user_id is required"))
        elif is_contract_id(received):
            expected = (404, error(f"{kind} not found"))
        else:
            expected = (400, error(f"invalid {name}"))
        assert (response.status_code, response.json()) == expected


@with_every_odd_string("value")
@REQUESTS
@given(value=ODD_TEXT | written_instants().map(lambda w: w.text))
async def test_odd_dates_in_the_query_are_a_400_or_a_range(
    client: httpx.AsyncClient, tenant: Tenant, value: str
) -> None:
    received = as_received(value)
    for name in ("start_date", "end_date"):
        response = await usage(
            client, tenant.key, organization_id=tenant.organization_id, **{name: value}
        )
        if received and not is_contract_date(received):
            assert (response.status_code, response.json()) == (400, bad_date(name))
        else:
            assert response.status_code == 200, response.text
            period = response.json()["usage"]["period"]
            assert period == ("custom" if received else "all_time")


@with_every_odd_string("value")
@REQUESTS
@given(value=ODD_TEXT)
async def test_odd_ids_in_the_path_are_a_400_or_an_upsert(
    client: httpx.AsyncClient, tenant: Tenant, value: str
) -> None:
    received = as_received(value)
    response = await client.put(
        f"/v1/partners/{quoted(value)}",
        content=as_json({"name": "Partner"}),
        headers={"X-API-Key": tenant.key, "Content-Type": "application/json"},
    )
    if is_contract_id(received):
        assert response.status_code in (200, 201), response.text
        assert response.json()["partner"] == {"id": received, "name": "Partner"}
    else:
        assert (response.status_code, response.json()) == (400, error("invalid partner_id"))


@with_every_odd_string("name")
@REQUESTS
@given(name=ODD_TEXT | st.text(ANY_CHARACTER, min_size=1, max_size=300) | JSON_VALUES)
async def test_any_valid_name_is_kept_exactly_and_any_other_is_a_400(
    client: httpx.AsyncClient, tenant: Tenant, name: Any
) -> None:
    response = await client.put(
        f"/v1/organizations/{tenant.organization_id}",
        content=as_json({"name": name}),
        headers={"X-API-Key": tenant.key, "Content-Type": "application/json"},
    )
    if isinstance(name, str) and is_valid_name(name):
        assert response.status_code == 200, response.text
        read = await usage(client, tenant.key, organization_id=tenant.organization_id)
        assert read.json()["usage"]["organization_name"] == name
    else:
        assert response.status_code == 400, response.text
        assert list(response.json()) == ["success", "error"]
        assert response.json()["error"].startswith("invalid name: ")


@with_every_odd_string("email")
@REQUESTS
@given(email=ODD_TEXT | st.emails() | JSON_VALUES)
async def test_odd_emails_are_a_clean_400_or_kept(
    client: httpx.AsyncClient, tenant: Tenant, email: Any
) -> None:
    body = {"organization_id": tenant.organization_id, "name": "John Smith", "email": email}
    response = await client.put(
        f"/v1/users/{tenant.user_id}",
        content=as_json(body),
        headers={"X-API-Key": tenant.key, "Content-Type": "application/json"},
    )
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert list(response.json()) == ["success", "error"]
        assert response.json()["error"].startswith("invalid email: ")
    else:
        # Kept as the validator normalizes it (a Unicode domain), and read back as kept.
        kept = response.json()["user"]["email"]
        read = await usage(client, tenant.key, user_id=tenant.user_id)
        assert read.json()["usage"]["user_email"] == kept


VISIBLE_ASCII = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)


@REQUESTS
@given(
    key=st.sampled_from([s for s in ODD_STRINGS if s.isascii() and s.isprintable()]) | VISIBLE_ASCII
)
async def test_odd_keys_are_a_401(client: httpx.AsyncClient, tenant: Tenant, key: str) -> None:
    response = await client.get(
        USAGE, params={"organization_id": tenant.organization_id}, headers={"X-API-Key": key}
    )
    assert response.status_code == 401, response.text
    assert response.json() in (error("invalid API key"), error("X-API-Key header is required"))
