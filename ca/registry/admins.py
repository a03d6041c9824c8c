"""Who may read the fleet console: admins with an ``admin`` client certificate, or with a one-time login link.

A login link carries 256 random bits shown once (``chargepki console login-link``); the store keeps
only their SHA-256 (a slow hash buys nothing against a random token of that size), so a database
reader cannot log in. Spending a link is one conditional UPDATE (``used_at IS NULL``, not expired):
of any number of simultaneous requests with the same link exactly one sees ``rowcount == 1``, on
SQLite and PostgreSQL alike. The winner gets a session: another random id, sent as a cookie and
stored as its SHA-256, with a short lifetime. An admin certificate is checked against the store on
every request (profile ``admin``, good standing), so revoking it ends that admin's access at once.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from ca import audit
from ca.clock import Clock, utcnow
from ca.errors import InputError, PolicyError
from ca.status.certificates import standing
from ca.store.models import Certificate, ConsoleLink, ConsoleSession
from ca.work import Work

ADMIN_PROFILE = "admin"
MAX_LINK_TTL = timedelta(hours=1)
DEFAULT_LINK_TTL = timedelta(minutes=10)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def check_admin_name(name: str) -> str:
    """An admin's name as it appears in the audit log: letters, digits, ``.``, ``_``, ``@``, ``-``; 1–64."""
    if not _NAME.fullmatch(name):
        raise InputError(
            f"admin name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', starting with one of the first two"
        )
    return name


def admin_actor(name: str) -> str:
    """The audit log's actor for an admin's console activity."""
    return f"admin:{name}"


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def issue_login_link(work: Work, *, admin: str, ttl: timedelta = DEFAULT_LINK_TTL) -> str:
    """A new one-time login token for ``admin``; returned once, never stored or logged in clear."""
    if ttl <= timedelta(0) or ttl > MAX_LINK_TTL:
        raise PolicyError(f"a login link lives between 1 second and {int(MAX_LINK_TTL.total_seconds() // 60)} minutes")
    admin = check_admin_name(admin)
    token = secrets.token_urlsafe(32)
    with work.transaction() as session:
        at = work.now()
        session.add(ConsoleLink(token_hash=_digest(token), admin=admin, created_at=at, expires_at=at + ttl))
        audit.record(
            session,
            "console.link_issued",
            actor=work.actor,
            subject=admin,
            now=work.now,
            details={"expires_at": (at + ttl).isoformat()},
        )
    return token


_LINKS = ConsoleLink.__table__
_SPEND = (
    update(_LINKS)
    .where(
        _LINKS.c.token_hash == bindparam("digest"),
        _LINKS.c.used_at.is_(None),
        _LINKS.c.expires_at > bindparam("now", type_=_LINKS.c.expires_at.type),
    )
    .values(used_at=bindparam("now", type_=_LINKS.c.used_at.type))
)


@dataclass(frozen=True)
class OpenedSession:
    session_id: str  # the cookie's value: shown to the browser only
    admin: str
    expires_at: datetime


def spend_login_link(
    session: Session, token: str, *, lifetime: timedelta, address: str | None, now: Clock = utcnow
) -> OpenedSession | None:
    """Spend a login link and open a session, in one transaction (committed). None: no such usable link.

    The conditional UPDATE is the only check: a link already spent, expired or unknown changes no
    row, so a second use, however close in time to the first, finds nothing to spend.
    """
    at = now()
    try:
        if session.execute(_SPEND, {"digest": _digest(token), "now": at}).rowcount != 1:
            session.rollback()
            return None
        link = session.scalars(select(ConsoleLink).where(ConsoleLink.token_hash == _digest(token))).one()
        session_id = secrets.token_urlsafe(32)
        session.add(
            ConsoleSession(
                session_hash=_digest(session_id), admin=link.admin, link_id=link.id, created_at=at,
                expires_at=at + lifetime,
            )
        )  # fmt: skip
        audit.record(
            session,
            "console.login",
            actor=admin_actor(link.admin),
            subject=address or "?",
            now=lambda: at,
            details={"by": "login link", "link": link.id, "session_expires_at": (at + lifetime).isoformat()},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return OpenedSession(session_id, link.admin, at + lifetime)


_SESSION_ADMIN = select(ConsoleSession.admin).where(
    ConsoleSession.session_hash == bindparam("digest"),
    ConsoleSession.expires_at > bindparam("now", type_=ConsoleSession.expires_at.type),
)


def session_admin(session: Session, session_id: str, *, now: Clock = utcnow) -> str | None:
    """The admin of an unexpired console session, or None."""
    return session.execute(_SESSION_ADMIN, {"digest": _digest(session_id), "now": now()}).scalar_one_or_none()


def certificate_admin(session: Session, certificate_der: bytes, *, now: Clock = utcnow) -> str | None:
    """The admin a TLS client certificate names, when the store holds it as an ``admin`` certificate in
    good standing (not revoked, on hold, superseded or expired); None otherwise."""
    fingerprint = hashlib.sha256(certificate_der).hexdigest()
    stored = session.scalar(select(Certificate).where(Certificate.fingerprint_sha256 == fingerprint))
    if stored is None or stored.profile != ADMIN_PROFILE or stored.common_name is None:
        return None
    if standing(stored, now()).status != "good":
        return None
    return stored.common_name
