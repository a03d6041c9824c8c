"""Revocation with RFC 5280 reasons; holds can be released, permanent revocations cannot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from ca import audit
from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.errors import ConflictError, InputError, NotFoundError
from ca.issuance.csr import read_csr
from ca.issuance.flow import issue, request_from_csr
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.status.revocation import REASONS, parse_reason, revoke, unhold
from ca.store.models import Certificate
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr


@pytest.fixture
def charger(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner) -> Certificate:
    issuer = issuer_for(hierarchy.issuing, token)
    return issue(
        Work(session, "test", status=status),
        issuer=issuer,
        request=request_from_csr(get_profile("charger"), read_csr(make_csr()), issuer),
    )


def _stored(session: Session, certificate: Certificate) -> tuple[object, ...]:
    """The revocation columns as the store holds them (read past the session's loaded objects)."""
    rows = Certificate.__table__.c
    columns = (rows.status, rows.revocation_reason, rows.revoked_at, rows.invalidity_date, rows.revoke_after)
    return tuple(session.execute(select(*columns).where(rows.id == certificate.id)).one())


@pytest.mark.parametrize(
    "text, name",
    [
        ("keyCompromise", "keyCompromise"),
        ("key-compromise", "keyCompromise"),
        ("KEY_COMPROMISE", "keyCompromise"),
        ("cACompromise", "cACompromise"),
        ("certificate-hold", "certificateHold"),
        ("superseded", "superseded"),
    ],
)
def test_reason_names_follow_rfc_5280(text: str, name: str) -> None:
    assert parse_reason(text) == name


def test_remove_from_crl_is_not_a_revocation_reason() -> None:
    assert "removeFromCRL" not in REASONS
    with pytest.raises(InputError, match="unknown revocation reason"):
        parse_reason("removeFromCRL")


def test_revoke_records_reason_time_and_audit(session: Session, status: Presigner, charger: Certificate) -> None:
    when = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    compromised = when - timedelta(days=2)
    revoked = revoke(
        Work(session, "admin", now=lambda: when, status=status),
        serial=charger.serial,
        reason="keyCompromise",
        invalidity_date=compromised,
    )
    assert (revoked.status, revoked.revocation_reason, revoked.revoked_at) == (
        "revoked",
        "keyCompromise",
        when,
    )
    assert revoked.invalidity_date == compromised
    assert _stored(session, charger) == ("revoked", "keyCompromise", when, compromised, None)  # the row, not the object
    (event,) = audit.events(session, action="certificate.revoked")
    assert event.subject == charger.serial and '"reason":"keyCompromise"' in event.details
    assert audit.verify(session).ok


def test_revoking_twice_is_refused(session: Session, status: Presigner, charger: Certificate) -> None:
    revoke(Work(session, "admin", status=status), serial=charger.serial, reason="superseded")
    with pytest.raises(ConflictError, match="already revoked"):
        revoke(Work(session, "admin", status=status), serial=charger.serial, reason="keyCompromise")


def test_a_hold_can_be_released(session: Session, status: Presigner, charger: Certificate) -> None:
    revoke(Work(session, "admin", status=status), serial=charger.serial, reason="certificateHold")
    released = unhold(Work(session, "admin", status=status), serial=charger.serial)
    assert released.status == "valid" and released.revocation_reason is None and released.revoked_at is None


def test_a_hold_can_become_permanent_keeping_its_time(
    session: Session, status: Presigner, charger: Certificate
) -> None:
    held_at = datetime(2026, 12, 1, tzinfo=UTC)
    revoke(Work(session, "admin", now=lambda: held_at, status=status), serial=charger.serial, reason="certificateHold")
    final = revoke(Work(session, "admin", status=status), serial=charger.serial, reason="keyCompromise")
    assert final.revocation_reason == "keyCompromise" and final.revoked_at == held_at
    assert _stored(session, charger)[:3] == ("revoked", "keyCompromise", held_at)
    with pytest.raises(ConflictError, match="not on hold"):
        unhold(Work(session, "admin", status=status), serial=charger.serial)


def test_unknown_serial_is_refused(session: Session, status: Presigner, hierarchy: Hierarchy) -> None:
    with pytest.raises(NotFoundError, match="no certificate with serial DEADBEEF"):
        revoke(Work(session, "admin", status=status), serial="deadbeef", reason="superseded")


def test_roots_are_not_revoked(session: Session, status: Presigner, hierarchy: Hierarchy) -> None:
    with pytest.raises(ConflictError, match="root certificate cannot be revoked"):
        revoke(Work(session, "admin", status=status), serial=hierarchy.root.serial, reason="cACompromise")


def test_a_future_invalidity_date_is_refused(session: Session, status: Presigner, charger: Certificate) -> None:
    with pytest.raises(InputError, match="future"):
        revoke(
            Work(session, "admin", status=status),
            serial=charger.serial,
            reason="keyCompromise",
            invalidity_date=datetime.now(UTC) + timedelta(days=1),
        )
