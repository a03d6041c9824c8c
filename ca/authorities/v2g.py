"""The ISO 15118 Plug & Charge (V2G) hierarchies of one environment:
V2G root → CPO Sub-CA 1 (pathLen 1) → CPO Sub-CA 2 (pathLen 0) → SECC leaves (``ca/enrollment/secc.py``).

Two of them can stand side by side, one per ISO 15118 version (``profiles.V2G_VERSIONS``, chosen
by ``V2gRequest.iso``): ISO 15118-2 (roles ``v2g-*``, secp256r1 with ECDSA-SHA256) and ISO 15118-20
(roles ``v2g20-*``, secp521r1 with ECDSA-SHA512), distinct sets of CAs since their curves differ.
ISO 15118-20 allows the Sub-CA 1 to be left out (``V2gRequest.sub_ca_1=False``): root → Sub-CA 2.

Either chargepki holds every key (``init_v2g``), or the V2G root belongs to someone else (a
V2G PKI operator): then ``request_sub_ca_1`` generates the key of the CPO CA directly under that
root (Sub-CA 1; Sub-CA 2 when there is no Sub-CA 1) in the token and writes a CSR, and
``import_sub_ca_1`` takes the certificate that root returned, checks it against the version's
profile, stores the external root (status ``external``: no key here, nobody here answers for it)
and creates Sub-CA 2 under it when it is not the imported CA itself. Every CA chargepki holds gets
its own delegated OCSP signer, whose responses live 14 days (``profiles.ocsp_validity``) so that
chargers can staple them to the EV.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.factory import CaPlan, Created, Plan, create, key_transaction
from ca.authorities.issuers import any_ca, chain, environments, newest_active, only_environment, public_key_sha256
from ca.clock import Clock, utcnow
from ca.config import DEFAULT_OCSP_URL, DEFAULT_REPOSITORY_URL
from ca.errors import ConflictError, InputError, NotFoundError, PolicyError
from ca.issuance.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.issuance.profiles import (
    ISO15118_2,
    ISO15118_20,
    PROFILES,
    V2G_VERSIONS,
    Profile,
    V2gVersion,
    v2g_version,
    v2g_version_of,
)
from ca.keys.keyspec import key_spec
from ca.keys.token_keys import token_private_key
from ca.kinds import CaStatus
from ca.store.models import AuditEvent, Authority, Certificate
from ca.work import Work

V2G_ROLES = V2G_VERSIONS[ISO15118_2].roles  # the ISO 15118-2 hierarchy's
V2G20_ROLES = V2G_VERSIONS[ISO15118_20].roles
# The audit entries that remember which token key a CSR for an external root was for, by the CPO
# CA it asks for (Sub-CA 2 only when a -20 hierarchy has no Sub-CA 1).
CSR_ACTION = "v2g.sub_ca_1.requested"
CSR_ACTIONS = {"sub-ca-1": CSR_ACTION, "sub-ca-2": "v2g.sub_ca_2.requested"}
MAX_PEM = 64 * 1024
# What follows the environment in each CA's name, and the title in its CN, per role.
_NAMES = {
    "v2g-root": "v2g-root-1",
    "v2g-sub-ca-1": "cpo-sub-ca1-1",
    "v2g-sub-ca-2": "cpo-sub-ca2-1",
    "v2g20-root": "v2g20-root-1",
    "v2g20-sub-ca-1": "cpo20-sub-ca1-1",
    "v2g20-sub-ca-2": "cpo20-sub-ca2-1",
}
_TITLES = {
    "v2g-root": "V2G Root CA",
    "v2g-sub-ca-1": "CPO Sub-CA 1",
    "v2g-sub-ca-2": "CPO Sub-CA 2",
    "v2g20-root": "15118-20 V2G Root CA",
    "v2g20-sub-ca-1": "15118-20 CPO Sub-CA 1",
    "v2g20-sub-ca-2": "15118-20 CPO Sub-CA 2",
}


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
    iso: str = ISO15118_2  # which hierarchy: "15118-2" or "15118-20" (``profiles.V2G_VERSIONS``)
    sub_ca_1: bool = True  # False: root → Sub-CA 2 (ISO 15118-20 only)


@dataclass(frozen=True)
class V2gHierarchy:
    root: Authority  # status "external" when imported
    sub_ca_1: Authority | None  # None: an ISO 15118-20 hierarchy without Sub-CA 1
    sub_ca_2: Authority
    ocsp_signers: list[Certificate]  # one per CA whose key chargepki holds
    iso: str = ISO15118_2


def _names(environment: str) -> dict[str, str]:
    return {role: f"{environment}-{suffix}" for role, suffix in _NAMES.items()}


def _subject(organization: str, environment: str, role: str, country: str | None) -> x509.Name:
    return subject_name(ca_common_name(organization, environment, _TITLES[role]), organization, country, "V2G")


def iso_option(version: V2gVersion) -> str:
    """How the CLI names a version after `chargepki v2g …` (nothing for the default, ISO 15118-2)."""
    return "" if version.iso == ISO15118_2 else f" --iso {version.iso}"


def _version(request: V2gRequest) -> V2gVersion:
    version = v2g_version(request.iso)
    if not request.sub_ca_1 and not version.sub_ca_1_optional:
        raise InputError(f"{version.title} requires a CPO Sub-CA 1 (only ISO 15118-20 may leave it out)")
    if not request.sub_ca_1 and request.sub_ca_1_validity is not None:
        raise InputError("a Sub-CA 1 validity was given for a hierarchy without Sub-CA 1")
    return version


def _checked(request: V2gRequest) -> tuple[str, str, str | None]:
    return (
        check_environment(request.environment),
        check_organization(request.organization),
        check_country(request.country),
    )


def _refuse_existing(session: Session, environment: str, version: V2gVersion) -> None:
    existing = any_ca(session, environment, version.roles)
    if existing is not None:
        what = "a V2G hierarchy" if version.iso == ISO15118_2 else f"an {version.title} V2G hierarchy"
        raise ConflictError(f"environment {environment!r} already has {what} (CA {existing})")


def init_v2g(work: Work, *, request: V2gRequest) -> V2gHierarchy:
    """V2G root, CPO Sub-CA 1 (unless ``request.sub_ca_1`` is False: ISO 15118-20 only) and CPO
    Sub-CA 2 of ``request.iso``'s version, keys in the token, and an OCSP signer for each."""
    version = _version(request)
    environment, organization, country = _checked(request)
    _refuse_existing(work.session, environment, version)
    names = _names(environment)

    def ca(role: str, parent: str | None, validity: timedelta | None) -> CaPlan:
        subject = _subject(organization, environment, role, country)
        return CaPlan(role, names[role], subject, parent=parent, validity=validity, key_type=version.key_type)

    cas = [ca(version.root, None, request.root_validity)]
    if request.sub_ca_1:
        cas.append(ca(version.sub_ca_1, version.root, request.sub_ca_1_validity))
    cas.append(ca(version.sub_ca_2, version.sub_ca_1 if request.sub_ca_1 else version.root, request.sub_ca_2_validity))
    plan = _plan(request, version, environment, organization, country, tuple(cas), "v2g.hierarchy.created")
    return _hierarchy(create(work, plan=plan), version)


def _plan(
    request: V2gRequest,
    version: V2gVersion,
    environment: str,
    organization: str,
    country: str | None,
    cas: tuple[CaPlan, ...],
    action: str,
) -> Plan:
    def details(created: Created) -> dict[str, object]:
        return {
            "iso": version.iso,
            **{
                authority.role: {"name": authority.name, "serial": authority.serial, "status": authority.status}
                for authority in created.authorities.values()
            },
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
        conflict=_conflict(version, environment),
    )


def _conflict(version: V2gVersion, environment: str) -> str:
    return f"the {version.title} V2G hierarchy of {environment!r} was created concurrently"


def _hierarchy(created: Created, version: V2gVersion) -> V2gHierarchy:
    """The result; one OCSP signer per CA whose key is here, Sub-CA 2's first."""
    return V2gHierarchy(
        created[version.root],
        created.authorities.get(version.sub_ca_1),
        created[version.sub_ca_2],
        list(created.ocsp_signers.values()),
        version.iso,
    )


# -- an external V2G root: CSR out, certificate in -------------------------------------------------
def _top_role(version: V2gVersion, sub_ca_1: bool) -> str:
    """The CPO CA directly under the V2G root: Sub-CA 1, or Sub-CA 2 in a hierarchy without one."""
    return version.sub_ca_1 if sub_ca_1 else version.sub_ca_2


def request_sub_ca_1(work: Work, *, request: V2gRequest) -> bytes:
    """Generate the key of the CPO CA under an external V2G root in the token (CPO Sub-CA 1; Sub-CA 2
    when ``request.sub_ca_1`` is False) and return a PEM CSR for that root.

    The key and the CSR's signature follow ``request.iso`` (ISO 15118-20: P-521, ecdsa-with-SHA512).
    The audit entry written here records the key's label and fingerprint and which CA it is for;
    ``import_sub_ca_1`` finds the key again from the certificate's public key.
    """
    version = _version(request)
    environment, organization, country = _checked(request)
    _refuse_existing(work.session, environment, version)
    role = _top_role(version, request.sub_ca_1)
    spec = key_spec(version.key_type)
    with key_transaction(work, _conflict(version, environment)) as keys, work.transaction() as session:
        label, public_key = keys.generate(spec, _names(environment)[role])
        key = token_private_key(keys.token, label, public_key)  # type: ignore[arg-type]
        profile = PROFILES[role]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_subject(organization, environment, role, country))
            # What we ask the root to certify (it decides; import checks what it decided).
            .add_extension(x509.BasicConstraints(ca=True, path_length=profile.path_length), critical=True)
            .add_extension(_ca_key_usage(), critical=True)
            .sign(key, spec.signature_hash)
        )
        audit.record(
            session,
            CSR_ACTIONS["sub-ca-1" if request.sub_ca_1 else "sub-ca-2"],
            actor=work.actor,
            subject=environment,
            now=work.now,
            details={
                "key_label": label,
                "public_key_sha256": public_key_sha256(public_key),  # type: ignore[arg-type]
                "organization": organization,
                "country": country,
                "subject": csr.subject.rfc4514_string(),
                "iso": version.iso,
                "role": role,
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


_ECDSA = {
    "sha256": (SignatureAlgorithmOID.ECDSA_WITH_SHA256, "ecdsa-with-SHA256"),
    "sha512": (SignatureAlgorithmOID.ECDSA_WITH_SHA512, "ecdsa-with-SHA512"),
}


def iso15118_problems(certificate: x509.Certificate, profile: Profile, now: Clock = utcnow) -> list[str]:
    """What in a V2G CA certificate breaks the profile of its ISO 15118 version (empty: nothing):
    ISO 15118-2 secp256r1 and ecdsa-with-SHA256, ISO 15118-20 secp521r1 and ecdsa-with-SHA512."""
    version = v2g_version_of(profile.name)
    assert version is not None, f"{profile.name} is not a V2G CA profile"
    spec = key_spec(version.key_type)
    problems = []
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != spec.curve_name:
        problems.append(f"the key is not {spec.curve_name}")
    algorithm, algorithm_name = _ECDSA[spec.signature_hash.name]
    if certificate.signature_algorithm_oid != algorithm:
        problems.append(f"the signature is not {algorithm_name}")
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
        .where(AuditEvent.action.in_(tuple(CSR_ACTIONS.values())), AuditEvent.subject == environment)
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
    """Install the certificate the external root returned for the ``request_sub_ca_1`` CSR (followed
    by the V2G root in the same file, or the root in ``root_data``), check both against
    ``request.iso``'s profile, and create CPO Sub-CA 2 under it (unless it is Sub-CA 2 itself: a
    -20 hierarchy without Sub-CA 1) and the OCSP signers.

    The CPO's organisation and country, and which CA the certificate is for, are the ones the CSR
    was made with (``request``'s organisation, country and ``sub_ca_1`` are ignored).
    """
    version = v2g_version(request.iso)
    environment = check_environment(request.environment)
    _refuse_existing(work.session, environment, version)
    certificates = load_certificates(certificate_data, "the Sub-CA 1 certificate file")
    if root_data is not None:
        certificates += load_certificates(root_data, "the V2G root file")
    if len(certificates) != 2:
        raise InputError(
            f"expected the Sub-CA 1 certificate and the V2G root certificate, found {len(certificates)} certificate(s)"
        )
    top_certificate, root_certificate = certificates
    requested = _requested_key(work.session, environment, top_certificate)
    # Entries written before ISO 15118-20 was supported name no role: they were Sub-CA 1 CSRs.
    role = str(requested.get("role") or V2G_VERSIONS[ISO15118_2].sub_ca_1)
    if role not in version.roles:
        other = v2g_version_of(role)
        hint = f" (--iso {other.iso})" if other is not None else ""
        raise PolicyError(f"this certificate is for a key requested for another ISO 15118 version{hint}")
    _check_external_chain(top_certificate, root_certificate, PROFILES[role], work.now)
    organization = str(requested["organization"])
    country = str(requested["country"]) if requested.get("country") else None
    names = _names(environment)
    key_type = version.key_type
    cas = [
        CaPlan(version.root, names[version.root], root_certificate.subject, certificate=root_certificate,
               key_type=key_type),  # external
        CaPlan(role, names[role], top_certificate.subject, parent=version.root, certificate=top_certificate,
               key_label=str(requested["key_label"]), key_type=key_type),
    ]  # fmt: skip
    if role == version.sub_ca_1:
        subject = _subject(organization, environment, version.sub_ca_2, country)
        cas.append(
            CaPlan(version.sub_ca_2, names[version.sub_ca_2], subject, parent=role,
                   validity=request.sub_ca_2_validity, key_type=key_type)
        )  # fmt: skip
    elif request.sub_ca_2_validity is not None:
        raise InputError("the external V2G root signed CPO Sub-CA 2 itself: a Sub-CA 2 validity does not apply")
    plan = _plan(request, version, environment, organization, country, tuple(cas), "v2g.hierarchy.imported")
    return _hierarchy(create(work, plan=plan), version)


def _check_external_chain(top: x509.Certificate, root: x509.Certificate, profile: Profile, now: Clock) -> None:
    """The external root and the CPO CA it signed (``profile``: Sub-CA 1's, or Sub-CA 2's)."""
    version = v2g_version_of(profile.name)
    assert version is not None
    what = "Sub-CA 1" if profile.name == version.sub_ca_1 else "Sub-CA 2"
    if root.issuer != root.subject:
        raise PolicyError("the V2G root certificate is not self-signed")
    try:
        root.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise PolicyError("the V2G root certificate's self-signature does not verify") from None
    try:
        top.verify_directly_issued_by(root)
    except (InvalidSignature, ValueError, TypeError):
        raise PolicyError(f"the {what} certificate is not signed by this V2G root") from None
    for certificate, checked, name in ((root, PROFILES[version.root], "V2G root"), (top, profile, what)):
        problems = iso15118_problems(certificate, checked, now)
        if problems:
            raise PolicyError(f"the {name} certificate breaks the {version.title} profile: {'; '.join(problems)}")


# -- finding the CAs ---------------------------------------------------------------------------
def v2g_environments(session: Session, iso: str = ISO15118_2) -> list[str]:
    """The environments with a V2G hierarchy of ISO 15118 version ``iso``."""
    return environments(session, v2g_version(iso).roles)


def current_sub_ca_2(
    session: Session, environment: str | None, iso: str = ISO15118_2, *, root: Authority | None = None
) -> Authority:
    """The newest active CPO Sub-CA 2 of version ``iso``'s hierarchy in ``environment`` (or in the only
    environment with such a hierarchy): the CA every new SECC leaf of that version comes from. With
    ``root`` (a V2G root an OCPP 2.1 SignCertificate named), the newest one whose chain ends there."""
    version = v2g_version(iso)
    if root is not None:
        under = session.scalars(
            select(Authority)
            .where(
                Authority.environment == root.environment,
                Authority.role == version.sub_ca_2,
                Authority.status == CaStatus.ACTIVE,
            )
            .order_by(Authority.id.desc())
        )
        for candidate in under:
            if chain(session, candidate)[-1].id == root.id:
                return candidate
        raise NotFoundError(f"no active {version.title} CPO Sub-CA 2 under the V2G root {root.name}")
    what = "" if version.iso == ISO15118_2 else f"{version.title} "
    if environment is None:
        environment = only_environment(
            session,
            version.roles,
            missing=f"no {what}V2G hierarchy yet: run `chargepki v2g init{iso_option(version)} --org NAME` first",
            several=f"several environments have {what}V2G CAs ({{known}}): choose one with --environment",
        )
    authority = newest_active(session, version.sub_ca_2, check_environment(environment))
    if authority is None:
        raise NotFoundError(
            f"no active {what}CPO Sub-CA 2 in environment {environment!r}: run `chargepki v2g init"
            f"{iso_option(version)} --environment {environment}` first"
        )
    return authority
