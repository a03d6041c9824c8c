"""CRLs (RFC 5280 §5): content, signature, numbering under races, atomic publication."""

from __future__ import annotations

import contextlib
import io
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import CRLEntryExtensionOID
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import Authority, Certificate
from ca.work import Work
from cli.main import cli
from crl.publisher import PublishError, publish_all, publish_crl
from ocsp.presign import Presigner
from tests.helpers import make_csr, openssl


def _charger(
    session: Session, hierarchy: Hierarchy, token: Token, cn: str, validity: timedelta | None = None, now=None
) -> Certificate:
    status = Presigner(token)
    issuer = issuer_for(hierarchy.issuing, token)
    request = request_from_csr(get_profile("charger"), read_csr(make_csr(cn)), issuer, validity)
    return issue(Work(session, "test", status=status), issuer=issuer, request=request, **{"now": now} if now else {})


def _load(path: Path) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(path.read_bytes())


def _pem_bundle(hierarchy: Hierarchy, path: Path) -> Path:
    path.write_bytes(
        b"".join(
            x509.load_der_x509_certificate(a.certificate_der).public_bytes(serialization.Encoding.PEM)
            for a in (hierarchy.issuing, hierarchy.root)
        )
    )
    return path


@pytest.fixture
def revoked(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner) -> dict[str, Certificate]:
    rows = {
        name: _charger(session, hierarchy, token, f"CP-{name}")
        for name in ("compromised", "unspecified", "held", "good")
    }
    revoke(
        Work(session, "test", status=status),
        serial=rows["compromised"].serial,
        reason="keyCompromise",
        invalidity_date=datetime.now(UTC) - timedelta(days=1),
    )
    revoke(Work(session, "test", status=status), serial=rows["unspecified"].serial, reason="unspecified")
    revoke(Work(session, "test", status=status), serial=rows["held"].serial, reason="certificateHold")
    return rows


def test_the_crl_lists_revocations_with_rfc_5280_reason_codes(
    session: Session, hierarchy: Hierarchy, token: Token, revoked: dict[str, Certificate], tmp_path: Path
) -> None:
    (published,) = [p for p in publish_all(session, token, tmp_path) if p.authority == hierarchy.issuing.name]
    crl = _load(published.path)
    entries = {format(e.serial_number, "X"): e for e in crl}
    assert set(entries) == {revoked[n].serial for n in ("compromised", "unspecified", "held")}
    compromised = entries[revoked["compromised"].serial]
    assert (
        compromised.extensions.get_extension_for_class(x509.CRLReason).value.reason == x509.ReasonFlags.key_compromise
    )
    assert compromised.extensions.get_extension_for_oid(CRLEntryExtensionOID.INVALIDITY_DATE)
    with pytest.raises(x509.ExtensionNotFound):  # RFC 5280 §5.3.1: omit reasonCode for unspecified
        entries[revoked["unspecified"].serial].extensions.get_extension_for_class(x509.CRLReason)
    held = entries[revoked["held"].serial].extensions.get_extension_for_class(x509.CRLReason).value
    assert held.reason == x509.ReasonFlags.certificate_hold
    assert crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert crl.issuer == x509.load_der_x509_certificate(hierarchy.issuing.certificate_der).subject
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=7)


def test_openssl_and_pkilint_accept_the_crl(
    session: Session, hierarchy: Hierarchy, token: Token, revoked: dict[str, Certificate], tmp_path: Path
) -> None:
    publish_all(session, token, tmp_path / "pki")
    bundle = _pem_bundle(hierarchy, tmp_path / "bundle.pem")
    for authority in (hierarchy.issuing, hierarchy.root):
        crl = tmp_path / "pki" / f"{authority.name}.crl"
        result = openssl("crl", "-inform", "DER", "-in", str(crl), "-CAfile", str(bundle), "-noout", "-verify")
        assert result.returncode == 0 and "verify OK" in (result.stdout + result.stderr), result.stderr
        from pkilint.bin import lint_crl

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            lint_crl.main(["lint", "-t", "CRL", "-p", "PKIX", "-s", "NOTICE", str(crl)])
        assert out.getvalue().strip() == "", out.getvalue()


def test_the_root_crl_covers_the_issuing_ca(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, tmp_path: Path
) -> None:
    revoke(Work(session, "test", status=status), serial=hierarchy.issuing.serial, reason="cACompromise")
    published = {p.authority: p for p in publish_all(session, token, tmp_path)}
    root_entries = [format(e.serial_number, "X") for e in _load(published[hierarchy.root.name].path)]
    assert root_entries == [hierarchy.issuing.serial]


def test_expired_certificates_leave_the_crl(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, tmp_path: Path
) -> None:
    short = _charger(session, hierarchy, token, "CP-SHORT", validity=timedelta(days=2))
    revoke(Work(session, "test", status=status), serial=short.serial, reason="superseded")
    issuer = issuer_for(hierarchy.issuing, token)
    assert len(list(_load(publish_crl(session, issuer, hierarchy.issuing, tmp_path, now=datetime.now(UTC)).path))) == 1
    later = datetime.now(UTC) + timedelta(days=3)
    assert len(list(_load(publish_crl(session, issuer, hierarchy.issuing, tmp_path, now=later).path))) == 0


def test_crl_numbers_only_increase_even_with_racing_publishers(
    store: Store, hierarchy: Hierarchy, token: Token, tmp_path: Path
) -> None:
    numbers: list[int] = []

    def publisher() -> None:
        with store.session() as session:
            for _ in range(5):
                authority = session.get(Authority, hierarchy.issuing.id)
                published = publish_crl(
                    session, issuer_for(authority, token), authority, tmp_path, now=datetime.now(UTC)
                )
                numbers.append(published.number)

    threads = [threading.Thread(target=publisher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(numbers) == 15 and len(set(numbers)) == 15, "every publication got its own number"
    final = _load(tmp_path / f"{hierarchy.issuing.name}.crl")
    assert final.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == max(numbers)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no half-written file remains"


def test_a_failed_write_keeps_the_previous_crl(
    session: Session, hierarchy: Hierarchy, token: Token, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    issuer = issuer_for(hierarchy.issuing, token)
    first = publish_crl(session, issuer, hierarchy.issuing, tmp_path, now=datetime.now(UTC))
    before = first.path.read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(PublishError, match="No space left on device"):
        publish_crl(session, issuer, hierarchy.issuing, tmp_path, now=datetime.now(UTC))
    assert first.path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_crl_publish(home: Path, token: Token) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["--home", str(home), "init", "--org", "Acme Charging"]).exit_code == 0
    result = runner.invoke(cli, ["--home", str(home), "crl", "publish", "--next-update", "2d"])
    assert result.exit_code == 0, result.output
    assert "production-issuing-1.crl (CRL number" in result.output
    crl = _load(home / "pki" / "production-issuing-1.crl")
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=2)
    assert (home / "pki" / "production-root-1.crt").exists()
    bad = runner.invoke(
        cli, ["--home", str(home), "crl", "publish", "--watch", "--interval", "3d", "--next-update", "2d"]
    )
    assert bad.exit_code == 2 and "--interval must be shorter" in bad.output
