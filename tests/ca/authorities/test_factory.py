"""The CA factory (ca/authorities/factory.py): a creation that fails anywhere before its commit,
for any reason (a lost database as much as a refusal), leaves no key in the token and no row in
the store; a constraint race becomes a ConflictError; concurrent creations of the same CA end
with one winner and one ConflictError, never an orphan key."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pkcs11 import Attribute, ObjectClass
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from ca.authorities.factory import KeyTransaction, create_ocsp_signer
from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.manufacturer import ManufacturerRequest, add_firmware_signer, init_manufacturer
from ca.authorities.rotation import rollover_root, rotate_issuing_ca
from ca.authorities.v2g import V2gRequest, init_v2g
from ca.errors import ConflictError
from ca.keys.pkcs11_token import Token
from ca.store.engine import Store
from ca.store.models import Authority, Certificate
from ca.work import Work
from ocsp.presign import Presigner

ORG = "Acme Charging"
LOST = OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
RACED = IntegrityError("INSERT INTO authorities", {}, Exception("duplicate key value violates unique constraint"))


def private_keys(token: Token) -> set[str]:
    with token.session() as session:
        return {key.label for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})}


@contextmanager
def failing_commit(session: Session, error: Exception, at: int = 1) -> Iterator[None]:
    """The session's ``at``-th commit from now fails with ``error``, as a lost database or a constraint would."""
    commits: list[int] = []

    def fail(_session: Session) -> None:
        commits.append(1)
        if len(commits) == at:
            raise error

    event.listen(session, "before_commit", fail)
    try:
        yield
    finally:
        event.remove(session, "before_commit", fail)


def counts(session: Session) -> tuple[int, int]:
    session.rollback()  # read what is committed
    found = (
        session.scalar(select(func.count()).select_from(Authority)) or 0,
        session.scalar(select(func.count()).select_from(Certificate).where(Certificate.status == "valid")) or 0,
    )
    session.rollback()  # and hold no lock (SQLite: every transaction is a write transaction)
    return found


def work(session: Session, token: Token) -> Work:
    return Work(session=session, actor="test", status=Presigner(token), token=token)


CA_FLOWS: dict[str, Callable[[Work], object]] = {
    "init": lambda w: init_hierarchy(w, request=HierarchyRequest(organization=ORG, environment="staging")),
    "v2g": lambda w: init_v2g(w, request=V2gRequest(organization=ORG, country="DE")),
    "v2g20": lambda w: init_v2g(w, request=V2gRequest(organization=ORG, iso="15118-20", sub_ca_1=False)),
    "manufacturer": lambda w: init_manufacturer(w, request=ManufacturerRequest(organization=ORG)),
    "rotate": lambda w: rotate_issuing_ca(w, environment="production"),
    "rollover": lambda w: rollover_root(w, environment="production"),
}


@pytest.mark.parametrize("flow", CA_FLOWS)
@pytest.mark.parametrize(("error", "raised"), [(LOST, OperationalError), (RACED, ConflictError)])
def test_a_database_failure_while_creating_cas_leaves_no_key_and_no_row(
    session: Session,
    token: Token,
    hierarchy: Hierarchy,
    flow: str,
    error: Exception,
    raised: type[Exception],
) -> None:
    keys, rows = private_keys(token), counts(session)
    with failing_commit(session, error), pytest.raises(raised):
        CA_FLOWS[flow](work(session, token))
    assert private_keys(token) == keys, "every key the creation generated is destroyed"
    assert counts(session) == rows
    CA_FLOWS[flow](work(session, token))  # nothing half-made stands in the way of doing it again


LEAF_FLOWS: dict[str, Callable[[Work, Hierarchy], object]] = {
    "ocsp-signer": lambda w, h: create_ocsp_signer(w, authority=h.issuing),
    "firmware-signer": lambda w, h: add_firmware_signer(w, name="fw-stable", environment="staging"),
}


@pytest.mark.parametrize("flow", LEAF_FLOWS)
@pytest.mark.parametrize("at", [1, 2], ids=["reservation", "record"])
def test_a_database_failure_while_issuing_a_token_held_leaf_leaves_no_key(
    session: Session, token: Token, hierarchy: Hierarchy, flow: str, at: int
) -> None:
    """Before the factory, these paths destroyed the key only on a ChargepkiError."""
    init_manufacturer(work(session, token), request=ManufacturerRequest(organization=ORG, environment="staging"))
    keys, rows = private_keys(token), counts(session)
    with failing_commit(session, LOST, at=at), pytest.raises(OperationalError):
        LEAF_FLOWS[flow](work(session, token), hierarchy)
    assert private_keys(token) == keys
    assert counts(session) == rows, "no certificate recorded (a reservation stays pending, never valid)"
    LEAF_FLOWS[flow](work(session, token), hierarchy)
    assert len(private_keys(token)) == len(keys) + 1


def test_link_certificates_name_the_token_key_they_certify(
    session: Session, token: Token, hierarchy: Hierarchy
) -> None:
    rollover = rollover_root(work(session, token), environment="production")
    assert rollover.new_with_old.key_label == rollover.new_root.key_label
    assert rollover.old_with_new.key_label == hierarchy.root.key_label


def _race(store: Store, token: Token, flow: Callable[[Work], object], postgres: bool) -> list[Any]:
    """Run ``flow`` in two threads, each with its own session, started together.

    On PostgreSQL both get past their checks before either generates a key, so the database's
    unique constraint decides; SQLite serialises writers, so the second sees the first's CA.
    """
    start, keys_made, local = threading.Barrier(2), threading.Barrier(2, timeout=30), threading.local()
    original = KeyTransaction.generate

    def generate(self: KeyTransaction, *args: Any) -> Any:
        if postgres and not getattr(local, "met", False):
            local.met = True
            keys_made.wait()
        return original(self, *args)

    results: list[Any] = [None, None]

    def run(index: int) -> None:
        with store.session() as session:
            start.wait()
            try:
                results[index] = flow(work(session, token))
            except Exception as exc:
                results[index] = exc

    KeyTransaction.generate = generate  # type: ignore[method-assign]
    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        KeyTransaction.generate = original  # type: ignore[method-assign]
    return results


RACES: dict[str, Callable[[Work], object]] = {
    "init": CA_FLOWS["init"],
    "rotate": lambda w: rotate_issuing_ca(w, ca_name="production-issuing-1"),  # `ca rotate --ca` twice at once
}


@pytest.mark.parametrize(("flow", "new_keys"), [("init", 4), ("rotate", 2)])
def test_concurrent_creations_of_the_same_ca_end_in_one_conflict_and_no_orphan_key(
    store: Store, session: Session, token: Token, hierarchy: Hierarchy, db_url: str, flow: str, new_keys: int
) -> None:
    keys, (authorities, _) = private_keys(token), counts(session)
    results = _race(store, token, RACES[flow], db_url.startswith("postgresql"))
    errors = [result for result in results if isinstance(result, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], ConflictError), results
    if db_url.startswith("postgresql"):  # both got past their checks: the unique constraint decided
        assert "concurrently" in str(errors[0]) or "raced with another change" in str(errors[0])
    assert len(private_keys(token)) == len(keys) + new_keys, "the loser's keys are gone"
    assert counts(session)[0] == authorities + new_keys // 2
