"""Issuing-CA rotation (`ca rotate`) and the automatic retirement of the superseded CA.

On SQLite and PostgreSQL, with the real token, OpenSSL as the independent verifier and the
keyless OCSP responder reading what the refresher signed.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from freezegun import freeze_time
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import default_issuing_ca, get_authority, issuer_for
from ca.authorities.rotation import (
    RETIRE_GRACE,
    check_can_issue,
    environment_certificates,
    finished_authorities,
    retire_finished,
    rotate_issuing_ca,
)
from ca.errors import ConflictError, InputError, PolicyError
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import AuditEvent, Authority, Certificate
from ca.work import Work
from cli.main import cli
from crl.publisher import publish_all
from ocsp.presign import Presigner, refresh, rotate_signers
from ocsp.responder import Responder
from ocsp.source import CachedSource, StoreSource
from tests.helpers import make_csr, openssl, pem, write


def _issue(session: Session, token: Token, status: Presigner, authority: Authority, cn: str, **kwargs) -> Certificate:
    issuer = issuer_for(authority, token)
    request = request_from_csr(get_profile("charger"), read_csr(make_csr(cn)), issuer, **kwargs)
    return issue(Work(session, "test", status=status), issuer=issuer, request=request)


def _verify(tmp: Path, leaf: Certificate, issuing: Authority, root: Authority) -> bool:
    """`openssl verify` of a leaf with only the root trusted and the issuing CA untrusted."""
    result = openssl(
        "verify",
        "-x509_strict",
        "-CAfile",
        str(write(tmp / "root.pem", pem(root.certificate_der))),
        "-untrusted",
        str(write(tmp / "issuing.pem", pem(issuing.certificate_der))),
        str(write(tmp / "leaf.pem", pem(leaf.der or b""))),
    )
    return result.returncode == 0


@pytest.fixture
def responder(store: Store) -> Iterator[Responder]:
    """The keyless responder's lookup path, reading what the refresher stored (no on-demand signer)."""
    reader = Store(store.url.render_as_string(hide_password=False), read_only=True)
    source = CachedSource(StoreSource(reader))
    yield Responder(source, None)
    source.close()
    reader.dispose()


def _ocsp_status(responder: Responder, leaf: Certificate, issuing: Authority) -> ocsp.OCSPResponse:
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(
            x509.load_der_x509_certificate(leaf.der or b""),
            x509.load_der_x509_certificate(issuing.certificate_der),
            hashes.SHA1(),
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    response = ocsp.load_der_ocsp_response(responder.answer(request).body)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    (signer,) = response.certificates
    signer.verify_directly_issued_by(x509.load_der_x509_certificate(issuing.certificate_der))
    return response


def test_rotation_moves_new_issuance_and_keeps_the_old_chain_working(
    session: Session, token: Token, status: Presigner, hierarchy: Hierarchy, responder: Responder, tmp_path: Path
) -> None:
    old = hierarchy.issuing
    before = _issue(session, token, status, old, "CP-OLD")

    rotation = rotate_issuing_ca(
        Work(session=session, actor="test", status=status, token=token), environment="production"
    )
    new = rotation.issuing
    assert rotation.previous.id == old.id
    assert (new.name, new.role, new.environment, new.parent_id) == (
        "production-issuing-2",
        "issuing",
        "production",
        hierarchy.root.id,
    )
    assert new.subject == "CN=Acme Charging Production Issuing CA 2,O=Acme Charging,C=DE"
    assert new.key_label != old.key_label
    # Generated in the token and never leaving it, like every CA key.
    attributes = token.key_attributes(new.key_label)
    assert attributes["sensitive"] and attributes["never_extractable"] and not attributes["extractable"]
    assert rotation.ocsp_signer.authority_id == new.id
    event = session.scalar(select(AuditEvent).where(AuditEvent.action == "ca.rotated"))
    assert event is not None and event.subject == new.name and '"previous":"production-issuing-1"' in event.details

    # New issuance uses the new CA at once; the old one is still active and answers for its certificates.
    assert default_issuing_ca(session, "production").id == new.id
    after = _issue(session, token, status, default_issuing_ca(session, "production"), "CP-NEW")
    assert after.authority_id == new.id
    assert get_authority(session, old.name).status == "active"
    assert _verify(tmp_path, before, old, hierarchy.root) and _verify(tmp_path, after, new, hierarchy.root)
    assert not _verify(tmp_path, after, old, hierarchy.root)  # not a chain mix-up by accident

    # Both CAs' responses are signed, refreshed and served, each by its own delegated signer.
    assert _ocsp_status(responder, before, old).certificate_status == ocsp.OCSPCertStatus.GOOD
    assert _ocsp_status(responder, after, new).certificate_status == ocsp.OCSPCertStatus.GOOD
    now = datetime.now(UTC)
    rotated = rotate_signers(session, status, actor="test", now=now, validity=timedelta(days=30), force=True)
    assert {authority.name for authority, _row in rotated} >= {old.name, new.name}
    assert refresh(session, status, now) > 0
    assert _ocsp_status(responder, before, old).certificate_status == ocsp.OCSPCertStatus.GOOD

    # A trust bundle holds both issuing CAs and the root, the newest chain first.
    names = [
        x509.load_der_x509_certificate(der).subject.rfc4514_string()
        for der in environment_certificates(session, "production")
    ]
    assert names == [
        "CN=Acme Charging Production Issuing CA 2,O=Acme Charging,C=DE",
        "CN=Acme Charging Production Root CA,O=Acme Charging,C=DE",
        "CN=Acme Charging Production Issuing CA 1,O=Acme Charging,C=DE",
    ]
    assert audit.verify(session).ok


def test_rotation_refusals(session: Session, token: Token, status: Presigner, hierarchy: Hierarchy) -> None:
    with pytest.raises(InputError, match="is a root CA"):
        rotate_issuing_ca(Work(session=session, actor="test", status=status, token=token), ca_name=hierarchy.root.name)
    with pytest.raises(InputError, match="belongs to environment production, not staging"):
        rotate_issuing_ca(
            Work(session=session, actor="test", status=status, token=token),
            ca_name=hierarchy.issuing.name,
            environment="staging",
        )
    rotate_issuing_ca(Work(session=session, actor="test", status=status, token=token), ca_name=hierarchy.issuing.name)
    with pytest.raises(ConflictError, match="already rotated: production-issuing-2 is the newest"):
        rotate_issuing_ca(
            Work(session=session, actor="test", status=status, token=token), ca_name=hierarchy.issuing.name
        )
    with pytest.raises(PolicyError, match="new certificates come from production-issuing-2"):
        check_can_issue(session, get_authority(session, hierarchy.issuing.name))
    check_can_issue(session, get_authority(session, "production-issuing-2"))
    # Nothing was left half-made by the refusals.
    assert [a.name for a in session.scalars(select(Authority).order_by(Authority.id))] == [
        "production-root-1",
        "production-issuing-1",
        "production-issuing-2",
    ]


def test_the_old_ca_retires_once_its_last_certificate_expired(
    session: Session, token: Token, status: Presigner, hierarchy: Hierarchy, tmp_path: Path
) -> None:
    old = hierarchy.issuing
    start = datetime.now(UTC)
    _issue(session, token, status, old, "CP-SHORT", validity=timedelta(days=10))
    longer = _issue(session, token, status, old, "CP-LONGER", validity=timedelta(days=20))
    new = rotate_issuing_ca(Work(session=session, actor="test", status=status, token=token)).issuing
    publication = tmp_path / "pki"

    with freeze_time(start + timedelta(days=15)):  # one certificate left: the old CA still answers
        assert retire_finished(Work(session, "test", now=lambda: datetime.now(UTC))) == []
        revoke(Work(session, "test", status=status), serial=longer.serial, reason="keyCompromise")
        published = {p.authority for p in publish_all(session, token, publication)}
        assert old.name in published and new.name in published
        crl = x509.load_der_x509_crl((publication / f"{old.name}.crl").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(int(longer.serial, 16)) is not None
        rotated = rotate_signers(
            session, status, actor="test", now=datetime.now(UTC), validity=timedelta(days=30), force=True
        )
        assert old.name in {authority.name for authority, _ in rotated}

    with freeze_time(start + timedelta(days=21)):  # the last one expired: a final CRL, then retirement
        assert [a.name for a in finished_authorities(session, datetime.now(UTC))] == [old.name]
        final = {p.authority: p for p in publish_all(session, token, publication)}
        assert old.name in final
        assert get_authority(session, old.name).status == "retired"
        crl = x509.load_der_x509_crl((publication / f"{old.name}.crl").read_bytes())
        assert crl.next_update_utc is not None and crl.next_update_utc > datetime.now(UTC)

    with freeze_time(start + timedelta(days=22)):  # from now on it is left alone
        assert old.name not in {p.authority for p in publish_all(session, token, publication)}
        rotated = rotate_signers(
            session, status, actor="test", now=datetime.now(UTC), validity=timedelta(days=30), force=True
        )
        assert old.name not in {authority.name for authority, _ in rotated}
        assert new.name in {authority.name for authority, _ in rotated}
        bundle = environment_certificates(session, "production")
        assert old.certificate_der not in bundle and new.certificate_der in bundle
        with pytest.raises(PolicyError, match="is retired"):
            check_can_issue(session, get_authority(session, old.name))
    events = session.scalars(select(AuditEvent).where(AuditEvent.action == "ca.retired")).all()
    assert [(e.subject, '"successor":"production-issuing-2"' in e.details) for e in events] == [(old.name, True)]
    assert audit.verify(session).ok


def test_a_fresh_successor_does_not_retire_its_predecessor_at_once(
    session: Session, token: Token, status: Presigner, hierarchy: Hierarchy
) -> None:
    """EST workers may still issue under the old CA for a few seconds after a rotation."""
    rotate_issuing_ca(Work(session=session, actor="test", status=status, token=token))
    now = datetime.now(UTC)
    assert retire_finished(Work(session, "test", now=lambda: now + RETIRE_GRACE / 2)) == []
    assert [a.name for a in retire_finished(Work(session, "test", now=lambda: now + RETIRE_GRACE * 2))] == [
        hierarchy.issuing.name
    ]


# -- the CLI ------------------------------------------------------------------------------------
def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _subjects(pem_text: str) -> list[str]:
    return [c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates(pem_text.encode())]


def test_cli_rotate_chain_issue_and_retire(home: Path, tmp_path: Path) -> None:
    assert run(home, "init", "--org", "Acme Charging", "--environment", "staging").exit_code == 0
    assert run(home, "init", "--org", "Acme Charging").exit_code == 0
    (home / "est").mkdir()  # as `serve est` leaves it: the client bundle is rewritten
    rotated = run(home, "ca", "rotate", "--environment", "staging")
    assert rotated.exit_code == 0, rotated.output
    assert "[staging] CA staging-issuing-2" in rotated.stderr
    assert "rotated staging-issuing-1 -> staging-issuing-2" in rotated.stdout
    assert "campaign start --from-ca staging-issuing-1" in rotated.stdout
    bundle = (home / "est" / "client-ca.pem").read_text()
    assert "CN=Acme Charging Staging Issuing CA 2,O=Acme Charging" in _subjects(bundle)

    listing = run(home, "ca", "list", "--environment", "staging").stdout
    assert "staging-issuing-1" in listing and "staging-issuing-2" in listing
    chain = run(home, "ca", "chain", "--environment", "staging")
    assert _subjects(chain.stdout)[0] == "CN=Acme Charging Staging Issuing CA 2,O=Acme Charging"
    assert "[staging] CA staging-issuing-2" in chain.stderr
    old_chain = run(home, "ca", "chain", "--ca", "staging-issuing-1")
    assert _subjects(old_chain.stdout)[0] == "CN=Acme Charging Staging Issuing CA 1,O=Acme Charging"
    everything = run(home, "ca", "chain", "--environment", "staging", "--all")
    assert len(_subjects(everything.stdout)) == 3
    # Production was not touched.
    assert _subjects(run(home, "ca", "chain", "--environment", "production").stdout)[0].startswith(
        "CN=Acme Charging Production Issuing CA 1"
    )

    csr = write(tmp_path / "cp.csr", make_csr("CP-1"))
    issued = run(home, "issue", "--csr", str(csr), "--profile", "charger", "--environment", "staging")
    assert issued.exit_code == 0 and "[staging] CA staging-issuing-2" in issued.stderr
    assert x509.load_pem_x509_certificate(issued.stdout.encode()).issuer.rfc4514_string() == (
        "CN=Acme Charging Staging Issuing CA 2,O=Acme Charging"
    )
    refused = run(home, "issue", "--csr", str(csr), "--profile", "charger", "--ca", "staging-issuing-1")
    assert refused.exit_code == 1 and "Error: CA staging-issuing-1 was rotated" in refused.stderr
    again = run(home, "ca", "rotate", "--ca", "staging-issuing-1")
    assert again.exit_code == 1 and "already rotated" in again.stderr and "Traceback" not in again.output

    # The refresher retires the old CA once nothing it issued is valid (here: it issued nothing).
    with freeze_time(datetime.now(UTC) + RETIRE_GRACE * 2):
        assert run(home, "ocsp", "refresh").exit_code == 0
    (old_line,) = [line for line in run(home, "ca", "list").stdout.splitlines() if "staging-issuing-1" in line]
    assert " retired " in old_line
    assert "retired" not in run(home, "ca", "list", "--environment", "production").stdout
