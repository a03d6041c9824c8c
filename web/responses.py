"""Plain-text and JSON responses, and the one place where errors become HTTP statuses."""

from __future__ import annotations

import logging
from typing import Any

from flask import Response, jsonify
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

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
API_REALM = 'Bearer realm="chargepki CSMS API"'
RETRY_AFTER = "30"
MAX_BODY = 32 * 1024  # a 16 KiB DER CSR in base64, or a JSON request with a PEM chain, plus headroom
_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
log = logging.getLogger("chargepki.web")


class UnsupportedMediaType(InputError):
    """A request body of the wrong Content-Type (HTTP 415)."""

    code = "unsupported_media_type"


def text(body: str, status: int, headers: dict[str, str] | None = None) -> Response:
    response = Response(body.rstrip("\n") + "\n", status=status, mimetype="text/plain")
    response.headers.update(headers or {})
    return response


def json_body(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers or {})
    return response


def classify(exc: Exception) -> tuple[int, str, str, dict[str, str]]:
    """(HTTP status, message, machine-readable reason, extra headers) for any exception."""
    if isinstance(exc, HTTPException):  # routing and protocol errors (404, 405 with Allow, 413)
        status = exc.code or 400
        allow = exc.get_response().headers.get("Allow")
        message = f"request body larger than {MAX_BODY} bytes" if status == 413 else f"{exc.name}: {exc.description}"
        return status, message, _HTTP_REASONS.get(status, "bad_request"), {"Allow": allow} if allow else {}
    if isinstance(exc, RateLimitedError):
        # RFC 6585 §4: 429 Too Many Requests, with Retry-After for honest clients.
        return 429, str(exc), exc.code, {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, AuthenticationError):
        return 401, str(exc), exc.code, {}
    if isinstance(exc, UnsupportedMediaType):
        return 415, str(exc), exc.code, {}
    if isinstance(exc, InputError):
        return 400, str(exc), exc.code, {}
    if isinstance(exc, PolicyError):
        return 403, str(exc), exc.code, {}
    if isinstance(exc, NotFoundError):
        return 404, str(exc), exc.code, {}
    if isinstance(exc, ConflictError):
        return 409, str(exc), exc.code, {}
    if isinstance(exc, TokenError | StoreError | ConfigError):
        log.warning("service unavailable: %s", exc)
        return 503, f"temporarily unavailable: {exc}", exc.code, {"Retry-After": RETRY_AFTER}
    if isinstance(exc, ChargepkiError):
        return 400, str(exc), exc.code, {}
    if isinstance(exc, SQLAlchemyError):
        log.warning("database unavailable: %s", type(exc).__name__)
        message = "temporarily unavailable: the database cannot be reached"
        return 503, message, "unavailable", {"Retry-After": RETRY_AFTER}
    log.exception("unexpected error")
    return 500, "internal error", "internal_error", {}


def error_response(exc: Exception) -> Response:
    """EST: one line of plain text (RFC 7030 clients show it to people)."""
    status, message, _reason, headers = classify(exc)
    if status == 401:
        headers = {"WWW-Authenticate": REALM}
    return text(message, status, headers)


def json_error(exc: Exception) -> Response:
    """CSMS API: ``{"error": message, "reason": code}`` (its callers are programs)."""
    status, message, reason, headers = classify(exc)
    if status == 401:
        headers = {**headers, "WWW-Authenticate": API_REALM}
    return json_body({"error": message, "reason": reason}, status, headers)
