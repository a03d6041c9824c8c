"""ISO 15118-20 beside ISO 15118-2, on SQLite and PostgreSQL: the P-521 hierarchy in both shapes
(root → Sub-CA 1 → Sub-CA 2, and root → Sub-CA 2) and under an external root, SECC leaves of both
versions for one station, P-521 only where a profile names it, and EST under the `v2g20` label.

Every new certificate is checked by OpenSSL (`verify -x509_strict`, the V2G root the only trust
anchor) and pkilint; the TLS 1.3 / TLS 1.2 handshakes and the OCSP responder are in
tests/e2e/test_v2g_tls.py.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import replace
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
from cryptography.x509.oid import ExtensionOID, NameOID, SignatureAlgorithmOID
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import issuer_for
from ca.authorities.v2g import V2gHierarchy, V2gRequest, import_sub_ca_1, init_v2g, request_sub_ca_1
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.enrollment.secc import issue_secc, secc_policies
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.flow import IssueRequest, issue, key_identity
from ca.issuance.profiles import PROFILES, get_profile
from ca.keys.keyspec import ALL_KEY_TYPES
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.store.models import AuditEvent, Certificate, KeyOwner, OcspResponse
from ca.work import Work
from cli.main import cli
from ocsp.presign import Presigner, rotate_signers
from tests.helpers import make_csr, make_key, openssl, pem, pkilint_findings, write
from web.app import create_app

ORG = "Acme Charging"
SECC_ID = "DE*ACM*E0001*1"
ISO20 = "15118-20"
YEAR = timedelta(days=365)
# pkilint reads domainComponent as a DNS name; ISO 15118 prescribes the bare DC=V2G and DC=CPO.
DC_FINDING = ("name_domain_components_invalid_domain_name",)
SHAPES = {"with-sub-ca-1": True, "without-sub-ca-1": False}


def _work(session: Session, token: Token, status: Presigner) -> Work:
    return Work(session=session, actor="test", status=status, token=token)


def _init(session: Session, token: Token, status: Presigner, sub_ca_1: bool = True, **kwargs) -> V2gHierarchy:
    request = V2gRequest(organization=ORG, country="DE", iso=ISO20, sub_ca_1=sub_ca_1, **kwargs)
    return init_v2g(_work(session, token, status), request=request)


def _issue(
    session: Session,
    token: Token,
    status: Presigner,
    secc_id: str = SECC_ID,
    key: object | None = None,
    iso: str = ISO20,
    **kwargs,
) -> Certificate:
    key = key or make_key("ec-p521" if iso == ISO20 else "ec-p256")
    return issue_secc(
        Work(session, "test", status=status, issuers=lambda ca: issuer_for(ca, token)),
        environment="production",
        csr=make_csr(secc_id, key=key),
        secc_id=secc_id,
        iso=iso,
        **kwargs,
    )


def _p521_sha512(certificate: x509.Certificate) -> None:
    key = certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp521r1"
    assert certificate.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA512


def _single(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    (value,) = name.get_attributes_for_oid(oid)
    return str(value.value)


def _path_length(certificate: x509.Certificate) -> int | None:
    constraints = certificate.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS)
    assert constraints.critical and constraints.value.ca
    return constraints.value.path_length


def _verify(tmp_path: Path, root_der: bytes, sub_cas: list[bytes], der: bytes, *purpose: str) -> None:
    """`openssl verify -x509_strict` with the V2G root as the only trust anchor."""
    root = write(tmp_path / "anchor.pem", pem(root_der))
    target = write(tmp_path / "target.pem", pem(der))
    untrusted = ["-untrusted", str(write(tmp_path / "subs.pem", b"".join(pem(d) for d in sub_cas)))] if sub_cas else []
    extra = ["-purpose", purpose[0]] if purpose else []
    result = openssl("verify", "-x509_strict", *extra, "-CAfile", str(root), *untrusted, str(target))
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


def _lint(tmp_path: Path, der: bytes, issuer_der: bytes | None, name: str) -> None:
    path = write(tmp_path / f"{name}.pem", pem(der))
    issuer = write(tmp_path / f"{name}-issuer.pem", pem(issuer_der)) if issuer_der is not None else None
    assert pkilint_findings(path, None, DC_FINDING) == "", name
    if issuer is not None:
        assert pkilint_findings(path, issuer, DC_FINDING) == "", f"{name} against its issuer"


# -- the hierarchy, both shapes -----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_the_15118_20_hierarchy_is_p521_with_sha512_in_both_shapes(
    session: Session, token: Token, status: Presigner, tmp_path: Path, shape: str
) -> None:
    hierarchy = _init(session, token, status, sub_ca_1=SHAPES[shape])
    assert hierarchy.iso == ISO20
    assert (hierarchy.sub_ca_1 is not None) == SHAPES[shape]
    assert hierarchy.root.role == "v2g20-root" and hierarchy.sub_ca_2.role == "v2g20-sub-ca-2"
    assert {hierarchy.root.key_type, hierarchy.sub_ca_2.key_type} == {"ec-p521"}
    assert hierarchy.sub_ca_2.name == "production-cpo20-sub-ca2-1"
    leaf_row = _issue(session, token, status)
    assert leaf_row.profile == "v2g20-secc"

    root = x509.load_der_x509_certificate(hierarchy.root.certificate_der)
    sub2 = x509.load_der_x509_certificate(hierarchy.sub_ca_2.certificate_der)
    leaf = x509.load_der_x509_certificate(leaf_row.der or b"")
    chain = [root]
    if hierarchy.sub_ca_1 is not None:
        sub1 = x509.load_der_x509_certificate(hierarchy.sub_ca_1.certificate_der)
        assert _path_length(sub1) == 1 and sub1.issuer == root.subject
        assert _single(sub1.subject, NameOID.COMMON_NAME) == "Acme Charging Production 15118-20 CPO Sub-CA 1"
        chain.append(sub1)
    assert _path_length(root) is None and _path_length(sub2) == 0
    assert sub2.issuer == chain[-1].subject  # under Sub-CA 1, or directly under the root
    chain += [sub2, leaf]
    for certificate in chain:
        _p521_sha512(certificate)
        assert certificate.version == x509.Version.v3
        der = certificate.public_bytes(serialization.Encoding.DER)
        assert len(der) <= 1600, f"{len(der)} bytes: over the 1600-byte certificateType of the ISO 15118-20 schema"
        with pytest.raises(x509.ExtensionNotFound):
            certificate.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS)
    for ca in chain[:-1]:
        assert _single(ca.subject, NameOID.DOMAIN_COMPONENT) == "V2G"
    assert _single(root.subject, NameOID.COMMON_NAME) == "Acme Charging Production 15118-20 V2G Root CA"
    # The SECC leaf: the -2 profile's extensions on P-521.
    assert _single(leaf.subject, NameOID.COMMON_NAME) == SECC_ID
    assert _single(leaf.subject, NameOID.DOMAIN_COMPONENT) == "CPO"
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_agreement
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=60)

    # Every new artefact, the delegated OCSP signers included, against the V2G root alone.
    ders = [c.public_bytes(serialization.Encoding.DER) for c in chain]
    sub_cas = ders[1:-1]
    for index, der in enumerate(ders[1:], start=1):
        _verify(tmp_path, ders[0], sub_cas, der, *(("sslserver",) if index == len(ders) - 1 else ()))
        _lint(tmp_path, der, ders[index - 1], f"chain-{index}")
    _verify(tmp_path, ders[0], [], ders[0])
    _lint(tmp_path, ders[0], None, "root")
    cas = {hierarchy.root.id: ders[0], hierarchy.sub_ca_2.id: ders[-2]}
    if hierarchy.sub_ca_1 is not None:
        cas[hierarchy.sub_ca_1.id] = ders[1]
    assert {signer.authority_id for signer in hierarchy.ocsp_signers} == set(cas)
    for signer in hierarchy.ocsp_signers:
        certificate = x509.load_der_x509_certificate(signer.der or b"")
        _p521_sha512(certificate)  # the CA's own key type, as for every CA's signer
        assert signer.not_after - signer.not_before == timedelta(days=42)
        _verify(tmp_path, ders[0], sub_cas, signer.der or b"", "ocsphelper")
        _lint(tmp_path, signer.der or b"", cas[signer.authority_id], f"signer-{signer.serial}")

    # The pre-signed responses: signed with ECDSA-SHA512 by P-521 signers, 14 days, about every non-root.
    answered = {leaf_row.serial, hierarchy.sub_ca_2.serial}
    if hierarchy.sub_ca_1 is not None:
        answered.add(hierarchy.sub_ca_1.serial)
    rows = session.scalars(select(OcspResponse).where(OcspResponse.serial.in_(answered))).all()
    session.commit()
    assert {row.serial for row in rows} == answered
    for row in rows:
        response = ocsp.load_der_ocsp_response(row.der)
        assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert response.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA512
        assert row.next_update - row.this_update == timedelta(days=14)
        (signer,) = response.certificates
        signer.public_key().verify(response.signature, response.tbs_response_bytes, ec.ECDSA(hashes.SHA512()))
    # Rotated signers are P-521 again and keep three response lifetimes.
    rotated = rotate_signers(
        session, status, actor="test", now=datetime.now(UTC), validity=timedelta(days=30), force=True
    )
    assert {authority.id for authority, _ in rotated} == set(cas)
    for _, row in rotated:
        _p521_sha512(x509.load_der_x509_certificate(row.der or b""))
        assert row.not_after - row.not_before == timedelta(days=42)


def test_the_15118_2_and_15118_20_hierarchies_are_distinct_cas_in_one_environment(
    session: Session, token: Token, status: Presigner
) -> None:
    two = init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG, country="DE"))
    twenty = _init(session, token, status, sub_ca_1=False)
    assert two.sub_ca_2.id != twenty.sub_ca_2.id and two.root.subject != twenty.root.subject
    assert (two.root.key_type, twenty.root.key_type) == ("ec-p256", "ec-p521")
    with pytest.raises(ConflictError, match="already has an ISO 15118-20 V2G hierarchy"):
        _init(session, token, status)
    with pytest.raises(ConflictError, match="already has a V2G hierarchy"):
        init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG))
    with pytest.raises(InputError, match="ISO 15118-2 requires a CPO Sub-CA 1"):
        init_v2g(
            _work(session, token, status),
            request=V2gRequest(organization=ORG, environment="staging", sub_ca_1=False),
        )
    with pytest.raises(InputError, match="unknown ISO 15118 version '15118-3'"):
        init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG, iso="15118-3"))
    # Each leaf profile comes only from its own version's Sub-CA 2.
    for issuer, profile, key in (
        (two.sub_ca_2, "v2g20-secc", make_key("ec-p521")),
        (twenty.sub_ca_2, "v2g-secc", make_key("ec-p256")),
        (twenty.root, "v2g20-secc", make_key("ec-p521")),
    ):
        request = IssueRequest(get_profile(profile), key.public_key(), SECC_ID)
        with pytest.raises(PolicyError, match=f"profile {profile} is issued by a"):
            issue(Work(session, "test", status=status), issuer=issuer_for(issuer, token), request=request)


# -- P-521 only where a profile says so ------------------------------------------------------------------
def _refusals(session: Session) -> list[AuditEvent]:
    events = session.scalars(select(AuditEvent).where(AuditEvent.action == "v2g.refused")).all()
    session.commit()
    return list(events)


def _certificates(session: Session) -> int:
    count = session.scalar(select(func.count()).select_from(Certificate)) or 0
    session.commit()
    return count


@pytest.mark.parametrize(
    ("iso", "key_type", "allowed"), [(ISO20, "ec-p256", "ec-p521"), ("15118-2", "ec-p521", "ec-p256")]
)
def test_each_version_refuses_the_other_curve_audited_and_nothing_issued(
    session: Session, token: Token, status: Presigner, iso: str, key_type: str, allowed: str
) -> None:
    init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG, country="DE"))
    _init(session, token, status)
    before = _certificates(session)
    profile = "v2g20-secc" if iso == ISO20 else "v2g-secc"
    with pytest.raises(PolicyError, match=f"key type {key_type} is not allowed for profile {profile}") as raised:
        _issue(session, token, status, key=make_key(key_type), iso=iso)
    assert raised.value.code == "key_not_allowed" and f"(allowed: {allowed})" in str(raised.value)
    (refusal,) = _refusals(session)
    assert json.loads(refusal.details)["code"] == "key_not_allowed" and refusal.subject == SECC_ID
    assert _certificates(session) == before, "no certificate, not even a pending reservation"


def test_p521_stays_refused_for_every_other_profile(
    session: Session, token: Token, status: Presigner, hierarchy: Hierarchy
) -> None:
    """Only the ISO 15118-20 profiles name ec-p521; OCSP signers take their CA's key type."""
    assert "ec-p521" not in ALL_KEY_TYPES
    p521 = {name for name, profile in PROFILES.items() if "ec-p521" in profile.key_types}
    assert p521 == {"v2g20-root", "v2g20-sub-ca-1", "v2g20-sub-ca-2", "v2g20-secc"}
    issuer = issuer_for(hierarchy.issuing, token)
    requests = {
        "charger": "CP-0001",
        "csms-server": "csms.example.com",
        "csms-client": "Acme CSMS",
        "ra": "Factory 1",
        "ocsp-signer": "Acme OCSP",
    }
    before = _certificates(session)
    for profile, name in requests.items():
        request = IssueRequest(get_profile(profile), make_key("ec-p521").public_key(), name)
        with pytest.raises(PolicyError, match=f"key type ec-p521 is not allowed for profile {profile}") as raised:
            issue(Work(session, "test", status=status), issuer=issuer, request=request)
        assert raised.value.code == "key_not_allowed"
    assert _certificates(session) == before
    # An OCSP signer may have its CA's key type: P-521 under a -20 CA, not under a P-256 or P-384 one.
    assert get_profile("ocsp-signer").allowed_key_types("ec-p521")[-1] == "ec-p521"
    assert "ec-p521" not in get_profile("ocsp-signer").allowed_key_types("ec-p256")
    assert "ec-p521" not in get_profile("charger").allowed_key_types("ec-p521")


# -- one station, one leaf per version, never one key for both -----------------------------------------
def test_a_station_holds_a_15118_2_and_a_15118_20_leaf_with_keys_of_their_own(
    session: Session, token: Token, status: Presigner
) -> None:
    two = init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG, country="DE"))
    _init(session, token, status, sub_ca_1=False)
    add_device(Work(session, "test"), serial="CP-A")
    add_device(Work(session, "test"), serial="CP-B")
    leaf_2 = _issue(session, token, status, iso="15118-2", device_serial="CP-A")
    leaf_20 = _issue(session, token, status, device_serial="CP-A")
    assert (leaf_2.profile, leaf_20.profile) == ("v2g-secc", "v2g20-secc")
    # A renewal supersedes the leaf of its own version only.
    key_20 = make_key("ec-p521")
    renewed_20 = _issue(session, token, status, key=key_20, device_serial="CP-A")
    session.refresh(leaf_2)
    session.refresh(leaf_20)
    assert leaf_20.status == "revoked" and leaf_20.revocation_reason == "superseded"
    assert leaf_2.status == "valid" and renewed_20.status == "valid"
    renewed_2 = _issue(session, token, status, iso="15118-2", device_serial="CP-A")
    session.refresh(renewed_20)
    assert renewed_20.status == "valid" and renewed_2.status == "valid"
    session.commit()
    # Another station cannot take the SECC ID, through either version.
    for iso in (ISO20, "15118-2"):
        with pytest.raises(ConflictError, match="certified for another charging station"):
            _issue(session, token, status, iso=iso, device_serial="CP-B")

    # One key, one identity: the SECC ID per version. The curves already keep the versions' keys apart;
    # the identity rule holds on its own too (a -2 profile widened to P-521 for this test only).
    assert key_identity("v2g-secc", SECC_ID, None) != key_identity("v2g20-secc", SECC_ID, None)
    shared = make_key("ec-p521")
    widened = replace(get_profile("v2g-secc"), key_types=("ec-p256", "ec-p521"))
    issue(
        Work(session, "test", status=status),
        issuer=issuer_for(two.sub_ca_2, token),
        request=IssueRequest(widened, shared.public_key(), "DE*ACM*E0009*1"),
    )
    before = _certificates(session)
    with pytest.raises(ConflictError, match="already certified for another identity") as raised:
        _issue(session, token, status, "DE*ACM*E0009*1", key=shared)
    assert raised.value.code == "key_reuse"
    assert _certificates(session) == before
    owner = session.scalar(select(KeyOwner.identity).where(KeyOwner.identity == "secc:DE*ACM*E0009*1"))
    session.commit()
    assert owner == "secc:DE*ACM*E0009*1"
    # …and the other way round: a -20 leaf's key is refused for another SECC ID (and for -2 by its curve).
    with pytest.raises(ConflictError, match="already certified for another identity"):
        _issue(session, token, status, "DE*ACM*E0010*1", key=key_20)


def test_secc_refusals_of_the_15118_20_route(session: Session, token: Token, status: Presigner) -> None:
    with pytest.raises(NotFoundError, match="no active ISO 15118-20 CPO Sub-CA 2 in environment 'production'"):
        _issue(session, token, status)
    _init(session, token, status)
    with pytest.raises(InputError, match="unknown ISO 15118 version"):
        _issue(session, token, status, iso="20")
    with pytest.raises(InputError, match="unknown ISO 15118 version"):
        secc_policies("2")
    cases = [
        ({"secc_id": "not an id"}, "is not an SECC ID"),
        ({"secc_id": "DE*ACM*E0004*1", "key": make_key("ec-p384")}, "key type ec-p384 is not allowed"),
        ({"secc_id": "DE*ACM*E0005*1", "validity": timedelta(days=91)}, "exceeds the maximum of 90"),
        ({"secc_id": "DE*ACM*E0006*1", "device_serial": "CP-NOPE"}, "not registered"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PolicyError, match=message):
            _issue(session, token, status, **kwargs)
    assert len(_refusals(session)) == len(cases)


# -- an external V2G root -----------------------------------------------------------------------------
class ExternalRoot:
    """An ISO 15118-20 V2G PKI operator's root (P-521, ECDSA-SHA512), played in software."""

    def __init__(self, curve: ec.EllipticCurve | None = None, algorithm: hashes.HashAlgorithm | None = None) -> None:
        self.key = ec.generate_private_key(curve or ec.SECP521R1())
        self.algorithm = algorithm or hashes.SHA512()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "V2G PKI Operator"),
                x509.NameAttribute(NameOID.COMMON_NAME, "External 15118-20 V2G Root CA"),
                x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "V2G"),
            ]
        )
        now = datetime.now(UTC)
        self.certificate = (
            self._ca(x509.CertificateBuilder(), None, self.key.public_key())
            .subject_name(name)
            .issuer_name(name)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + 30 * YEAR)
            .sign(self.key, self.algorithm)
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

    def sign(self, csr_pem: bytes, path_length: int | None = None, days: int = 365) -> bytes:
        """The CA certificate for the CSR, with the pathLen the CSR asked for unless told otherwise."""
        csr = x509.load_pem_x509_csr(csr_pem)
        if path_length is None:
            path_length = csr.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
        now = datetime.now(UTC)
        certificate = (
            self._ca(x509.CertificateBuilder(), path_length, csr.public_key())
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .subject_name(csr.subject)
            .issuer_name(self.certificate.subject)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now - timedelta(minutes=5) + timedelta(days=days))
            .sign(self.key, self.algorithm)
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("shape", SHAPES)
def test_an_external_15118_20_root_signs_the_top_cpo_ca_in_both_shapes(
    session: Session, token: Token, status: Presigner, tmp_path: Path, shape: str
) -> None:
    sub_ca_1 = SHAPES[shape]
    request = V2gRequest(organization=ORG, country="DE", iso=ISO20, sub_ca_1=sub_ca_1)
    csr_pem = request_sub_ca_1(_work(session, token, status), request=request)
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid and csr.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA512
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey) and csr.public_key().curve.name == "secp521r1"
    asked = csr.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    assert asked == (1 if sub_ca_1 else 0)
    title = "CPO Sub-CA 1" if sub_ca_1 else "CPO Sub-CA 2"
    assert _single(csr.subject, NameOID.COMMON_NAME) == f"Acme Charging Production 15118-20 {title}"
    external = ExternalRoot()
    what = "Sub-CA 1" if sub_ca_1 else "Sub-CA 2"
    refusals = [
        (
            ExternalRoot(ec.SECP256R1(), hashes.SHA256()),
            None,
            "breaks the ISO 15118-20 profile: the key is not secp521r1",
        ),
        (ExternalRoot(ec.SECP521R1(), hashes.SHA256()), None, "the signature is not ecdsa-with-SHA512"),
        (external, 5, f"the {what} certificate breaks the ISO 15118-20 profile: pathLenConstraint is 5"),
    ]
    for root, path_length, message in refusals:
        with pytest.raises(PolicyError, match=message):
            import_sub_ca_1(
                _work(session, token, status),
                request=request,
                certificate_data=root.sign(csr_pem, path_length) + root.pem(),
            )
    # The -2 import of a -20 key is refused, pointing at the right version.
    with pytest.raises(PolicyError, match=r"another ISO 15118 version \(--iso 15118-20\)"):
        import_sub_ca_1(
            _work(session, token, status),
            request=V2gRequest(organization=ORG),
            certificate_data=external.sign(csr_pem) + external.pem(),
        )
    hierarchy = import_sub_ca_1(
        _work(session, token, status),
        request=replace(request, sub_ca_1=True),  # the CSR's record decides the shape, not the request
        certificate_data=external.sign(csr_pem),
        root_data=external.pem(),
    )
    assert hierarchy.root.status == "external" and hierarchy.root.key_type == "ec-p521"
    assert (hierarchy.sub_ca_1 is not None) == sub_ca_1
    assert hierarchy.sub_ca_2.parent_id == (hierarchy.sub_ca_1.id if hierarchy.sub_ca_1 else hierarchy.root.id)
    held = [a for a in (hierarchy.sub_ca_1, hierarchy.sub_ca_2) if a is not None]
    assert {signer.authority_id for signer in hierarchy.ocsp_signers} == {a.id for a in held}
    leaf = _issue(session, token, status)
    sub_cas = [hierarchy.sub_ca_2.certificate_der] + ([hierarchy.sub_ca_1.certificate_der] if sub_ca_1 else [])
    root_der = external.certificate.public_bytes(serialization.Encoding.DER)
    for der in (leaf.der or b"", *sub_cas, *(signer.der or b"" for signer in hierarchy.ocsp_signers)):
        _verify(tmp_path, root_der, sub_cas, der)
    for der in (leaf.der or b"", hierarchy.sub_ca_2.certificate_der):
        _p521_sha512(x509.load_der_x509_certificate(der))
    if sub_ca_1:
        _lint(tmp_path, hierarchy.sub_ca_2.certificate_der, sub_cas[1], "sub2")
    _lint(tmp_path, leaf.der or b"", hierarchy.sub_ca_2.certificate_der, "leaf")


# -- EST under the v2g20 label ------------------------------------------------------------------------
@pytest.fixture
def est_client(
    tmp_path: Path, migrated_db_url: str, token: Token, status: Presigner, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator:
    home = tmp_path / "home"
    settings = EstSettings(client_cert_header="X-SSL-Client-Cert", trusted_proxies=("127.0.0.1",))
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0], est=settings))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        ocpp = init_hierarchy(_work(session, token, status), request=HierarchyRequest(organization=ORG))
        init_v2g(_work(session, token, status), request=V2gRequest(organization=ORG, country="DE"))
        twenty = _init(session, token, status, sub_ca_1=False)
        ra = issue(
            Work(session, "test", status=status),
            issuer=issuer_for(ocpp.issuing, token),
            request=IssueRequest(get_profile("ra"), make_key().public_key(), "ra"),
        )
        credentials = quote(pem(ra.der or b"").decode())
        name = twenty.sub_ca_2.name
    yield create_app(pki, settings).test_client(), credentials, name
    pki.close()


def test_est_issues_15118_20_leaves_under_the_v2g20_label(est_client) -> None:  # type: ignore[no-untyped-def]
    client, credentials, sub2_name = est_client

    def enroll(label: str, csr: bytes, certificate: str | None = credentials):  # type: ignore[no-untyped-def]
        der = x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER)
        headers = {"Content-Type": "application/pkcs10"}
        if certificate:
            headers["X-SSL-Client-Cert"] = certificate
        return client.post(f"/.well-known/est/{label}/simpleenroll", data=base64.encodebytes(der), headers=headers)

    chain = pkcs7.load_der_pkcs7_certificates(base64.b64decode(client.get("/.well-known/est/v2g20/cacerts").get_data()))
    assert {_single(c.subject, NameOID.COMMON_NAME) for c in chain} == {
        "Acme Charging Production 15118-20 CPO Sub-CA 2",
        "Acme Charging Production 15118-20 V2G Root CA",
    }
    # csrattrs asks for secp521r1 and ecdsa-with-SHA512 (RFC 9908 form).
    attributes = base64.b64decode(client.get("/.well-known/est/v2g20/csrattrs").get_data())
    assert bytes.fromhex("06052b81040023") in attributes  # OID 1.3.132.0.35, secp521r1
    assert bytes.fromhex("06082a8648ce3d040304") in attributes  # OID 1.2.840.10045.4.3.4, ecdsa-with-SHA512
    for label in ("v2g20", sub2_name):
        response = enroll(label, make_csr(SECC_ID, key=make_key("ec-p521")))
        assert response.status_code == 200, response.get_data(as_text=True)
        (leaf,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(response.get_data()))
        _p521_sha512(leaf)
        assert _single(leaf.subject, NameOID.COMMON_NAME) == SECC_ID
    # The -2 label still issues P-256 leaves and refuses P-521; the -20 one refuses P-256.
    two = enroll("v2g", make_csr("DE*ACM*E0002*1"))
    assert two.status_code == 200
    refused = enroll("v2g", make_csr("DE*ACM*E0003*1", key=make_key("ec-p521")))
    assert refused.status_code == 403 and "ec-p521 is not allowed for profile v2g-secc" in refused.get_data(
        as_text=True
    )
    refused = enroll("v2g20", make_csr("DE*ACM*E0003*1"))
    assert refused.status_code == 403 and "ec-p256 is not allowed for profile v2g20-secc" in refused.get_data(
        as_text=True
    )


# -- the CLI: an external -20 root in two steps, without Sub-CA 1 ---------------------------------------
def _cli(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


def _ok(home: Path, *args: str) -> Result:
    result = _cli(home, *args)
    assert result.exit_code == 0, result.output
    return result


def test_cli_external_15118_20_root_without_sub_ca_1(home: Path, tmp_path: Path) -> None:
    csr_path = tmp_path / "sub-ca-2.csr"
    refused = _cli(home, "v2g", "init", "--org", ORG, "--without-sub-ca-1", "--external-root-csr", str(csr_path))
    assert refused.exit_code != 0 and "--without-sub-ca-1 is for ISO 15118-20" in refused.stderr
    step_one = _ok(
        home, "v2g", "init", "--iso", ISO20, "--without-sub-ca-1", "--org", ORG, "--country", "DE",
        "--external-root-csr", str(csr_path),
    ).output  # fmt: skip
    assert "CPO Sub-CA 2 key generated in the token" in step_one
    assert "next: chargepki v2g init --iso 15118-20 --environment production --import-subca1 CERT" in step_one
    external = ExternalRoot()
    certificate = write(tmp_path / "sub-ca-2.pem", external.sign(csr_path.read_bytes()) + external.pem())
    refused = _cli(home, "v2g", "init", "--import-subca1", str(certificate))  # forgot --iso: the -2 hierarchy
    assert refused.exit_code != 0 and "another ISO 15118 version (--iso 15118-20)" in refused.stderr
    output = _ok(home, "v2g", "init", "--iso", ISO20, "--import-subca1", str(certificate)).output
    assert "V2G hierarchy (ISO 15118-20)" in output and "external: its key is not here" in output
    assert "CPO Sub-CA 1  none" in output
    chain = x509.load_pem_x509_certificates(
        _ok(home, "ca", "chain", "--ca", "production-cpo20-sub-ca2-1").stdout.encode()
    )
    assert [_single(c.subject, NameOID.COMMON_NAME) for c in chain] == [
        "Acme Charging Production 15118-20 CPO Sub-CA 2",
        "External 15118-20 V2G Root CA",
    ]
    key = make_key("ec-p521")
    csr = write(tmp_path / "secc.csr", make_csr(SECC_ID, key=key))
    out = tmp_path / "secc.pem"
    _ok(home, "v2g", "issue", "--iso", ISO20, "--csr", str(csr), "--secc-id", SECC_ID, "--out", str(out))
    leaf, sub2 = x509.load_pem_x509_certificates(out.read_bytes())  # the root is the EV's: not sent
    _p521_sha512(leaf)
    root_der = external.certificate.public_bytes(serialization.Encoding.DER)
    _verify(
        tmp_path,
        root_der,
        [sub2.public_bytes(serialization.Encoding.DER)],
        leaf.public_bytes(serialization.Encoding.DER),
        "sslserver",
    )
    # The generic `issue` finds the -20 Sub-CA 2 for the -20 leaf profile.
    other = write(tmp_path / "other.csr", make_csr("DE*ACM*E0002*1", key=make_key("ec-p521")))
    issued = _ok(home, "issue", "--profile", "v2g20-secc", "--csr", str(other))
    assert "[production] CA production-cpo20-sub-ca2-1" in issued.stderr
    _ok(home, "crl", "publish")  # the external root is left out; Sub-CA 2's CRL is signed with SHA-512
    crl = x509.load_der_x509_crl((home / "pki" / "production-cpo20-sub-ca2-1.crl").read_bytes())
    assert crl.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA512
    assert crl.is_signature_valid(sub2.public_key())  # type: ignore[arg-type]
