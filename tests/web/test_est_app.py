"""The EST Flask app in-process (`create_app` + test client): failures of the token surface
as 503 with Retry-After, are audited, and do not spend the device's secret."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.store.models import AuditEvent
from ca.work import Work
from ocsp.presign import Presigner
from tests.conftest import new_token_settings
from tests.helpers import make_csr
from web.app import create_app


def test_a_token_without_the_ca_key_gives_503_and_keeps_the_secret(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, softhsm_conf: Path
) -> None:
    # The hierarchy's keys are in the shared test token; the service is pointed at another token.
    other_token, _pin = new_token_settings(softhsm_conf, tmp_path)
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=other_token))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging"),
        )
        add_device(Work(session, "test"), serial="CP-503")
        secret = issue_secret(Work(session, "test"), device=get_device(session, "CP-503"))
    client = create_app(pki, EstSettings()).test_client()
    der = x509.load_pem_x509_csr(make_csr("CP-503")).public_bytes(serialization.Encoding.DER)
    auth = {"Authorization": "Basic " + base64.b64encode(f"CP-503:{secret}".encode()).decode()}
    response = client.post(
        "/.well-known/est/simpleenroll",
        data=base64.encodebytes(der),
        headers={"Content-Type": "application/pkcs10", **auth},
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "30"
    assert "no public key labelled" in response.get_data(as_text=True)
    with pki.store.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "enrollment.refused")).all()
        assert events and "KeyMissing" in events[-1].details  # a TokenError: the key is not in that token
    # The same secret still works once the service has the right token.
    pki.close()
    write_config(
        Config(
            home=home,
            database_url=migrated_db_url,
            pkcs11=Pkcs11Settings(
                module=other_token.module, token_label=token.label, pin_file=None, softhsm_conf=softhsm_conf
            ),
        )
    )
    fixed = Pki.open(home, {"CHARGEPKI_PKCS11_PIN": "unused-already-logged-in"})
    good = (
        create_app(fixed, EstSettings())
        .test_client()
        .post(
            "/.well-known/est/simpleenroll",
            data=base64.encodebytes(der),
            headers={"Content-Type": "application/pkcs10", **auth},
        )
    )
    assert good.status_code == 200, good.get_data(as_text=True)
    fixed.close()


def test_error_pages_are_plain_text(tmp_path: Path, migrated_db_url: str, token_settings) -> None:
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    client = create_app(pki, EstSettings()).test_client()
    for method, path, status in (
        ("GET", "/", 404),
        ("PUT", "/.well-known/est/cacerts", 405),
        ("GET", "/.well-known/est/cacerts", 404),
    ):
        response = client.open(path, method=method)
        assert response.status_code == status, (path, response.get_data(as_text=True))
        assert response.mimetype == "text/plain" and "<html" not in response.get_data(as_text=True).lower()
    pki.close()


def test_malformed_authorization_headers_get_401(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings
) -> None:
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging"),
        )
    client = create_app(pki, EstSettings()).test_client()
    der = x509.load_pem_x509_csr(make_csr("CP-1")).public_bytes(serialization.Encoding.DER)
    for header in (
        "Basic !!!not-base64",
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Bearer abc",
        "Basic " + base64.b64encode(b"no-colon").decode(),
        "Digest username=x",
    ):
        response = client.post(
            "/.well-known/est/simpleenroll",
            data=base64.encodebytes(der),
            headers={"Content-Type": "application/pkcs10", "Authorization": header},
        )
        assert response.status_code == 401, (header, response.get_data(as_text=True))
        assert response.headers["WWW-Authenticate"].startswith("Basic")
    pki.close()


def test_a_refusal_that_first_fills_the_worker_ca_cache_does_not_break_later_enrollments(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings
) -> None:
    """The worker caches the label's CA; a refused request (rolled back) that loaded it first must
    not leave an expired object there (every later request answered 503 before the fix)."""
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    secrets = {}
    with pki.store.session() as session:
        init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging"),
        )
        for serial in ("CP-LOCKED", "CP-GOOD"):
            add_device(Work(session, "test"), serial=serial)
            secrets[serial] = issue_secret(Work(session, "test"), device=get_device(session, serial))
    app = create_app(pki, EstSettings())
    client = app.test_client()

    def enroll(serial: str, password: str) -> int:
        der = x509.load_pem_x509_csr(make_csr(serial)).public_bytes(serialization.Encoding.DER)
        auth = {"Authorization": "Basic " + base64.b64encode(f"{serial}:{password}".encode()).decode()}
        headers = {"Content-Type": "application/pkcs10", **auth}
        return client.post("/.well-known/est/simpleenroll", data=base64.encodebytes(der), headers=headers).status_code

    while enroll("CP-LOCKED", "wrong") != 429:  # lock the device out
        pass
    app.runtime.forget_authorities()  # as when the cache's 10 s have passed
    assert enroll("CP-LOCKED", "wrong") == 429  # loads the CA into the cache, then rolls back
    assert enroll("CP-GOOD", secrets["CP-GOOD"]) == 200
    pki.close()
