"""The fleet console's Flask application: who may look, what every answer carries, how errors read.

Every request but the stylesheet and the login link's own pages is answered for an admin only:
an ``admin`` client certificate on the TLS connection (checked against the store on every request,
so a revoked one stops working at once) or a session cookie a one-time login link opened. Others
get 401 (nothing presented) or 403 (a certificate that is no admin's), counted as anonymous noise
in the audit log (``audit.count_noise``), never served. An admin's page views are counted per
page and summarised once a minute (``audit.count_activity``). Nothing here writes anything else:
the console has no write actions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, Response, g, render_template, request
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from ca import audit
from ca.clock import iso_utc, utcnow
from ca.config import ConsoleSettings, EstSettings
from ca.context import Pki
from ca.registry.admins import admin_actor, certificate_admin, session_admin
from web.caller import client_certificate
from web.responses import classify

COOKIE = "chargepki_console"
VIEW = "console.view"
PUBLIC = frozenset({"console.login", "console.login_form", "static"})
# The console listens itself (no proxy): the client certificate comes from its TLS socket only.
_DIRECT = EstSettings(client_cert_header=None, trusted_proxies=())
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # a login link's token never leaves in a Referer
    "Cache-Control": "no-store",  # nothing of the fleet in a browser's or proxy's cache
    "X-Frame-Options": "DENY",
}


class ConsoleApp(Flask):
    pki: Pki
    settings: ConsoleSettings
    audit_key: Callable[[], ec.EllipticCurvePublicKey]


def db() -> Session:
    """This request's database session (closed when the request ends)."""
    if "db" not in g:
        g.db = g.pki.store.session()
    return g.db  # type: ignore[no-any-return]


def create_console_app(
    pki: Pki, settings: ConsoleSettings, *, audit_key: Callable[[], ec.EllipticCurvePublicKey]
) -> ConsoleApp:
    """``audit_key``: the audit key's public half (read from the token once), to check the last checkpoint."""
    from web.console.pages import pages

    app = ConsoleApp("web.console")
    app.pki, app.settings, app.audit_key = pki, settings, audit_key
    app.config["MAX_CONTENT_LENGTH"] = 4096  # the login form is the only body
    app.jinja_env.filters["utc"] = lambda value: (iso_utc(value) or "-").replace("T", " ")
    app.jinja_env.globals["without"] = lambda args, *names: {k: v for k, v in args.items() if k not in names}
    app.register_blueprint(pages)

    @app.before_request
    def authenticate() -> Response | None:
        g.pki = pki
        g.admin = None
        if request.endpoint in PUBLIC:
            return None
        der, _binding = client_certificate(_DIRECT)
        if der is not None:
            g.admin = certificate_admin(db(), der)
            db().commit()
            if g.admin is None:
                return refuse(403, "not_admin", "this client certificate is not a valid admin certificate")
            g.via = "client certificate"
            return None
        session_id = request.cookies.get(COOKIE)
        if session_id and len(session_id) <= 128:
            g.admin = session_admin(db(), session_id)
            db().commit()
        if g.admin is None:
            return refuse(401, "unauthenticated", "log in with an admin certificate or a login link")
        g.via = "login link"
        return None

    @app.after_request
    def secure(response: Response) -> Response:
        response.headers.update(HEADERS)
        if g.get("admin") and response.status_code == 200 and request.endpoint not in PUBLIC:
            audit.count_activity(
                db(), actor=admin_actor(g.admin), address=request.remote_addr, action=VIEW, code=request.endpoint or "?"
            )
            db().commit()
        return response

    @app.teardown_request
    def close(_exc: BaseException | None) -> None:
        session = g.pop("db", None)
        if session is not None:
            session.close()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status, message, _reason, headers = classify(exc)
        return page_error(status, message, headers)

    @app.errorhandler(Exception)
    def any_error(exc: Exception) -> Response:
        if "db" in g:
            g.db.rollback()
        status, message, _reason, headers = classify(exc)
        return page_error(status, message, headers)

    return app


def refuse(status: int, code: str, message: str) -> Response:
    """401/403 for someone who is no admin: counted as anonymous noise, then an error page."""
    audit.count_noise(db(), address=request.remote_addr, action=VIEW, code=code, now=utcnow)
    db().commit()
    return page_error(status, message)


def page_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    body = render_template("error.html", status=status, message=message)
    response = Response(body, status=status, mimetype="text/html", headers=headers or {})
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Cookie realm="chargepki console"'
    return response


def session_lifetime(settings: ConsoleSettings) -> timedelta:
    return timedelta(minutes=settings.session_minutes)
