"""OEM roots and the InstallCertificate bundle, on SQLite and PostgreSQL.

An operator imports a vehicle manufacturer's root for an environment (`chargepki csms oem-root add`);
it is checked as a station would check a root before trusting it, listed in the environment's
InstallCertificate bundle as `OEMRootCertificate` (OCPP 2.1 only) beside the CSMS, V2G (-2 and -20)
and manufacturer roots, and written with the root-rollover files; it is never a CA of this
installation (no client-certificate trust, no identity check, no chain).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.manufacturer import ManufacturerRequest, init_manufacturer
from ca.authorities.oem import import_oem_root, oem_roots, remove_oem_root
from ca.authorities.rotation import install_certificate, install_certificates, rollover_files, rollover_root
from ca.authorities.v2g import V2gRequest, init_v2g
from ca.enrollment.identity import check_identity
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.keys.pkcs11_token import Token
from ca.store.models import AuditEvent, Authority
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner
from tests.helpers import write
from web.server import client_ca_bundle

ORG = "Acme Charging"
DAY = timedelta(days=1)


def oem_root(
    name: str = "Example Motors OEM Root",
    *,
    key: object | None = None,
    ca: bool | None = True,
    key_cert_sign: bool | None = True,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    issuer: tuple[x509.Name, object] | None = None,
) -> tuple[x509.Certificate, object]:
    """A vehicle manufacturer's root (P-521 by default, as ISO 15118-20 OEM roots are)."""
    key = key or ec.generate_private_key(ec.SECP521R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Motors"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    issuer_name, signing_key = issuer or (subject, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 3650 * DAY)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if key_cert_sign is not None:
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "encipher_only", "decipher_only"),
            False,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.KeyUsage(key_cert_sign=key_cert_sign, crl_sign=True, **usage), critical=True
        )
    algorithm = None if isinstance(signing_key, ed25519.Ed25519PrivateKey) else hashes.SHA512()
    return builder.sign(signing_key, algorithm), key  # type: ignore[arg-type]


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _work(session: Session, token: Token, status: Presigner) -> Work:
    return Work(session=session, actor="test", status=status, token=token)


def test_an_imported_oem_root_is_in_the_ocpp_2_1_bundle_beside_every_other_root(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    work = _work(session, token, status)
    v2 = init_v2g(work, request=V2gRequest(organization=ORG, country="DE"))
    v20 = init_v2g(work, request=V2gRequest(organization=ORG, country="DE", iso="15118-20", sub_ca_1=False))
    manufacturer = init_manufacturer(work, request=ManufacturerRequest(organization=ORG))
    certificate, _key = oem_root()
    root = import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(certificate))
    assert (root.name, root.role, root.status, root.key_type) == (
        "production-oem-root-1",
        "oem-root",
        "external",
        "ec-p521",
    )
    assert root.parent_id is None and root.key_label == ""

    bundle = install_certificates(session, "production")
    assert [(entry.certificate_type, entry.authority.name) for entry in bundle] == [
        ("CSMSRootCertificate", hierarchy.root.name),
        ("V2GRootCertificate", v2.root.name),
        ("V2GRootCertificate", v20.root.name),
        ("ManufacturerRootCertificate", manufacturer.root.name),
        ("OEMRootCertificate", root.name),
    ]
    for entry in bundle:
        assert set(entry.payload) == {"certificateType", "certificate"}
        assert entry.payload["certificateType"] == entry.certificate_type
        installed = x509.load_pem_x509_certificate(entry.payload["certificate"].encode())
        assert installed.public_bytes(serialization.Encoding.DER) == entry.authority.certificate_der
    assert bundle[-1].payload["certificate"].encode() == _pem(certificate)
    # OCPP 2.0.1's InstallCertificate has no OEMRootCertificate: that bundle leaves it out.
    assert [e.certificate_type for e in install_certificates(session, "production", ocpp="2.0.1")] == [
        "CSMSRootCertificate",
        "V2GRootCertificate",
        "V2GRootCertificate",
        "ManufacturerRootCertificate",
    ]
    with pytest.raises(InputError):
        install_certificate(certificate.public_bytes(serialization.Encoding.DER), "OEMRootCertificate", ocpp="2.0.1")
    with pytest.raises(InputError):
        install_certificates(session, "production", ocpp="1.6")
    assert install_certificates(session, "staging") == []  # another environment's roots are its own

    # Never a CA of this installation: no TLS client trust, and what it signs is an unknown issuer.
    assert _pem(certificate) not in client_ca_bundle(session)
    assert x509.load_der_x509_certificate(hierarchy.root.certificate_der).public_bytes(
        serialization.Encoding.PEM
    ) in client_ca_bundle(session)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "CP-0001")]))
        .issuer_name(certificate.subject)
        .public_key(leaf_key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.now(UTC) - DAY)
        .not_valid_after(datetime.now(UTC) + DAY)
        .sign(_key, hashes.SHA512())  # type: ignore[arg-type]
    )
    verdict = check_identity(session, "CP-0001", _pem(leaf).decode(), environment="production")
    assert (verdict.allowed, verdict.reason) == (False, "unknown_issuer")

    # Removed: out of the bundle, kept (retired) for the record, both audited.
    remove_oem_root(Work(session, "test"), name=root.name)
    assert "OEMRootCertificate" not in {e.certificate_type for e in install_certificates(session, "production")}
    assert [a.status for a in oem_roots(session, "production")] == ["retired"]
    with pytest.raises(ConflictError):
        remove_oem_root(Work(session, "test"), name=root.name)
    with pytest.raises(NotFoundError):
        remove_oem_root(Work(session, "test"), name=hierarchy.root.name)  # not an OEM root
    actions = session.scalars(select(AuditEvent.action).where(AuditEvent.subject == root.name)).all()
    assert actions == ["oem_root.imported", "oem_root.removed"]
    # Imported again after its removal: a new entry.
    again = import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(certificate))
    assert again.name == "production-oem-root-2"


def test_what_a_station_should_not_trust_is_refused_and_nothing_is_stored(
    session: Session, hierarchy: Hierarchy
) -> None:
    now = datetime.now(UTC)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Someone Else")])
    cases = {
        "not self-signed": oem_root(issuer=(other_name, other_key))[0],
        "self-signature does not verify": oem_root(issuer=(oem_root()[0].subject, other_key))[0],
        "CA:FALSE": oem_root(ca=False)[0],
        "no basicConstraints": oem_root(ca=None)[0],
        "lacks keyCertSign": oem_root(key_cert_sign=False)[0],
        "expired": oem_root(not_before=now - 400 * DAY, not_after=now - DAY)[0],
        "not valid before": oem_root(not_before=now + 10 * DAY)[0],
        "ed25519": oem_root(key=ed25519.Ed25519PrivateKey.generate())[0],
    }
    for expected, certificate in cases.items():
        with pytest.raises(PolicyError) as refused:
            import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(certificate))
        assert refused.value.code == "bad_oem_root" and expected in str(refused.value), (expected, refused.value)
    # A root without keyUsage may sign certificates (RFC 5280): accepted; the same one twice is not.
    plain, _ = oem_root(key_cert_sign=None)
    import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(plain))
    with pytest.raises(ConflictError):
        import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(plain))
    # DER is read too; two certificates, junk and an environment without CAs are refused.
    der = oem_root()[0].public_bytes(serialization.Encoding.DER)
    assert import_oem_root(Work(session, "test"), environment="production", certificate_data=der).name.endswith("-2")
    with pytest.raises(InputError):
        import_oem_root(
            Work(session, "test"), environment="production", certificate_data=_pem(oem_root()[0]) + _pem(plain)
        )
    with pytest.raises(InputError):
        import_oem_root(Work(session, "test"), environment="production", certificate_data=b"junk")
    with pytest.raises(NotFoundError):
        import_oem_root(Work(session, "test"), environment="staging", certificate_data=_pem(oem_root()[0]))
    assert len(session.scalars(select(Authority).where(Authority.role == "oem-root")).all()) == 2


def test_the_rollover_files_carry_the_bundle_with_the_oem_roots(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    certificate, _ = oem_root()
    import_oem_root(Work(session, "test"), environment="production", certificate_data=_pem(certificate))
    rollover = rollover_root(_work(session, token, status), environment="production")
    files = rollover_files(session, rollover)
    payloads = json.loads(files["install-certificates.json"])
    assert [p["certificateType"] for p in payloads] == [
        "CSMSRootCertificate",
        "CSMSRootCertificate",
        "OEMRootCertificate",
    ]
    new_root = x509.load_der_x509_certificate(rollover.new_root.certificate_der)
    assert x509.load_pem_x509_certificate(payloads[0]["certificate"].encode()) == new_root  # newest first
    assert payloads[2]["certificate"].encode() == _pem(certificate)
    assert "OEMRootCertificate" in files["README.txt"].decode()
    # The numbered payloads are unchanged: OCPP 2.0.1 CSMS roots.
    assert json.loads(files["02-InstallCertificate-new-root.json"])["certificateType"] == "CSMSRootCertificate"


def _run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def test_cli_oem_root_add_list_remove_and_the_bundle(home: Path, tmp_path: Path) -> None:
    assert _run(home, "init", "--org", ORG).exit_code == 0
    certificate, _ = oem_root()
    added = _run(home, "csms", "oem-root", "add", str(write(tmp_path / "oem.pem", _pem(certificate))))
    assert added.exit_code == 0 and "[production] OEM root production-oem-root-1 imported" in added.output
    refused = _run(home, "csms", "oem-root", "add", str(write(tmp_path / "leaf.pem", _pem(oem_root(ca=False)[0]))))
    assert refused.exit_code == 1 and "CA:FALSE" in refused.stderr
    listing = _run(home, "csms", "oem-root", "list").output
    assert "production-oem-root-1" in listing and "in bundle" in listing
    bundle = json.loads(_run(home, "csms", "install-certificates").output)
    assert [p["certificateType"] for p in bundle] == ["CSMSRootCertificate", "OEMRootCertificate"]
    older = json.loads(_run(home, "csms", "install-certificates", "--ocpp", "2.0.1").output)
    assert [p["certificateType"] for p in older] == ["CSMSRootCertificate"]
    written = _run(home, "csms", "install-certificates", "--out", str(tmp_path / "bundle.json"))
    assert written.exit_code == 0 and json.loads((tmp_path / "bundle.json").read_text()) == bundle
    assert _run(home, "csms", "oem-root", "remove", "production-oem-root-1").exit_code == 0
    assert "removed" in _run(home, "csms", "oem-root", "list").output
    assert [p["certificateType"] for p in json.loads(_run(home, "csms", "install-certificates").output)] == [
        "CSMSRootCertificate"
    ]
