"""Faults, end to end on loopback: the token going away (directory gone, wrong PIN, module
missing, signatures failing), the database going away (PostgreSQL behind a forwarder the test
cuts; SQLite locked or moved), and `kill -9` of the EST service in the middle of a load run.
Each service is a real `chargepki serve` process; the assertions read the database directly."""

from __future__ import annotations

import shutil
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from ca.config import find_softhsm_module
from ca.models import AuditEvent
from ca.store import Store
from tests.conftest import database
from tests.est_server import EstServer, free_port, start_server
from tests.fault_helpers import (
    certificate_of,
    chargepki,
    csr_body,
    embedded_home,
    enroll,
    issuing_certificate,
    ocsp_answer,
    register,
    root_pem,
    token_directory,
)

DEADLINE = 20.0  # seconds to wait for a service to recover (it normally takes one or two)


def _until(condition: Callable[[], object], what: str, deadline: float = DEADLINE) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``deadline``."""
    end = time.monotonic() + deadline
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"{what}: not within {deadline} s")
        time.sleep(0.2)


def _events(store: Store, action: str) -> list[AuditEvent]:
    with store.session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))
        session.commit()
        return rows


def _audit_ok(home: Path) -> None:
    result = chargepki(home, "audit", "verify")
    assert result.returncode == 0, result.stdout + result.stderr


def _stop(*servers: EstServer | None) -> None:
    for server in servers:
        if server is not None:
            server.stop()


def _clean_log(server: EstServer) -> None:
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log and '" 500 ' not in log, log[-3000:]


@pytest.fixture(params=["sqlite", "postgresql"])
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A home made by `chargepki init` with its own SoftHSM2 token, and its database URL."""
    with database(request.param, tmp_path) as url:
        yield embedded_home(tmp_path / "home", url), url


def _set_module(home: Path, module: str) -> None:
    path = home / "chargepki.toml"
    config = tomllib.loads(path.read_text())
    config["pkcs11"]["module"] = module
    path.write_text(tomli_w.dumps(config))


# -- the token ------------------------------------------------------------------------------------
def test_token_faults_give_503_keep_ocsp_serving_are_audited_and_heal_without_restart(
    embedded: tuple[Path, str], tmp_path: Path
) -> None:
    home, url = embedded
    store = Store(url)
    root = root_pem(store, tmp_path / "root.pem")
    issuer = issuing_certificate(store)
    pin = (home / "softhsm" / "user.pin").read_text().strip()
    secrets = register(store, [f"CP-TOK-{n}" for n in range(4)])
    est = ocsp_server = None
    try:
        est = start_server(home, free_port(), workers=1)
        ocsp_server = start_server(home, free_port(), workers=1, service="ocsp")
        first = certificate_of(enroll(est.port, "CP-TOK-0", secrets["CP-TOK-0"], root))
        assert ocsp_answer(ocsp_server.port, first, issuer) == "GOOD"

        # 1. The token's directory disappears (a removed HSM): the next signature fails.
        tokens = token_directory(home)
        away = home / "softhsm" / "away"
        shutil.move(tokens, away)
        body = csr_body("CP-TOK-1")
        for _ in range(3):
            refused = enroll(est.port, "CP-TOK-1", secrets["CP-TOK-1"], root, body=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "30"
            assert refused.text.startswith("temporarily unavailable: ") and "token" in refused.text
        # The responder holds no key: what is stored is still served; what needs a signature waits.
        assert ocsp_answer(ocsp_server.port, first, issuer) == "GOOD"
        never_issued = _with_serial(first, 12345)
        assert ocsp_answer(ocsp_server.port, never_issued, issuer) == "TRY_LATER"

        # 2. It comes back: the same request (the secret was not spent) succeeds without a restart.
        shutil.move(away, tokens)
        second = certificate_of(
            _until(
                lambda: (
                    (r := enroll(est.port, "CP-TOK-1", secrets["CP-TOK-1"], root, body=body)).status_code == 200 and r
                ),
                "enrollment after the token came back",
            )
        )
        assert _until(
            lambda: ocsp_answer(ocsp_server.port, never_issued, issuer) == "UNKNOWN",
            "the on-demand OCSP signer after the token came back",
        )
        assert ocsp_answer(ocsp_server.port, second, issuer) == "GOOD"

        # 3. A wrong PIN (the token needs a new login after going away once more): 503, then the
        #    corrected PIN file is read at the next login.
        (home / "softhsm" / "user.pin").write_text("wrong-pin\n")
        shutil.move(tokens, away)
        body = csr_body("CP-TOK-2")
        assert enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body).status_code == 503
        shutil.move(away, tokens)
        wrong = _until(
            lambda: (
                (r := enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body)).status_code == 503
                and "wrong PIN" in r.text
                and r.text
            ),
            "the wrong PIN reported",
        )
        assert "wrong-pin" not in wrong
        (home / "softhsm" / "user.pin").write_text(pin + "\n")
        _until(
            lambda: enroll(est.port, "CP-TOK-2", secrets["CP-TOK-2"], root, body=body).status_code == 200,
            "enrollment after the PIN file was corrected",
        )
    finally:
        _stop(est, ocsp_server)

    # 4. The PKCS#11 module is missing when the service starts (a worker opens the token lazily).
    _set_module(home, str(tmp_path / "libpkcs11-link.so"))
    est = None
    try:
        est = start_server(home, free_port(), workers=1)
        missing = enroll(est.port, "CP-TOK-3", secrets["CP-TOK-3"], root)
        assert missing.status_code == 503 and "PKCS#11 module not found" in missing.text, missing.text
        (tmp_path / "libpkcs11-link.so").symlink_to(find_softhsm_module())
        _until(
            lambda: enroll(est.port, "CP-TOK-3", secrets["CP-TOK-3"], root).status_code == 200,
            "enrollment once the module is installed",
        )
    finally:
        _stop(est)
    for server in (est,):
        _clean_log(server)

    # Every outage and every recovery is in the audit log, with its reason and never the PIN.
    lost = _events(store, "token.unavailable")
    back = _events(store, "token.available")
    reasons = " | ".join(event.details for event in lost)
    assert len(lost) >= 3 and len(back) >= 3, reasons
    assert "became unavailable" in reasons and "wrong PIN" in reasons and "module not found" in reasons
    aborted = _events(store, "certificate.aborted")
    assert aborted and "token" in aborted[0].details  # the signature that failed burnt its serial
    with store.session() as session:
        everything = " ".join(e.details + (e.subject or "") for e in session.scalars(select(AuditEvent)))
        session.commit()
    assert pin not in everything and "wrong-pin" not in everything
    for log in home.glob("*.log"):
        text = log.read_text(errors="replace")
        assert pin not in text and "wrong-pin" not in text, log
    _audit_ok(home)
    store.dispose()


def _with_serial(certificate: x509.Certificate, serial: int) -> x509.Certificate:
    """A certificate of the same issuer with another serial (only its issuer and serial go into a CertID)."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(certificate.subject)
        .issuer_name(certificate.issuer)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(certificate.not_valid_before_utc)
        .not_valid_after(certificate.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
