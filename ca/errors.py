"""Errors that the interfaces turn into one clear line (CLI) or a 4xx/503 (HTTP).

Every refusal the CA makes is one of these, so no caller ever needs to show a traceback.
"""

from __future__ import annotations


class ChargepkiError(Exception):
    """Base class: the message is meant for the operator, one line, no secrets."""


class ConfigError(ChargepkiError):
    """The home, config file or a setting is missing or invalid."""


class TokenError(ChargepkiError):
    """The PKCS#11 module, token, PIN or a key in it is unusable."""


class StoreError(ChargepkiError):
    """The database is unreachable or its schema is not what this code expects."""


class InputError(ChargepkiError):
    """Malformed input: PEM, DER, serial numbers, dates."""


class PolicyError(ChargepkiError):
    """Well-formed input that the CA's policy refuses (key type, validity, names)."""


class NotFoundError(ChargepkiError):
    """A certificate, authority or device that does not exist."""


class ConflictError(ChargepkiError):
    """An operation that would contradict the current state (init twice, revoke twice)."""


class AuthenticationError(ChargepkiError):
    """Missing or wrong credentials (HTTP 401): the message never says which part was wrong."""


class RateLimitedError(ChargepkiError):
    """Too many failed authentications from this device or address (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after
