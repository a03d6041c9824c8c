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
from ca.authorities import Issuer, issuer_for, key_sha1, public_key_sha256
from ca.errors import ChargepkiError, ConflictError, PolicyError
from ca.issuance import Clock, IssueRequest, build_certificate, issue, utcnow, validity_window
from ca.keyspec import KeySpec, key_spec
from ca.models import Authority, Certificate
from ca.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.pkcs11_token import Token, new_key_label
from ca.profiles import PROFILES
from ca.serials import new_serial
from ca.status import StatusSigner
from ca.token_keys import token_private_key


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


def _authority(
    issuer: Issuer, role: str, key_label: str, parent: Authority | None, request: HierarchyRequest, now: Clock
) -> Authority:
    certificate = issuer.certificate
    assert certificate is not None
    return Authority(
        name=issuer.name,
        role=role,
        environment=request.environment,
        organization=request.organization,
        country=request.country,
        parent=parent,
        key_label=key_label,
        key_type=issuer.spec.name,
        rsa_padding=issuer.rsa_padding,
        serial=format(certificate.serial_number, "X"),
        subject=certificate.subject.rfc4514_string(),
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
        key_sha1=key_sha1(certificate.public_key()).hex(),
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
        status="active",
        created_at=now(),
    )


def _record_ca_certificate(authority: Authority, issued_by: Authority, profile: str, now: Clock) -> Certificate:
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
    existing = session.scalar(select(Authority.name).where(Authority.environment == environment).limit(1))
    if existing is not None:
        raise ConflictError(
            f"environment {environment!r} is already initialised (CA {existing}); init runs once per environment"
        )

    created_labels: list[str] = []
    try:
        root_issuer, root_label = _self_signed_root(
            token, spec, padding, request, organization, country, now, created_labels
        )
        root = _authority(root_issuer, "root", root_label, None, request, now)
        issuing_issuer, issuing_label = _issuing_ca(token, spec, padding, request, root_issuer, now, created_labels)
        issuing = _authority(issuing_issuer, "issuing", issuing_label, root, request, now)
        session.add_all([root, issuing])
        session.flush()
        issuing_certificate = _record_ca_certificate(issuing, root, "issuing-ca", now)
        session.add_all([_record_ca_certificate(root, root, "root", now), issuing_certificate])
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
        _destroy(token, created_labels)
        raise ConflictError(f"environment {environment!r} was initialised concurrently") from None
    except BaseException:
        session.rollback()
        _destroy(token, created_labels)
        raise
    signer = create_ocsp_signer(session, token, issuing, actor=actor, status=status, now=now)
    root_signer = create_ocsp_signer(session, token, root, actor=actor, status=status, now=now)
    status.update(session, [issuing_certificate], now())  # the root's signer exists only now
    session.commit()
    return Hierarchy(root, issuing, signer, root_signer)


def _generate(token: Token, spec: KeySpec, prefix: str, created: list[str]) -> tuple[str, object]:
    label = new_key_label(prefix)
    public_key = token.generate_key(spec, label)
    created.append(label)
    return label, public_key


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
    name = f"{request.environment}-root-1"
    label, public_key = _generate(token, spec, name, created)
    subject = subject_name(ca_common_name(organization, request.environment, "Root CA"), organization, country)
    unsigned = Issuer(
        name=name,
        subject=subject,
        private_key=token_private_key(token, label, public_key),
        spec=spec,
        rsa_padding=padding,
        organization=organization,
        country=country,
        environment=request.environment,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
    )
    profile = PROFILES["root"]
    validity = validity_window(profile, request.root_validity, now(), None)
    builder = build_certificate(profile, unsigned, subject, public_key, new_serial(), validity)  # type: ignore[arg-type]
    certificate = unsigned.sign(builder)
    return replace(unsigned, certificate=certificate), label


def _issuing_ca(
    token: Token,
    spec: KeySpec,
    padding: str | None,
    request: HierarchyRequest,
    root: Issuer,
    now: Clock,
    created: list[str],
) -> tuple[Issuer, str]:
    name = f"{request.environment}-issuing-1"
    label, public_key = _generate(token, spec, name, created)
    subject = subject_name(
        ca_common_name(root.organization, request.environment, "Issuing CA 1"),
        root.organization,
        root.country,
    )
    profile = PROFILES["issuing-ca"]
    assert root.certificate is not None
    validity = validity_window(profile, request.issuing_validity, now(), root.certificate.not_valid_after_utc)
    builder = build_certificate(profile, root, subject, public_key, new_serial(), validity)  # type: ignore[arg-type]
    certificate = root.sign(builder)
    issuer = Issuer(
        name=name,
        subject=subject,
        private_key=token_private_key(token, label, public_key),
        spec=spec,
        rsa_padding=padding,
        organization=root.organization,
        country=root.country,
        environment=request.environment,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        certificate=certificate,
    )
    return issuer, label


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
    label, public_key = _generate(token, issuer.spec, f"{authority.name}-ocsp", created)
    kind = "Root OCSP Signer" if authority.role == "root" else "OCSP Signer"
    request = IssueRequest(
        profile=PROFILES["ocsp-signer"],
        public_key=public_key,  # type: ignore[arg-type]
        common_name=ca_common_name(authority.organization, authority.environment, kind),
        validity=validity,
        key_label=label,
    )
    try:
        return issue(session, issuer, request, actor=actor, status=status, now=now)
    except ChargepkiError:
        _destroy(token, created)
        raise


def _destroy(token: Token, labels: list[str]) -> None:
    for label in labels:
        # If the token is gone too, an orphan key under a random label harms nothing.
        with suppress(ChargepkiError):
            token.destroy_key(label)
