"""The console's query parameters: each page names the ones it accepts, anything else is a 400.

Browsers and people type URLs; a value that is not what a page expects must come back as a clear
message (``InputError`` → 400), never reach a query or become a 500.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flask import request

from ca.errors import InputError

MAX_VALUE = 128
MAX_PAGE = 10_000
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_NUMBER = re.compile(r"[0-9]{1,9}")


def accept(*names: str) -> dict[str, str]:
    """The request's query parameters, when each is one of ``names`` and given once; else 400."""
    args = request.args
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise InputError(f"unknown query parameter {unknown[0][:40]!r} (this page takes: {', '.join(names) or 'none'})")
    values = {}
    for name in args:
        given = args.getlist(name)
        if len(given) > 1:
            raise InputError(f"query parameter {name!r} given {len(given)} times")
        value = given[0].strip()
        if len(value) > MAX_VALUE or not _PRINTABLE.fullmatch(value):
            raise InputError(f"query parameter {name!r}: at most {MAX_VALUE} printable ASCII characters")
        if value:
            values[name] = value
    return values


def choice(values: dict[str, str], name: str, allowed: Iterable[str]) -> str | None:
    value = values.get(name)
    options = tuple(allowed)
    if value is not None and value not in options:
        raise InputError(f"query parameter {name!r}: {value!r} is not one of {', '.join(options)}")
    return value


def number(values: dict[str, str], name: str, *, default: int | None, low: int = 1, high: int = MAX_PAGE) -> int | None:
    value = values.get(name)
    if value is None:
        return default
    if not _NUMBER.fullmatch(value) or not low <= int(value) <= high:
        raise InputError(f"query parameter {name!r}: a whole number from {low} to {high}")
    return int(value)
