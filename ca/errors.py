"""Errors that the interfaces turn into one clear line (CLI) or a 4xx/503 (HTTP).

Every refusal the CA makes is one of these, so no caller ever needs to show a traceback.
"""

from __future__ import annotations


class ChargepkiError(Exception):
    """Base class: the message is meant for the operator, one line, no secrets.

    ``code`` is a stable machine-readable reason (``cn_mismatch``, ``key_reuse`` …) for APIs whose
    callers are programs (the CSMS API); each class has a default, raise sites may be more precise.
    """

    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(ChargepkiError):
    """The home, config file or a setting is missing or invalid."""

    code = "unavailable"


class TokenError(ChargepkiError):
    """The PKCS#11 module, token, PIN or a key in it is unusable."""

    code = "unavailable"


class StoreError(ChargepkiError):
    """The database is unreachable or its schema is not what this code expects."""

    code = "unavailable"


class InputError(ChargepkiError):
    """Malformed input: PEM, DER, serial numbers, dates."""

    code = "bad_request"


class PolicyError(ChargepkiError):
    """Well-formed input that the CA's policy refuses (key type, validity, names)."""

    code = "refused"


class NotFoundError(ChargepkiError):
    """A certificate, authority or device that does not exist."""

    code = "not_found"


class ConflictError(ChargepkiError):
    """An operation that would contradict the current state (init twice, revoke twice)."""

    code = "conflict"


class AuthenticationError(ChargepkiError):
    """Missing or wrong credentials (HTTP 401): the message never says which part was wrong."""

    code = "unauthenticated"


class RateLimitedError(ChargepkiError):
    """Too many failed authentications from this device or address (HTTP 429 with Retry-After)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (a database driver's own, when it wraps one), for logs and replies."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
