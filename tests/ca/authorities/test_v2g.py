"""ISO 15118 Plug & Charge: the V2G hierarchy (own root or an external one), SECC certificates
through the core, EST and the CLI, and OCSP for the sub-CAs and leaves, on SQLite and PostgreSQL.

Each certificate is checked field by field against the ISO 15118-2 profile (Annex F, as
DOMAIN.md summarises it), and the chain by OpenSSL as an independent verifier.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID, NameOID, SignatureAlgorithmOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.authorities.issuers import issuer_for
from ca.authorities.v2g import V2gHierarchy, V2gRequest, import_sub_ca_1, init_v2g, request_sub_ca_1
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.enrollment.secc import issue_secc
from ca.errors import ChargepkiError, ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.store.engine import Store
from ca.store.models import AuditEvent, Certificate, Device, OcspResponse
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner, refresh, rotate_signers
from ocsp.source import StoreSource
from tests.est_server import free_port, start_server
from tests.helpers import make_csr, make_key, openssl, pem, pkilint_findings, write
from web.app import create_app

ORG = "Acme Charging"
SECC_ID = "DE*ACM*E0001*1"
OCSP_URL = "http://127.0.0.1:8081/ocsp"
YEAR = timedelta(days=365)


@pytest.fixture
def v2g(session: Session, token: Token, status: Presigner) -> V2gHierarchy:
    return init_v2g(
        Work(session=session, actor="test", status=status, token=token),
        request=V2gRequest(organization=ORG, country="DE"),
    )


def _issue(
    session: Session, token: Token, status: Presigner, secc_id: str = SECC_ID, key: object | None = None, **kwargs
) -> Certificate:
    csr = make_csr(kwargs.pop("cn", secc_id), key=key)
    return issue_secc(
        Work(session, "test", status=status, issuers=lambda ca: issuer_for(ca, token)),
        environment="production",
        csr=csr,
        secc_id=secc_id,
        **kwargs,
    )


def _extension(certificate: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension:
    return certificate.extensions.get_extension_for_oid(oid)


def _single(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    assert len(values) == 1, (name, oid)
    return str(values[0].value)


def _assert_common(certificate: x509.Certificate, der: bytes) -> None:
    """What ISO 15118-2 asks of every certificate in the chain."""
    assert certificate.version == x509.Version.v3
    assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert 0 < certificate.serial_number < 2**159  # positive, at most 20 octets
    assert len(der) <= 800, f"{len(der)} bytes: over the 800-byte certificateType of the ISO 15118-2 schema"
    assert _single(certificate.subject, NameOID.ORGANIZATION_NAME) == ORG
    assert _single(certificate.subject, NameOID.COUNTRY_NAME) == "DE"
    assert not _extension(certificate, ExtensionOID.SUBJECT_KEY_IDENTIFIER).critical
    with pytest.raises(x509.ExtensionNotFound):  # revocation by OCSP only, and every byte counts
        _extension(certificate, ExtensionOID.CRL_DISTRIBUTION_POINTS)


def _assert_ca(certificate: x509.Certificate, path_length: int | None) -> None:
    constraints = _extension(certificate, ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == path_length
    usage = _extension(certificate, ExtensionOID.KEY_USAGE)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert not (usage.value.digital_signature or usage.value.key_agreement or usage.value.key_encipherment)
    assert _single(certificate.subject, NameOID.DOMAIN_COMPONENT) == "V2G"


def _aki_of(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    aki = _extension(certificate, ExtensionOID.AUTHORITY_KEY_IDENTIFIER)
    ski = _extension(issuer, ExtensionOID.SUBJECT_KEY_IDENTIFIER)
    assert not aki.critical and aki.value.key_identifier == ski.value.digest
    assert certificate.issuer == issuer.subject


def _ocsp_only_aia(certificate: x509.Certificate) -> None:
    aia = _extension(certificate, ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
    assert not aia.critical
    assert [(d.access_method, d.access_location.value) for d in aia.value] == [
        (AuthorityInformationAccessOID.OCSP, OCSP_URL)
    ]


def _lifetime(certificate: x509.Certificate) -> timedelta:
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc


def test_the_chain_meets_the_iso_15118_2_profile_field_by_field(
    v2g: V2gHierarchy, session: Session, token: Token, status: Presigner, tmp_path: Path
) -> None:
    leaf_row = _issue(session, token, status)
    ders = {
        "root": v2g.root.certificate_der,
        "sub1": v2g.sub_ca_1.certificate_der,
        "sub2": v2g.sub_ca_2.certificate_der,
        "leaf": leaf_row.der or b"",
    }
    root, sub1, sub2, leaf = (x509.load_der_x509_certificate(der) for der in ders.values())
    for name, certificate in zip(ders, (root, sub1, sub2, leaf), strict=True):
        _assert_common(certificate, ders[name])

    # V2G root: self-signed, CA without a path length, no AKI (RFC 5280 4.2.1.1), no AIA.
    _assert_ca(root, None)
    assert root.issuer == root.subject
    root.verify_directly_issued_by(root)
    assert _single(root.subject, NameOID.COMMON_NAME) == "Acme Charging Production V2G Root CA"
    for oid in (ExtensionOID.AUTHORITY_KEY_IDENTIFIER, ExtensionOID.AUTHORITY_INFORMATION_ACCESS):
        with pytest.raises(x509.ExtensionNotFound):
            _extension(root, oid)
    assert _lifetime(root) <= 40 * YEAR + timedelta(days=10)

    # CPO Sub-CA 1: pathLen 1, under the root, OCSP in AIA, at most four years.
    _assert_ca(sub1, 1)
    _aki_of(sub1, root)
    _ocsp_only_aia(sub1)
    assert _lifetime(sub1) <= 4 * YEAR + timedelta(days=1)
    assert _single(sub1.subject, NameOID.COMMON_NAME) == "Acme Charging Production CPO Sub-CA 1"

    # CPO Sub-CA 2: pathLen 0, under Sub-CA 1, OCSP in AIA, at most two years.
    _assert_ca(sub2, 0)
    _aki_of(sub2, sub1)
    _ocsp_only_aia(sub2)
    assert _lifetime(sub2) <= 2 * YEAR

    # SECC leaf: CN = SECC ID, DC=CPO, CA:false, digitalSignature+keyAgreement critical, AIA OCSP, 60 days.
    constraints = _extension(leaf, ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical and not constraints.value.ca
    usage = _extension(leaf, ExtensionOID.KEY_USAGE)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_encipherment)
    assert _single(leaf.subject, NameOID.COMMON_NAME) == SECC_ID
    assert _single(leaf.subject, NameOID.DOMAIN_COMPONENT) == "CPO"
    _aki_of(leaf, sub2)
    _ocsp_only_aia(leaf)
    with pytest.raises(x509.ExtensionNotFound):
        _extension(leaf, ExtensionOID.EXTENDED_KEY_USAGE)
    assert _lifetime(leaf) == timedelta(days=60)
    assert {extension.oid for extension in leaf.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    }

    # OpenSSL builds and verifies the chain (strict X.509, TLS server purpose: the SECC serves the EV).
    paths = {name: write(tmp_path / f"{name}.pem", pem(der)) for name, der in ders.items()}
    untrusted = write(tmp_path / "sub-cas.pem", pem(ders["sub2"]) + pem(ders["sub1"]))
    result = openssl(
        "verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", str(paths["root"]),
        "-untrusted", str(untrusted), str(paths["leaf"]),
    )  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr
    # pkilint (RFC 5280) finds nothing in any certificate, nor in any issuer/subject pair, except that
    # it reads domainComponent as a DNS name: ISO 15118-2 prescribes the bare DC=V2G and DC=CPO.
    ignore = ("name_domain_components_invalid_domain_name",)
    for name, issuer in (("root", None), ("sub1", "root"), ("sub2", "sub1"), ("leaf", "sub2")):
        assert pkilint_findings(paths[name], paths[issuer] if issuer else None, ignore) == "", name


def test_each_ca_has_its_ocsp_signer_and_responses_live_14_days(
    v2g: V2gHierarchy, session: Session, token: Token, status: Presigner
) -> None:
    leaf = _issue(session, token, status)
    signers = {row.authority_id: row for row in v2g.ocsp_signers}
    assert set(signers) == {v2g.root.id, v2g.sub_ca_1.id, v2g.sub_ca_2.id}
    for signer in signers.values():  # three response lifetimes, so rotation never clamps one
        assert signer.not_after - signer.not_before == timedelta(days=42)
    serials = {leaf.serial, v2g.sub_ca_1.serial, v2g.sub_ca_2.serial}
    rows = session.scalars(select(OcspResponse).where(OcspResponse.serial.in_(serials))).all()
    session.commit()
    assert {row.serial for row in rows} == serials
    for row in rows:
        assert row.next_update - row.this_update == timedelta(days=14)
        parsed = ocsp.load_der_ocsp_response(row.der)
        assert parsed.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert len(row.der) < 1000, f"{len(row.der)} bytes"
    assert status.validity_for(session, v2g.sub_ca_2.id) == timedelta(days=14)
    # Nothing is due at once: the refresher re-signs V2G responses after 7 days, not 12 hours.
    assert refresh(session, status, datetime.now(UTC) + timedelta(days=6)) == 0
    assert refresh(session, status, datetime.now(UTC) + timedelta(days=7, minutes=1)) >= len(serials)


def test_secc_refusals_are_one_line_and_audited(
    v2g: V2gHierarchy, session: Session, token: Token, status: Presigner
) -> None:
    first = _issue(session, token, status)
    key = make_key()
    cases: list[tuple[dict, type[ChargepkiError], str]] = [
        ({"secc_id": "not an id"}, PolicyError, "is not an SECC ID"),
        ({"secc_id": "DE*ACM*E0002*1", "cn": "DE*ACM*E0003*1"}, PolicyError, "is not the SECC ID"),
        ({"secc_id": "DE*ACM*E0004*1", "key": make_key("rsa-2048")}, PolicyError, "key type rsa-2048 is not allowed"),
        ({"secc_id": "DE*ACM*E0005*1", "key": make_key("ec-p384")}, PolicyError, "key type ec-p384 is not allowed"),
        ({"secc_id": "DE*ACM*E0006*1", "device_serial": "CP-NOPE"}, PolicyError, "not registered"),
        ({"secc_id": "DE*ACM*E0007*1", "validity": timedelta(days=91)}, PolicyError, "exceeds the maximum of 90"),
    ]
    _issue(session, token, status, "DE*ACM*E0008*1", key=key)
    cases.append(({"secc_id": "DE*ACM*E0009*1", "key": key}, ConflictError, "already certified for another identity"))
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message) as raised:
            _issue(session, token, status, **kwargs)
        assert "\n" not in str(raised.value)
    with pytest.raises(InputError, match="malformed CSR"):
        issue_secc(
            Work(session, "test", status=status, issuers=lambda ca: issuer_for(ca, token)),
            environment="production",
            csr=b"junk",
            secc_id=SECC_ID,
        )
    with pytest.raises(NotFoundError, match="no active CPO Sub-CA 2 in environment 'staging'"):
        issue_secc(
            Work(session, "t", status=status, issuers=lambda ca: issuer_for(ca, token)),
            environment="staging",
            csr=make_csr(SECC_ID),
            secc_id=SECC_ID,
        )
    refused = session.scalars(select(AuditEvent).where(AuditEvent.action == "v2g.refused")).all()
    session.commit()
    assert len(refused) == len(cases) + 1
    assert session.get(Certificate, first.id).status == "valid"


def test_a_new_certificate_supersedes_the_old_one_and_stations_keep_their_secc_ids(
    v2g: V2gHierarchy, session: Session, token: Token, status: Presigner
) -> None:
    add_device(Work(session, "test"), serial="CP-A")
    add_device(Work(session, "test"), serial="CP-B")
    add_device(Work(session, "test"), serial="CP-STAGING", environment="staging")
    first = _issue(session, token, status, device_serial="CP-A")
    second = _issue(session, token, status, device_serial="CP-A")
    session.refresh(first)
    assert first.status == "revoked" and first.revocation_reason == "superseded"
    assert second.device_id == session.scalar(select(Device.id).where(Device.serial == "CP-A"))
    with pytest.raises(ConflictError, match="certified for another charging station"):
        _issue(session, token, status, device_serial="CP-B")
    with pytest.raises(PolicyError, match="belongs to environment staging, not production"):
        _issue(session, token, status, "DE*ACM*E0099*1", device_serial="CP-STAGING")
    session.refresh(second)
    assert second.status == "valid"


def test_ocpp_and_v2g_hierarchies_live_side_by_side(session: Session, token: Token, status: Presigner) -> None:
    init_v2g(
        Work(session=session, actor="test", status=status, token=token),
        request=V2gRequest(organization=ORG, country="DE"),
    )
    hierarchy = init_hierarchy(
        Work(session=session, actor="test", status=status, token=token), request=HierarchyRequest(organization=ORG)
    )
    with pytest.raises(ConflictError, match="already has a V2G hierarchy"):
        init_v2g(Work(session=session, actor="test", status=status, token=token), request=V2gRequest(organization=ORG))
    # A charger certificate does not come from a V2G CA, nor an SECC certificate from the OCPP issuing CA.
    issuer = issuer_for(hierarchy.issuing, token)
    request = IssueRequest(get_profile("v2g-secc"), make_key().public_key(), SECC_ID)
    with pytest.raises(PolicyError, match="issued by a v2g-sub-ca-2 CA, not by production-issuing-1"):
        issue(Work(session, "test", status=status), issuer=issuer, request=request)


# -- an external V2G root -------------------------------------------------------------------------
class ExternalRoot:
    """The V2G PKI operator's side, played in software by the test."""

    def __init__(self, path_length: int | None = None) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "V2G PKI Operator"),
                x509.NameAttribute(NameOID.COMMON_NAME, "External V2G Root CA"),
                x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "V2G"),
            ]
        )
        now = datetime.now(UTC)
        self.certificate = (
            self._ca(x509.CertificateBuilder(), path_length, self.key.public_key())
            .subject_name(name)
            .issuer_name(name)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + 30 * YEAR)
            .sign(self.key, hashes.SHA256())
        )

    @staticmethod
    def _ca(builder: x509.CertificateBuilder, path_length: int | None, key: object) -> x509.CertificateBuilder:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return (
            builder.public_key(key)  # type: ignore[arg-type]
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
        )

    def sign(self, csr_pem: bytes, path_length: int = 1, days: int = 4 * 365) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        now = datetime.now(UTC)
        certificate = (
            self._ca(x509.CertificateBuilder(), path_length, csr.public_key())
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .subject_name(csr.subject)
            .issuer_name(self.certificate.subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now - timedelta(minutes=5) + timedelta(days=days))
            .sign(self.key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def test_an_external_root_signs_sub_ca_1_and_the_rest_is_ours(
    session: Session, token: Token, status: Presigner, tmp_path: Path
) -> None:
    external = ExternalRoot()
    request = V2gRequest(organization=ORG, country="DE")
    csr_pem = request_sub_ca_1(Work(session=session, actor="test", token=token), request=request)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid and csr.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    assert _single(csr.subject, NameOID.DOMAIN_COMPONENT) == "V2G"
    assert _extension(csr, ExtensionOID.BASIC_CONSTRAINTS).value.path_length == 1  # type: ignore[arg-type]

    refusals = [
        (b"not a certificate", InputError, "holds no readable certificate"),
        (external.sign(csr_pem), InputError, "found 1 certificate"),
        (external.sign(csr_pem) + ExternalRoot().pem(), PolicyError, "not signed by this V2G root"),
        (external.sign(csr_pem, path_length=2) + external.pem(), PolicyError, "pathLenConstraint is 2, not 1"),
        (external.sign(csr_pem, days=5 * 365) + external.pem(), PolicyError, "valid for longer than 1461 days"),
        (
            external.sign(make_csr("Someone Else")) + external.pem(),
            PolicyError,
            "not for a key requested",
        ),
    ]
    for data, error, message in refusals:
        with pytest.raises(error, match=message):
            import_sub_ca_1(
                Work(session=session, actor="test", status=status, token=token), request=request, certificate_data=data
            )
    hierarchy = import_sub_ca_1(
        Work(session=session, actor="test", status=status, token=token),
        request=request,
        certificate_data=external.sign(csr_pem),
        root_data=external.pem(),
    )
    assert hierarchy.root.status == "external" and hierarchy.root.key_label == ""
    assert [signer.authority_id for signer in hierarchy.ocsp_signers] == [hierarchy.sub_ca_2.id, hierarchy.sub_ca_1.id]
    leaf = _issue(session, token, status)
    untrusted = write(
        tmp_path / "subs.pem", pem(hierarchy.sub_ca_2.certificate_der) + pem(hierarchy.sub_ca_1.certificate_der)
    )
    root = write(tmp_path / "root.pem", external.pem())
    result = openssl(
        "verify", "-x509_strict", "-CAfile", str(root), "-untrusted", str(untrusted),
        str(write(tmp_path / "leaf.pem", pem(leaf.der or b""))),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sub2 = x509.load_der_x509_certificate(hierarchy.sub_ca_2.certificate_der)
    _assert_common(sub2, hierarchy.sub_ca_2.certificate_der)
    _assert_ca(sub2, 0)
    # The external root has no key and no signer here: rotation passes it by, the responder does not claim it.
    now = datetime.now(UTC)
    rotated = rotate_signers(session, status, actor="test", now=now, validity=timedelta(days=30), force=True)
    assert {authority.name for authority, _ in rotated} == {hierarchy.sub_ca_1.name, hierarchy.sub_ca_2.name}
    assert all(row.not_after - row.not_before == timedelta(days=42) for _, row in rotated)  # not the 30 asked
    session.commit()
    served = set(StoreSource(Store(str(session.get_bind().url))).issuers().values())
    assert hierarchy.root.id not in served and hierarchy.sub_ca_1.id in served


# -- EST under a V2G label --------------------------------------------------------------------------
@pytest.fixture
def est_client(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator:
    home = tmp_path / "home"
    settings = EstSettings(client_cert_header="X-SSL-Client-Cert", trusted_proxies=("127.0.0.1",))
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0], est=settings))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        ocpp = init_hierarchy(
            Work(session=session, actor="test", status=status, token=token), request=HierarchyRequest(organization=ORG)
        )
        staging = init_hierarchy(
            Work(session=session, actor="test", status=status, token=token),
            request=HierarchyRequest(organization=ORG, environment="staging"),
        )
        v2g = init_v2g(
            Work(session=session, actor="test", status=status, token=token),
            request=V2gRequest(organization=ORG, country="DE"),
        )
        credentials = {}
        for name, profile, authority, device in (
            ("ra", "ra", ocpp.issuing, None),
            ("CP-A", "charger", ocpp.issuing, "CP-A"),
            ("CP-B", "charger", ocpp.issuing, "CP-B"),
            ("CP-S", "charger", staging.issuing, "CP-S"),
        ):
            device_id = None
            if device:
                device_id = add_device(Work(session, "test"), serial=device, environment=authority.environment).id
            row = issue(
                Work(session, "test", status=status),
                issuer=issuer_for(authority, token),
                request=IssueRequest(get_profile(profile), make_key().public_key(), name, device_id=device_id),
            )
            credentials[name] = quote(pem(row.der or b"").decode())
        sub2_name = v2g.sub_ca_2.name
    client = create_app(pki, settings).test_client()
    yield client, credentials, sub2_name
    pki.close()


def _enroll(client, label: str, csr: bytes, certificate: str | None, operation: str = "simpleenroll"):  # type: ignore[no-untyped-def]
    der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
    headers = {"Content-Type": "application/pkcs10"}
    if certificate:
        headers["X-SSL-Client-Cert"] = certificate
    return client.post(f"/.well-known/est/{label}/{operation}", data=base64.encodebytes(der), headers=headers)


def _leaf(response) -> x509.Certificate:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.get_data(as_text=True)
    (certificate,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.get_data()))
    return certificate


def test_est_issues_secc_certificates_under_a_v2g_label(est_client) -> None:  # type: ignore[no-untyped-def]
    client, credentials, sub2_name = est_client
    chain = pkcs7.load_der_pkcs7_certificates(base64.b64decode(client.get("/.well-known/est/v2g/cacerts").get_data()))
    names = {_single(c.subject, NameOID.COMMON_NAME): c for c in chain}  # a SET OF in PKCS#7: no order
    assert set(names) == {
        "Acme Charging Production CPO Sub-CA 2",
        "Acme Charging Production CPO Sub-CA 1",
        "Acme Charging Production V2G Root CA",
    }
    sub2 = names["Acme Charging Production CPO Sub-CA 2"]
    # The CSMS as registration authority, for any SECC ID; the label may also be the Sub-CA 2's name.
    by_ra = _leaf(_enroll(client, "v2g", make_csr("DE*ACM*E0100*1"), credentials["ra"]))
    assert _single(by_ra.subject, NameOID.COMMON_NAME) == "DE*ACM*E0100*1" and by_ra.issuer == sub2.subject
    _leaf(_enroll(client, sub2_name, make_csr("DE*ACM*E0101*1"), credentials["ra"]))
    # A station with its charger certificate; then it renews with the SECC certificate itself.
    key = make_key()
    by_station = _leaf(_enroll(client, "v2g", make_csr("DE*ACM*E0200*1", key=key), credentials["CP-A"]))
    own = quote(by_station.public_bytes(serialization.Encoding.PEM).decode())
    renewed = _leaf(_enroll(client, "v2g", make_csr("DE*ACM*E0200*1"), own, "simplereenroll"))
    assert renewed.serial_number != by_station.serial_number

    refusals = [
        (make_csr("DE*ACM*E0300*1"), None, 401, "needs a TLS client certificate"),
        (make_csr("DE*ACM*E0200*1"), credentials["CP-B"], 409, "certified for another charging station"),
        (make_csr("DE*ACM*E0301*1"), credentials["CP-S"], 401, "belongs to environment staging, not production"),
        (make_csr("DE*ACM*E0302*1"), own, 401, "revoked"),  # superseded by the renewal
        (make_csr("CP-1"), credentials["ra"], 403, "is not an SECC ID"),
        (make_csr("DE*ACM*E0303*1", key=make_key("rsa-2048")), credentials["ra"], 403, "rsa-2048 is not allowed"),
    ]
    for csr, certificate, code, message in refusals:
        response = _enroll(client, "v2g", csr, certificate)
        assert response.status_code == code and message in response.get_data(as_text=True), (
            message,
            response.get_data(as_text=True),
        )
    assert client.get("/.well-known/est/no-such-label/cacerts").status_code == 404


# -- the CLI, and OCSP through the real responder ---------------------------------------------------
def run(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _ok(home: Path, *args: str) -> Result:
    result = run(home, *args)
    assert result.exit_code == 0, result.output
    return result


def _one_line_error(result: Result, pattern: str) -> None:
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and pattern in lines[0], result.stderr


def test_cli_init_issue_and_ocsp_through_the_responder(
    home: Path, db_url: str, token_settings: tuple[Pkcs11Settings, str], tmp_path: Path
) -> None:
    output = _ok(home, "v2g", "init", "--org", ORG, "--country", "DE").output
    assert "[production] V2G hierarchy" in output and "production-cpo-sub-ca2-1" in output
    _one_line_error(run(home, "v2g", "init", "--org", ORG), "already has a V2G hierarchy")
    _ok(home, "init", "--org", ORG)  # the OCPP hierarchy of the same environment, beside it
    csr = write(tmp_path / "secc.csr", make_csr(SECC_ID))
    chain_path = tmp_path / "secc-chain.pem"
    issued = _ok(home, "v2g", "issue", "--csr", str(csr), "--secc-id", SECC_ID, "--out", str(chain_path))
    assert "[production] CA production-cpo-sub-ca2-1" in issued.stderr
    leaf, sub2, sub1 = x509.load_pem_x509_certificates(chain_path.read_bytes())
    revoked_path = tmp_path / "revoked.pem"
    _ok(home, "v2g", "issue", "--csr", str(write(tmp_path / "r.csr", make_csr("DE*ACM*E0002*1"))),
        "--secc-id", "DE*ACM*E0002*1", "--out", str(revoked_path))  # fmt: skip
    revoked = x509.load_pem_x509_certificates(revoked_path.read_bytes())[0]
    revocation = _ok(home, "revoke", format(revoked.serial_number, "X"), "--reason", "keyCompromise")
    assert "[production]" in revocation.stderr
    listing = _ok(home, "ca", "list").output
    for role in ("v2g-root", "v2g-sub-ca-1", "v2g-sub-ca-2", "issuing"):
        assert role in listing

    _one_line_error(run(home, "v2g", "issue", "--csr", str(csr), "--secc-id", "bad id"), "is not an SECC ID")
    _one_line_error(run(home, "v2g", "issue", "--csr", str(csr), "--secc-id", SECC_ID, "--environment", "staging"),
                    "no active CPO Sub-CA 2 in environment 'staging'")  # fmt: skip
    _one_line_error(run(home, "issue", "--profile", "v2g-secc", "--csr", str(csr), "--ca", "production-issuing-1"),
                    "issued by a v2g-sub-ca-2 CA")  # fmt: skip
    _one_line_error(run(home, "v2g", "init", "--environment", "staging"), "--org is required")

    root_pem = _ok(home, "ca", "chain", "--ca", "production-cpo-sub-ca2-1").stdout
    root = x509.load_pem_x509_certificates(root_pem.encode())[-1]
    files = {
        name: write(tmp_path / f"{name}.pem", c.public_bytes(serialization.Encoding.PEM))
        for name, c in (("leaf", leaf), ("sub2", sub2), ("sub1", sub1), ("root", root), ("revoked", revoked))
    }
    others = write(tmp_path / "others.pem", files["sub2"].read_bytes() + files["sub1"].read_bytes())
    server = start_server(home, free_port(), service="ocsp")
    sizes = {}
    try:
        for name, issuer in (("leaf", "sub2"), ("sub2", "sub1"), ("sub1", "root"), ("revoked", "sub2")):
            response_path = tmp_path / f"{name}.ocsp"
            result = openssl(
                "ocsp", "-issuer", str(files[issuer]), "-cert", str(files[name]), "-CAfile", str(files["root"]),
                "-verify_other", str(others), "-url", f"http://127.0.0.1:{server.port}/ocsp", "-no_nonce",
                "-respout", str(response_path),
            )  # fmt: skip
            assert result.returncode == 0 and "Response verify OK" in result.stderr, result.stdout + result.stderr
            expected = "revoked" if name == "revoked" else "good"
            assert f"{files[name]}: {expected}" in result.stdout, result.stdout
            parsed = ocsp.load_der_ocsp_response(response_path.read_bytes())
            assert parsed.next_update_utc - parsed.this_update_utc >= timedelta(days=7)
            sizes[name] = len(response_path.read_bytes())
    finally:
        server.stop()
    assert all(size < 1000 for size in sizes.values()), sizes  # stapled: about 0.9 KB each


def test_cli_external_root_in_two_steps(home: Path, tmp_path: Path) -> None:
    csr_path = tmp_path / "sub-ca-1.csr"
    step_one = _ok(home, "v2g", "init", "--org", ORG, "--environment", "staging", "--external-root-csr", str(csr_path))
    assert "[staging]" in step_one.output
    external = ExternalRoot()
    certificate = write(tmp_path / "sub-ca-1.pem", external.sign(csr_path.read_bytes()))
    root = write(tmp_path / "v2g-root.pem", external.pem())
    _one_line_error(
        run(home, "v2g", "init", "--environment", "staging", "--import-subca1", str(certificate)),
        "expected the Sub-CA 1 certificate and the V2G root certificate",
    )
    _one_line_error(
        run(home, "v2g", "init", "--environment", "staging", "--import-subca1", str(tmp_path / "missing.pem")),
        "cannot read the Sub-CA 1 certificate",
    )
    output = _ok(
        home, "v2g", "init", "--environment", "staging", "--import-subca1", str(certificate), "--v2g-root", str(root)
    ).output
    assert "[staging] V2G hierarchy" in output and "external: its key is not here" in output
    chain = x509.load_pem_x509_certificates(_ok(home, "ca", "chain", "--ca", "staging-cpo-sub-ca2-1").stdout.encode())
    assert [_single(c.subject, NameOID.COMMON_NAME) for c in chain] == [
        "Acme Charging Staging CPO Sub-CA 2",
        "Acme Charging Staging CPO Sub-CA 1",
        "External V2G Root CA",
    ]
    assert "external" in _ok(home, "ca", "list").output
    _ok(home, "crl", "publish")  # the external root has no key here: not published, no error
