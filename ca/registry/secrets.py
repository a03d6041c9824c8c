"""One-time enrollment secrets for factory bootstrap (EST HTTP Basic password).

A secret is 192 random bits shown once; the store keeps only its SHA-256 (a slow password
hash buys nothing against a random secret of that size). Consumption is one conditional
UPDATE, so of two simultaneous enrollments with the same secret exactly one sees
``rowcount == 1``, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.clock import Clock, utcnow
from ca.errors import PolicyError
from ca.store.models import Certificate, Device, EnrollmentSecret
from ca.store.prepared import Prepared, as_objects
from ca.work import Work

MAX_TTL = timedelta(days=90)
DEFAULT_TTL = timedelta(hours=24)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def issue_secret(work: Work, *, device: Device, ttl: timedelta = DEFAULT_TTL, keep_older: bool = False) -> str:
    """A new secret for ``device``; returned once, never stored or logged in clear.

    The device's older unspent secrets are withdrawn (audited) unless ``keep_older``: a device
    needs one, and a secret printed on an older sheet or CSV should not stay usable for months.
    """
    return issue_secrets(work, devices=[device], ttl=ttl, keep_older=keep_older)[0]


def issue_secrets(
    work: Work, *, devices: Sequence[Device], ttl: timedelta = DEFAULT_TTL, keep_older: bool = False
) -> list[str]:
    """One new secret per device, all in one transaction: a half-issued batch would confuse the factory."""
    if ttl <= timedelta(0) or ttl > MAX_TTL:
        raise PolicyError(f"the secret's lifetime must be between 1 minute and {MAX_TTL.days} days")
    with work.transaction() as session:
        return [_issue(session, work, device, ttl, keep_older) for device in devices]


def _issue(session: Session, work: Work, device: Device, ttl: timedelta, keep_older: bool) -> str:
    if not device.enabled:
        raise PolicyError(f"device {device.serial} is disabled")
    if not keep_older:
        _withdraw(session, work, device, "a new secret was issued", None)
    secret = secrets.token_urlsafe(24)
    at = work.now()
    session.add(EnrollmentSecret(device_id=device.id, secret_hash=_hash(secret), expires_at=at + ttl, created_at=at))
    audit.record(
        session,
        "secret.issued",
        actor=work.actor,
        subject=device.serial,
        now=work.now,
        details={"expires_at": (at + ttl).isoformat()},
    )
    return secret


# Prepared once: these run on every enrollment, and building a statement costs more than running it.
_SECRETS = EnrollmentSecret.__table__
_DEVICES = Device.__table__
_DEVICE_ID = select(_DEVICES.c.id).where(_DEVICES.c.serial == bindparam("serial")).scalar_subquery()
_USABLE = (
    _SECRETS.c.secret_hash == bindparam("digest"),
    _SECRETS.c.used_at.is_(None),
    _SECRETS.c.expires_at > bindparam("now", type_=_SECRETS.c.expires_at.type),
)
_CONSUME = Prepared(
    update(_SECRETS)
    .where(_SECRETS.c.device_id == _DEVICE_ID, *_USABLE)
    .values(used_at=bindparam("now", type_=_SECRETS.c.used_at.type))
)
# The device, when the secret is a usable one of it: an enrollment's authentication and its device in
# one statement (secret hashes are unique: at most one row).
_DEVICE_OF_VALID_SECRET = Prepared(
    select(_DEVICES)
    .join(_SECRETS, _SECRETS.c.device_id == _DEVICES.c.id)
    .where(_DEVICES.c.serial == bindparam("serial"), *_USABLE)
)
_RESTORE = (
    update(_SECRETS)
    .where(_SECRETS.c.secret_hash == bindparam("digest"), _SECRETS.c.device_id == _DEVICE_ID)
    .values(used_at=None)
)


# How long after spending its secret a repeated request still gets the certificate it produced.
REPEAT_WINDOW = timedelta(minutes=15)
_CERTIFICATES = Certificate.__table__
_REPEATED = (
    select(_CERTIFICATES.c.id)
    .join(_SECRETS, _SECRETS.c.device_id == _CERTIFICATES.c.device_id)
    .where(
        _SECRETS.c.device_id == _DEVICE_ID,
        _SECRETS.c.secret_hash == bindparam("digest"),
        _SECRETS.c.used_at > bindparam("since", type_=_SECRETS.c.used_at.type),
        _CERTIFICATES.c.public_key_sha256 == bindparam("key"),
        _CERTIFICATES.c.authority_id == bindparam("authority_id"),
        _CERTIFICATES.c.profile == "charger",
        _CERTIFICATES.c.status == "valid",
    )
    .order_by(_CERTIFICATES.c.id.desc())
    .limit(1)
)


def repeated_enrollment(
    session: Session, serial: str, secret: str, public_key_sha256: str, authority_id: int, *, now: Clock = utcnow
) -> int | None:
    """The certificate (its id) that this device's secret, spent in the last ``REPEAT_WINDOW``,
    already produced for this very key under this CA, or None.

    A load balancer retries a request whose server died after the commit but before the answer;
    the secret is spent by then, and refusing would strand a factory station's device. The same
    secret and a CSR signed by the same private key (its proof of possession was checked) ask for
    what was already issued: handing back that certificate issues nothing and reveals nothing the
    caller does not hold."""
    parameters = {
        "serial": serial,
        "digest": _hash(secret),
        "since": now() - REPEAT_WINDOW,
        "key": public_key_sha256,
        "authority_id": authority_id,
    }
    return session.execute(_REPEATED, parameters).scalar()


def consume_secret(session: Session, serial: str, secret: str, *, now: Clock = utcnow, commit: bool = True) -> bool:
    """Use the secret up if it is valid for this device. False means: do not authenticate.

    With ``commit=False`` the consumption rides on the caller's next commit (issuance commits it
    with the serial reservation, saving a disk sync); until then the row stays locked, so a
    concurrent request with the same secret waits and then finds it used.
    """
    result = _CONSUME.run(session, {"serial": serial, "digest": _hash(secret), "now": now()})
    if commit:
        session.commit()
    return result.rowcount == 1


def secret_is_valid(session: Session, serial: str, secret: str, *, now: Clock = utcnow) -> bool:
    """Check without consuming (to refuse a bad request before the secret is spent)."""
    return device_of_valid_secret(session, serial, secret, now=now) is not None


def device_of_valid_secret(session: Session, serial: str, secret: str, *, now: Clock = utcnow) -> Device | None:
    """``secret_is_valid``, returning the device (loaded into ``session``) instead of True."""
    parameters = {"serial": serial, "digest": _hash(secret), "now": now()}
    found = as_objects(session, Device, _DEVICE_OF_VALID_SECRET.run(session, parameters))
    return found[0] if found else None


def restore_secret(session: Session, serial: str, secret: str, *, commit: bool = True) -> None:
    """Give a consumed secret back when the CA failed to sign (the device did nothing wrong).

    With ``commit=False`` it rides on the caller's transaction (the enrollment pipeline's refusal)."""
    session.execute(_RESTORE, {"serial": serial, "digest": _hash(secret)})
    if commit:
        session.commit()


def withdraw_secrets(work: Work, *, entries: Sequence[tuple[Device, str | None]], reason: str) -> int:
    """Withdraw secrets, all in one transaction: for each (device, secret) that secret, or with
    ``None`` every unexpired secret of the device. They expire now.

    Returns how many were still unspent (those are what a leak exposed), and audits them as
    ``secret.withdrawn``. Spent ones expire too, so a secret given back after a signing failure
    (``restore_secret``) cannot come back to life after its withdrawal.
    """
    with work.transaction() as session:
        return sum(_withdraw(session, work, device, reason, secret) for device, secret in entries)


def _withdraw(session: Session, work: Work, device: Device, reason: str, secret: str | None) -> int:
    at = work.now()
    conditions = [_SECRETS.c.device_id == device.id, _SECRETS.c.expires_at > at]
    if secret is not None:
        conditions.append(_SECRETS.c.secret_hash == _hash(secret))
    withdraw = update(_SECRETS).values(expires_at=at).execution_options(synchronize_session=False)
    unspent = session.execute(withdraw.where(*conditions, _SECRETS.c.used_at.is_(None))).rowcount
    session.execute(withdraw.where(*conditions, _SECRETS.c.used_at.is_not(None)))
    if unspent:
        audit.record(
            session,
            "secret.withdrawn",
            actor=work.actor,
            subject=device.serial,
            now=work.now,
            details={"count": unspent, "reason": reason, "one": secret is not None},
        )
    return unspent
