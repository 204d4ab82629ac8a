"""Series (contract 2.6): how buckets are summed from the roll-ups.

`series.plan` is checked against sums computed directly from random events: the roll-ups
of every level are built here from those events, and the plan's reads are evaluated the
way the SQL evaluates them (rows of the top level in the bucket of their midpoint, signed
spans of finer rows, raw events of cut quarter-hours in their own bucket).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from usage_api.analytics.calendar import GRANULARITIES, Calendar
from usage_api.analytics.series import LEVELS, SIZE, Level, Plan, plan

START = datetime(2026, 1, 1, tzinfo=UTC)
ZONES = ("UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe")


def floor(at: datetime, level: Level) -> datetime:
    size = SIZE[level]
    return START + (at - START) // size * size


def evaluate(p: Plan, events: Sequence[tuple[datetime, int]]) -> list[int]:
    rows: dict[Level, dict[datetime, int]] = {level: defaultdict(int) for level in LEVELS}
    for at, value in events:
        for level in LEVELS:
            rows[level][floor(at, level)] += value
    n = len(p.bounds) - 1
    totals = [0] * (n + 2)
    for at, value in rows[p.top].items():
        if p.top_start <= at < p.top_end:
            totals[bisect_right(p.bounds, at + SIZE[p.top] / 2)] += value
    for span in p.spans:
        for at, value in rows[span.level].items():
            if span.start <= at < span.end:
                totals[span.to] += value
                totals[span.away] -= value
    for raw in p.raw:
        for at, value in events:
            if raw.start <= at < raw.end:
                totals[bisect_right(p.bounds, at)] += value
    return totals[1 : n + 1]


def direct(bounds: Sequence[datetime], events: Sequence[tuple[datetime, int]]) -> list[int]:
    totals = [0] * (len(bounds) - 1)
    for at, value in events:
        if bounds[0] <= at < bounds[-1]:
            totals[bisect_right(bounds, at) - 1] += value
    return totals


instants = st.builds(
    lambda quarters, micro: START + quarters * SIZE["quarter"] + timedelta(microseconds=micro),
    st.integers(0, 8 * 96),
    st.sampled_from([0, 0, 1, -1, 450_000_000]) | st.integers(0, 900_000_000 - 1),
)


@st.composite
def bounds(draw: st.DrawFn) -> list[datetime]:
    if draw(st.booleans()):  # a series' own buckets, between two random instants
        start, end = sorted(draw(st.lists(instants, min_size=2, max_size=2, unique=True)))
        calendar = Calendar(
            ZoneInfo(draw(st.sampled_from(ZONES))), draw(st.sampled_from(GRANULARITIES))
        )
        cut = calendar.buckets(start, end)
        return [cut[0][0], *(b for _, b in cut)]
    return sorted(draw(st.lists(instants, min_size=2, max_size=40, unique=True)))


@settings(max_examples=400, deadline=None)
@given(
    bounds(),
    st.lists(st.tuples(instants, st.integers(1, 1000)), max_size=60),
    st.sampled_from(LEVELS),
)
def test_a_plan_sums_every_bucket_exactly(
    cuts: list[datetime], events: list[tuple[datetime, int]], top: Level
) -> None:
    # Events exactly on, and one microsecond before, every bound too.
    events = events + [(b, 7) for b in cuts] + [(b - timedelta(microseconds=1), 3) for b in cuts]
    assert evaluate(plan(cuts, top), events) == direct(cuts, events)


def test_a_boundary_costs_less_than_half_a_row_of_each_level() -> None:
    new_york = Calendar(ZoneInfo("America/New_York"), "day")
    cut = new_york.buckets(datetime(2025, 1, 1, 5, tzinfo=UTC), datetime(2026, 1, 1, 5, tzinfo=UTC))
    p = plan([cut[0][0], *(b for _, b in cut)], "day")
    assert p.rows()["day"] == 366 and p.rows()["hour"] <= 366 * 5 and "quarter" not in p.rows()
    kolkata = Calendar(ZoneInfo("Asia/Kolkata"), "day")
    cut = kolkata.buckets(
        datetime(2024, 12, 31, 18, 30, tzinfo=UTC), datetime(2025, 12, 31, 18, 30, tzinfo=UTC)
    )
    p = plan([cut[0][0], *(b for _, b in cut)], "day")
    assert p.rows() == {"raw": 0, "day": 366, "hour": 366 * 5, "quarter": 366 * 2}
