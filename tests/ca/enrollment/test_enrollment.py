"""Enrollment in the core (no HTTP): the supersede grace period and its sweep."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.enrollment.pipeline import Credentials, EnrollmentSettings, enroll, reenroll
from ca.errors import AuthenticationError
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.registry.secrets import REPEAT_WINDOW, issue_secret
from ca.status.revocation import revoke_due
from ca.store.models import AuditEvent, Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr, make_key


def _der(pem: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def test_a_renewed_certificate_stays_valid_for_the_grace_period_then_is_swept(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    issuers = lambda authority: issuer_for(authority, token)  # noqa: E731
    device = add_device(Work(session, "test"), serial="CP-GRACE")
    secret = issue_secret(Work(session, "test"), device=device)
    key = make_key()
    first = enroll(
        Work(session, "test", status=status, issuers=issuers),
        authority=hierarchy.issuing,
        csr=_der(make_csr("CP-GRACE", key=key)),
        credentials=Credentials(username="CP-GRACE", password=secret),
    )
    settings = EnrollmentSettings(supersede_grace=timedelta(hours=1))
    renewed = reenroll(
        Work(session, "test", status=status, issuers=issuers),
        authority=hierarchy.issuing,
        csr=_der(make_csr("CP-GRACE", key=key)),
        credentials=Credentials(client_certificate=first.der),
        settings=settings,
    )
    assert first.status == "valid" and first.revoke_after is not None and renewed.status == "valid"
    assert revoke_due(Work(session, "system:supersede", status=status)) == 0, "still inside the grace period"
    later = datetime.now(UTC) + timedelta(hours=2)
    assert revoke_due(Work(session, "system:supersede", now=lambda: later, status=status)) == 1
    session.refresh(first)
    assert (first.status, first.revocation_reason) == ("revoked", "superseded")


def test_renewing_twice_does_not_extend_the_grace_of_the_first_certificate(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    issuers = lambda authority: issuer_for(authority, token)  # noqa: E731
    device = add_device(Work(session, "test"), serial="CP-TWICE")
    key = make_key()
    csr = _der(make_csr("CP-TWICE", key=key))
    first = enroll(
        Work(session, "test", status=status, issuers=issuers),
        authority=hierarchy.issuing,
        csr=csr,
        credentials=Credentials(username="CP-TWICE", password=issue_secret(Work(session, "test"), device=device)),
    )
    settings = EnrollmentSettings(supersede_grace=timedelta(hours=1))
    start = datetime.now(UTC)
    second = reenroll(
        Work(session, "test", status=status, issuers=issuers, now=lambda: start),
        authority=hierarchy.issuing,
        csr=csr,
        credentials=Credentials(client_certificate=first.der),
        settings=settings,
    )
    deadline = first.revoke_after
    reenroll(
        Work(session, "test", status=status, issuers=issuers, now=lambda: start + timedelta(minutes=30)),
        authority=hierarchy.issuing,
        csr=csr,
        credentials=Credentials(client_certificate=second.der),
        settings=settings,
    )
    session.refresh(first)
    assert first.revoke_after == deadline


def test_reenrollment_with_an_expired_certificate_is_refused_by_the_core(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """Behind a proxy TLS may not check expiry; the core does, whatever the transport."""
    issuers = lambda authority: issuer_for(authority, token)  # noqa: E731
    device = add_device(Work(session, "test"), serial="CP-OLD")
    key = make_key()
    csr = _der(make_csr("CP-OLD", key=key))
    first = enroll(
        Work(session, "test", status=status, issuers=issuers),
        authority=hierarchy.issuing,
        csr=csr,
        credentials=Credentials(username="CP-OLD", password=issue_secret(Work(session, "test"), device=device)),
    )
    later = first.not_after + timedelta(days=1)
    with pytest.raises(AuthenticationError, match="has expired"):
        reenroll(
            Work(session, "test", status=status, issuers=issuers, now=lambda: later),
            authority=hierarchy.issuing,
            csr=csr,
            credentials=Credentials(client_certificate=first.der),
        )


def test_the_pipeline_owns_its_transactions_and_refuses_a_session_with_pending_changes(
    session: Session, hierarchy: Hierarchy, token: Token
) -> None:
    """A refusal ends only the pipeline's own work: it never rolls back what a caller left pending."""
    device = add_device(Work(session, "test"), serial="CP-UOW")
    secret = issue_secret(Work(session, "test"), device=device)
    device.model = "changed, not committed"
    work = Work(session, "test", status=Presigner(token), issuers=lambda authority: issuer_for(authority, token))
    arguments = {
        "authority": hierarchy.issuing,
        "csr": _der(make_csr("CP-UOW")),
        "credentials": Credentials(username="CP-UOW", password=secret),
    }
    with pytest.raises(RuntimeError, match="owns its transactions"):
        enroll(work, **arguments)
    assert device.model == "changed, not committed", "the caller's change is still the caller's"
    session.rollback()
    assert enroll(work, **arguments).status == "valid"


# -- a retried request (its first attempt committed, its answer lost) -----------------------------
def test_a_repeated_request_gets_back_what_its_spent_secret_produced_and_nothing_more(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """A load balancer retries a request whose server died after the commit: the same secret with a
    CSR of the same key gets the certificate already issued (issued once, the repeat audited); another
    key, another CA or a repeat after ``REPEAT_WINDOW`` is refused as a used secret."""
    issuers = lambda authority: issuer_for(authority, token)  # noqa: E731
    device = add_device(Work(session, "test"), serial="CP-RETRY")
    secret = issue_secret(Work(session, "test"), device=device)
    key = make_key()

    def attempt(csr_key=key, *, authority=hierarchy.issuing, now=lambda: datetime.now(UTC)):  # type: ignore[no-untyped-def]
        return enroll(
            Work(session, "system:est", status=status, issuers=issuers, now=now),
            authority=authority,
            csr=_der(make_csr("CP-RETRY", key=csr_key)),
            credentials=Credentials(username="CP-RETRY", password=secret),
        )

    first = attempt()
    again = attempt()
    assert (again.id, again.serial, again.der) == (first.id, first.serial, first.der)
    assert session.scalar(select(func.count()).select_from(Certificate).where(Certificate.device_id == device.id)) == 1
    resent = session.scalars(select(AuditEvent).where(AuditEvent.action == "certificate.resent")).all()
    assert [(e.subject, json.loads(e.details)["serial"]) for e in resent] == [("CP-RETRY", first.serial)]
    with pytest.raises(AuthenticationError, match="used or expired secret"):
        attempt(make_key())  # another key: a used secret, not a repeat
    with pytest.raises(AuthenticationError, match="used or expired secret"):
        attempt(authority=hierarchy.root)  # another CA: what this one issued is no answer there
    later = datetime.now(UTC) + REPEAT_WINDOW + timedelta(minutes=1)
    with pytest.raises(AuthenticationError, match="used or expired secret"):
        attempt(now=lambda: later)
    assert session.scalar(select(func.count()).select_from(Certificate).where(Certificate.device_id == device.id)) == 1


def test_a_repeated_renewal_gets_back_its_successor_instead_of_stranding_the_charger(
    session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """The old certificate was superseded (revoked) in the transaction that issued its successor; a
    retry presenting it again with the new key's CSR gets that successor, once; a CSR of any other
    key, or the retry after ``REPEAT_WINDOW``, is refused as a revoked client certificate."""
    issuers = lambda authority: issuer_for(authority, token)  # noqa: E731
    device = add_device(Work(session, "test"), serial="CP-RENEW-RETRY")
    secret = issue_secret(Work(session, "test"), device=device)
    first = enroll(
        Work(session, "test", status=status, issuers=issuers),
        authority=hierarchy.issuing,
        csr=_der(make_csr("CP-RENEW-RETRY")),
        credentials=Credentials(username="CP-RENEW-RETRY", password=secret),
    )
    new_key = make_key()

    def renew(key=new_key, *, now=lambda: datetime.now(UTC)):  # type: ignore[no-untyped-def]
        return reenroll(
            Work(session, "system:est", status=status, issuers=issuers, now=now),
            authority=hierarchy.issuing,
            csr=_der(make_csr("CP-RENEW-RETRY", key=key)),
            credentials=Credentials(client_certificate=first.der),
        )

    renewed = renew()
    session.refresh(first)
    assert (first.status, first.revocation_reason) == ("revoked", "superseded")
    assert renew().serial == renewed.serial
    with pytest.raises(AuthenticationError, match="revoked"):
        renew(make_key())
    later = datetime.now(UTC) + REPEAT_WINDOW + timedelta(minutes=1)
    with pytest.raises(AuthenticationError, match="revoked"):
        renew(now=lambda: later)
    charger = select(func.count()).select_from(Certificate).where(Certificate.device_id == device.id)
    assert session.scalar(charger) == 2
