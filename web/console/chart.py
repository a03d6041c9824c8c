"""Revocations per day as bars of an inline SVG, laid out here so the template only draws them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

WIDTH, HEIGHT, LABELS = 720, 140, 18  # the plot, and the strip under it for the first and last date


@dataclass(frozen=True)
class Bar:
    day: date
    count: int
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    total: int
    width: int = WIDTH
    height: int = HEIGHT + LABELS
    plot_height: int = HEIGHT


def revocation_chart(per_day: list[tuple[date, int]]) -> Chart:
    """Bars scaled to the busiest day (a day without revocations is a hairline, so the axis reads)."""
    peak = max((count for _, count in per_day), default=0)
    step = WIDTH / max(len(per_day), 1)
    bars = []
    for i, (day, count) in enumerate(per_day):
        height = max(1.0, HEIGHT * count / peak) if peak else 1.0
        bars.append(
            Bar(day, count, round(i * step + 1, 2), round(HEIGHT - height, 2), round(step - 2, 2), round(height, 2))
        )
    return Chart(bars, peak, sum(count for _, count in per_day))
