"""Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select

from ca.models import AuditHead, Base
from ca.store import Store


def test_upgrade_from_empty_matches_the_models(db_url: str) -> None:
    store = Store(db_url)
    assert store.current_revision() is None
    store.ensure_schema()
    assert store.current_revision() == store.head_revision()
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    with store.session() as session:
        head = session.execute(select(AuditHead.seq, AuditHead.hash)).one()
        assert (head.seq, head.hash) == (0, "0" * 64)
    store.dispose()


def test_hot_lookups_are_indexed(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    inspector = inspect(store.engine)
    indexed = {tuple(index["column_names"]) for index in inspector.get_indexes("certificates")}
    unique = {tuple(c["column_names"]) for c in inspector.get_unique_constraints("certificates")}
    assert ("authority_id", "serial") in indexed  # OCSP: issuer + serial
    assert ("status", "not_after") in indexed and ("not_after",) in indexed  # expiry listings
    assert ("serial",) in unique and ("fingerprint_sha256",) in unique
    assert ("public_key_sha256",) in indexed  # one key, one identity
    ocsp_unique = {tuple(c["column_names"]) for c in inspector.get_unique_constraints("ocsp_responses")}
    assert ("authority_id", "serial", "hash_algorithm") in ocsp_unique  # the responder's one lookup
    assert ("next_update",) in {tuple(i["column_names"]) for i in inspector.get_indexes("ocsp_responses")}
    store.dispose()


def test_upgrade_is_idempotent(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    store.upgrade()
    store.ensure_schema()
    assert store.current_revision() == store.head_revision()
    store.dispose()
