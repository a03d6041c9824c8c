"""Revocation with RFC 5280 reasons; holds can be released, permanent revocations cannot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
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
from ocsp.presign import Presigner
from tests.helpers import make_csr


@pytest.fixture
def charger(session: Session, hierarchy: Hierarchy, token: Token, status: Presigner) -> Certificate:
    issuer = issuer_for(hierarchy.issuing, token)
    return issue(
        session,
        issuer,
        request_from_csr(get_profile("charger"), read_csr(make_csr()), issuer),
        actor="test",
        status=status,
    )


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
        session,
        charger.serial,
        "keyCompromise",
        actor="admin",
        invalidity_date=compromised,
        now=lambda: when,
        status=status,
    )
    assert (revoked.status, revoked.revocation_reason, revoked.revoked_at) == (
        "revoked",
        "keyCompromise",
        when,
    )
    assert revoked.invalidity_date == compromised
    (event,) = audit.events(session, action="certificate.revoked")
    assert event.subject == charger.serial and '"reason":"keyCompromise"' in event.details
    assert audit.verify(session).ok


def test_revoking_twice_is_refused(session: Session, status: Presigner, charger: Certificate) -> None:
    revoke(session, charger.serial, "superseded", actor="admin", status=status)
    with pytest.raises(ConflictError, match="already revoked"):
        revoke(session, charger.serial, "keyCompromise", actor="admin", status=status)


def test_a_hold_can_be_released(session: Session, status: Presigner, charger: Certificate) -> None:
    revoke(session, charger.serial, "certificateHold", actor="admin", status=status)
    released = unhold(session, charger.serial, actor="admin", status=status)
    assert released.status == "valid" and released.revocation_reason is None and released.revoked_at is None


def test_a_hold_can_become_permanent_keeping_its_time(
    session: Session, status: Presigner, charger: Certificate
) -> None:
    held_at = datetime(2026, 12, 1, tzinfo=UTC)
    revoke(session, charger.serial, "certificateHold", actor="admin", now=lambda: held_at, status=status)
    final = revoke(session, charger.serial, "keyCompromise", actor="admin", status=status)
    assert final.revocation_reason == "keyCompromise" and final.revoked_at == held_at
    with pytest.raises(ConflictError, match="not on hold"):
        unhold(session, charger.serial, actor="admin", status=status)


def test_unknown_serial_is_refused(session: Session, status: Presigner, hierarchy: Hierarchy) -> None:
    with pytest.raises(NotFoundError, match="no certificate with serial DEADBEEF"):
        revoke(session, "deadbeef", "superseded", actor="admin", status=status)


def test_roots_are_not_revoked(session: Session, status: Presigner, hierarchy: Hierarchy) -> None:
    with pytest.raises(ConflictError, match="root certificate cannot be revoked"):
        revoke(session, hierarchy.root.serial, "cACompromise", actor="admin", status=status)


def test_a_future_invalidity_date_is_refused(session: Session, status: Presigner, charger: Certificate) -> None:
    with pytest.raises(InputError, match="future"):
        revoke(
            session,
            charger.serial,
            "keyCompromise",
            actor="admin",
            invalidity_date=datetime.now(UTC) + timedelta(days=1),
            status=status,
        )
