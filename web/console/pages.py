"""The console's pages: each reads through the core's own queries (the ones the CLI's reports, lists and
``--json`` views use) and renders a template. GET only, apart from spending a login link."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, current_app, g, make_response, redirect, render_template, request

from ca import audit, reports
from ca.audit.checkpoints import latest
from ca.authorities.issuers import list_authorities
from ca.clock import utcnow
from ca.errors import ChargepkiError, InputError, one_line
from ca.issuance.names import ENVIRONMENTS
from ca.registry.admins import spend_login_link
from ca.registry.devices import DEVICE_STATES, current_certificate, device_certificates, get_device, search_devices
from ca.status.certificates import STATUSES, display_status, get_certificate
from ca.store.models import Device
from ocsp.presign import stored_answers
from web.console.app import COOKIE, db, session_lifetime
from web.console.chart import revocation_chart
from web.console.params import accept, choice, number

pages = Blueprint("console", __name__, template_folder="templates", static_folder="static")
PAGE_SIZE = 50
EXPIRING_WINDOW = timedelta(days=30)
EXPIRING_SHOWN = 20
CHART_DAYS = 30


@pages.get("/")
def overview() -> str:
    """One environment at a glance: its CAs, certificates by status, what expires next, revocations per day."""
    args = accept("environment")
    session = db()
    present = [e for e in ENVIRONMENTS if any(a.environment == e for a in list_authorities(session))]
    environment = choice(args, "environment", ENVIRONMENTS) or (present[0] if present else ENVIRONMENTS[0])
    now = utcnow()
    authorities = list_authorities(session, environment)
    by_status = dict.fromkeys(STATUSES, 0) | reports.certificates_by_status(session, now, environment)
    expiring = reports.expiring(session, now, within=EXPIRING_WINDOW, environment=environment, limit=EXPIRING_SHOWN)
    chart = revocation_chart(reports.revocations_per_day(session, now, days=CHART_DAYS, environment=environment))
    return render_template(
        "overview.html", environment=environment, environments=present or list(ENVIRONMENTS), now=now,
        authorities=authorities, by_status=by_status, devices=reports.device_counts(session, environment),
        expiring=expiring.tables[0].rows, expiring_total=expiring.total,
        window_days=EXPIRING_WINDOW.days, chart=chart,
    )  # fmt: skip


@pages.get("/devices")
def devices() -> str:
    """Device search by serial (prefix), model, state and environment, a page at a time."""
    args = accept("serial", "model", "state", "environment", "page")
    state = choice(args, "state", DEVICE_STATES)
    environment = choice(args, "environment", ENVIRONMENTS)
    page = number(args, "page", default=1) or 1
    found, more = search_devices(
        db(), serial=args.get("serial"), model=args.get("model"), state=state, environment=environment,
        limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE,
    )  # fmt: skip
    return render_template(
        "devices.html", devices=found, more=more, page=page, args=args, states=DEVICE_STATES,
        environments=ENVIRONMENTS,
    )  # fmt: skip


@pages.get("/devices/<serial>")
def device(serial: str) -> str:
    """A device and every certificate it was issued, oldest first, with the status people see."""
    accept()
    session = db()
    found = get_device(session, serial)
    now = utcnow()
    current = current_certificate(session, found, lambda: now)
    history = [(c, display_status(c, now)) for c in device_certificates(session, found)]
    return render_template("device.html", device=found, history=history, current=current)


@pages.get("/certificates/<serial>")
def certificate(serial: str) -> str:
    """One certificate and the pre-signed OCSP answers the responder serves for it now."""
    accept()
    session = db()
    found = get_certificate(session, serial)
    now = utcnow()
    holder = session.get(Device, found.device_id) if found.device_id is not None else None
    return render_template(
        "certificate.html", certificate=found, status=display_status(found, now),
        answers=stored_answers(session, found), device_serial=holder.serial if holder is not None else None, now=now,
    )  # fmt: skip


@pages.get("/campaigns")
def campaigns() -> str:
    """Every re-enrollment campaign's progress, newest first."""
    accept()
    report = reports.campaigns(db(), utcnow())
    return render_template("campaigns.html", columns=report.tables[0].columns, rows=report.tables[0].rows)


@pages.get("/campaigns/<int:campaign_id>")
def campaign(campaign_id: int) -> str:
    """One campaign: its progress and each of its devices, a page at a time."""
    args = accept("page")
    page = number(args, "page", default=1) or 1
    report = reports.campaigns(db(), utcnow(), name=str(campaign_id))
    rows = report.tables[1].rows
    shown = rows[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    return render_template(
        "campaign.html", columns=report.tables[0].columns, summary=report.tables[0].rows[0], devices=shown,
        page=page, more=len(rows) > page * PAGE_SIZE,
    )  # fmt: skip


@pages.get("/audit")
def audit_trail() -> str:
    """The audit log, newest page first, filtered by action, actor or subject; and the last checkpoint."""
    args = accept("action", "actor", "subject", "before")
    before = number(args, "before", default=None, high=2**31 - 1)
    session = db()
    entries = audit.events(
        session, action=args.get("action"), actor=args.get("actor"), subject=args.get("subject"), before=before,
        limit=PAGE_SIZE,
    )  # fmt: skip
    entries.reverse()  # newest first on a page
    try:
        checkpoint, checkpoint_error = latest(session, current_app.audit_key), None  # type: ignore[attr-defined]
    except ChargepkiError as exc:
        checkpoint, checkpoint_error = None, one_line(exc)
    older = entries[-1].seq if len(entries) == PAGE_SIZE else None
    return render_template(
        "audit.html", entries=entries, args=args, older=older, checkpoint=checkpoint, checkpoint_error=checkpoint_error
    )


# -- logging in by a one-time link ---------------------------------------------------------------
@pages.get("/login")
def login_form() -> str:
    """The link's landing page: a button that spends it (a link preview that only GETs spends nothing)."""
    token = accept("token").get("token")
    if token is None:
        raise InputError("this login link has no token: print a new one with `chargepki console login-link`")
    return render_template("login.html", token=token)


@pages.post("/login")
def login() -> Any:
    accept()
    token = request.form.get("token", "")
    if not token or len(token) > 128:
        raise InputError("no login token in the form")
    settings = current_app.settings  # type: ignore[attr-defined]
    opened = spend_login_link(db(), token, lifetime=session_lifetime(settings), address=request.remote_addr)
    if opened is None:
        response = make_response(
            render_template(
                "error.html", status=403, message="this login link was used already, has expired or never existed"
            ),
            403,
        )
        audit.count_noise(db(), address=request.remote_addr, action="console.login", code="bad_link")
        db().commit()
        return response
    g.admin = opened.admin
    response: Response = redirect("/", code=303)
    response.set_cookie(
        COOKIE, opened.session_id, max_age=int(session_lifetime(settings).total_seconds()), secure=True,
        httponly=True, samesite="Strict", path="/",
    )  # fmt: skip
    return response
