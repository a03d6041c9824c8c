"""Creating an environment's CA hierarchy: root → issuing CA (pathLen 0), each with a delegated OCSP signer.

All three keys are generated inside the token. Each environment (production, staging,
factory-test) gets its own hierarchy, whose names carry the environment.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass, replace
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.issuers import Issuer, issuer_for, key_sha1, public_key_sha256
from ca.clock import Clock, utcnow
from ca.errors import ChargepkiError, ConflictError, PolicyError
from ca.issuance.flow import IssueRequest, build_certificate, issue, validity_window
from ca.issuance.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.issuance.profiles import PROFILES, Profile, ca_profile
from ca.issuance.serials import new_serial
from ca.keys.keyspec import KeySpec, key_spec
from ca.keys.pkcs11_token import Token, new_key_label
from ca.keys.token_keys import token_private_key
from ca.status.signal import StatusSigner
from ca.store.models import Authority, Certificate

OCPP_ROLES = ("root", "issuing")  # the V2G and manufacturer hierarchies live beside it (ca/v2g.py, ca/manufacturer.py)
# What the delegated OCSP signer of each CA role is called (CN suffix after organisation and environment).
_SIGNER_NAMES = {
    "root": "Root OCSP Signer",
    "manufacturer": "Manufacturer OCSP Signer",
    "v2g-root": "V2G Root OCSP",
    "v2g-sub-ca-1": "CPO Sub-CA 1 OCSP",
    "v2g-sub-ca-2": "CPO Sub-CA 2 OCSP",
}


@dataclass(frozen=True)
class HierarchyRequest:
    organization: str
    environment: str = "production"
    country: str | None = None
    key_type: str = "ec-p256"
    rsa_padding: str = "pkcs1"  # pkcs1 | pss (RSA keys only)
    ocsp_url: str = "http://127.0.0.1:8081/ocsp"
    repository_url: str = "http://127.0.0.1:8081/pki"
    root_validity: timedelta | None = None
    issuing_validity: timedelta | None = None


@dataclass(frozen=True)
class Hierarchy:
    root: Authority
    issuing: Authority
    ocsp_signer: Certificate  # the issuing CA's
    root_ocsp_signer: Certificate  # answers for the issuing CA's own certificate


def authority_row(issuer: Issuer, role: str, key_label: str, parent: Authority | None, now: Clock) -> Authority:
    """The stored form of a CA whose certificate ``issuer`` holds (roles: see ``profiles.CA_ROLE_PROFILES``)."""
    certificate = issuer.certificate
    assert certificate is not None
    return Authority(
        name=issuer.name,
        role=role,
        environment=issuer.environment,
        organization=issuer.organization,
        country=issuer.country,
        parent=parent,
        key_label=key_label,
        key_type=issuer.spec.name,
        rsa_padding=issuer.rsa_padding,
        serial=format(certificate.serial_number, "X"),
        subject=certificate.subject.rfc4514_string(),
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        key_sha1=key_sha1(certificate.public_key()).hex(),
        ocsp_url=issuer.ocsp_url,
        repository_url=issuer.repository_url,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        status="active",
        created_at=now(),
    )


def record_ca_certificate(authority: Authority, issued_by: Authority, profile: str, now: Clock) -> Certificate:
    """CA certificates are certificates too: listed, revocable (by the parent's CRL), audited."""
    certificate = x509.load_der_x509_certificate(authority.certificate_der)
    return Certificate(
        serial=authority.serial,
        authority=issued_by,
        profile=profile,
        status="valid",
        subject=authority.subject,
        common_name=str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value),
        not_before=authority.not_before,
        not_after=authority.not_after,
        der=authority.certificate_der,
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        public_key_sha256=public_key_sha256(certificate.public_key()),
        key_label=authority.key_label,
        created_at=now(),
    )


def init_hierarchy(
    session: Session,
    token: Token,
    request: HierarchyRequest,
    *,
    actor: str,
    status: StatusSigner,
    now: Clock = utcnow,
) -> Hierarchy:
    """Create root, issuing CA and OCSP signer for one environment; refuse if it exists already."""
    environment = check_environment(request.environment)
    organization = check_organization(request.organization)
    country = check_country(request.country)
    spec = key_spec(request.key_type)
    if request.rsa_padding not in ("pkcs1", "pss"):
        raise PolicyError(f"unknown RSA padding {request.rsa_padding!r} (pkcs1 or pss)")
    padding = request.rsa_padding if spec.algorithm == "rsa" else None
    existing = session.scalar(
        select(Authority.name).where(Authority.environment == environment, Authority.role.in_(OCPP_ROLES)).limit(1)
    )
    if existing is not None:
        raise ConflictError(
            f"environment {environment!r} is already initialised (CA {existing}); init runs once per environment"
        )

    created_labels: list[str] = []
    try:
        root_issuer, root_label = _self_signed_root(
            token, spec, padding, request, organization, country, now, created_labels
        )
        root = authority_row(root_issuer, "root", root_label, None, now)
        issuing_issuer, issuing_label = _issuing_ca(token, spec, padding, request, root_issuer, now, created_labels)
        issuing = authority_row(issuing_issuer, "issuing", issuing_label, root, now)
        session.add_all([root, issuing])
        session.flush()
        issuing_certificate = record_ca_certificate(issuing, root, "issuing-ca", now)
        session.add_all([record_ca_certificate(root, root, "root", now), issuing_certificate])
        audit.record(
            session,
            "hierarchy.created",
            actor=actor,
            subject=environment,
            now=now,
            details={
                "root": root.name,
                "issuing": issuing.name,
                "organization": organization,
                "key_type": spec.name,
                "root_key_label": root_label,
                "issuing_key_label": issuing_label,
            },
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        destroy_keys(token, created_labels)
        raise ConflictError(f"environment {environment!r} was initialised concurrently") from None
    except BaseException:
        session.rollback()
        destroy_keys(token, created_labels)
        raise
    signer = create_ocsp_signer(session, token, issuing, actor=actor, status=status, now=now)
    root_signer = create_ocsp_signer(session, token, root, actor=actor, status=status, now=now)
    status.update(session, [issuing_certificate], now())  # the root's signer exists only now
    session.commit()
    return Hierarchy(root, issuing, signer, root_signer)


def generate_ca_key(token: Token, spec: KeySpec, prefix: str, created: list[str]) -> tuple[str, object]:
    """A new key pair in the token under a fresh label; the label is appended to ``created`` for rollback."""
    label = new_key_label(prefix)
    public_key = token.generate_key(spec, label)
    created.append(label)
    return label, public_key


def self_signed_ca(
    token: Token,
    spec: KeySpec,
    padding: str | None,
    *,
    name: str,
    subject: x509.Name,
    profile: Profile,
    validity: timedelta | None,
    environment: str,
    organization: str,
    country: str | None,
    ocsp_url: str,
    repository_url: str,
    now: Clock,
    created: list[str],
) -> tuple[Issuer, str]:
    """A root: key generated in the token, certificate signed by itself under ``profile``."""
    label, public_key = generate_ca_key(token, spec, name, created)
    unsigned = Issuer(
        name=name,
        subject=subject,
        private_key=token_private_key(token, label, public_key),
        spec=spec,
        rsa_padding=padding,
        organization=organization,
        country=country,
        environment=environment,
        ocsp_url=ocsp_url,
        repository_url=repository_url,
    )
    window = validity_window(profile, validity, now(), None)
    builder = build_certificate(profile, unsigned, subject, public_key, new_serial(), window)  # type: ignore[arg-type]
    return replace(unsigned, certificate=unsigned.sign(builder)), label


def subordinate_ca(
    token: Token,
    parent: Issuer,
    *,
    name: str,
    subject: x509.Name,
    profile: Profile,
    validity: timedelta | None,
    now: Clock,
    created: list[str],
) -> tuple[Issuer, str]:
    """A CA under ``parent``: key generated in the token (same type), certificate signed by the parent."""
    label, public_key = generate_ca_key(token, parent.spec, name, created)
    assert parent.certificate is not None
    window = validity_window(profile, validity, now(), parent.certificate.not_valid_after_utc)
    builder = build_certificate(profile, parent, subject, public_key, new_serial(), window)  # type: ignore[arg-type]
    issuer = replace(
        parent,
        name=name,
        subject=subject,
        private_key=token_private_key(token, label, public_key),
        certificate=parent.sign(builder),
        authority_id=None,
        role=None,
    )
    return issuer, label


def _self_signed_root(
    token: Token,
    spec: KeySpec,
    padding: str | None,
    request: HierarchyRequest,
    organization: str,
    country: str | None,
    now: Clock,
    created: list[str],
) -> tuple[Issuer, str]:
    return self_signed_ca(
        token,
        spec,
        padding,
        name=f"{request.environment}-root-1",
        subject=subject_name(ca_common_name(organization, request.environment, "Root CA"), organization, country),
        profile=PROFILES["root"],
        validity=request.root_validity,
        environment=request.environment,
        organization=organization,
        country=country,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        now=now,
        created=created,
    )


def _issuing_ca(
    token: Token,
    spec: KeySpec,
    padding: str | None,
    request: HierarchyRequest,
    root: Issuer,
    now: Clock,
    created: list[str],
) -> tuple[Issuer, str]:
    subject = subject_name(
        ca_common_name(root.organization, request.environment, "Issuing CA 1"), root.organization, root.country
    )
    return subordinate_ca(
        token,
        root,
        name=f"{request.environment}-issuing-1",
        subject=subject,
        profile=PROFILES["issuing-ca"],
        validity=request.issuing_validity,
        now=now,
        created=created,
    )


def create_ocsp_signer(
    session: Session,
    token: Token,
    authority: Authority,
    *,
    actor: str,
    status: StatusSigner,
    validity: timedelta | None = None,
    now: Clock = utcnow,
) -> Certificate:
    """A delegated OCSP signing certificate for ``authority`` (root or issuing), key generated in the token."""
    issuer = issuer_for(authority, token)
    created: list[str] = []
    label, public_key = generate_ca_key(token, issuer.spec, f"{authority.name}-ocsp", created)
    kind = _SIGNER_NAMES.get(authority.role, "OCSP Signer")
    request = IssueRequest(
        profile=PROFILES["ocsp-signer"],
        public_key=public_key,  # type: ignore[arg-type]
        common_name=ca_common_name(authority.organization, authority.environment, kind),
        validity=signer_validity(authority.role, validity),
        key_label=label,
    )
    try:
        return issue(session, issuer, request, actor=actor, status=status, now=now)
    except ChargepkiError:
        destroy_keys(token, created)
        raise


def signer_validity(role: str, requested: timedelta | None) -> timedelta | None:
    """At least three response lifetimes for CAs whose OCSP responses live long (V2G: 14 days).

    Signers are rotated when a third of their life is left and no response outlives its signer,
    so this keeps every response at its full length.
    """
    profile = ca_profile(role)
    if profile is None or profile.ocsp_validity is None:
        return requested
    floor = 3 * profile.ocsp_validity
    return max(requested or PROFILES["ocsp-signer"].default_validity, floor)


def destroy_keys(token: Token, labels: list[str]) -> None:
    """Remove the keys made for CAs whose creation failed."""
    for label in labels:
        # If the token is gone too, an orphan key under a random label harms nothing.
        with suppress(ChargepkiError):
            token.destroy_key(label)
