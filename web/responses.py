"""Plain-text responses, and the one place where errors become HTTP statuses."""

from __future__ import annotations

import logging

from flask import Response
from sqlalchemy.exc import SQLAlchemyError

from ca.errors import (
    AuthenticationError,
    ChargepkiError,
    ConfigError,
    ConflictError,
    InputError,
    NotFoundError,
    PolicyError,
    RateLimitedError,
    StoreError,
    TokenError,
)

REALM = 'Basic realm="chargepki EST", charset="UTF-8"'
RETRY_AFTER = "30"
log = logging.getLogger("chargepki.web")


class UnsupportedMediaType(InputError):
    """A request body of the wrong Content-Type (HTTP 415)."""


def text(body: str, status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(body.rstrip("\n") + "\n", status=status, mimetype="text/plain")
    response.headers.update(headers or {})
    return response


def error_response(exc: Exception) -> Response:
    if isinstance(exc, RateLimitedError):
        # RFC 6585 §4: 429 Too Many Requests, with Retry-After for honest clients.
        return text(str(exc), 429, {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, AuthenticationError):
        return text(str(exc), 401, {"WWW-Authenticate": REALM})
    if isinstance(exc, UnsupportedMediaType):
        return text(str(exc), 415)
    if isinstance(exc, InputError):
        return text(str(exc), 400)
    if isinstance(exc, PolicyError):
        return text(str(exc), 403)
    if isinstance(exc, NotFoundError):
        return text(str(exc), 404)
    if isinstance(exc, ConflictError):
        return text(str(exc), 409)
    if isinstance(exc, TokenError | StoreError | ConfigError):
        log.warning("service unavailable: %s", exc)
        return text(f"temporarily unavailable: {exc}", 503, {"Retry-After": RETRY_AFTER})
    if isinstance(exc, ChargepkiError):
        return text(str(exc), 400)
    if isinstance(exc, SQLAlchemyError):
        log.warning("database unavailable: %s", type(exc).__name__)
        return text("temporarily unavailable: the database cannot be reached", 503, {"Retry-After": RETRY_AFTER})
    log.exception("unexpected error")
    return text("internal error", 500)
