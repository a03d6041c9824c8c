"""Rate limiting of failed authentications, in one key space per authentication method.

One-time secrets are 192 random bits, so guessing one is hopeless; the limit is there to keep
a misbehaving or hostile client from hammering the service (every failure costs queries and an
audit entry) and to make a stolen serial list worthless for probing. Counts live in the
database (``auth_failures``) so that every gunicorn worker and every server process sees the
same numbers; a fixed window per key, restarted by the first failure after it ends.

- Key spaces never mix, so guesses made with one method never lock out another
  (``request_keys``): HTTP Basic failures count against the user name (``device``) and the
  client address (``address``); client certificate failures count against that certificate's
  SHA-256 (``cert``), which nobody can present without its private key. A caller is checked
  only against the keys of the methods it presents, so no amount of Basic guessing with a
  charger's serial or an RA's name delays a certificate-authenticated request, from any address.
- A key is locked out for ``lockout`` once it has ``max_failures`` failures within ``window``;
  the lockout ends by itself. While locked out, even a correct secret is refused (HTTP 429),
  otherwise the lockout would not stop guessing.
- Starting a lockout is audited (``auth.locked_out``: reason, device, address, until); the
  refusals during it are not, so an attacker cannot grow the audit log at line rate.
- A successful authentication clears only the caller's own counts (its user name, its
  certificate): never another device's, and never the address's (one valid secret must not
  buy unlimited guesses for others).
- Only presented credentials that fail count; a request without any (the first leg of HTTP
  authentication) does not.
- The CSMS API has key spaces of its own (``api_request_keys``): a wrong or revoked API token
  counts against the client address (``token``), never against a CSMS (a token names none, and
  keying a guess by the client it claims would let anyone lock that client out); a refused
  client certificate counts against its SHA-256 (``csmscert``). A token decides alone when one
  is presented, so a CSMS authenticating with its certificate from a guesser's address (a shared
  NAT) still gets in.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, delete, or_, select, update
from sqlalchemy import insert as sa_insert
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ca import audit
from ca.errors import PolicyError
from ca.issuance.names import check_charger_identity
from ca.store.engine import reading_outside_transaction
from ca.store.models import AuthFailure
from ca.store.prepared import Prepared

# ``device``: an HTTP Basic user name (the serial a caller claims); ``cert``: a client
# certificate's SHA-256; ``address``: a client address, for Basic failures only.
DEVICE, CERTIFICATE, ADDRESS = "device", "cert", "address"
# The CSMS API: ``token``: a client address that presented a wrong API token; ``csmscert``: a
# client certificate the API refused, by SHA-256.
API_TOKEN, API_CERTIFICATE = "token", "csmscert"
_OWN_KINDS = (DEVICE, CERTIFICATE, API_CERTIFICATE)  # a caller's own credentials, cleared by its success
Key = tuple[str, str]


@dataclass(frozen=True)
class AuthLimits:
    """``[est]`` auth_* settings; a ``max_failures_*`` of 0 switches that limit off."""

    max_failures_per_device: int = 5
    max_failures_per_address: int = 50
    window: timedelta = timedelta(minutes=15)
    lockout: timedelta = timedelta(minutes=15)

    def limit(self, kind: str) -> int:
        """The limit of a key space; 0 (off) for kinds this version no longer uses."""
        if kind in _OWN_KINDS:
            return self.max_failures_per_device
        return self.max_failures_per_address if kind in (ADDRESS, API_TOKEN) else 0


@dataclass(frozen=True)
class Standing:
    """What the store says about a caller before it authenticates."""

    retry_after: int | None  # seconds until the longest running lockout ends; None: not locked out
    has_own_failures: bool  # a success should clear the caller's user name or certificate count


def device_key(name: str | None) -> str | None:
    """The stored key of a device name: itself when it can be a serial, else a digest (bounded, no NULs)."""
    if not name:
        return None
    try:
        return check_charger_identity(name)
    except PolicyError:
        return "sha256:" + hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()


def request_keys(user_name: str | None, basic: bool, certificate_der: bytes | None, address: str | None) -> list[Key]:
    """The keys a request is checked and counted against: only those of the methods it presents.

    ``basic``: HTTP Basic credentials were presented (user name ``user_name``); the address is
    counted for those only, so guessing from an address never locks out the certificates used
    from it (a factory line behind one NAT, a CSMS).
    """
    keys: list[Key] = []
    if basic:
        name = device_key(user_name)
        if name:
            keys.append((DEVICE, name))
        if address:
            keys.append((ADDRESS, address[:128]))
    if certificate_der is not None:
        keys.append((CERTIFICATE, hashlib.sha256(certificate_der).hexdigest()))
    return keys


def api_request_keys(token: bool, certificate_der: bytes | None, address: str | None) -> list[Key]:
    """The CSMS API's keys of a request: its address when it presents an API token (which decides
    alone), else its client certificate's SHA-256; none without credentials."""
    if token:
        return [(API_TOKEN, address[:128])] if address else []
    if certificate_der is not None:
        return [(API_CERTIFICATE, hashlib.sha256(certificate_der).hexdigest())]
    return []


_TABLE = AuthFailure.__table__
_COLUMNS = _TABLE.c


def _match(keys: list[Key]):  # type: ignore[no-untyped-def]
    return or_(*(and_(_COLUMNS.kind == kind, _COLUMNS.key == key) for kind, key in keys))


def standing(session: Session, limits: AuthLimits, keys: list[Key], now: datetime) -> Standing:
    """Whether any of the caller's keys is locked out now (one indexed read of at most three rows).

    Read outside the write transaction (``reading_outside_transaction``): on SQLite it would otherwise
    begin the request's ``BEGIN IMMEDIATE`` transaction and hold the writer lock for every other
    writer. A lockout that starts a moment later is seen by the next request, as on PostgreSQL
    (READ COMMITTED): the failures themselves are counted in a write transaction (``record_failure``).
    """
    if not keys:
        return Standing(None, False)
    with reading_outside_transaction(session) as connection:
        rows = _standing_statement(len(keys)).run_on(connection, _standing_parameters(keys)).rows
    remaining = [
        (row.locked_until - now).total_seconds()
        for row in rows
        if row.locked_until is not None and row.locked_until > now and limits.limit(row.kind) > 0
    ]
    retry_after = math.ceil(max(remaining)) if remaining else None
    return Standing(retry_after, any(row.kind in _OWN_KINDS for row in rows))


# Prepared once per number of keys (one to three): building the OR of ANDs cost more than running it.
@functools.cache
def _standing_statement(count: int) -> Prepared:
    return Prepared(
        select(_COLUMNS.kind, _COLUMNS.locked_until).where(
            or_(
                *(
                    and_(_COLUMNS.kind == bindparam(f"kind{i}"), _COLUMNS.key == bindparam(f"key{i}"))
                    for i in range(count)
                )
            )
        )
    )


def _standing_parameters(keys: list[Key]) -> dict[str, str]:
    parameters = {}
    for i, (kind, key) in enumerate(keys):
        parameters[f"kind{i}"], parameters[f"key{i}"] = kind, key
    return parameters


_INSERT = {
    "sqlite": sqlite_insert(_TABLE).on_conflict_do_nothing(),
    "postgresql": postgresql_insert(_TABLE).on_conflict_do_nothing(),
}
_SET = (
    update(_TABLE)
    .where(_COLUMNS.kind == bindparam("k_kind"), _COLUMNS.key == bindparam("k_key"))
    .values(failures=bindparam("failures"), window_start=bindparam("window_start"), locked_until=bindparam("until"))
)


def record_failure(
    session: Session,
    limits: AuthLimits,
    keys: list[Key],
    *,
    actor: str,
    now: datetime,
    address: str | None = None,
    shown_device: str | None = None,
) -> list[str]:
    """Count one failed authentication in the caller's transaction; returns the kinds it locked out.

    The row is created if missing (INSERT … ON CONFLICT DO NOTHING) and then locked (``FOR UPDATE``
    on PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers), so concurrent failures in
    several processes all count.
    """
    locked = []
    dialect = session.get_bind().dialect.name
    # Rows whose window ended and whose lockout (if any) is over say nothing any more.
    session.execute(
        delete(_TABLE).where(
            _COLUMNS.window_start < now - limits.window,
            or_(_COLUMNS.locked_until.is_(None), _COLUMNS.locked_until < now),
        )
    )
    for kind, key in keys:
        limit = limits.limit(kind)
        if limit <= 0:
            continue
        _ensure_row(
            session, dialect, {"kind": kind, "key": key, "failures": 0, "window_start": now, "locked_until": None}
        )
        query = select(_COLUMNS.failures, _COLUMNS.window_start, _COLUMNS.locked_until).where(
            _COLUMNS.kind == kind, _COLUMNS.key == key
        )
        if dialect == "postgresql":
            query = query.with_for_update()
        row = session.execute(query).one()
        if row.locked_until is not None and row.locked_until > now:
            continue  # already locked out (this request passed the check just before the lockout began)
        if row.window_start + limits.window <= now or row.locked_until is not None:
            failures, window_start = 1, now  # a new window: the old one ended, or its lockout is over
        else:
            failures, window_start = row.failures + 1, row.window_start
        until = now + limits.lockout if failures >= limit else None
        session.execute(
            _SET, {"k_kind": kind, "k_key": key, "failures": failures, "window_start": window_start, "until": until}
        )
        if until is not None:
            locked.append(kind)
            audit.record(
                session,
                "auth.locked_out",
                actor=actor,
                subject=key if kind in (ADDRESS, API_TOKEN) else (shown_device or key),
                now=lambda: now,
                details={
                    "reason": f"{failures} failed authentications within {int(limits.window.total_seconds())} s",
                    "locked": kind,
                    "device": shown_device or next((k for kd, k in keys if kd == DEVICE), None),
                    "address": address,
                    "until": until.isoformat(),
                },
            )
    return locked


def _ensure_row(session: Session, dialect: str, values: dict[str, object]) -> None:
    insert = _INSERT.get(dialect)
    if insert is not None:
        session.execute(insert, values)
        return
    try:  # other databases: a savepoint keeps the caller's transaction usable when the row exists
        with session.begin_nested():
            session.execute(sa_insert(_TABLE), values)
    except IntegrityError:
        pass


def forget(session: Session, keys: list[Key]) -> None:
    """A successful authentication: clear the caller's own user name and certificate counts (nothing else)."""
    own = [(kind, key) for kind, key in keys if kind in _OWN_KINDS]
    if own:
        session.execute(delete(_TABLE).where(_match(own)))
