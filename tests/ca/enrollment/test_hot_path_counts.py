"""Regression guard of the hot paths: counted work, never time.

For one EST-style enrollment (``simpleenroll`` with a one-time secret), one re-enrollment
(``simplereenroll`` by the current certificate) and one OCSP pre-signing, on SQLite and on
PostgreSQL, with a real SoftHSM2 token, this counts what the benchmark only reports as time:

- SQL statements the application sends (``before_cursor_execute``), by kind;
- transactions begun, committed and rolled back (engine events): on PostgreSQL each is a round
  trip of its own (psycopg sends BEGIN/COMMIT separately), on SQLite each commit is an fsync;
  reads begun by ``begin_reads`` run in autocommit, reach no BEGIN or COMMIT, and count apart;
- the ORM's session transactions begun (``after_transaction_create``): each costs Python work
  (its state machine, begin and commit events, a connection checked out and in) even when it
  sends nothing, so an empty one is waste the engine events above cannot see;
- pool pre-pings (a ``SELECT 1`` round trip per checkout on PostgreSQL when enabled);
- signatures made in the token (a counting wrapper around ``Token.sign``), and how many of them
  the signing thread made with a write transaction open (every other writer waits for those);
- audit entries written.

The numbers are the design, written out below with the reason for each; a change that adds a
statement, a commit or a signature to the hot path fails here, on any machine, however loaded.
When a change removes work, lower the number (and say why in its comment).

The worker's caches are warm, as in a running EST worker: one enrollment of another device
first (the issuer binding, the presigner's signer/issuer-hash/validity caches, the pool).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import event, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, SessionTransaction

from ca.authorities.hierarchy import Hierarchy
from ca.authorities.issuers import issuer_for
from ca.enrollment.pipeline import Credentials, enroll, reenroll
from ca.keys.pkcs11_token import Token
from ca.registry.devices import add_device
from ca.registry.secrets import issue_secret
from ca.store.engine import AUTOCOMMIT_READ, Store
from ca.store.group_commit import GroupCommit
from ca.store.models import AuditEvent, Authority, Certificate, OcspResponse
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr, make_key


@dataclass
class Cost:
    """What one operation cost, counted."""

    statements: list[str] = field(default_factory=list)
    begins: int = 0
    reads: int = 0  # transactions begun for reads only, in autocommit: nothing reaches the database
    commits: int = 0
    rollbacks: int = 0
    pings: int = 0
    signatures: int = 0
    signatures_in_writes: int = 0  # made by a thread with a write transaction open: other writers waited
    audit_entries: int = 0
    sessions: int = 0  # the ORM's root session transactions begun, whether or not they reached the database
    writing: set[int] = field(default_factory=set)  # the threads with a write transaction open

    def kinds(self) -> Counter[str]:
        return Counter(statement.split(None, 1)[0].upper() for statement in self.statements)

    @property
    def round_trips(self) -> int:
        """Calls that cross to the database server (PostgreSQL) or into SQLite's locking (SQLite)."""
        return len(self.statements) + self.begins + self.commits + self.rollbacks + self.pings

    def summary(self) -> str:
        return (
            f"statements={len(self.statements)} {dict(self.kinds())} reads={self.reads} begins={self.begins} "
            f"commits={self.commits} "
            f"rollbacks={self.rollbacks} pings={self.pings} signatures={self.signatures} "
            f"(in writes {self.signatures_in_writes}) audit={self.audit_entries} sessions={self.sessions}"
        )


@contextmanager
def counted(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cost]:
    work = Cost()
    engine: Engine = store.engine

    postgres = not store.is_sqlite

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        work.statements.append(statement.strip())
        if statement.strip() == "BEGIN IMMEDIATE":  # SQLite: the writer lock is taken here
            work.writing.add(threading.get_ident())

    # Reads begun by ``begin_reads`` run in autocommit: SQLAlchemy begins and ends a transaction for
    # them, but no BEGIN, COMMIT or ROLLBACK reaches the database. Counted apart, as ``reads``.
    def reads(conn: Any) -> bool:
        return bool(conn.get_execution_options().get(AUTOCOMMIT_READ))

    def on_begin(conn: Any) -> None:
        if reads(conn):
            work.reads += 1
            return
        work.begins += 1
        if postgres:  # SQLite: at BEGIN IMMEDIATE, above
            work.writing.add(threading.get_ident())

    def on_commit(conn: Any) -> None:
        if not reads(conn):
            work.commits += 1
            work.writing.discard(threading.get_ident())

    def on_rollback(conn: Any) -> None:
        if not reads(conn):
            work.rollbacks += 1
            work.writing.discard(threading.get_ident())

    def on_session_transaction(_session: Session, transaction: SessionTransaction) -> None:
        if transaction.parent is None:
            work.sessions += 1

    real_ping = engine.dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        work.pings += 1
        return real_ping(dbapi_connection)

    real_sign = Token.sign

    def sign(self: Token, *args: Any, **kwargs: Any) -> bytes:
        work.signatures += 1
        work.signatures_in_writes += threading.get_ident() in work.writing
        return real_sign(self, *args, **kwargs)

    with store.session() as probe:
        audit_before = probe.scalar(select(func.count()).select_from(AuditEvent))
    listeners = [
        ("before_cursor_execute", on_statement),
        ("begin", on_begin),
        ("commit", on_commit),
        ("rollback", on_rollback),
    ]
    for name, listener in listeners:
        event.listen(engine, name, listener)
    event.listen(Session, "after_transaction_create", on_session_transaction)
    monkeypatch.setattr(engine.dialect, "do_ping", ping)
    monkeypatch.setattr(Token, "sign", sign)
    try:
        yield work
    finally:
        for name, listener in listeners:
            event.remove(engine, name, listener)
        event.remove(Session, "after_transaction_create", on_session_transaction)
        monkeypatch.undo()
    with store.session() as probe:
        work.audit_entries = probe.scalar(select(func.count()).select_from(AuditEvent)) - audit_before


def _der(pem_csr: bytes) -> bytes:
    return x509.load_pem_x509_csr(pem_csr).public_bytes(serialization.Encoding.DER)


@dataclass
class Worker:
    """An EST worker's long-lived state: the issuer cache, the presigner, the CA it serves (detached)."""

    store: Store
    token: Token
    authority: Authority
    status: Presigner
    issuers: dict[int, Any] = field(default_factory=dict)
    commits: GroupCommit | None = None

    def issuer(self, authority: Authority) -> Any:
        if authority.id not in self.issuers:
            self.issuers[authority.id] = issuer_for(authority, self.token)
        return self.issuers[authority.id]


@pytest.fixture
def worker(store: Store, hierarchy: Hierarchy, token: Token) -> Worker:
    with store.session() as session:
        authority = session.get(Authority, hierarchy.issuing.id)
        assert authority is not None
        session.expunge(authority)  # as web/est._authority keeps it
    worker = Worker(store, token, authority, Presigner(token))
    _first_enrollment(worker, "CP-WARM-1")  # warm caches, as in a worker that has served a request
    return worker


def _secret(store: Store, serial: str) -> str:
    with store.session() as session:
        work = Work(session, "test")
        return issue_secret(work, device=add_device(work, serial=serial))


def _first_enrollment(worker: Worker, serial: str, secret: str | None = None) -> Certificate:
    secret = secret or _secret(worker.store, serial)
    with worker.store.session() as session:
        return enroll(
            Work(session, "system:est", status=worker.status, issuers=worker.issuer, commits=worker.commits),
            authority=worker.authority,
            csr=_der(make_csr(serial)),
            credentials=Credentials(username=serial, password=secret, address="192.0.2.7"),
        )


def _reenrollment(worker: Worker, current: bytes, serial: str) -> Certificate:
    with worker.store.session() as session:
        return reenroll(
            Work(session, "system:est", status=worker.status, issuers=worker.issuer, commits=worker.commits),
            authority=worker.authority,
            csr=_der(make_csr(serial, key=make_key())),
            credentials=Credentials(client_certificate=current, address="192.0.2.7"),
        )


def _is_postgres(store: Store) -> bool:
    return not store.is_sqlite


def test_one_enrollment_costs_what_it_was_designed_to(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = _secret(worker.store, "CP-COUNT-1")
    with counted(worker.store, monkeypatch) as work:
        row = _first_enrollment(worker, "CP-COUNT-1", secret)
    assert row.status == "valid"
    _check_enrollment(work, _is_postgres(worker.store), renewal=False)


def test_a_lone_group_committed_enrollment_costs_the_same(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a worker's group commit, alone: the same statements and signatures, the same two write
    transactions, and the checks read before either (on SQLite: without the writer lock)."""
    worker.commits = GroupCommit(worker.store.session)
    secret = _secret(worker.store, "CP-COUNT-4")
    with counted(worker.store, monkeypatch) as work:
        row = _first_enrollment(worker, "CP-COUNT-4", secret)
    assert row.status == "valid"
    postgres = _is_postgres(worker.store)
    kinds = work.kinds()
    write_transactions = kinds.pop("BEGIN", 0)
    assert dict(kinds) == _expected(ENROLLMENT, postgres, notifies=1, audits=1, claims=1), work.summary()
    assert worker.commits.stats.transactions == 2 and worker.commits.stats.largest == 1
    # Two write transactions, and the checks read before them (autocommit: no BEGIN or COMMIT reaches the
    # database); the response signed ahead reads nothing (its signer is the worker's last one). No pre-ping,
    # no rollback.
    assert (work.reads, work.begins, work.commits, work.rollbacks, work.pings) == (1, 2, 2, 0, 0), work.summary()
    assert work.signatures_in_writes == 0, work.summary()
    assert work.signatures == 2 and work.audit_entries == 1, work.summary()
    # Session transactions: the request's reads, the reservation's and the record's (each in the group
    # commit's session), and the request's session taking the recorded row back. Nothing in between
    # begins one (an empty one between the two writes cost about 50 Python calls).
    assert work.sessions == 4, work.summary()
    if not postgres:
        assert write_transactions == 2
        first_write = work.statements.index("BEGIN IMMEDIATE")
        assert [s.split(None, 2)[1] for s in work.statements[:first_write]] == [
            "auth_failures.kind,",
            "devices.id,",
        ], work.statements[:first_write]


def test_concurrent_enrollments_share_their_write_transactions(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight enrollments arriving while a transaction is being written: their eight reservations
    commit together, and so do their eight records: two commits where alone they cost sixteen,
    the same signatures per certificate, and the statements of each alone but those the shared
    record needs once: the audit head's lock and the change counter (and NOTIFY)."""
    commits = worker.commits = GroupCommit(worker.store.session)
    serials = [f"CP-GROUP-{n}" for n in range(8)]
    secrets = {serial: _secret(worker.store, serial) for serial in serials}
    holds: list[threading.Event] = []

    def hold() -> None:
        """Occupy the committer with a transaction that waits until the test lets it go."""
        started, release = threading.Event(), threading.Event()

        def held(_session: Any) -> None:
            started.set()
            assert release.wait(30)

        threading.Thread(target=commits.run, args=(held,)).start()
        assert started.wait(30)
        holds.append(release)

    def release_when_queued() -> None:
        while commits.waiting < len(serials):
            threading.Event().wait(0.001)
        holds[-1].set()

    signed = threading.Barrier(len(serials), action=hold)  # after every signature, before any record
    real_issuer = worker.issuer

    def issuer(authority: Authority) -> Any:
        bound = real_issuer(authority)

        class Waiting:
            def __getattr__(self, name: str) -> Any:
                return getattr(bound, name)

            def sign(self, builder: Any) -> Any:
                certificate = bound.sign(builder)
                signed.wait(30)
                return certificate

        return Waiting()

    monkeypatch.setattr(worker, "issuer", issuer)
    rows: dict[str, Certificate] = {}

    def enroll_one(serial: str) -> None:
        rows[serial] = _first_enrollment(worker, serial, secrets[serial])

    with counted(worker.store, monkeypatch) as work:
        hold()
        threads = [threading.Thread(target=enroll_one, args=(serial,)) for serial in serials]
        for thread in threads:
            thread.start()
        release_when_queued()  # the reservations, queued behind the first hold
        while len(holds) < 2:  # the barrier's action holds the committer again once all have signed
            threading.Event().wait(0.001)
        release_when_queued()  # the records
        for thread in threads:
            thread.join(60)
    assert sorted(rows) == serials and all(row.status == "valid" for row in rows.values())
    assert commits.stats.transactions == 4 and commits.stats.largest == 8, commits.stats
    # The two shared transactions, and on SQLite the two holds' (there the committer begins, taking the
    # writer lock, before it takes the queue); each request's checks read (once: its response signed ahead
    # reads nothing) and commit nothing. No signature while its thread had a write transaction open.
    holds_began = 0 if _is_postgres(worker.store) else 2
    assert work.commits == 2 + holds_began and work.reads == len(serials), work.summary()
    assert work.signatures_in_writes == 0, work.summary()
    assert work.signatures == 2 * len(serials) and work.audit_entries == len(serials)
    kinds = work.kinds()
    kinds.pop("BEGIN", None)
    postgres = _is_postgres(worker.store)
    per_certificate = _expected(ENROLLMENT, postgres, notifies=1, audits=1, claims=1)
    shared = {kind: count * len(serials) for kind, count in per_certificate.items()}
    once = len(serials) - 1  # statements the other seven would have repeated
    shared["UPDATE"] -= once  # the audit head's advance (its lock)
    shared["WITH" if postgres else "UPDATE"] -= once  # the change counter (PostgreSQL: with NOTIFY)
    assert dict(kinds) == shared, work.summary()


def test_one_reenrollment_costs_what_it_was_designed_to(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _first_enrollment(worker, "CP-COUNT-2")
    with counted(worker.store, monkeypatch) as work:
        row = _reenrollment(worker, first.der or b"", "CP-COUNT-2")
    assert row.status == "valid"
    with worker.store.session() as session:
        assert session.get(Certificate, first.id).status == "revoked"  # superseded in the same transaction
    _check_enrollment(work, _is_postgres(worker.store), renewal=True)


def test_one_ocsp_presign_costs_what_it_was_designed_to(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    row = _first_enrollment(worker, "CP-COUNT-3")
    with counted(worker.store, monkeypatch) as work, worker.store.session() as session:
        worker.status.update(session, [row], datetime.now(UTC))
        session.commit()
    with worker.store.session() as session:
        stored = session.scalars(select(OcspResponse).where(OcspResponse.serial == row.serial)).all()
    assert [response.hash_algorithm for response in stored] == ["sha1"]
    _check_presign(work, _is_postgres(worker.store))


# -- the design ----------------------------------------------------------------------------------
# One enrollment by a one-time secret (simpleenroll), statement by statement:
#   reads, outside any write transaction (SQLite: autocommit, no writer lock)
#     1 SELECT auth_failures                      the caller's lockout standing (device + address keys)
#     2 SELECT devices JOIN enrollment_secrets    the registered device, when the secret is a usable one
#                                                 of it (authentication and device in one statement)
#   transaction 1, the reservation (committed before the token signs: the serial is taken)
#     3 UPDATE enrollment_secrets                 the secret is spent (conditional: once)
#     4 INSERT key_owners ... ON CONFLICT         one key, one identity
#     5 INSERT certificates ... SELECT WHERE CA active   the pending row (PostgreSQL: 4 and 5 are one
#                                                 WITH … statement, the row inserted only if the claim won)
#   between them, no statement: the token signs the certificate, and then its OCSP response ahead of the
#   record (by the signer the worker's last lookup found, still within its validity), so no other writer
#   waits for either signature
#   transaction 2, the record (one commit: certificate, audit entry, OCSP response, supersede)
#     6 UPDATE audit_head RETURNING               the audit head's lock (queues writers); once per
#                                                 transaction: a later entry in it chains on the tail
#     7 INSERT audit_events                       certificate.issued
#     8 UPDATE audit_head                         its hash (PostgreSQL: 7 and 8 are one WITH … statement)
#     9 UPDATE certificates WHERE pending AND CA active   the DER
#    10 INSERT ocsp_responses SELECT … WHERE <its signer is the CA's current one> ON CONFLICT
#                                                 the response signed ahead, stored only if its signer is
#                                                 the current one in this transaction (the check and the
#                                                 write in one statement; when it is not, nothing is
#                                                 written and it is signed again here)
#       (no lookup of hash algorithms already stored for the serial: a new certificate has none)
#    11 UPDATE status_feed                        the change counter, once per transaction
#       (PostgreSQL: with NOTIFY, in one WITH … statement)
#    12 SELECT certificates                       older charger certificates to supersede, as rows (none)
#    13 UPDATE devices                            enrollment closed
# Token signatures: the certificate, and its OCSP response (sha1 CertID): 2, none in a write transaction.
# Audit entries: 1.
ENROLLMENT = {"SELECT": 3, "INSERT": 4, "UPDATE": 6}
# A re-enrollment by the current certificate (simplereenroll) differs: no secret (-1 UPDATE), the presented
# certificate by fingerprint with its CA's environment and its device instead of the device by its secret
# (one statement, as statement 2), and in transaction 2 the superseded
# certificate: found and loaded by statement 12 itself (no extra SELECT), revoked (+1 UPDATE), audited
# (+1 INSERT, +1 UPDATE: the head, already locked by the first entry, moves with the second's hash), its
# OCSP response re-signed (+2 SELECT, +1 INSERT; the change counter and NOTIFY once per transaction); no
# enrollment to close (-1 UPDATE).
# Token signatures: the certificate, the new and the superseded OCSP responses: 3, of which only the
# superseded one's in a write transaction (its revocation and new response commit together). Audit entries: 2.
REENROLLMENT = {"SELECT": 5, "INSERT": 6, "UPDATE": 6}  # 3 + the two of the OCSP re-signing
# One OCSP pre-signing (``Presigner.update`` of one certificate) in the caller's transaction: the signer,
# the stored hash algorithms, the upsert, the change counter (PostgreSQL: with NOTIFY). One signature.
PRESIGN = {"SELECT": 2, "INSERT": 1, "UPDATE": 1}


def _expected(design: dict[str, int], postgres: bool, notifies: int, audits: int, claims: int = 0) -> dict[str, int]:
    """The design above is SQLite's statements; PostgreSQL writes each audit entry and the head's new
    hash in one statement (``WITH … INSERT … UPDATE``, ca/audit/chain.py) instead of an INSERT and an
    UPDATE, raises the change counter and NOTIFYs in one (``WITH … UPDATE … SELECT pg_notify``,
    ca/status/signal.py) instead of the UPDATE alone, and claims the key and inserts the pending row
    in one (``WITH … INSERT … INSERT``, ca/issuance/flow.py) when the design has a reservation."""
    if not postgres:
        return dict(design)
    expected = {
        **design,
        "INSERT": design["INSERT"] - audits - 2 * claims,
        "UPDATE": design["UPDATE"] - audits - notifies,
    }
    expected["WITH"] = audits + notifies + claims
    return {kind: count for kind, count in expected.items() if count}


def _check_common(
    work: Cost,
    postgres: bool,
    design: dict[str, int],
    notifies: int,
    transactions: int,
    audits: int = 0,
    claims: int = 0,
) -> None:
    kinds = work.kinds()
    write_transactions = kinds.pop("BEGIN", 0)  # SQLite: BEGIN IMMEDIATE, sent by ca/store/engine.py
    expected = _expected(design, postgres, notifies, audits, claims)
    assert dict(kinds) == expected, work.summary()
    assert work.commits == transactions, work.summary()
    # No pool pre-ping: a dead connection is retried instead (ca/store/engine._Session).
    assert work.pings == 0, work.summary()
    if postgres:
        assert work.begins == transactions and work.rollbacks == 0, work.summary()
        assert work.round_trips == sum(expected.values()) + 2 * transactions
    else:
        assert write_transactions == transactions, work.summary()


def _check_enrollment(work: Cost, postgres: bool, *, renewal: bool) -> None:
    design = REENROLLMENT if renewal else ENROLLMENT
    audits = 2 if renewal else 1
    _check_common(work, postgres, design, notifies=1, transactions=2, audits=audits, claims=1)
    assert work.signatures == (3 if renewal else 2), work.summary()
    assert work.signatures_in_writes == (1 if renewal else 0), work.summary()
    assert work.audit_entries == (2 if renewal else 1), work.summary()
    # Session transactions, alone (no group commit): the checks with the reservation, the record, and the
    # recorded row taken back into the caller's session.
    assert work.sessions == 3, work.summary()
    # The lockout check reads before any write transaction: on SQLite it takes no writer lock.
    assert work.statements[0].startswith("SELECT auth_failures"), work.statements[:2]
    if not postgres:
        assert work.statements[1] == "BEGIN IMMEDIATE", work.statements[:2]


def _check_presign(work: Cost, postgres: bool) -> None:
    _check_common(work, postgres, PRESIGN, notifies=1, transactions=1, audits=0)
    assert work.signatures == 1, work.summary()
    assert work.audit_entries == 0, work.summary()
