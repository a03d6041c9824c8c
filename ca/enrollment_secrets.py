"""One-time enrollment secrets for factory bootstrap (EST HTTP Basic password).

A secret is 192 random bits shown once; the store keeps only its SHA-256 (a slow password
hash buys nothing against a random secret of that size). Consumption is one conditional
UPDATE, so of two simultaneous enrollments with the same secret exactly one sees
``rowcount == 1``, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.errors import PolicyError
from ca.issuance import Clock, utcnow
from ca.models import Device, EnrollmentSecret

MAX_TTL = timedelta(days=90)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def issue_secret(
    session: Session,
    device: Device,
    *,
    ttl: timedelta = timedelta(hours=24),
    actor: str,
    now: Clock = utcnow,
    commit: bool = True,
) -> str:
    """A new secret for ``device``; returned once, never stored or logged in clear."""
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise PolicyError(f"the secret's lifetime must be between 1 minute and {MAX_TTL.days} days")
    if not device.enabled:
        raise PolicyError(f"device {device.serial} is disabled")
    secret = secrets.token_urlsafe(24)
    at = now()
    session.add(EnrollmentSecret(device_id=device.id, secret_hash=_hash(secret), expires_at=at + ttl, created_at=at))
    audit.record(
        session,
        "secret.issued",
        actor=actor,
        subject=device.serial,
        now=now,
        details={"expires_at": (at + ttl).isoformat()},
    )
    if commit:
        session.commit()
    return secret


def consume_secret(session: Session, serial: str, secret: str, *, now: Clock = utcnow, commit: bool = True) -> bool:
    """Use the secret up if it is valid for this device. False means: do not authenticate.

    With ``commit=False`` the consumption rides on the caller's next commit (issuance commits it
    with the serial reservation, saving a disk sync); until then the row stays locked, so a
    concurrent request with the same secret waits and then finds it used.
    """
    device_id = select(Device.id).where(Device.serial == serial).scalar_subquery()
    result = session.execute(
        update(EnrollmentSecret)
        .where(
            EnrollmentSecret.secret_hash == _hash(secret),
            EnrollmentSecret.device_id == device_id,
            EnrollmentSecret.used_at.is_(None),
            EnrollmentSecret.expires_at > now(),
        )
        .values(used_at=now())
        .execution_options(synchronize_session=False)
    )
    if commit:
        session.commit()
    return result.rowcount == 1


def secret_is_valid(session: Session, serial: str, secret: str, *, now: Clock = utcnow) -> bool:
    """Check without consuming (to refuse a bad request before the secret is spent)."""
    return (
        session.scalar(
            select(EnrollmentSecret.id)
            .join(Device, Device.id == EnrollmentSecret.device_id)
            .where(
                EnrollmentSecret.secret_hash == _hash(secret),
                Device.serial == serial,
                EnrollmentSecret.used_at.is_(None),
                EnrollmentSecret.expires_at > now(),
            )
        )
        is not None
    )


def restore_secret(session: Session, serial: str, secret: str) -> None:
    """Give a consumed secret back when the CA failed to sign (the device did nothing wrong)."""
    device_id = select(Device.id).where(Device.serial == serial).scalar_subquery()
    session.execute(
        update(EnrollmentSecret)
        .where(EnrollmentSecret.secret_hash == _hash(secret), EnrollmentSecret.device_id == device_id)
        .values(used_at=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()
