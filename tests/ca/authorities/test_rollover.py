"""Root rollover as OCPP 2.0.1's AdditionalRootCertificateCheck requires (`ca rollover-root`).

A simulated charging station that trusts only the old root installs the pushed payloads in
order, the way M05 describes it, and then verifies a CSMS server certificate of the new chain;
OpenSSL and cryptography's X.509 verifier check every path independently. SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.authorities.rotation import environment_certificates, latest_rollover, rollover_files, rollover_root
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.store.models import AuditEvent, Authority, Certificate, OcspResponse
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner
from tests.helpers import make_csr, openssl, pkilint_findings, write

CSMS = "csms.example.com"


def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


class SimulatedCharger:
    """A charging station with AdditionalRootCertificateCheck = true (OCPP 2.0.1 M05).

    It holds one CSMS root (plus the previous one as a fallback until it has connected with the
    new one) and accepts a new CSMS root only if the root it has installed signed it. Its TLS
    stack treats an installed certificate as a trust anchor, as embedded stacks (mbedTLS) do.
    """

    def __init__(self, root: x509.Certificate, workdir: Path) -> None:
        self.root = root
        self.fallback: x509.Certificate | None = None
        self.workdir = workdir

    def install_certificate(self, payload: dict[str, str]) -> str:
        if payload.get("certificateType") != "CSMSRootCertificate":
            return "Rejected"
        candidate = x509.load_pem_x509_certificate(payload["certificate"].encode())
        try:
            candidate.verify_directly_issued_by(self.root)
        except (InvalidSignature, ValueError, TypeError):
            return "Rejected"
        self.fallback, self.root = self.root, candidate
        return "Accepted"

    def connect(self, server_chain: list[x509.Certificate]) -> bool:
        """TLS server authentication of the CSMS: `openssl verify` with what is installed as anchors."""
        anchors = [self.root] + ([self.fallback] if self.fallback is not None else [])
        result = openssl(
            "verify",
            "-partial_chain",
            "-purpose",
            "sslserver",
            "-verify_hostname",
            CSMS,
            "-CAfile",
            str(write(self.workdir / "anchors.pem", _pem(anchors))),
            "-untrusted",
            str(write(self.workdir / "presented.pem", _pem(server_chain[1:] or server_chain[:1]))),
            str(write(self.workdir / "server.pem", _pem(server_chain[:1]))),
        )
        if result.returncode == 0:
            self.fallback = None  # M05: the new root worked, the fallback goes
        return result.returncode == 0


@pytest.fixture
def rolled_over(home: Path, tmp_path: Path) -> tuple[Path, Path]:
    """An installation after `init` and `ca rollover-root --out DIR`; (home, DIR)."""
    assert run(home, "init", "--org", "Acme Charging", "--country", "DE").exit_code == 0
    assert run(home, "init", "--org", "Acme Charging", "--environment", "staging").exit_code == 0
    out = tmp_path / "push"
    result = run(home, "ca", "rollover-root", "--environment", "production", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "[production] CA production-root-2" in result.stderr
    assert "01-InstallCertificate-link.json" in result.stdout
    return home, out


def _server_certificate(home: Path, tmp_path: Path, *ca: str) -> x509.Certificate:
    csr = write(tmp_path / "csms.csr", make_csr(CSMS, dns_names=(CSMS,)))
    result = run(home, "issue", "--csr", str(csr), "--profile", "csms-server", "--environment", "production", *ca)
    assert result.exit_code == 0, result.output
    return x509.load_pem_x509_certificate(result.stdout.encode())


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_a_charger_trusting_only_the_old_root_follows_the_rollover(
    rolled_over: tuple[Path, Path], tmp_path: Path
) -> None:
    home, out = rolled_over
    old_root, new_root = _load(out / "old-root.pem"), _load(out / "new-root.pem")
    link = _load(out / "new-with-old.pem")
    new_issuing = x509.load_pem_x509_certificates((out / "new-issuing-chain.pem").read_bytes())[0]
    server = _server_certificate(home, tmp_path)  # the default CA is the new chain's issuing CA now
    assert server.issuer == new_issuing.subject

    # The payloads, exactly as the CSMS sends them, in their order.
    first = json.loads((out / "01-InstallCertificate-link.json").read_text())
    second = json.loads((out / "02-InstallCertificate-new-root.json").read_text())
    assert set(first) == set(second) == {"certificateType", "certificate"}
    assert first["certificateType"] == second["certificateType"] == "CSMSRootCertificate"
    assert x509.load_pem_x509_certificate(first["certificate"].encode()) == link
    assert x509.load_pem_x509_certificate(second["certificate"].encode()) == new_root
    assert len(first["certificate"]) <= 5500 and len(second["certificate"]) <= 5500

    # The link certificate carries the new root's name and key, under the old root's signature.
    assert link.subject == new_root.subject and link.issuer == old_root.subject
    assert link.public_key() == new_root.public_key()
    new_root.verify_directly_issued_by(link)  # the self-signed new root verifies under the link's key

    # Independent checks with OpenSSL: trust store = the old root only.
    old_only = str(out / "old-root.pem")
    assert openssl("verify", "-x509_strict", "-CAfile", old_only, str(out / "new-with-old.pem")).returncode == 0
    chain_with_link = write(tmp_path / "untrusted.pem", _pem([new_issuing, link]))
    server_file = write(tmp_path / "server-cert.pem", _pem([server]))
    verified = openssl(
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        old_only,
        "-untrusted",
        str(chain_with_link),
        str(server_file),
    )
    assert verified.returncode == 0, verified.stderr
    without_link = write(tmp_path / "untrusted-nolink.pem", _pem([new_issuing]))
    assert openssl("verify", "-CAfile", old_only, "-untrusted", str(without_link), str(server_file)).returncode != 0
    after = openssl(
        "verify",
        "-x509_strict",
        "-purpose",
        "sslserver",
        "-CAfile",
        str(out / "new-root.pem"),
        "-untrusted",
        str(without_link),
        str(server_file),
    )
    assert after.returncode == 0, after.stderr

    # And with cryptography's verifier (RFC 5280 path building, webpki-style profile checks).
    verifier = PolicyBuilder().store(Store([old_root])).build_server_verifier(x509.DNSName(CSMS))
    path = verifier.verify(server, [new_issuing, link])
    assert path[-1] == old_root and link in path
    with pytest.raises(VerificationError):
        verifier.verify(server, [new_issuing])

    # The station, step by step.
    charger = SimulatedCharger(old_root, tmp_path)
    assert not charger.connect([server, new_issuing])  # before step 1: the new chain is unknown
    assert charger.install_certificate(second) == "Rejected"  # out of order: not signed by the old root
    assert charger.install_certificate(first) == "Accepted"
    assert charger.fallback == old_root
    assert charger.connect([server, new_issuing])
    assert charger.fallback is None
    assert charger.install_certificate(second) == "Accepted"  # signed by the key installed in step 1
    assert charger.root == new_root
    assert charger.connect([server, new_issuing])

    # A station that missed step 1 still verifies the CSMS when it serves the link in its chain.
    late = SimulatedCharger(old_root, tmp_path)
    assert late.connect([server, new_issuing, link])


def test_rollover_records_links_and_serves_both_chains(
    session: Session, token: Token, status: Presigner, hierarchy: Hierarchy, tmp_path: Path
) -> None:
    issuer = issuer_for(hierarchy.issuing, token)
    request = request_from_csr(get_profile("charger"), read_csr(make_csr("CP-OLD")), issuer)
    old_leaf = issue(Work(session, "test", status=status), issuer=issuer, request=request)

    rollover = rollover_root(Work(session=session, actor="test", status=status, token=token), environment="production")
    assert (rollover.old_root.name, rollover.new_root.name, rollover.issuing.name) == (
        "production-root-1",
        "production-root-2",
        "production-issuing-2",
    )
    assert rollover.new_root.subject == "CN=Acme Charging Production Root CA 2,O=Acme Charging,C=DE"
    assert rollover.issuing.parent_id == rollover.new_root.id
    assert default_issuing_ca(session, "production").id == rollover.issuing.id
    assert rollover.old_root.status == "active"  # it answers for its issuing CA and the link
    assert latest_rollover(session, "production").new_with_old.id == rollover.new_with_old.id

    new_with_old = x509.load_der_x509_certificate(rollover.new_with_old.der or b"")
    old_with_new = x509.load_der_x509_certificate(rollover.old_with_new.der or b"")
    old_root = x509.load_der_x509_certificate(rollover.old_root.certificate_der)
    new_root = x509.load_der_x509_certificate(rollover.new_root.certificate_der)
    assert rollover.new_with_old.authority_id == rollover.old_root.id and rollover.new_with_old.profile == "root-link"
    assert rollover.old_with_new.authority_id == rollover.new_root.id
    assert old_with_new.subject == old_root.subject and old_with_new.public_key() == old_root.public_key()
    old_with_new.verify_directly_issued_by(new_root)
    # A link never outlives the root whose key certified it.
    assert new_with_old.not_valid_after_utc <= old_root.not_valid_after_utc
    assert old_with_new.not_valid_after_utc == old_root.not_valid_after_utc
    constraints = new_with_old.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = new_with_old.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature

    # RFC 5280 lint of both links against their issuers.
    for certificate, issuing_root in ((new_with_old, old_root), (old_with_new, new_root)):
        path = write(tmp_path / "link.pem", _pem([certificate]))
        issuer_path = write(tmp_path / "issuer.pem", _pem([issuing_root]))
        assert pkilint_findings(path, issuer_path) == ""

    # A relying party installed with the new root only verifies an old-chain leaf via OldWithNew.
    old_issuing = x509.load_der_x509_certificate(hierarchy.issuing.certificate_der)
    leaf = write(tmp_path / "old-leaf.pem", _pem([x509.load_der_x509_certificate(old_leaf.der or b"")]))
    anchors = write(tmp_path / "new-root.pem", _pem([new_root]))
    untrusted = write(tmp_path / "old-chain.pem", _pem([old_issuing, old_with_new]))
    assert (
        openssl("verify", "-x509_strict", "-CAfile", str(anchors), "-untrusted", str(untrusted), str(leaf)).returncode
        == 0
    )

    # Each link has its OCSP response from its issuer's delegated signer, and is audited.
    for link in (rollover.new_with_old, rollover.old_with_new):
        stored = session.scalar(select(OcspResponse).where(OcspResponse.serial == link.serial))
        assert stored is not None and stored.cert_status == "good" and stored.authority_id == link.authority_id
    event = session.scalar(select(AuditEvent).where(AuditEvent.action == "ca.root_rolled_over"))
    assert event is not None and rollover.new_with_old.serial in event.details
    assert audit.verify(session).ok

    # Trust bundle (EST cacerts, `ca chain --all`): both chains and both links, newest chain first.
    bundle = [x509.load_der_x509_certificate(der) for der in environment_certificates(session, "production")]
    assert [c.subject.rfc4514_string().split(",")[0] for c in bundle] == [
        "CN=Acme Charging Production Issuing CA 2",
        "CN=Acme Charging Production Root CA 2",
        "CN=Acme Charging Production Issuing CA 1",
        "CN=Acme Charging Production Root CA",
        "CN=Acme Charging Production Root CA 2",  # NewWithOld
        "CN=Acme Charging Production Root CA",  # OldWithNew
    ]
    assert bundle[4] == new_with_old and bundle[5] == old_with_new

    files = rollover_files(session, rollover)
    assert "AdditionalRootCertificateCheck" in files["README.txt"].decode()
    assert sorted(n for n in files if n.endswith(".json")) == [
        "01-InstallCertificate-link.json",
        "02-InstallCertificate-new-root.json",
        "install-certificates.json",  # the environment's whole bundle (tests/ca/authorities/test_oem_roots.py)
    ]
    # Nothing but the two new CAs, their signers and the links was created.
    assert [a.name for a in session.scalars(select(Authority).order_by(Authority.id))] == [
        "production-root-1",
        "production-issuing-1",
        "production-root-2",
        "production-issuing-2",
    ]
    links = session.scalars(select(Certificate).where(Certificate.profile == "root-link")).all()
    assert len(links) == 2


def test_export_only_rewrites_the_files_and_refuses_without_a_rollover(home: Path, tmp_path: Path) -> None:
    assert run(home, "init", "--org", "Acme Charging").exit_code == 0
    missing = run(home, "ca", "rollover-root", "--export-only", "--out", str(tmp_path / "x"))
    assert missing.exit_code == 1 and "has had no root rollover" in missing.stderr
    assert run(home, "ca", "rollover-root").exit_code == 0
    default_dir = home / "rollover" / "production-root-2"
    first = (default_dir / "01-InstallCertificate-link.json").read_bytes()
    again = run(home, "ca", "rollover-root", "--export-only", "--out", str(tmp_path / "again"))
    assert again.exit_code == 0 and "[production] CA production-root-2" in again.stderr
    assert (tmp_path / "again" / "01-InstallCertificate-link.json").read_bytes() == first
    conflicting = run(home, "ca", "rollover-root", "--export-only", "--key-type", "ec-p384")
    assert conflicting.exit_code == 1 and "--export-only creates nothing" in conflicting.stderr
    # A second rollover goes on from the newest root.
    assert run(home, "ca", "rollover-root", "--out", str(tmp_path / "third")).exit_code == 0
    link = _load(tmp_path / "third" / "new-with-old.pem")
    assert link.issuer.rfc4514_string() == "CN=Acme Charging Production Root CA 2,O=Acme Charging"
    assert datetime.now(UTC) < link.not_valid_after_utc
