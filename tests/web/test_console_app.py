"""The fleet console's application through Flask's test client, on SQLite and PostgreSQL: who gets in,
what each page shows (held against the database), and that bad input is a 400, never a 500."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from ca import audit
from ca.audit import checkpoints
from ca.authorities.issuers import default_issuing_ca, issuer_for, list_authorities
from ca.authorities.rotation import rotate_issuing_ca
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.registry.admins import issue_login_link
from ca.registry.campaigns import start_campaign
from ca.registry.devices import add_device, disable_device
from ca.status.revocation import revoke
from ca.store.models import AuditEvent, Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.hostile import World
from web.console.app import COOKIE, create_console_app

BASE = "https://localhost"


@dataclass
class Fleet:
    world: World
    admin_der: bytes
    revoked_admin_der: bytes
    charger_der: bytes
    good_serial: str
    revoked_serial: str
    campaign_id: int

    def app(self) -> Any:
        pki = self.world.pki
        return create_console_app(pki, pki.config.console, audit_key=lambda: checkpoints.audit_public_key(pki.token()))

    def link(self, admin: str = "alice") -> str:
        with self.world.pki.store.session() as session:
            return issue_login_link(Work(session, "cli:test"), admin=admin)


class _TlsSocket:
    """What gunicorn puts in ``environ['gunicorn.socket']`` for a TLS connection with a client certificate."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes:
        return self.der

    def get_channel_binding(self, _kind: str) -> bytes:
        raise ValueError("TLS 1.3")


@pytest.fixture(scope="module")
def fleet(world: World) -> Iterator[Fleet]:
    pki = world.pki
    token = pki.token()
    status = Presigner(token)
    with pki.store.session() as session:
        work = Work(session, "test", status=status, token=token)
        issuing = default_issuing_ca(session, None)
        issuer = issuer_for(issuing, token)

        def certificate(profile: str, name: str, device_id: int | None = None) -> Certificate:
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
            return issue(
                work, issuer=issuer, request=IssueRequest(get_profile(profile), key, name, device_id=device_id)
            )

        one = add_device(Work(session, "test"), serial="CP-CON-1", model="AC22")
        add_device(Work(session, "test"), serial="CP-CON-2", model="DC150")
        old = certificate("charger", "CP-CON-1", one.id)
        revoke(work, serial=old.serial, reason="keyCompromise")
        good = certificate("charger", "CP-CON-1", one.id)
        disable_device(work, serial="CP-CON-2")
        admin = certificate("admin", "alice")
        mallory = certificate("admin", "mallory")
        revoke(work, serial=mallory.serial, reason="cessationOfOperation")
        charger_der = good.der or b""
        rotate_issuing_ca(work, ca_name=issuing.name)
        campaign, _size = start_campaign(work, from_ca=issuing.name)
        checkpoints.checkpoint(session, token, world.home)
        yield Fleet(world, admin.der or b"", mallory.der or b"", charger_der, good.serial, old.serial, campaign.id)


@pytest.fixture
def admin(fleet: Fleet) -> Any:
    """A browser-like client logged in by a login link."""
    client = fleet.app().test_client()
    response = client.post("/login", data={"token": fleet.link()}, base_url=BASE)
    assert response.status_code == 303 and response.headers["Location"] == "/"
    return client


def get(client: Any, path: str, **kwargs: Any) -> Any:
    return client.get(path, base_url=BASE, **kwargs)


def text(response: Any) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", response.get_data(as_text=True)))


# -- who gets in ---------------------------------------------------------------------------------
PAGES = ["/", "/devices", "/devices/CP-CON-1", "/campaigns", "/audit"]


@pytest.mark.parametrize("path", PAGES)
def test_nobody_is_served_without_credentials_and_the_refusal_is_counted(fleet: Fleet, path: str) -> None:
    response = get(fleet.app().test_client(), path)
    assert response.status_code == 401
    assert "CP-CON" not in response.get_data(as_text=True) and "Acme" not in response.get_data(as_text=True)
    with fleet.world.pki.store.session() as session:
        audit.flush_all_noise(session)
        summaries = session.scalars(select(AuditEvent.details).where(AuditEvent.action == audit.NOISE)).all()
    assert any("console.view unauthenticated" in details for details in summaries)


def test_a_login_link_opens_a_strict_session_cookie_once(fleet: Fleet) -> None:
    client = fleet.app().test_client()
    token = fleet.link()
    form = get(client, f"/login?token={token}")
    assert form.status_code == 200 and token in form.get_data(as_text=True)  # only the form: nothing spent yet
    first = client.post("/login", data={"token": token}, base_url=BASE)
    assert first.status_code == 303
    cookie = first.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and all(flag in cookie for flag in ("Secure", "HttpOnly", "SameSite=Strict"))
    assert get(client, "/").status_code == 200
    again = fleet.app().test_client().post("/login", data={"token": token}, base_url=BASE)
    assert again.status_code == 403 and COOKIE not in again.headers.get("Set-Cookie", "")


def test_a_forged_or_stale_cookie_is_refused(fleet: Fleet) -> None:
    client = fleet.app().test_client()
    client.set_cookie(COOKIE, "x" * 43, domain="localhost")
    assert get(client, "/").status_code == 401


def test_an_admin_certificate_is_enough_and_its_revocation_ends_it(fleet: Fleet) -> None:
    client = fleet.app().test_client()
    ok = get(client, "/", environ_base={"gunicorn.socket": _TlsSocket(fleet.admin_der)})
    assert ok.status_code == 200 and "alice (client certificate)" in text(ok)
    revoked = get(client, "/", environ_base={"gunicorn.socket": _TlsSocket(fleet.revoked_admin_der)})
    assert revoked.status_code == 403
    charger = get(client, "/", environ_base={"gunicorn.socket": _TlsSocket(fleet.charger_der)})
    assert charger.status_code == 403  # a certificate of this PKI, but no admin's


def test_the_console_writes_nothing(admin: Any) -> None:
    for path in PAGES:
        assert admin.post(path, base_url=BASE).status_code == 405


def test_every_answer_forbids_caching_framing_and_scripts(admin: Any) -> None:
    headers = get(admin, "/").headers
    assert headers["Cache-Control"] == "no-store" and headers["X-Frame-Options"] == "DENY"
    assert (
        "default-src 'none'" in headers["Content-Security-Policy"]
        and "script" not in headers["Content-Security-Policy"]
    )


# -- what each page shows ------------------------------------------------------------------------
def test_the_overview_shows_the_environments_cas_and_counts(admin: Any, fleet: Fleet) -> None:
    page = text(get(admin, "/?environment=production"))
    with fleet.world.pki.store.session() as session:
        names = [a.name for a in list_authorities(session, "production")]
        revoked = session.scalar(select(func.count()).where(Certificate.status == "revoked"))
    assert all(name in page for name in names)
    assert re.search(rf"Revocations per day \(last 30 days, UTC\) {revoked}\b", page), page
    body = get(admin, "/").get_data(as_text=True)
    assert "<svg" in body and 'data-count="' in body and "<script" not in body


def test_device_search_by_serial_model_and_state(admin: Any) -> None:
    assert "CP-CON-1" in text(get(admin, "/devices?serial=CP-CON"))
    by_model = text(get(admin, "/devices?model=DC150"))
    assert "CP-CON-2" in by_model and "CP-CON-1" not in by_model
    disabled = text(get(admin, "/devices?state=disabled"))
    assert "CP-CON-2" in disabled and "CP-CON-1" not in disabled
    assert "no device matches" in text(get(admin, "/devices?serial=%25"))  # a LIKE wildcard is a character


def test_a_devices_history_lists_every_certificate_with_its_status(admin: Any, fleet: Fleet) -> None:
    page = text(get(admin, "/devices/CP-CON-1"))
    assert f"{fleet.revoked_serial} charger revoked" in page
    assert f"{fleet.good_serial} charger valid" in page
    assert f"current certificate {fleet.good_serial}" in page


def test_a_certificate_shows_the_ocsp_answer_served_now(admin: Any, fleet: Fleet) -> None:
    good = text(get(admin, f"/certificates/{fleet.good_serial}"))
    assert "sha1 good" in good
    revoked = text(get(admin, f"/certificates/{fleet.revoked_serial}"))
    assert "sha1 revoked" in revoked and "key_compromise" in revoked


def test_campaign_progress(admin: Any, fleet: Fleet) -> None:
    listing = text(get(admin, "/campaigns"))
    assert str(fleet.campaign_id) in listing
    one = text(get(admin, f"/campaigns/{fleet.campaign_id}"))
    assert "CP-CON-1" in one and "pending" in one


def test_the_audit_trail_filters_and_names_the_last_verified_checkpoint(admin: Any, fleet: Fleet) -> None:
    page = text(get(admin, "/audit?action=certificate.revoked"))
    with fleet.world.pki.store.session() as session:
        last = session.scalar(select(func.max(AuditEvent.seq)).where(AuditEvent.action == "certificate.revoked"))
    assert f" {last} " in page and "certificate.issued" not in page.split("Filter", 1)[1]
    assert "Last verified checkpoint: entry" in page


def test_page_views_are_audited_in_one_summary_per_admin_and_minute(admin: Any, fleet: Fleet) -> None:
    for path in ("/", "/devices", "/devices", "/audit"):
        assert get(admin, path).status_code == 200
    with fleet.world.pki.store.session() as session:
        audit.flush_all_noise(session)
        summaries = session.scalars(
            select(AuditEvent).where(AuditEvent.action == audit.ACTIVITY, AuditEvent.actor == "admin:alice")
        ).all()
    assert summaries and any('"console.view console.devices":2' in s.details for s in summaries)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/?environment=mars", "/?nonsense=1", "/devices?page=0", "/devices?page=abc", "/devices?page=99999999",
        "/devices?state=broken", "/devices?serial=%00", "/devices?serial=" + "A" * 200, "/devices?model=a&model=b",
        "/audit?before=-1", "/audit?before=1e9", "/certificates/ZZ-not-hex", "/campaigns/1?page=x", "/login",
        "/devices/CP-CON-1?x=1",
    ],
)  # fmt: skip
def test_garbage_in_a_query_is_a_400_with_a_reason(admin: Any, path: str) -> None:
    response = get(admin, path)
    assert response.status_code == 400, (path, response.status_code)
    assert "query parameter" in text(response) or "serial" in text(response) or "token" in text(response)


@pytest.mark.parametrize("path", ["/devices/CP-NOBODY", "/certificates/0A0B0C", "/campaigns/999999", "/nowhere"])
def test_what_does_not_exist_is_a_404(admin: Any, path: str) -> None:
    assert get(admin, path).status_code == 404
