"""click parameter types shared by the commands."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import click

_DURATION = re.compile(r"^\s*(\d+)\s*([dhm]?)\s*$")
_UNITS = {"d": "days", "": "days", "h": "hours", "m": "minutes"}
_PER_DAY = {"d": 1, "": 1, "h": 24, "m": 24 * 60}
MAX_DURATION_DAYS = 36500


class Duration(click.ParamType):
    """``90d``, ``23h``, ``30m``; a bare number means days."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = _DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration such as 90d, 23h or 30m", param, ctx)
        amount = int(match.group(1))
        # Nothing chargepki schedules lasts a century; larger numbers would overflow timedelta (found by fuzzing).
        if amount > MAX_DURATION_DAYS * _PER_DAY[match.group(2)]:
            self.fail(f"{value!r} is longer than {MAX_DURATION_DAYS} days", param, ctx)
        return timedelta(**{_UNITS[match.group(2)]: amount})


class UtcDateTime(click.ParamType):
    """An ISO 8601 date or date-time; without a zone it is taken as UTC."""

    name = "datetime"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(str(value))
            return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
        except (ValueError, OverflowError):  # OverflowError: year 1 or 9999 moved across a zone (found by fuzzing)
            self.fail(f"{value!r} is not an ISO 8601 date such as 2026-11-24T10:00:00Z", param, ctx)


DURATION = Duration()
UTC_DATETIME = UtcDateTime()
