"""Certificate serial numbers: random, positive, at most 20 octets, written as OCPP writes them.

RFC 5280 §4.1.2.2 allows 20 octets; the CA/Browser Forum Baseline Requirements ask for at least
64 bits of CSPRNG output.
We draw 159 bits from the OS CSPRNG and force the top bit of the first octet clear, so the
DER INTEGER is positive and never needs a padding octet (always ≤ 20 octets). Uniqueness is
enforced by the database, not assumed from the randomness.
"""

from __future__ import annotations

import re
import secrets

from ca.errors import InputError

SERIAL_BITS = 159
_HEX = re.compile(r"^[0-9A-F]{1,40}$")


def new_serial() -> int:
    value = 0
    while value == 0:  # zero is not a valid serial (RFC 5280 §4.1.2.2: positive)
        value = secrets.randbits(SERIAL_BITS)
    return value


def format_serial(value: int) -> str:
    """Upper-case hex without leading zeros (OCPP CertificateHashData.serialNumber)."""
    return format(value, "X")


def parse_serial(text: str) -> str:
    """Accept ``0x``-prefixed, colon-separated, any-case hex; return the canonical form."""
    cleaned = text.strip().replace(":", "").upper()
    cleaned = cleaned.removeprefix("0X").lstrip("0") or "0"
    if not _HEX.match(cleaned):
        raise InputError(f"not a certificate serial number (hex, at most 20 octets): {text!r}")
    return cleaned
