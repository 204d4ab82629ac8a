"""Stacked bar charts as inline SVG, drawn on the server: one path per layer, so a
365-bar chart stays a few kilobytes, and no script or library is needed to see it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from usage_api.dashboard.figures import Bucket

WIDTH_PER_BAR = 10
HEIGHT = 100
# (chart key, title, unit, layers: (path in usage, legend label, css class))
CHARTS = (
    (
        "sms",
        "SMS segments",
        "segments",
        ((("sms", "outbound"), "Outbound", "out"), (("sms", "inbound"), "Inbound", "in")),
    ),
    (
        "mms",
        "MMS segments",
        "segments",
        ((("mms", "outbound"), "Outbound", "out"), (("mms", "inbound"), "Inbound", "in")),
    ),
    (
        "voice",
        "Voice seconds",
        "seconds",
        (
            (("voice", "seconds"), "Plain", "out"),
            (("voice", "kb_seconds"), "Knowledge base", "in"),
        ),
    ),
)


@dataclass(frozen=True)
class Layer:
    label: str
    css: str
    path: str


@dataclass(frozen=True)
class Chart:
    key: str
    title: str
    unit: str
    width: int
    layers: list[Layer]
    top: int  # the value at the top of the axis
    summary: str  # the chart in one sentence


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least `value` (1 for 0)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def bucket_label(at: datetime, granularity: str) -> str:
    """A locale-free label: `Mon 24 Nov 2026 14:00`, `Mon 24 Nov 2026`, `Nov 2026`."""
    if granularity == "hour":
        return at.strftime("%a %d %b %Y %H:%M")
    if granularity == "day":
        return at.strftime("%a %d %b %Y")
    if granularity == "week":
        return "Week of " + at.strftime("%d %b %Y")
    return at.strftime("%b %Y")


def _bar_path(heights: list[float], bases: list[float]) -> str:
    width = WIDTH_PER_BAR - 2
    parts = []
    for index, (height, base) in enumerate(zip(heights, bases, strict=True)):
        if height <= 0:
            continue
        x = index * WIDTH_PER_BAR + 1
        y = HEIGHT - base - height
        parts.append(f"M{x} {y:.2f}h{width}v{height:.2f}h-{width}z")
    return "".join(parts)


def stacked_charts(buckets: list[Bucket], granularity: str) -> list[Chart]:
    charts = []
    for key, title, unit, layers in CHARTS:
        values = [[bucket.usage[path[0]][path[1]] for bucket in buckets] for path, _, _ in layers]
        sums = [sum(column) for column in zip(*values, strict=True)]
        top = nice_ceiling(max(sums, default=0))
        bases = [0.0] * len(buckets)
        drawn = []
        for (_, label, css), layer in zip(layers, values, strict=True):
            heights = [value * HEIGHT / top for value in layer]
            drawn.append(Layer(label, css, _bar_path(heights, bases)))
            bases = [base + height for base, height in zip(bases, heights, strict=True)]
        if any(sums):
            peak = max(range(len(sums)), key=lambda n: sums[n])
            summary = (
                f"{title}: {sum(sums):,} {unit} in {len(buckets)} buckets; the highest,"
                f" {sums[peak]:,}, in {bucket_label(buckets[peak].start, granularity)}."
            )
        else:
            summary = f"{title}: none in this period."
        charts.append(
            Chart(key, title, unit, max(len(buckets), 1) * WIDTH_PER_BAR, drawn, top, summary)
        )
    return charts
