"""What one CSMS API signature (``POST /api/v1/sign``, a relayed CSR) costs the database: counted, never timed.

A relay is an enrollment plus the call's own audit entry. On a warm worker (its CA, issuer and sweep
done by a first call) the call writes in exactly two transactions: the serial's reservation, and the
certificate's record with the call's audit entry (a call's outcome is settled by then: it commits
with what it did). Each goes through the worker's group commit, so under load they share
transactions with concurrent requests' writes. Everything else the call reads
(credentials, lockout standing, the CSMS's certificate type, the issuing CA, the chain it answers
with) runs in autocommit: on SQLite no read takes the writer lock (a ``BEGIN IMMEDIATE``), which
every other writer, in every process, would wait for.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select

from ca.authorities.hierarchy import HierarchyRequest, init_hierarchy
from ca.config import Config, EstSettings, Pkcs11Settings, write_config
from ca.context import Pki
from ca.errors import StoreError
from ca.keys.pkcs11_token import Token
from ca.registry.csms import add_client, issue_token
from ca.registry.devices import add_device
from ca.store.engine import AUTOCOMMIT_READ
from ca.store.models import AuditEvent
from ca.work import Work
from ocsp.presign import Presigner
from tests.helpers import make_csr
from web.app import create_app
from web.runtime import runtime_of

# The design: the reservation, the record (with the call's audit entry). Audit entries: the
# certificate's issue and the call.
WRITE_TRANSACTIONS = 2
AUDIT_ENTRIES = 2
# Every statement of a warm relay: lockout, credentials, the issuing CA, the device; the reservation
# (on SQLite its BEGIN IMMEDIATE, the key claim, the row; on PostgreSQL one statement); the record
# (audit entry, certificate, OCSP response, change counter, superseding, closing enrollment, the
# call's entry). The answer's chain is read from what the signing loaded (no statement).
STATEMENTS = {"sqlite": 18, "postgresql": 13}


@dataclass
class Counted:
    writes: int = 0  # transactions begun that may write (SQLite: BEGIN IMMEDIATE, the writer lock)
    reads: int = 0  # transactions begun for reads only (autocommit: nothing reaches the database)
    commits: int = 0
    immediate: int = 0  # SQLite's BEGIN IMMEDIATE statements
    statements: list[str] = field(default_factory=list)


@pytest.fixture
def site(
    tmp_path: Path, migrated_db_url: str, token: Token, token_settings: tuple[Pkcs11Settings, str]
) -> Iterator[Any]:
    home = tmp_path / "home"
    write_config(Config(home=home, database_url=migrated_db_url, pkcs11=token_settings[0]))
    pki = Pki.open(home, {}, create=True)
    with pki.store.session() as session:
        request = HierarchyRequest(organization="Acme Charging", country="DE")
        init_hierarchy(Work(session, "test", status=Presigner(token), token=token), request=request)
        for n in range(12):
            add_device(Work(session, "test"), serial=f"CP-{n}")
        secret = issue_token(
            Work(session, "test"), client=add_client(Work(session, "test"), name="csms-1", environment="production")
        )
    app = create_app(pki, EstSettings(default_environment="production"))
    yield pki, app, {"Authorization": f"Bearer {secret}"}
    pki.close()


def _sign(app: Any, headers: dict[str, str], station: str) -> Any:
    body = {"chargingStationId": station, "csr": make_csr(station).decode()}
    return app.test_client().post("/api/v1/sign", json=body, headers=headers)


def _counting(pki: Pki) -> tuple[Counted, list[tuple[str, Any]]]:
    counted = Counted()

    def on_begin(conn: Any) -> None:
        if conn.get_execution_options().get(AUTOCOMMIT_READ):
            counted.reads += 1
        else:
            counted.writes += 1

    def on_commit(conn: Any) -> None:
        if not conn.get_execution_options().get(AUTOCOMMIT_READ):
            counted.commits += 1

    def on_statement(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        counted.statements.append(" ".join(statement.split()))
        if statement.strip() == "BEGIN IMMEDIATE":
            counted.immediate += 1

    listeners = [("begin", on_begin), ("commit", on_commit), ("before_cursor_execute", on_statement)]
    for name, listener in listeners:
        event.listen(pki.store.engine, name, listener)
    return counted, listeners


def _audit_entries(pki: Pki) -> int:
    with pki.store.session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_one_relayed_signature_writes_two_group_committed_transactions_and_reads_without_locks(
    site: Any, db_url: str
) -> None:
    pki, app, headers = site
    assert _sign(app, headers, "CP-0").status_code == 200  # warms the worker: CA, issuer, presigner, sweep
    group = runtime_of(app).commits().stats
    transactions_before, audit_before = group.transactions, _audit_entries(pki)
    counted, listeners = _counting(pki)
    try:
        response = _sign(app, headers, "CP-1")
    finally:
        for name, listener in listeners:
            event.remove(pki.store.engine, name, listener)
    assert response.status_code == 200, response.get_json()
    assert counted.writes == WRITE_TRANSACTIONS, counted
    assert counted.commits == WRITE_TRANSACTIONS, counted
    assert group.transactions - transactions_before == WRITE_TRANSACTIONS  # every write joined the group commit
    assert counted.reads >= 2, counted  # the credentials and the signing's checks, in autocommit
    if db_url.startswith("sqlite"):
        assert counted.immediate == WRITE_TRANSACTIONS, counted  # no read took the writer lock
    assert _audit_entries(pki) - audit_before == AUDIT_ENTRIES
    dialect = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    assert len(counted.statements) == STATEMENTS[dialect], "\n".join(counted.statements)


def test_concurrent_relays_are_all_audited_and_share_the_group_commit(site: Any) -> None:
    """Ten relays at once: each answered, each call audited with its certificate, every write of
    every call through the group commit (where writes that meet share a transaction)."""
    pki, app, headers = site
    assert _sign(app, headers, "CP-0").status_code == 200
    group = runtime_of(app).commits().stats
    units_before, audit_before = group.units, _audit_entries(pki)
    answers: dict[str, int] = {}
    start = threading.Barrier(10)

    def relay(station: str) -> None:
        start.wait()
        answers[station] = _sign(app, headers, station).status_code

    threads = [threading.Thread(target=relay, args=(f"CP-{n}",)) for n in range(2, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(answers.values()) == {200}, answers
    assert _audit_entries(pki) - audit_before == AUDIT_ENTRIES * 10
    assert group.units - units_before == WRITE_TRANSACTIONS * 10  # every write of every call went through it
    with pki.store.session() as session:
        calls = session.scalars(select(AuditEvent.subject).where(AuditEvent.action == "csms.api.sign")).all()
    assert sorted(calls) == sorted(["CP-0", *answers])


def test_the_call_is_audited_with_its_certificate_and_again_when_its_answer_then_fails(
    site: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The call's entry (200, the serial) commits in the certificate's own transaction, right after its
    issue entry. Should the answer still fail after that (the chain cannot be read), the call is
    audited once more, with the status the CSMS really received."""
    pki, app, headers = site
    assert _sign(app, headers, "CP-0").status_code == 200
    with pki.store.session() as session:
        last = session.scalars(select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(2)).all()
    call = json.loads(last[0].details)
    assert [entry.action for entry in last] == ["csms.api.sign", "certificate.issued"]
    assert call["status"] == 200 and call["serial"] == last[1].subject and call["auth"] == "token"

    def unreadable(*_args: Any) -> Any:
        raise StoreError("the store went away")

    monkeypatch.setattr("web.api._signed", unreadable)
    assert _sign(app, headers, "CP-1").status_code == 503
    with pki.store.session() as session:
        calls = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "csms.api.sign", AuditEvent.subject == "CP-1")
        ).all()
    assert [json.loads(entry.details)["status"] for entry in calls] == [200, 503]


def test_an_anonymous_call_is_counted_in_a_transaction_of_its_own(site: Any) -> None:
    """A refused caller's noise count locks its address's counter row and then, to summarise a finished
    minute, the audit head: in a shared transaction after another unit's head lock, two workers'
    batches could wait for each other on PostgreSQL. So it stays out of the group commit."""
    pki, app, headers = site
    assert _sign(app, headers, "CP-0").status_code == 200
    group = runtime_of(app).commits().stats
    units_before = group.units
    counted, listeners = _counting(pki)
    try:
        response = _sign(app, {"Authorization": "Bearer not-a-token"}, "CP-1")
    finally:
        for name, listener in listeners:
            event.remove(pki.store.engine, name, listener)
    assert response.status_code == 401, response.get_json()
    assert group.units == units_before
    # The failed authentication's count (its own transaction, as on the EST routes) and the noise count.
    assert counted.commits == 2, counted
