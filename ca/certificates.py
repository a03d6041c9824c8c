"""Reading the certificate store: by serial, filtered lists, and the status people see."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from ca.errors import InputError, NotFoundError
from ca.models import Authority, Certificate
from ca.serials import parse_serial

STATUSES = ("valid", "expired", "revoked", "hold", "pending", "aborted")


def display_status(certificate: Certificate, now: datetime) -> str:
    """What an operator means by status: expiry is derived from the clock, hold from the reason."""
    if certificate.status == "revoked":
        return "hold" if certificate.revocation_reason == "certificateHold" else "revoked"
    if certificate.status == "valid" and certificate.not_after <= now:
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
            query = query.where(Certificate.status == "valid", Certificate.not_after > now)
        elif status == "expired":
            query = query.where(Certificate.status == "valid", Certificate.not_after <= now)
        elif status == "hold":
            query = query.where(Certificate.status == "revoked", Certificate.revocation_reason == "certificateHold")
        elif status == "revoked":
            query = query.where(Certificate.status == "revoked", Certificate.revocation_reason != "certificateHold")
        else:
            query = query.where(Certificate.status == status)
    if expiring_within is not None:
        if expiring_within < timedelta(0):
            raise InputError("--expiring-within must not be negative")
        query = query.where(
            Certificate.status == "valid",
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
