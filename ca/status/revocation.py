"""Revoking certificates and releasing holds, with RFC 5280 reason codes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from ca import audit
from ca.clock import Clock, utcnow
from ca.errors import ConflictError, InputError, StoreError
from ca.issuance.profiles import PROFILES, ROOT_PROFILES
from ca.kinds import CertStatus
from ca.status.certificates import get_certificate
from ca.status.signal import StatusSigner
from ca.store.models import Authority, Certificate
from ca.store.prepared import Prepared
from ca.work import Work

# RFC 5280 §5.3.1 reason names (removeFromCRL exists only in delta CRLs, so it is not a reason to revoke).
REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
_BY_FOLDED = {re.sub(r"[-_]", "", name).lower(): name for name in REASONS}


def parse_reason(text: str) -> str:
    """``keyCompromise``, ``key-compromise`` and ``KEY_COMPROMISE`` all mean the RFC's keyCompromise."""
    name = _BY_FOLDED.get(re.sub(r"[-_\s]", "", text).lower())
    if name is None:
        raise InputError(f"unknown revocation reason {text!r} (RFC 5280 reasons: {', '.join(REASONS)})")
    return name


# Certificates a CA signs for its own operation: revoking the CA does not strand a device with them.
_OWN_PROFILES = ("ocsp-signer",)


@dataclass(frozen=True)
class CaImpact:
    """What revoking a CA's certificate stops: that CA and every CA under it never sign again."""

    authorities: list[Authority]  # the CA first, then its descendants
    stranded: int  # unexpired valid certificates they issued (their OCSP signers aside)


def ca_impact(session: Session, certificate: Certificate, now: datetime) -> CaImpact | None:
    """None unless ``certificate`` is the certificate of one of our CAs (not a root link certificate)."""
    if certificate.profile not in PROFILES or not PROFILES[certificate.profile].ca:
        return None  # a leaf (every revocation on the enrollment path): no query
    authority = session.scalar(
        select(Authority).where(Authority.serial == certificate.serial, Authority.parent_id == certificate.authority_id)
    )
    if authority is None:
        return None
    authorities = [authority]
    for parent in authorities:  # grows while it is walked: breadth first down the hierarchy
        authorities.extend(session.scalars(select(Authority).where(Authority.parent_id == parent.id)))
    stranded = session.scalar(
        select(func.count(Certificate.id)).where(
            Certificate.authority_id.in_([a.id for a in authorities]),
            Certificate.status == CertStatus.VALID,
            Certificate.not_after > now,
            Certificate.profile.not_in(_OWN_PROFILES),
        )
    )
    return CaImpact(authorities, int(stranded or 0))


def _stop_authorities(
    session: Session, impact: CaImpact, certificate: Certificate, reason: str, actor: str, now: Clock
) -> None:
    """A revoked CA certificate stops its CA, and the CAs under it, for good, in the revocation's
    transaction, after its audit entry took the audit head's lock: ``issuance.issue`` re-reads the
    status under that same lock, so issuances in flight commit first and later ones see ``revoked``."""
    for authority in impact.authorities:
        changed = session.execute(
            update(Authority)
            .where(Authority.id == authority.id, Authority.status.in_(("active", "retired")))
            .values(status="revoked")
            .execution_options(synchronize_session=False)
        )
        if changed.rowcount != 1:
            continue
        audit.record(
            session,
            "ca.revoked",
            actor=actor,
            subject=authority.name,
            now=now,
            details={
                "certificate": certificate.serial,
                "reason": reason,
                "under": None if authority is impact.authorities[0] else impact.authorities[0].name,
                "stranded": impact.stranded if authority is impact.authorities[0] else None,
            },
        )
    for authority in impact.authorities:
        session.refresh(authority, ["status"])


def revoke(work: Work, *, serial: str, reason: str, invalidity_date: datetime | None = None) -> Certificate:
    """Revoke (or put on hold) by serial and commit; a held certificate may later be revoked for good."""
    reason = parse_reason(reason)  # bad input is reported before any lookup
    with work.transaction() as session:
        certificate = get_certificate(session, serial)
        apply_revocation(
            session,
            certificate,
            reason,
            actor=work.actor,
            status=work.signer(),
            invalidity_date=invalidity_date,
            now=work.now,
        )
    return certificate


_CERTIFICATES = Certificate.__table__
# One UPDATE by primary key, prepared once: a re-enrollment revokes the certificate it supersedes, and
# the ORM's unit of work flushing the same five columns cost a tenth of the whole request.
_REVOKE = Prepared(
    update(_CERTIFICATES)
    .where(_CERTIFICATES.c.id == bindparam("row_id"))
    .values(
        status=bindparam("v_status", type_=_CERTIFICATES.c.status.type),
        revocation_reason=bindparam("v_revocation_reason", type_=_CERTIFICATES.c.revocation_reason.type),
        revoked_at=bindparam("v_revoked_at", type_=_CERTIFICATES.c.revoked_at.type),
        invalidity_date=bindparam("v_invalidity_date", type_=_CERTIFICATES.c.invalidity_date.type),
        revoke_after=bindparam("v_revoke_after", type_=_CERTIFICATES.c.revoke_after.type),
    )
)


def _write_revocation(session: Session, certificate: Certificate, values: dict[str, object]) -> None:
    """Write ``values`` to the certificate's row and set them on the loaded object as committed (a
    rollback expires them with the rest of the session's objects)."""
    changed = _REVOKE.run(session, {"row_id": certificate.id, **{f"v_{k}": v for k, v in values.items()}})
    if changed.rowcount != 1:
        raise StoreError(f"certificate {certificate.serial} is not in the store")
    for name, value in values.items():
        set_committed_value(certificate, name, value)


def apply_revocation(
    session: Session,
    certificate: Certificate,
    reason: str,
    *,
    actor: str,
    status: StatusSigner,
    invalidity_date: datetime | None = None,
    now: Clock = utcnow,
) -> None:
    """Revoke inside the caller's transaction (device disable, supersede), with its audit entry
    and a freshly signed OCSP response, so the status that commits is the status that is served."""
    reason = parse_reason(reason)
    if certificate.status in ("pending", "aborted"):
        raise ConflictError(f"certificate {certificate.serial} was never issued ({certificate.status})")
    if certificate.profile in ROOT_PROFILES:
        raise ConflictError("a root certificate cannot be revoked; retire the hierarchy instead")
    held = certificate.revocation_reason == "certificateHold"
    if certificate.status == CertStatus.REVOKED and (not held or reason == "certificateHold"):
        raise ConflictError(f"certificate {certificate.serial} is already revoked ({certificate.revocation_reason})")
    at = now()
    if invalidity_date is not None and invalidity_date > at:
        raise InputError("the invalidity date cannot be in the future")
    impact = ca_impact(session, certificate, at)
    if impact is not None and reason == "certificateHold":
        raise ConflictError(
            f"certificate {certificate.serial} is CA {impact.authorities[0].name}'s: a CA is revoked for good, not held"
        )
    previous = certificate.revocation_reason
    # A hold made permanent keeps its original revocation time (RFC 5280 §5.3.2 semantics).
    revoked = {
        "status": CertStatus.REVOKED,
        "revocation_reason": reason,
        "revoked_at": certificate.revoked_at if previous == "certificateHold" else at,
        "invalidity_date": invalidity_date,
        "revoke_after": None,
    }
    _write_revocation(session, certificate, revoked)
    audit.record(
        session,
        "certificate.revoked",
        actor=actor,
        subject=certificate.serial,
        now=now,
        details={
            "reason": reason,
            "previous": previous,
            "cn": certificate.common_name,
            "profile": certificate.profile,
            "invalidity_date": invalidity_date.isoformat() if invalidity_date else None,
        },
    )
    if impact is not None:
        _stop_authorities(session, impact, certificate, reason, actor, now)
    status.update(session, [certificate], at)


def revoke_due(work: Work) -> int:
    """Revoke certificates whose re-enrollment grace period has ended (reason superseded)."""
    with work.transaction() as session:
        due = session.scalars(
            select(Certificate).where(
                Certificate.revoke_after <= work.now(),  # NULL never compares true
                Certificate.status == CertStatus.VALID,
            )
        ).all()
        for certificate in due:
            apply_revocation(session, certificate, "superseded", actor=work.actor, status=work.signer(), now=work.now)
    return len(due)


def unhold(work: Work, *, serial: str) -> Certificate:
    """Release a ``certificateHold``: the certificate is good again."""
    with work.transaction() as session:
        certificate = get_certificate(session, serial)
        if certificate.status != CertStatus.REVOKED or certificate.revocation_reason != "certificateHold":
            raise ConflictError(f"certificate {certificate.serial} is not on hold")
        certificate.status = CertStatus.VALID
        certificate.revocation_reason = None
        certificate.revoked_at = None
        certificate.invalidity_date = None
        audit.record(
            session,
            "certificate.released",
            actor=work.actor,
            subject=certificate.serial,
            now=work.now,
            details={"cn": certificate.common_name},
        )
        work.signer().update(session, [certificate], work.now())
    return certificate
