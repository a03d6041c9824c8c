"""Reading the certificate store: by serial, filtered lists, and the status people see."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from ca.authorities.issuers import chain
from ca.errors import InputError, NotFoundError
from ca.issuance.serials import parse_serial
from ca.kinds import CertStatus
from ca.store.models import Authority, Certificate

STATUSES = ("valid", "expired", "revoked", "hold", "pending", "aborted")


def display_status(certificate: Certificate, now: datetime) -> str:
    """What an operator means by status: expiry is derived from the clock, hold from the reason."""
    if certificate.status == CertStatus.REVOKED:
        return "hold" if certificate.revocation_reason == "certificateHold" else "revoked"
    if certificate.status == CertStatus.VALID and certificate.not_after <= now:
        return "expired"
    return certificate.status


def get_certificate(session: Session, serial: str) -> Certificate:
    canonical = parse_serial(serial)
    certificate = session.scalar(select(Certificate).where(Certificate.serial == canonical))
    if certificate is None:
        raise NotFoundError(f"no certificate with serial {canonical}")
    return certificate


def list_certificates(
    session: Session,
    now: datetime,
    *,
    status: str | None = None,
    expiring_within: timedelta | None = None,
    profile: str | None = None,
    authority: Authority | None = None,
    limit: int | None = None,
) -> list[Certificate]:
    """Certificates soonest-expiring first; ``expiring_within`` keeps valid ones expiring in that window."""
    query: Select[tuple[Certificate]] = select(Certificate)
    if status is not None:
        if status not in STATUSES:
            raise InputError(f"unknown status {status!r} (known: {', '.join(STATUSES)})")
        if status == "valid":
            query = query.where(Certificate.status == CertStatus.VALID, Certificate.not_after > now)
        elif status == "expired":
            query = query.where(Certificate.status == CertStatus.VALID, Certificate.not_after <= now)
        elif status == "hold":
            query = query.where(
                Certificate.status == CertStatus.REVOKED, Certificate.revocation_reason == "certificateHold"
            )
        elif status == "revoked":
            query = query.where(
                Certificate.status == CertStatus.REVOKED, Certificate.revocation_reason != "certificateHold"
            )
        else:
            query = query.where(Certificate.status == status)
    if expiring_within is not None:
        if expiring_within < timedelta(0):
            raise InputError("--expiring-within must not be negative")
        query = query.where(
            Certificate.status == CertStatus.VALID,
            Certificate.not_after > now,
            Certificate.not_after <= now + expiring_within,
        )
    if profile is not None:
        query = query.where(Certificate.profile == profile)
    if authority is not None:
        query = query.where(Certificate.authority_id == authority.id)
    query = query.order_by(Certificate.not_after, Certificate.id)
    if limit is not None:
        query = query.limit(limit)
    return list(session.scalars(query))


@dataclass(frozen=True)
class Standing:
    """What a relying party (a CSMS) needs to know: good, revoked (why, since when) or expired."""

    status: str  # good | revoked | expired
    reason: str | None = None
    revoked_at: datetime | None = None


def standing(certificate: Certificate, now: datetime) -> Standing:
    """Revocation first (a revoked certificate stays revoked after expiry), then expiry.

    A certificate superseded with a grace period counts as revoked once the grace has ended, as
    enrollment already treats it, even before the sweep has written the revocation.
    """
    if certificate.status == CertStatus.REVOKED:
        return Standing("revoked", certificate.revocation_reason, certificate.revoked_at)
    if certificate.revoke_after is not None and certificate.revoke_after <= now:
        return Standing("revoked", "superseded", certificate.revoke_after)
    if certificate.not_after <= now:
        return Standing("expired")
    return Standing("good")


def pem_certificate(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM).decode("ascii")


# A CA's chain is fixed when the CA is made (its certificate and its parent never change, and no CA row
# is ever deleted), and a relayed signature needs it twice (the OCPP length check, the answer): kept by
# the CA's certificate, so the parents are read once per process, not per request.
_INTERMEDIATES: dict[bytes, str] = {}
_INTERMEDIATES_KEPT = 256


def intermediates_pem(session: Session, authority: Authority) -> str:
    """The issuing CA and any sub-CAs above it, without the root: what follows a leaf in OCPP's chain."""
    key = authority.certificate_der
    pem = _INTERMEDIATES.get(key)
    if pem is None:
        pem = "".join(pem_certificate(a.certificate_der) for a in chain(session, authority) if a.parent_id is not None)
        if len(_INTERMEDIATES) >= _INTERMEDIATES_KEPT:
            _INTERMEDIATES.clear()  # more CAs than any installation has: start over rather than grow
        _INTERMEDIATES[key] = pem
    return pem


def ocpp_chain_pem(session: Session, certificate: Certificate) -> str:
    """OCPP's ``certificateChain``: the leaf first, the sub-CAs after, the root left out."""
    return pem_certificate(certificate.der or b"") + intermediates_pem(session, certificate.authority)
