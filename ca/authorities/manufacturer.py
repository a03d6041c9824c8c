"""The manufacturer hierarchy of one environment: a root, and firmware signers directly under it.

OCPP (SignedUpdateFirmware) wants the firmware signing certificate issued by the manufacturer
root with no intermediate. Each signer has a name (its CN) and a release channel (its OU, e.g.
``stable`` or ``beta``), its key in the token, and is an ordinary certificate otherwise: listed,
revocable with ``chargepki revoke``, answered for by the root's OCSP signer and its CRL. Revoking
the beta signer leaves the stable one untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.factory import CaPlan, Created, Leaf, Plan, create, create_leaf
from ca.authorities.issuers import any_ca, newest_active, only_environment
from ca.config import DEFAULT_OCSP_URL, DEFAULT_REPOSITORY_URL
from ca.errors import ConflictError, NotFoundError, PolicyError
from ca.issuance.names import ca_common_name, check_country, check_environment, check_organization, subject_name
from ca.keys.keyspec import key_spec
from ca.kinds import CertStatus
from ca.store.models import Authority, Certificate
from ca.work import Work

ROLE = "manufacturer"
_SIGNER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
_CHANNEL = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


@dataclass(frozen=True)
class ManufacturerRequest:
    organization: str
    environment: str = "production"
    country: str | None = None
    key_type: str = "ec-p256"
    ocsp_url: str = DEFAULT_OCSP_URL
    repository_url: str = DEFAULT_REPOSITORY_URL
    validity: timedelta | None = None


@dataclass(frozen=True)
class Manufacturer:
    root: Authority
    ocsp_signer: Certificate


def init_manufacturer(work: Work, *, request: ManufacturerRequest) -> Manufacturer:
    """The manufacturer root of one environment (key in the token) and its delegated OCSP signer."""
    environment = check_environment(request.environment)
    organization = check_organization(request.organization)
    country = check_country(request.country)
    spec = key_spec(request.key_type)
    existing = any_ca(work.session, environment, (ROLE,))
    if existing is not None:
        raise ConflictError(f"environment {environment!r} already has a manufacturer root (CA {existing})")

    def details(created: Created) -> dict[str, object]:
        root = created[ROLE]
        return {"root": root.name, "serial": root.serial, "key_type": spec.name, "key_label": root.key_label}

    root = CaPlan(
        ROLE,
        f"{environment}-manufacturer-root-1",
        subject_name(ca_common_name(organization, environment, "Manufacturer Root"), organization, country),
        validity=request.validity,
        key_type=spec.name,
    )
    plan = Plan(
        environment=environment,
        organization=organization,
        country=country,
        ocsp_url=request.ocsp_url,
        repository_url=request.repository_url,
        cas=(root,),
        action="manufacturer.created",
        audit_subject=environment,
        details=details,
        conflict=f"the manufacturer root of {environment!r} was created concurrently",
    )
    created = create(work, plan=plan)
    return Manufacturer(created[ROLE], created.ocsp_signers[ROLE])


def manufacturer_root(session: Session, environment: str | None) -> Authority:
    """The active manufacturer root of ``environment`` (or of the only environment that has one)."""
    if environment is None:
        environment = only_environment(
            session,
            (ROLE,),
            missing="no manufacturer root: run `chargepki manufacturer init --org NAME` first",
            several="several environments have a manufacturer root ({known}): choose one with --environment",
        )
    root = newest_active(session, ROLE, check_environment(environment))
    if root is None:
        raise NotFoundError(
            f"no manufacturer root in environment {environment!r}: "
            f"run `chargepki manufacturer init --org NAME --environment {environment}` first"
        )
    return root


def channel_of(certificate: Certificate) -> str:
    """The release channel a signer was issued for (the OU of its subject)."""
    parsed = x509.load_der_x509_certificate(certificate.der or b"")
    units = parsed.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(units[0].value) if units else "-"


def _signers_query(root: Authority, name: str | None = None):  # type: ignore[no-untyped-def]
    query = select(Certificate).where(
        Certificate.profile == "firmware-signer", Certificate.authority_id == root.id, Certificate.der.is_not(None)
    )
    if name is not None:
        query = query.where(Certificate.common_name == name)
    return query.order_by(Certificate.id.desc())


def add_firmware_signer(
    work: Work,
    *,
    name: str,
    environment: str | None,
    channel: str = "stable",
    validity: timedelta | None = None,
) -> Certificate:
    """A firmware signing certificate directly under the manufacturer root, key generated in the token.

    A name is reusable once its previous signer is revoked or expired (re-keying a channel).
    """
    if not _SIGNER_NAME.match(name):
        raise PolicyError(f"signer name {name!r} must be 1-48 letters, digits, '.', '_' or '-', starting alphanumeric")
    if not _CHANNEL.match(channel):
        raise PolicyError(f"channel {channel!r} must be 1-32 lower-case letters, digits or '-' (e.g. stable, beta)")
    root = manufacturer_root(work.session, environment)
    for existing in work.session.scalars(_signers_query(root, name)):
        if existing.status == CertStatus.VALID and existing.not_after > work.now():
            raise ConflictError(
                f"firmware signer {name!r} exists (serial {existing.serial}); revoke it first to replace it"
            )
    leaf = Leaf(
        profile="firmware-signer",
        common_name=name,
        key_prefix=f"{root.environment}-firmware-{name}",
        validity=validity,
        organizational_unit=channel,
    )
    return create_leaf(work, issuer=work.issuer(root), leaf=leaf)


def firmware_signers(session: Session, environment: str | None = None) -> list[Certificate]:
    """Every firmware signer (current, revoked and expired), newest first."""
    query = select(Authority).where(Authority.role == ROLE)
    if environment is not None:
        query = query.where(Authority.environment == environment)
    signers: list[Certificate] = []
    for root in session.scalars(query.order_by(Authority.id)):
        signers += session.scalars(_signers_query(root))
    return signers


def get_firmware_signer(session: Session, name: str, environment: str | None) -> Certificate:
    """The newest signer named ``name`` under the environment's manufacturer root."""
    root = manufacturer_root(session, environment)
    signer = session.scalars(_signers_query(root, name).limit(1)).first()
    if signer is None:
        known = ", ".join(sorted({s.common_name or "" for s in session.scalars(_signers_query(root))})) or "none"
        raise NotFoundError(f"no firmware signer {name!r} in environment {root.environment} (known: {known})")
    return signer
