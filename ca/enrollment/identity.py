"""The identity check a CSMS must make on every charger connection (OCPP security profile 3).

TLS only proves that the charger holds the key of *some* certificate from a trusted CA. The CSMS
must also bind that certificate to the station identity in the connection URL; CSMSs that skip
this let any charger of the fleet (or one cloned key) connect as any other. Here the certificate
is checked against this installation's own records: which CA signed it (and in which
environment), whether it is the charger certificate we issued for that very device, whether it
has been revoked or has expired, whether that CA and every CA above it still stand (a revoked
or retired CA vouches for nothing, whatever its signature says), and whether the device is still
enabled.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca.authorities.issuers import chain
from ca.clock import Clock, utcnow
from ca.errors import InputError
from ca.kinds import CaRole, CaStatus
from ca.status.certificates import standing
from ca.store.models import Authority, Certificate, Device

MAX_PEM_CHARS = 10000  # OCPP's chain limit; one leaf certificate is far below it


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str | None = None  # machine-readable, when refused
    detail: str = ""
    certificate: Certificate | None = None


def read_leaf(pem: str) -> x509.Certificate:
    """The first certificate of a PEM text (a chain may follow; only this installation's CAs are trusted)."""
    if len(pem) > MAX_PEM_CHARS:
        raise InputError(f"clientCertificate is longer than {MAX_PEM_CHARS} characters", code="bad_certificate")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode("utf-8"))
    except ValueError:
        raise InputError("clientCertificate is not a PEM certificate", code="bad_certificate") from None
    return certificates[0]


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(attribute.value) for attribute in name.get_attributes_for_oid(oid)]


def _issuing_authority(session: Session, leaf: x509.Certificate) -> Authority | None:
    """The CA of this installation whose key signed ``leaf`` (matched by name, proven by signature)."""
    issuer_der = leaf.issuer.public_bytes()
    # An imported OEM root is a trust anchor handed to stations, not a CA of this installation.
    for authority in session.scalars(select(Authority).where(Authority.role != CaRole.OEM_ROOT).order_by(Authority.id)):
        certificate = x509.load_der_x509_certificate(authority.certificate_der)
        if certificate.subject.public_bytes() != issuer_der:
            continue
        try:
            leaf.verify_directly_issued_by(certificate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        return authority
    return None


# A CA vouches for certificates under it while it signs, or as a trust anchor signed elsewhere.
_STANDING_CA = (CaStatus.ACTIVE, CaStatus.EXTERNAL)


def _fallen_authority(session: Session, authority: Authority) -> Authority | None:
    """The first CA from ``authority`` up to its root that is revoked or retired, if any: the status
    ``issuer_for`` refuses to sign with, read from the records along the whole chain."""
    for member in chain(session, authority):
        if member.status not in _STANDING_CA:
            return member
    return None


def check_identity(
    session: Session, charging_station_id: str, client_certificate: str, *, environment: str, now: Clock = utcnow
) -> Verdict:
    """Is ``client_certificate`` the current certificate of station ``charging_station_id`` in ``environment``?"""
    leaf = read_leaf(client_certificate)
    at = now()
    authority = _issuing_authority(session, leaf)
    if authority is None:
        return Verdict(False, "unknown_issuer", "the certificate was not issued by a CA of this installation")
    if authority.environment != environment:
        return Verdict(
            False,
            "other_environment",
            f"the certificate was issued by {authority.name} ({authority.environment}), not a {environment} CA",
        )
    fallen = _fallen_authority(session, authority)
    if fallen is not None:
        return Verdict(
            False,
            "ca_not_active",
            f"the certificate was issued under CA {fallen.name}, which is {fallen.status}",
        )
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    stored = session.scalar(select(Certificate).where(Certificate.fingerprint_sha256 == fingerprint))
    if stored is None:
        return Verdict(False, "unknown_certificate", "the certificate is not in this CA's records")
    if stored.profile != "charger":
        return Verdict(False, "not_a_charger_certificate", f"a {stored.profile} certificate", stored)
    state = standing(stored, at)
    if state.status == "revoked":
        when = state.revoked_at.isoformat() if state.revoked_at else "?"
        return Verdict(False, "revoked", f"revoked ({state.reason}) at {when}", stored)
    if state.status == "expired" or leaf.not_valid_after_utc <= at:
        return Verdict(False, "expired", f"expired at {stored.not_after.isoformat()}", stored)
    if leaf.not_valid_before_utc > at:
        return Verdict(False, "not_yet_valid", f"valid from {leaf.not_valid_before_utc.isoformat()}", stored)
    common_names = _attribute(leaf.subject, NameOID.COMMON_NAME)
    if common_names != [charging_station_id]:
        return Verdict(
            False,
            "cn_mismatch",
            f"the certificate's CN {common_names[0] if common_names else None!r} is not {charging_station_id!r}",
            stored,
        )
    organizations = _attribute(leaf.subject, NameOID.ORGANIZATION_NAME)
    if organizations != [authority.organization]:
        return Verdict(
            False,
            "wrong_organization",
            f"the certificate's O {organizations[0] if organizations else None!r} is not {authority.organization!r}",
            stored,
        )
    device = session.get(Device, stored.device_id) if stored.device_id is not None else None
    if device is None or device.serial != charging_station_id:
        return Verdict(False, "unknown_device", f"no registered device {charging_station_id!r} holds it", stored)
    if not device.enabled:
        return Verdict(False, "device_disabled", f"device {device.serial} is disabled", stored)
    if device.environment != environment:
        return Verdict(False, "other_environment", f"device {device.serial} is in {device.environment}", stored)
    return Verdict(True, None, "", stored)
