"""The Flask application of ``chargepki serve est``: EST and the CSMS API.

``create_app`` follows the Flask factory pattern; everything it needs (the opened
installation and the EST settings) is passed in, so tests build apps the same way.
Every failure becomes a 4xx (or 503 with ``Retry-After`` while the token or the database is
unavailable), never an HTML page or a traceback: plain text for EST, whose clients show it
to people, and JSON ``{"error", "reason"}`` under ``/api/`` and OPCP's ``/cpo/``, whose callers are programs.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Response, request
from werkzeug.exceptions import HTTPException

from ca.config import EstSettings
from ca.context import Pki
from web.api import JobRunner, api
from web.est import est
from web.opcp import owns, register
from web.responses import MAX_BODY, classify, error_response, json_error, text
from web.runtime import WorkerApp, WorkerRuntime


def create_app(pki: Pki, settings: EstSettings, *, run_jobs: bool = False) -> WorkerApp:
    """``run_jobs`` starts the thread that signs the CSMS API's asynchronous requests and writes the
    periodic signed audit checkpoints (serving processes).

    The worker's state (the installation, settings, caches, the job runner) is one
    :class:`web.runtime.WorkerRuntime`, made here and shared by the request threads and the runner.
    """
    app = WorkerApp("chargepki")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.runtime = WorkerRuntime.create(pki, settings)
    app.register_blueprint(est)
    app.register_blueprint(api)
    register(app, settings.opcp_bases)  # OPCP-compatible CPO EST (web/opcp.py)
    if run_jobs:
        every = timedelta(seconds=pki.config.audit.checkpoint_interval_seconds)
        app.runtime.jobs = JobRunner(app, checkpoint_every=every)
        app.runtime.jobs.start()

    def is_api() -> bool:
        return request.path.startswith("/api/") or owns(request.path)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        """Routing and protocol errors (404, 405 with Allow, 413)."""
        if is_api():
            return json_error(exc)
        status, message, _reason, headers = classify(exc)
        return text(message, status, headers)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:
        return json_error(exc) if is_api() else error_response(exc)

    return app
