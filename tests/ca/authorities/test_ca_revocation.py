"""A revoked, retired or expired CA never signs again, in any process: the CLI, an EST worker
whose caches still hold the CA, a signing racing the revocation, and the CRL publisher. Checked
with OpenSSL as a relying party would, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import Issuer, get_authority, issuer_for
from ca.authorities.rotation import retire
from ca.config import Config, EstSettings, write_config
from ca.context import Pki
from ca.errors import PolicyError
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import AuditEvent, Authority, Certificate
from ca.work import Work
from cli.main import cli
from crl.publisher import publish_all
from ocsp.presign import Presigner
from tests.helpers import make_csr, openssl, write
from web.app import create_app


def run(home: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], input=input, catch_exceptions=False)


def _authority(home_store: Store, name: str) -> Authority:
    with home_store.session() as session:
        authority = get_authority(session, name)
        session.expunge(authority)
        session.commit()
    return authority


def _pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def test_revoking_an_issuing_ca_from_the_cli_stops_it_and_openssl_agrees(home: Path, db_url: str) -> None:
    assert run(home, "init", "--org", "Acme Charging", "--country", "DE").exit_code == 0
    store = Store(db_url)
    first = run(home, "issue", "--profile", "charger", "--csr", str(write(home / "a.csr", make_csr("CP-A"))))
    assert first.exit_code == 0, first.output
    assert run(home, "crl", "publish").exit_code == 0  # issuing-1's CRL exists from before the revocation
    old = _authority(store, "production-issuing-1")

    refused = run(home, "revoke", old.serial, "--reason", "keyCompromise", input="n\n")
    assert refused.exit_code == 1, refused.output
    assert "production-issuing-1 will never sign again, stranding 1 live certificate(s)" in refused.stderr
    assert _authority(store, "production-issuing-1").status == "active", "answering no changes nothing"

    revoked = run(home, "revoke", old.serial, "--reason", "keyCompromise", "--yes")
    assert revoked.exit_code == 0, revoked.output
    assert "stranding 1 live certificate(s)" in revoked.stderr
    listing = run(home, "ca", "list").output
    assert any("production-issuing-1" in line and "revoked" in line for line in listing.splitlines()), listing

    # The CLI issues nothing under it: neither by default nor when named.
    csr = str(write(home / "b.csr", make_csr("CP-B")))
    for extra in ([], ["--ca", "production-issuing-1"]):
        result = run(home, "issue", "--profile", "charger", "--csr", csr, *extra)
        assert result.exit_code == 1 and "Error: " in result.stderr, result.output
    chain = run(home, "ca", "chain")
    assert chain.exit_code == 1 and "no active issuing CA" in chain.stderr
    named = run(home, "ca", "chain", "--ca", "production-issuing-1")
    assert named.exit_code == 0 and "[production] CA production-issuing-1 (revoked)" in named.stderr
    assert run(home, "crl", "publish").exit_code == 0
    with store.session() as session:
        assert session.scalar(select(func.count()).where(Certificate.authority_id == old.id)) == 2, (
            "its OCSP signer, CP-A, and no other"
        )
        entries = session.scalars(select(AuditEvent).where(AuditEvent.action == "ca.revoked")).all()
        assert [(e.subject, '"stranded":1' in e.details) for e in entries] == [("production-issuing-1", True)]
        session.commit()

    # OpenSSL, checking every CRL of the chain: the root's CRL now lists the issuing CA (error 23).
    pki = home / "pki"
    root_pem = write(home / "root.pem", _pem(_authority(store, "production-root-1").certificate_der))
    issuing_pem = write(home / "issuing.pem", _pem(old.certificate_der))
    crls = write(home / "crls.pem", (pki / "production-crls.pem").read_bytes() + _crl_pem(pki / f"{old.name}.crl"))
    leaf = write(home / "a.pem", first.stdout.encode())
    verdict = openssl(
        "verify", "-crl_check_all", "-CAfile", str(root_pem), "-untrusted", str(issuing_pem),
        "-CRLfile", str(crls), str(leaf),
    )  # fmt: skip
    assert verdict.returncode != 0 and "error 23" in verdict.stdout + verdict.stderr, verdict.stdout + verdict.stderr
    store.dispose()


def _crl_pem(path: Path) -> bytes:
    return x509.load_der_x509_crl(path.read_bytes()).public_bytes(serialization.Encoding.PEM)


def test_revoke_with_rotate_replaces_the_ca_at_once(home: Path, db_url: str) -> None:
    assert run(home, "init", "--org", "Acme Charging").exit_code == 0
    store = Store(db_url)
    old = _authority(store, "production-issuing-1")
    result = run(home, "revoke", old.serial, "--reason", "cACompromise", "--yes", "--rotate")
    assert result.exit_code == 0, result.output
    assert "stranding 0 live certificate(s)" in result.stderr and "production-issuing-2" in result.stdout
    issued = run(home, "issue", "--profile", "charger", "--csr", str(write(home / "c.csr", make_csr("CP-C"))))
    assert issued.exit_code == 0, issued.output
    assert "[production] CA production-issuing-2" in issued.stderr
    chain = x509.load_pem_x509_certificates(run(home, "ca", "chain", "--all").stdout.encode())
    assert "Issuing CA 2" in chain[0].subject.rfc4514_string()
    assert all("Issuing CA 1" not in c.subject.rfc4514_string() for c in chain), "the revoked CA left the bundle"
    assert run(home, "crl", "publish").exit_code == 0
    pki = home / "pki"
    root_pem = write(home / "root.pem", _pem(_authority(store, "production-root-1").certificate_der))
    issuing_pem = write(home / "issuing.pem", chain[0].public_bytes(serialization.Encoding.PEM))
    verdict = openssl(
        "verify", "-crl_check_all", "-CAfile", str(root_pem), "-untrusted", str(issuing_pem),
        "-CRLfile", str(pki / "production-crls.pem"), str(write(home / "c.pem", issued.stdout.encode())),
    )  # fmt: skip
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    assert not (pki / f"{old.name}.crl").exists(), "a revoked CA signs no CRL"
    # --rotate applies to issuing CAs only, and a CA is never merely held.
    root_link = run(
        home, "revoke", _authority(store, "production-issuing-2").serial, "--reason", "certificateHold", "--yes"
    )
    assert root_link.exit_code == 1 and "revoked for good, not held" in root_link.stderr
    store.dispose()


def test_an_est_worker_that_cached_the_ca_cannot_sign_after_its_revocation(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings
) -> None:
    """The worker keeps the label's CA and its bound Issuer; a revocation in another process is
    seen at sign time, before the token signs, and the worker looks again afterwards."""
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    secrets = {}
    with pki.store.session() as session:
        hierarchy = init_hierarchy(
            Work(session=session, actor="t", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging"),
        )
        for serial in ("CP-1", "CP-2", "CP-3"):
            add_device(Work(session, "test"), serial=serial)
            secrets[serial] = issue_secret(Work(session, "test"), device=get_device(session, serial))
        old_serial = hierarchy.issuing.serial
    client = create_app(pki, EstSettings()).test_client()

    def enroll(serial: str):  # type: ignore[no-untyped-def]
        der = x509.load_pem_x509_csr(make_csr(serial)).public_bytes(serialization.Encoding.DER)
        auth = {"Authorization": "Basic " + base64.b64encode(f"{serial}:{secrets[serial]}".encode()).decode()}
        return client.post(
            "/.well-known/est/simpleenroll",
            data=base64.encodebytes(der),
            headers={"Content-Type": "application/pkcs10", **auth},
        )

    assert enroll("CP-1").status_code == 200  # the worker now caches issuing-1 and its Issuer
    with pki.store.session() as session:
        revoke(Work(session, "test", status=status), serial=old_serial, reason="keyCompromise")
        before = session.scalar(select(func.count()).select_from(Certificate))
    refused = enroll("CP-2")
    assert refused.status_code == 403 and "signs nothing any more" in refused.get_data(as_text=True)
    with pki.store.session() as session:
        assert session.scalar(select(func.count()).select_from(Certificate)) == before, "not even a reservation"
        rotated = __import__("ca.authorities.rotation", fromlist=["x"]).rotate_issuing_ca(
            Work(session=session, actor="test", status=status, token=token), ca_name="production-issuing-1"
        )
    cacerts = client.get("/.well-known/est/cacerts")
    served = pkcs7.load_der_pkcs7_certificates(base64.b64decode(cacerts.get_data()))
    assert [c.serial_number for c in served if format(c.serial_number, "X") == old_serial] == []
    assert enroll("CP-2").status_code == 200, "the refusal emptied the cache: the next request finds the successor"
    assert rotated.issuing.name == "production-issuing-2"
    pki.close()


def test_a_revocation_between_reservation_and_record_abandons_the_certificate(
    store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """The token signs while another process revokes the CA: the record step re-reads the status
    in its transaction (on PostgreSQL under a row lock), so the certificate is never handed out."""
    bound = issuer_for(hierarchy.issuing, token)
    ca_serial = hierarchy.issuing.serial

    @dataclasses.dataclass(frozen=True)
    class RevokedWhileSigning(Issuer):
        def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
            with store.session() as other:
                revoke(Work(other, "test:other", status=Presigner(token)), serial=ca_serial, reason="keyCompromise")
            return super().sign(builder)

    racing = RevokedWhileSigning(**{f.name: getattr(bound, f.name) for f in dataclasses.fields(Issuer)})
    request = request_from_csr(get_profile("charger"), read_csr(make_csr("CP-RACE")), bound)
    with pytest.raises(PolicyError, match="revoked: it signs nothing any more"):
        issue(Work(session, "test", status=status), issuer=racing, request=request)
    row = session.scalar(select(Certificate).where(Certificate.common_name == "CP-RACE"))
    assert row is not None and (row.status, row.der) == ("aborted", None)
    with pytest.raises(PolicyError, match="signs nothing"):
        issue(
            Work(session, "t", status=status),
            issuer=bound,
            request=request_from_csr(get_profile("charger"), read_csr(make_csr("CP-X")), bound),
        )
    with pytest.raises(PolicyError, match="signs nothing"):
        issuer_for(session.get(Authority, hierarchy.issuing.id), token)  # type: ignore[arg-type]


def test_retired_and_expired_cas_sign_nothing(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    bound = issuer_for(hierarchy.issuing, token)
    request = request_from_csr(get_profile("charger"), read_csr(make_csr("CP-E")), bound)
    after_expiry = hierarchy.issuing.not_after + timedelta(days=1)
    with pytest.raises(PolicyError, match="expired"):
        issue(Work(session, "test", status=status, now=lambda: after_expiry), issuer=bound, request=request)
    retire(Work(session, "test", now=lambda: datetime.now(UTC)), authorities=[hierarchy.issuing])
    with pytest.raises(PolicyError, match="retired: it signs nothing any more"):
        issue(
            Work(session, "test", status=status), issuer=bound, request=request
        )  # an Issuer bound before the retirement
    assert session.scalar(select(func.count()).where(Certificate.common_name == "CP-E")) == 0


def test_the_crl_publisher_leaves_a_revoked_ca_out(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, tmp_path: Path
) -> None:
    revoke(Work(session, "test", status=status), serial=hierarchy.issuing.serial, reason="keyCompromise")
    published = publish_all(session, token, tmp_path)
    assert [p.path.name for p in published] == [f"{hierarchy.root.name}.crl"]
    root_crl = x509.load_der_x509_crl((tmp_path / f"{hierarchy.root.name}.crl").read_bytes())
    entry = root_crl.get_revoked_certificate_by_serial_number(int(hierarchy.issuing.serial, 16))
    assert entry is not None
