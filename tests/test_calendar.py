"""Local calendar units (contract 2.5, 2.6): reading dates in a zone, cutting ranges into
buckets, labelling them.

The property tests compare `Calendar` with a brute-force oracle: every instant of a
15-minute UTC grid (every offset and every change of offset of these zones since 1990 lies
on it) is given its local unit by `zoneinfo` directly, and a bucket starts wherever that
unit changes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usage_api.analytics.calendar import (
    GRANULARITIES,
    MAX_BUCKETS,
    Calendar,
    Granularity,
    local_range,
    parse_granularity,
    parse_timezone,
    read_bound,
)
from usage_api.dates import make_range, parse_instant
from usage_api.errors import ApiError

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/Havana",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
)
QUARTER = timedelta(minutes=15)
MICROSECOND = timedelta(microseconds=1)
SPANS = {
    "hour": timedelta(hours=200),
    "day": timedelta(days=40),
    "week": timedelta(weeks=20),
    "month": timedelta(days=400),
}
BERLIN = ZoneInfo("Europe/Berlin")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def labels(zone: str, unit: Granularity, start: str, end: str) -> list[tuple[str, str]]:
    calendar = Calendar(ZoneInfo(zone), unit)
    span = local_range(read_bound(start, calendar.zone), read_bound(end, calendar.zone))
    assert span is not None
    return [
        (calendar.label(a), calendar.label(b))
        for a, b in calendar.buckets(span.start, span.end_exclusive)
    ]


# -- the oracle ---------------------------------------------------------------------------


def unit_of(at: datetime, zone: ZoneInfo, unit: Granularity) -> object:
    local = at.astimezone(zone)
    if unit == "hour":
        return local.replace(minute=0, second=0, microsecond=0, tzinfo=None), local.utcoffset()
    if unit == "day":
        return local.date()
    if unit == "week":
        return local.isocalendar()[:2]
    return local.year, local.month


def oracle(
    zone: ZoneInfo, unit: Granularity, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    cuts = [start]
    grid = start.replace(minute=start.minute // 15 * 15, second=0, microsecond=0) + QUARTER
    while grid < end:
        if unit_of(grid, zone, unit) != unit_of(grid - MICROSECOND, zone, unit):
            cuts.append(grid)
        grid += QUARTER
    cuts.append(end)
    return list(pairwise(cuts))


@cache
def changes(zone_name: str) -> tuple[datetime, ...]:
    """Every change of offset of a zone in 2024-2027, found by bisecting daily samples."""
    zone = ZoneInfo(zone_name)
    found = []
    at = datetime(2024, 1, 1, tzinfo=UTC)
    while at.year < 2028:
        after = at + timedelta(days=1)
        if at.astimezone(zone).utcoffset() != after.astimezone(zone).utcoffset():
            lo, hi = at, after
            while hi - lo > QUARTER:
                middle = lo + (hi - lo) / 2
                if middle.astimezone(zone).utcoffset() == lo.astimezone(zone).utcoffset():
                    lo = middle
                else:
                    hi = middle
            found.append(hi)
        at = after
    return tuple(found)


@st.composite
def series(draw: st.DrawFn) -> tuple[ZoneInfo, Granularity, datetime, datetime]:
    name = draw(st.sampled_from(ZONES))
    unit = draw(st.sampled_from(GRANULARITIES))
    span = SPANS[unit]
    if name != "UTC" and changes(name) and draw(st.booleans()):
        # Around a change of offset, so that most cases cross one.
        anchor = draw(st.sampled_from(changes(name)))
        start = anchor - draw(st.timedeltas(timedelta(0), min(span, timedelta(days=3))))
    else:
        start = draw(st.datetimes(datetime(1990, 1, 1), datetime(2037, 1, 1))).replace(tzinfo=UTC)
    length = draw(st.timedeltas(MICROSECOND, span))
    return ZoneInfo(name), unit, start, start + length


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(series())
def test_buckets_are_the_units_zoneinfo_gives_each_instant(
    case: tuple[ZoneInfo, Granularity, datetime, datetime],
) -> None:
    zone, unit, start, end = case
    calendar = Calendar(zone, unit)
    buckets = calendar.buckets(start, end)
    assert buckets == oracle(zone, unit, start, end)
    # Contiguous, clipped, each labelled with the offset in force at its start.
    assert buckets[0][0] == start and buckets[-1][1] == end
    assert all(a[1] == b[0] for a, b in pairwise(buckets))
    for a, _ in buckets:
        local = datetime.fromisoformat(calendar.label(a))
        assert local == a and local.utcoffset() == a.astimezone(zone).utcoffset()


@settings(max_examples=250, deadline=None)
@given(series())
def test_floor_and_following_bracket_every_instant(
    case: tuple[ZoneInfo, Granularity, datetime, datetime],
) -> None:
    zone, unit, at, _ = case
    calendar = Calendar(zone, unit)
    floor, following = calendar.floor(at), calendar.following(at)
    assert floor <= at < following
    assert unit_of(floor, zone, unit) == unit_of(at, zone, unit)
    assert unit_of(following, zone, unit) != unit_of(following - MICROSECOND, zone, unit)
    assert calendar.following(floor) == following


def chained_following(
    calendar: Calendar, start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """`[start, end)` cut by applying `following` again and again: what `buckets` must equal."""
    cut, at = [], start
    while at < end:
        following = min(calendar.following(at), end)
        cut.append((at, following))
        at = following
    return cut


# Zones whose changes the 15-minute grid of the oracle does not all see, or that skip a
# whole day (Samoa, 2011-12-30), change twice a year (Casablanca's Ramadan), by two hours
# (Troll) or sit 12:45 or 14 hours from UTC.
ODD_ZONES = (
    "Pacific/Apia",
    "Pacific/Kiritimati",
    "Pacific/Chatham",
    "Africa/Casablanca",
    "Antarctica/Troll",
    "America/St_Johns",
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(ZONES + ODD_ZONES),
    st.sampled_from(GRANULARITIES),
    st.datetimes(datetime(1900, 1, 1), datetime(2040, 1, 1)),
    st.floats(0.000001, 1.0),
)
def test_a_range_is_cut_as_following_cuts_it_again_and_again(
    zone: str, unit: Granularity, start: datetime, share: float
) -> None:
    calendar = Calendar(ZoneInfo(zone), unit)
    begin = start.replace(tzinfo=UTC)
    days = {"hour": 40, "day": 990, "week": 6900, "month": 30000}[unit]
    end = begin + share * days * timedelta(days=1)
    assert calendar.buckets(begin, end) == chained_following(calendar, begin, end)


def test_a_day_samoa_skipped_has_no_bucket() -> None:
    assert labels("Pacific/Apia", "day", "2011-12-29", "2011-12-31") == [
        ("2011-12-29T00:00:00-10:00", "2011-12-31T00:00:00+14:00"),
        ("2011-12-31T00:00:00+14:00", "2012-01-01T00:00:00+14:00"),
    ]


FORMS = st.one_of(
    st.dates(min_value=datetime(1000, 1, 1).date(), max_value=datetime(9998, 1, 1).date()).map(str),
    st.builds(
        lambda at, form, offset: at.strftime(form) + offset,
        st.datetimes(datetime(1000, 1, 1), datetime(9998, 1, 1)),
        st.sampled_from(["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S.%f"]),
        st.sampled_from(["", "Z", "+05:30", "-03:00"]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(FORMS, FORMS)
def test_in_utc_a_range_is_exactly_the_one_without_timezone(start: str, end: str) -> None:
    zone = ZoneInfo("UTC")
    start_instant, end_instant = parse_instant(start), parse_instant(end)
    assert start_instant is not None and end_instant is not None
    assert local_range(read_bound(start, zone), read_bound(end, zone)) == make_range(
        start_instant, end_instant
    )
    assert local_range(read_bound(start, zone), None) == make_range(start_instant, None)
    assert local_range(None, read_bound(end, zone)) == make_range(None, end_instant)


# -- named cases --------------------------------------------------------------------------


def test_a_day_when_clocks_go_forward_has_23_hours() -> None:
    assert labels("Europe/Berlin", "day", "2026-03-29", "2026-03-29") == [
        ("2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00")
    ]
    hours = labels("Europe/Berlin", "hour", "2026-03-29", "2026-03-29")
    assert len(hours) == 23
    assert hours[1] == ("2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00")
    assert labels("America/New_York", "hour", "2026-03-08", "2026-03-08")[2][0] == (
        "2026-03-08T03:00:00-04:00"
    )


def test_a_day_when_clocks_go_back_has_25_hours_and_the_repeated_hour_twice() -> None:
    hours = labels("Europe/Berlin", "hour", "2026-10-25", "2026-10-25")
    assert len(hours) == 25
    assert hours[1:4] == [
        ("2026-10-25T01:00:00+02:00", "2026-10-25T02:00:00+02:00"),
        ("2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"),
        ("2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"),
    ]
    assert labels("America/New_York", "day", "2026-11-01", "2026-11-01") == [
        ("2026-11-01T00:00:00-04:00", "2026-11-02T00:00:00-05:00")
    ]
    assert len(labels("America/New_York", "hour", "2026-11-01", "2026-11-01")) == 25


def test_a_range_starting_in_a_repeated_midnight_hour_reads_later_midnights_as_the_first() -> None:
    """Havana repeats 00:00-01:00 on the first Sunday of November: a range starting in the
    second 00:03 still ends its October a year later at the first midnight of November."""
    havana = ZoneInfo("America/Havana")
    start = datetime(2025, 11, 2, 5, 3, 45, tzinfo=UTC)  # 00:03:45-05:00, the second time
    end = datetime(2026, 11, 1, 5, 3, 45, tzinfo=UTC)
    buckets = Calendar(havana, "month").buckets(start, end)
    assert buckets == oracle(havana, "month", start, end)
    assert buckets[-2] == (
        datetime(2026, 10, 1, 4, tzinfo=UTC),
        datetime(2026, 11, 1, 4, tzinfo=UTC),  # 00:00-04:00, the first midnight
    )


def test_a_midnight_that_does_not_exist_starts_the_day_at_its_first_instant() -> None:
    # Havana moves its clocks from 00:00 to 01:00: March 8 begins at 01:00.
    assert labels("America/Havana", "day", "2026-03-07", "2026-03-09") == [
        ("2026-03-07T00:00:00-05:00", "2026-03-08T01:00:00-04:00"),
        ("2026-03-08T01:00:00-04:00", "2026-03-09T00:00:00-04:00"),
        ("2026-03-09T00:00:00-04:00", "2026-03-10T00:00:00-04:00"),
    ]
    bound = read_bound("2026-03-08", ZoneInfo("America/Havana"))
    assert bound is not None and bound.at == utc("2026-03-08T05:00:00Z")


def test_lord_howes_half_hour_changes_cut_the_hour_around_them() -> None:
    back = labels("Australia/Lord_Howe", "hour", "2026-04-05", "2026-04-05")
    assert len(back) == 25
    assert back[1:3] == [
        ("2026-04-05T01:00:00+11:00", "2026-04-05T01:30:00+10:30"),
        ("2026-04-05T01:30:00+10:30", "2026-04-05T02:00:00+10:30"),
    ]
    forward = labels("Australia/Lord_Howe", "hour", "2026-10-04", "2026-10-04")
    assert len(forward) == 24
    assert forward[1:3] == [
        ("2026-10-04T01:00:00+10:30", "2026-10-04T02:30:00+11:00"),
        ("2026-10-04T02:30:00+11:00", "2026-10-04T03:00:00+11:00"),
    ]
    day = labels("Australia/Lord_Howe", "day", "2026-04-05", "2026-04-05")
    assert day == [("2026-04-05T00:00:00+11:00", "2026-04-06T00:00:00+10:30")]


def test_half_and_quarter_hour_zones_cut_days_off_the_utc_hour() -> None:
    span = local_range(
        read_bound("2026-03-01", ZoneInfo("Asia/Kolkata")),
        read_bound("2026-03-02", ZoneInfo("Asia/Kolkata")),
    )
    assert span is not None
    assert (span.start_echo, span.end_echo) == ("2026-02-28T18:30:00Z", "2026-03-02T18:29:59Z")
    assert labels("Asia/Kathmandu", "day", "2026-03-01", "2026-03-01") == [
        ("2026-03-01T00:00:00+05:45", "2026-03-02T00:00:00+05:45")
    ]
    hours = labels("Asia/Kathmandu", "hour", "2026-03-01T10:20+05:45", "2026-03-01T11:00+05:45")
    assert hours == [
        ("2026-03-01T10:20:00+05:45", "2026-03-01T11:00:00+05:45"),
        ("2026-03-01T11:00:00+05:45", "2026-03-01T11:01:00+05:45"),
    ]


def test_weeks_start_on_monday_and_months_on_the_first() -> None:
    assert labels("America/New_York", "week", "2026-03-04", "2026-03-10") == [
        ("2026-03-04T00:00:00-05:00", "2026-03-09T00:00:00-04:00"),
        ("2026-03-09T00:00:00-04:00", "2026-03-11T00:00:00-04:00"),
    ]
    assert labels("Europe/Berlin", "month", "2026-02-15", "2026-04-01T12:00") == [
        ("2026-02-15T00:00:00+01:00", "2026-03-01T00:00:00+01:00"),
        ("2026-03-01T00:00:00+01:00", "2026-04-01T00:00:00+02:00"),
        ("2026-04-01T00:00:00+02:00", "2026-04-01T12:01:00+02:00"),
    ]


def test_a_local_time_in_a_gap_lands_as_many_minutes_later() -> None:
    bound = read_bound("2026-03-29T02:30", BERLIN)
    assert bound is not None and bound.at == utc("2026-03-29T03:30:00+02:00")


def test_a_local_time_that_occurs_twice_is_the_earlier_one() -> None:
    bound = read_bound("2026-10-25T02:30", BERLIN)
    assert bound is not None and bound.at == utc("2026-10-25T02:30:00+02:00")
    assert bound.unit_end == utc("2026-10-25T02:31:00+02:00")


def test_an_explicit_offset_wins_over_the_zone() -> None:
    for text, expected in [
        ("2026-03-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        ("2026-03-01T00:00+05:30", "2026-02-28T18:30:00Z"),
    ]:
        bound = read_bound(text, BERLIN)
        assert bound is not None and bound.at == utc(expected)
    span = local_range(read_bound("2026-03-01", BERLIN), read_bound("2026-03-31", BERLIN))
    assert span is not None
    assert (span.start_echo, span.end_echo) == ("2026-02-28T23:00:00Z", "2026-03-31T21:59:59Z")


def test_1000_buckets_pass_and_1001_are_refused() -> None:
    calendar = Calendar(ZoneInfo("UTC"), "hour")
    start = utc("2026-01-01T00:00:00Z")
    assert len(calendar.buckets(start, start + timedelta(hours=MAX_BUCKETS))) == MAX_BUCKETS
    with pytest.raises(ApiError) as refused:
        calendar.buckets(start, start + timedelta(hours=MAX_BUCKETS, microseconds=1))
    assert (refused.value.status, refused.value.message) == (
        400,
        "too many buckets: at most 1000 (use a coarser granularity or a shorter range)",
    )


@pytest.mark.parametrize("name", ["UTC", "Europe/Berlin", "Asia/Kathmandu", "America/Havana"])
def test_iana_names_are_time_zones(name: str) -> None:
    assert parse_timezone(name).key == name


@pytest.mark.parametrize(
    "name", ["", "Mars/Olympus", "europe/berlin ", "../etc/passwd", "/etc/localtime", "+05:30"]
)
def test_anything_else_is_not_a_time_zone(name: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_timezone(name)
    assert (refused.value.status, refused.value.message) == (
        400,
        "timezone must be an IANA time zone name, e.g. Europe/Berlin",
    )


def test_granularity_is_one_of_four() -> None:
    assert [parse_granularity(g) for g in GRANULARITIES] == ["hour", "day", "week", "month"]
    with pytest.raises(ApiError) as refused:
        parse_granularity("minute")
    assert refused.value.message == "granularity must be one of hour, day, week, month"
