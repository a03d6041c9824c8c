"""The Flask application of ``chargepki serve est``: EST today, the CSMS API later.

``create_app`` follows the Flask factory pattern; everything it needs (the opened
installation and the EST settings) is passed in, so tests build apps the same way.
Every failure becomes a plain-text 4xx (or 503 with ``Retry-After`` while the token or
the database is unavailable), never an HTML page or a traceback.
"""

from __future__ import annotations

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from ca.config import EstSettings
from ca.context import Pki
from web.est import est
from web.responses import error_response, text

MAX_BODY = 32 * 1024  # a 16 KiB DER CSR in base64, plus headroom


def create_app(pki: Pki, settings: EstSettings) -> Flask:
    app = Flask("chargepki")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.extensions["chargepki"] = pki
    app.extensions["chargepki.est"] = settings
    app.register_blueprint(est)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        """Routing and protocol errors (404, 405 with Allow, 413) as one line of plain text."""
        allow = exc.get_response().headers.get("Allow")
        if exc.code == 413:
            return text(f"request body larger than {MAX_BODY} bytes", 413)
        return text(f"{exc.name}: {exc.description}", exc.code or 400, {"Allow": allow} if allow else None)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:
        return error_response(exc)

    return app
