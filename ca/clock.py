"""The clock every core flow takes as an argument, so tests and the moved-clock run can set it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso_utc(value: datetime | None) -> str | None:
    """``2026-12-03T10:00:00Z``: the one timestamp format of machine-readable output (JSON, CSV exports).

    Seconds are enough for an operator's tools, and a fixed ``Z`` suffix sorts and parses everywhere.
    """
    return None if value is None else value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
