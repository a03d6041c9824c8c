"""The ISO 15118 Plug & Charge (V2G) hierarchy of one environment:
V2G root → CPO Sub-CA 1 (pathLen 1) → CPO Sub-CA 2 (pathLen 0) → SECC leaves (``ca/secc.py``).

Either chargepki holds every key (``init_v2g``), or the V2G root belongs to someone else (a
V2G PKI operator): then ``request_sub_ca_1`` generates the Sub-CA 1 key in the token and writes
a CSR, and ``import_sub_ca_1`` takes the certificate that root returned, checks it against the
ISO 15118-2 profile, stores the external root (status ``external``: no key here, nobody here
answers for it) and creates Sub-CA 2 under it. Every CA chargepki holds gets its own delegated
OCSP signer, whose responses live 14 days (``profiles.ocsp_validity``) so that chargers can
staple them to the EV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.factory import CaPlan, Created, Plan, create, key_transaction
from ca.authorities.issuers import any_ca, environments, newest_active, only_environment, public_key_sha256
from ca.clock import Clock, utcnow
from ca.config import DEFAULT_OCSP_URL, DEFAULT_REPOSITORY_URL
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.issuance.profiles import PROFILES, Profile
from ca.keys.keyspec import key_spec
from ca.keys.token_keys import token_private_key
from ca.store.models import AuditEvent, Authority, Certificate
from ca.work import Work

V2G_ROLES = ("v2g-root", "v2g-sub-ca-1", "v2g-sub-ca-2")
CSR_ACTION = "v2g.sub_ca_1.requested"  # the audit entry that remembers which token key a CSR was for
MAX_PEM = 64 * 1024


@dataclass(frozen=True)
class V2gRequest:
    organization: str  # the CPO
    environment: str = "production"
    country: str | None = None
    ocsp_url: str = DEFAULT_OCSP_URL
    repository_url: str = DEFAULT_REPOSITORY_URL
    root_validity: timedelta | None = None
    sub_ca_1_validity: timedelta | None = None
    sub_ca_2_validity: timedelta | None = None


@dataclass(frozen=True)
class V2gHierarchy:
    root: Authority  # status "external" when imported
    sub_ca_1: Authority
    sub_ca_2: Authority
    ocsp_signers: list[Certificate]  # one per CA whose key chargepki holds


def _names(environment: str) -> dict[str, str]:
    return {
        "v2g-root": f"{environment}-v2g-root-1",
        "v2g-sub-ca-1": f"{environment}-cpo-sub-ca1-1",
        "v2g-sub-ca-2": f"{environment}-cpo-sub-ca2-1",
    }


def _subject(organization: str, environment: str, role: str, country: str | None) -> x509.Name:
    title = {"v2g-root": "V2G Root CA", "v2g-sub-ca-1": "CPO Sub-CA 1", "v2g-sub-ca-2": "CPO Sub-CA 2"}[role]
    return subject_name(ca_common_name(organization, environment, title), organization, country, "V2G")


def _checked(request: V2gRequest) -> tuple[str, str, str | None]:
    return (
        check_environment(request.environment),
        check_organization(request.organization),
        check_country(request.country),
    )


def _refuse_existing(session: Session, environment: str) -> None:
    existing = any_ca(session, environment, V2G_ROLES)
    if existing is not None:
        raise ConflictError(f"environment {environment!r} already has a V2G hierarchy (CA {existing})")


def init_v2g(work: Work, *, request: V2gRequest) -> V2gHierarchy:
    """V2G root, CPO Sub-CA 1 and CPO Sub-CA 2 with keys in the token, and an OCSP signer for each."""
    environment, organization, country = _checked(request)
    _refuse_existing(work.session, environment)
    names = _names(environment)
    cas = (
        CaPlan("v2g-root", names["v2g-root"], _subject(organization, environment, "v2g-root", country),
               validity=request.root_validity),
        CaPlan("v2g-sub-ca-1", names["v2g-sub-ca-1"], _subject(organization, environment, "v2g-sub-ca-1", country),
               parent="v2g-root", validity=request.sub_ca_1_validity),
        CaPlan("v2g-sub-ca-2", names["v2g-sub-ca-2"], _subject(organization, environment, "v2g-sub-ca-2", country),
               parent="v2g-sub-ca-1", validity=request.sub_ca_2_validity),
    )  # fmt: skip
    plan = _plan(request, environment, organization, country, cas, "v2g.hierarchy.created")
    return _hierarchy(create(work, plan=plan))


def _plan(
    request: V2gRequest,
    environment: str,
    organization: str,
    country: str | None,
    cas: tuple[CaPlan, ...],
    action: str,
) -> Plan:
    def details(created: Created) -> dict[str, object]:
        return {
            authority.role: {"name": authority.name, "serial": authority.serial, "status": authority.status}
            for authority in created.authorities.values()
        }

    return Plan(
        environment=environment,
        organization=organization,
        country=country,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        cas=cas,
        action=action,
        audit_subject=environment,
        details=details,
        conflict=f"the V2G hierarchy of {environment!r} was created concurrently",
    )


def _hierarchy(created: Created) -> V2gHierarchy:
    """The result; one OCSP signer per CA whose key is here, Sub-CA 2's first."""
    return V2gHierarchy(
        created["v2g-root"], created["v2g-sub-ca-1"], created["v2g-sub-ca-2"], list(created.ocsp_signers.values())
    )


# -- an external V2G root: CSR out, certificate in -------------------------------------------------
def request_sub_ca_1(work: Work, *, request: V2gRequest) -> bytes:
    """Generate the CPO Sub-CA 1 key in the token and return a PEM CSR for the external V2G root.

    The audit entry written here records the key's label and fingerprint; ``import_sub_ca_1``
    finds the key again from the certificate's public key.
    """
    environment, organization, country = _checked(request)
    _refuse_existing(work.session, environment)
    conflict = f"the V2G hierarchy of {environment!r} was created concurrently"
    with key_transaction(work, conflict) as keys, work.transaction() as session:
        label, public_key = keys.generate(key_spec("ec-p256"), _names(environment)["v2g-sub-ca-1"])
        key = token_private_key(keys.token, label, public_key)  # type: ignore[arg-type]
        profile = PROFILES["v2g-sub-ca-1"]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_subject(organization, environment, "v2g-sub-ca-1", country))
            # What we ask the root to certify (it decides; import checks what it decided).
            .add_extension(x509.BasicConstraints(ca=True, path_length=profile.path_length), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(key, hashes.SHA256())
        )
        audit.record(
            session,
            CSR_ACTION,
            actor=work.actor,
            subject=environment,
            now=work.now,
            details={
                "key_label": label,
                "public_key_sha256": public_key_sha256(public_key),  # type: ignore[arg-type]
                "organization": organization,
                "country": country,
                "subject": csr.subject.rfc4514_string(),
            },
        )
    return csr.public_bytes(serialization.Encoding.PEM)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def load_certificates(data: bytes, what: str) -> list[x509.Certificate]:
    """PEM certificates (one or a bundle), or one DER certificate; an ``InputError`` otherwise."""
    if not data.strip():
        raise InputError(f"{what} is empty")
    if len(data) > MAX_PEM:
        raise InputError(f"{what} is larger than {MAX_PEM} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise InputError(
            f"{what} holds no readable certificate: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None


def iso15118_problems(certificate: x509.Certificate, profile: Profile, now: Clock = utcnow) -> list[str]:
    """What in a V2G CA certificate breaks the ISO 15118-2 profile (empty: nothing)."""
    problems = []
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        problems.append("the key is not secp256r1")
    if certificate.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA256:
        problems.append("the signature is not ecdsa-with-SHA256")
    if certificate.version != x509.Version.v3:
        problems.append("not an X.509 v3 certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        if not constraints.critical or not constraints.value.ca:
            problems.append("basicConstraints is not critical CA:TRUE")
        elif constraints.value.path_length != profile.path_length:
            problems.append(f"pathLenConstraint is {constraints.value.path_length}, not {profile.path_length}")
    except x509.ExtensionNotFound:
        problems.append("basicConstraints is missing")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        if not usage.critical or not (usage.value.key_cert_sign and usage.value.crl_sign):
            problems.append("keyUsage is not critical keyCertSign, cRLSign")
    except x509.ExtensionNotFound:
        problems.append("keyUsage is missing")
    try:
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        problems.append("subjectKeyIdentifier is missing")
    if certificate.not_valid_after_utc - certificate.not_valid_before_utc > profile.max_validity:
        problems.append(f"valid for longer than {profile.max_validity.days} days")
    moment = now()
    if not certificate.not_valid_before_utc <= moment < certificate.not_valid_after_utc:
        problems.append("not valid now")
    if not certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        problems.append("the subject has no CN")
    return problems


def _requested_key(session: Session, environment: str, certificate: x509.Certificate) -> dict[str, object]:
    """What the Sub-CA 1 CSR step recorded for the certificate's public key (token label, CPO names)."""
    fingerprint = public_key_sha256(certificate.public_key())
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == CSR_ACTION, AuditEvent.subject == environment)
        .order_by(AuditEvent.seq.desc())
    )
    for event in events:
        details = audit_details(event)
        if details.get("public_key_sha256") == fingerprint:
            return details
    raise PolicyError(
        f"this certificate is not for a key requested with `chargepki v2g init --external-root-csr` "
        f"in environment {environment}"
    )


def audit_details(event: AuditEvent) -> dict[str, object]:
    value = json.loads(event.details)
    return value if isinstance(value, dict) else {}


def import_sub_ca_1(
    work: Work, *, request: V2gRequest, certificate_data: bytes, root_data: bytes | None = None
) -> V2gHierarchy:
    """Install the external root's Sub-CA 1 certificate (followed by the V2G root in the same file,
    or the root in ``root_data``), check both, and create CPO Sub-CA 2 and the OCSP signers.

    The CPO's organisation and country are the ones the CSR was made with (``request``'s are ignored).
    """
    environment = check_environment(request.environment)
    _refuse_existing(work.session, environment)
    certificates = load_certificates(certificate_data, "the Sub-CA 1 certificate file")
    if root_data is not None:
        certificates += load_certificates(root_data, "the V2G root file")
    if len(certificates) != 2:
        raise InputError(
            f"expected the Sub-CA 1 certificate and the V2G root certificate, found {len(certificates)} certificate(s)"
        )
    sub_1_certificate, root_certificate = certificates
    _check_external_chain(sub_1_certificate, root_certificate, work.now)
    requested = _requested_key(work.session, environment, sub_1_certificate)
    organization = str(requested["organization"])
    country = str(requested["country"]) if requested.get("country") else None
    names = _names(environment)
    cas = (
        CaPlan("v2g-root", names["v2g-root"], root_certificate.subject, certificate=root_certificate),  # external
        CaPlan("v2g-sub-ca-1", names["v2g-sub-ca-1"], sub_1_certificate.subject, parent="v2g-root",
               certificate=sub_1_certificate, key_label=str(requested["key_label"])),
        CaPlan("v2g-sub-ca-2", names["v2g-sub-ca-2"], _subject(organization, environment, "v2g-sub-ca-2", country),
               parent="v2g-sub-ca-1", validity=request.sub_ca_2_validity),
    )  # fmt: skip
    plan = _plan(request, environment, organization, country, cas, "v2g.hierarchy.imported")
    return _hierarchy(create(work, plan=plan))


def _check_external_chain(sub_1: x509.Certificate, root: x509.Certificate, now: Clock) -> None:
    if root.issuer != root.subject:
        raise PolicyError("the V2G root certificate is not self-signed")
    try:
        root.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise PolicyError("the V2G root certificate's self-signature does not verify") from None
    try:
        sub_1.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise PolicyError("the Sub-CA 1 certificate is not signed by this V2G root") from None
    for certificate, profile, what in (
        (root, PROFILES["v2g-root"], "V2G root"),
        (sub_1, PROFILES["v2g-sub-ca-1"], "Sub-CA 1"),
    ):
        problems = iso15118_problems(certificate, profile, now)
        if problems:
            raise PolicyError(f"the {what} certificate breaks the ISO 15118-2 profile: {'; '.join(problems)}")


# -- finding the CAs ---------------------------------------------------------------------------
def v2g_environments(session: Session) -> list[str]:
    return environments(session, V2G_ROLES)


def current_sub_ca_2(session: Session, environment: str | None) -> Authority:
    """The newest active CPO Sub-CA 2 of ``environment`` (or of the only environment with V2G CAs)."""
    if environment is None:
        environment = only_environment(
            session,
            V2G_ROLES,
            missing="no V2G hierarchy yet: run `chargepki v2g init --org NAME` first",
            several="several environments have V2G CAs ({known}): choose one with --environment",
        )
    authority = newest_active(session, "v2g-sub-ca-2", check_environment(environment))
    if authority is None:
        raise NotFoundError(
            f"no active CPO Sub-CA 2 in environment {environment!r}: run `chargepki v2g init --environment "
            f"{environment}` first"
        )
    return authority
