"""The chain a leaf is handed with (OCPP's ``certificateChain``): the CAs above it, the root left out."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import event
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.status.certificates import intermediates_pem
from ca.store.engine import Store


def test_the_intermediates_are_the_issuing_ca_without_the_root(session: Session, hierarchy: Hierarchy) -> None:
    pem = intermediates_pem(session, hierarchy.issuing)
    chain = x509.load_pem_x509_certificates(pem.encode())
    assert [c.public_bytes(Encoding.DER) for c in chain] == [hierarchy.issuing.certificate_der]


def test_a_cas_chain_is_read_from_the_store_once_per_process(
    store: Store, session: Session, hierarchy: Hierarchy
) -> None:
    """A CA's chain never changes (its certificate and parent are fixed, no CA row is deleted): after
    the first answer, the same CA's chain costs no statement."""
    first = intermediates_pem(session, hierarchy.issuing)
    sent: list[str] = []
    record = lambda _c, _k, statement, *_a: sent.append(statement)  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", record)
    try:
        session.expire_all()  # the root is no longer loaded: reading the chain again would need it
        session.refresh(hierarchy.issuing)
        sent.clear()
        assert intermediates_pem(session, hierarchy.issuing) == first
    finally:
        event.remove(store.engine, "before_cursor_execute", record)
    assert sent == []
