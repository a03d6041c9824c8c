"""Who may read the fleet console: one-time login links spent exactly once, sessions, admin certificates."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.errors import InputError, PolicyError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.registry.admins import certificate_admin, issue_login_link, session_admin, spend_login_link
from ca.status.revocation import revoke
from ca.store.engine import Store
from ca.store.models import AuditEvent, ConsoleLink, ConsoleSession
from ca.work import Work
from ocsp.presign import Presigner

HOUR = timedelta(hours=1)


def test_a_link_is_stored_as_a_hash_and_opens_one_session(session: Session) -> None:
    token = issue_login_link(Work(session, "cli:ops"), admin="alice")
    link = session.scalars(select(ConsoleLink)).one()
    assert token not in link.token_hash and link.used_at is None and link.admin == "alice"

    opened = spend_login_link(session, token, lifetime=HOUR, address="192.0.2.7")
    assert opened is not None and opened.admin == "alice"
    assert session_admin(session, opened.session_id) == "alice"
    stored = session.scalars(select(ConsoleSession)).one()
    assert opened.session_id not in stored.session_hash
    assert spend_login_link(session, token, lifetime=HOUR, address="192.0.2.7") is None  # spent
    actions = session.scalars(select(AuditEvent.action).order_by(AuditEvent.seq)).all()
    assert actions[-2:] == ["console.link_issued", "console.login"]


def test_expired_links_and_sessions_open_nothing(session: Session) -> None:
    issued_at = datetime(2026, 12, 4, 10, 0, tzinfo=UTC)
    token = issue_login_link(Work(session, "cli:ops", now=lambda: issued_at), admin="bob", ttl=timedelta(minutes=10))
    late = issued_at + timedelta(minutes=10)
    assert spend_login_link(session, token, lifetime=HOUR, address=None, now=lambda: late) is None
    token = issue_login_link(Work(session, "cli:ops", now=lambda: issued_at), admin="bob")
    opened = spend_login_link(session, token, lifetime=HOUR, address=None, now=lambda: issued_at)
    assert opened is not None
    assert session_admin(session, opened.session_id, now=lambda: issued_at + HOUR - timedelta(seconds=1)) == "bob"
    assert session_admin(session, opened.session_id, now=lambda: issued_at + HOUR) is None
    assert session_admin(session, "not-a-session") is None


@pytest.mark.parametrize(("name", "ttl"), [("", timedelta(minutes=1)), ("a b", timedelta(minutes=1)), ("x" * 65, HOUR)])
def test_admin_names_are_checked(session: Session, name: str, ttl: timedelta) -> None:
    with pytest.raises(InputError):
        issue_login_link(Work(session, "cli:ops"), admin=name, ttl=ttl)


def test_a_link_lives_at_most_an_hour(session: Session) -> None:
    with pytest.raises(PolicyError):
        issue_login_link(Work(session, "cli:ops"), admin="alice", ttl=HOUR + timedelta(seconds=1))


def test_simultaneous_uses_of_one_link_open_exactly_one_session(store: Store) -> None:
    """The only-once rule is the conditional UPDATE's: many requests at once, one winner (both databases)."""
    with store.session() as session:
        token = issue_login_link(Work(session, "cli:ops"), admin="alice")
    attempts = 8
    start = threading.Barrier(attempts, timeout=60)  # against a hang only

    def attempt(_: int) -> bool:
        with store.session() as session:
            start.wait()
            return spend_login_link(session, token, lifetime=HOUR, address="192.0.2.1") is not None

    with ThreadPoolExecutor(max_workers=attempts) as pool:
        outcomes = list(pool.map(attempt, range(attempts)))
    assert outcomes.count(True) == 1
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(ConsoleSession)) == 1
        assert session.scalar(select(func.count()).where(AuditEvent.action == "console.login")) == 1


def _certificate(session: Session, token: Token, hierarchy: Hierarchy, profile: str, name: str) -> tuple[str, bytes]:
    issuer = issuer_for(hierarchy.issuing, token)
    request = IssueRequest(get_profile(profile), ec.generate_private_key(ec.SECP256R1()).public_key(), name)
    row = issue(Work(session, "test", status=Presigner(token)), issuer=issuer, request=request)
    return row.serial, row.der or b""


def test_only_an_admin_certificate_in_good_standing_is_an_admin(
    session: Session, token: Token, hierarchy: Hierarchy, status: Presigner
) -> None:
    serial, der = _certificate(session, token, hierarchy, "admin", "alice")
    _, ra = _certificate(session, token, hierarchy, "ra", "alice")
    assert certificate_admin(session, der) == "alice"
    assert certificate_admin(session, ra) is None  # a client certificate of another kind
    assert certificate_admin(session, b"not a certificate") is None
    revoke(Work(session, "test", status=status), serial=serial, reason="cessationOfOperation")
    assert certificate_admin(session, der) is None  # revoked: refused on the next request
