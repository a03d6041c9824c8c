"""Alembic migrations, on SQLite and PostgreSQL: from empty to exactly the schema the models describe, and from
the first release with data in it to head without losing a row or breaking the audit chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from sqlalchemy import Connection, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from ca import audit
from ca.authorities import default_issuing_ca, issuer_for
from ca.devices import add_device
from ca.hierarchy import HierarchyRequest, init_hierarchy
from ca.issuance import IssueRequest, issue
from ca.models import AuditHead, Base, Certificate, OcspResponse
from ca.pkcs11_token import Token
from ca.profiles import get_profile
from ca.revocation import revoke
from ca.store import Store
from crl.publisher import publish_crl
from ocsp.presign import Presigner, refresh
from tests.helpers import make_key


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


# -- upgrading a populated first release ------------------------------------------------------
# The tables and columns of revision 0001, the first released schema, frozen here: the models move on.
SCHEMA_0001 = {
    "authorities": (
        "id", "name", "role", "environment", "organization", "country", "parent_id", "key_label", "key_type",
        "rsa_padding", "serial", "subject", "certificate_der", "key_sha1", "ocsp_url", "repository_url",
        "not_before", "not_after", "status", "created_at",
    ),
    "devices": ("id", "serial", "model", "environment", "enabled", "created_at"),
    "certificates": (
        "id", "serial", "authority_id", "profile", "status", "subject", "common_name", "not_before", "not_after",
        "der", "fingerprint_sha256", "public_key_sha256", "key_label", "device_id", "revoked_at",
        "revocation_reason", "invalidity_date", "created_at",
    ),
    "audit_events": ("seq", "at", "actor", "action", "subject", "details", "prev_hash", "hash"),
    "audit_head": ("id", "seq", "hash"),
}  # fmt: skip
ORDER_BY = {"audit_events": "seq"}


def _rows(connection: Connection, table: str) -> list[tuple]:
    columns = ", ".join(SCHEMA_0001[table])
    return [
        tuple(row)
        for row in connection.execute(text(f"SELECT {columns} FROM {table} ORDER BY {ORDER_BY.get(table, 'id')}"))
    ]


def _populate_first_release(target: Store, token: Token, tmp_path: Path) -> dict[str, list[tuple]]:
    """A 0001 database holding what an installation of that release held, written with plain SQL.

    The rows come from a real installation (hierarchy in the token, chargers with devices,
    revocations, their audit chain) built at head in a scratch SQLite file, copied column by
    column into 0001's tables, plus a pending and an aborted reservation written by hand.
    """
    scratch = Store(f"sqlite:///{tmp_path / 'scratch.db'}")
    scratch.upgrade()
    status = Presigner(token)
    with scratch.session() as session:
        hierarchy = init_hierarchy(
            session, token, HierarchyRequest(organization="Acme Charging", country="DE"), actor="cli:ops", status=status
        )
        issuer = issuer_for(hierarchy.issuing, token)
        for n in range(4):
            device = add_device(session, f"CP-{n:04d}", model="Wallbox 22", actor="cli:ops")
            row = issue(
                session,
                issuer,
                IssueRequest(get_profile("charger"), make_key().public_key(), device.serial, device_id=device.id),
                actor="cli:ops",
                status=status,
            )
            if n == 1:
                revoke(session, row.serial, "keyCompromise", actor="cli:ops", status=status)
            if n == 2:
                revoke(session, row.serial, "certificateHold", actor="cli:ops", status=status)
        session.execute(text("UPDATE devices SET enabled = 0 WHERE serial = 'CP-0003'"))
        session.commit()
    with scratch.engine.connect() as source:
        copied = {table: _rows(source, table) for table in SCHEMA_0001}
    scratch.dispose()
    now = datetime.now(UTC).replace(tzinfo=None)
    issuing_id = next(row[0] for row in copied["authorities"] if row[2] == "issuing")
    for serial, state in (("7E57AB1E", "pending"), ("7E57AB0E", "aborted")):
        copied["certificates"].append(
            (
                len(copied["certificates"]) + 1, serial, issuing_id, "charger", state,
                "C=DE,O=Acme Charging,CN=CP-9999", "CP-9999", f"{now:%Y-%m-%d %H:%M:%S.%f}",
                f"{now + timedelta(days=700):%Y-%m-%d %H:%M:%S.%f}", None, None, "ab" * 32, None, None, None, None,
                None, f"{now:%Y-%m-%d %H:%M:%S.%f}",
            )
        )  # fmt: skip

    target.upgrade("0001")
    with target.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_head"))  # 0001 seeds the genesis head; the copy replaces it
        for table in ("authorities", "devices", "certificates", "audit_events", "audit_head"):
            columns = SCHEMA_0001[table]
            statement = text(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(':' + c for c in columns)})"
            )
            for row in copied[table]:
                values = dict(zip(columns, row, strict=True))
                if table == "devices":
                    values["enabled"] = bool(values["enabled"])  # SQLite hands back 0/1
                connection.execute(statement, values)
        if not target.is_sqlite:  # explicit ids: move the sequences past them, as the release's own inserts would
            for table in ("authorities", "devices", "certificates"):
                connection.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
                )
    with target.engine.connect() as connection:
        return {table: _rows(connection, table) for table in SCHEMA_0001}


def test_upgrade_from_the_first_release_keeps_every_row(db_url: str, token: Token, tmp_path: Path) -> None:
    store = Store(db_url)
    before = _populate_first_release(store, token, tmp_path)
    assert store.current_revision() == "0001"
    # root, issuing CA, two OCSP signers, four chargers, two hand-written reservations
    assert len(before["certificates"]) == 10 and len(before["devices"]) == 4
    assert len(before["audit_events"]) > 10

    store.upgrade()

    assert store.current_revision() == store.head_revision()
    with store.engine.connect() as connection:
        assert {table: _rows(connection, table) for table in SCHEMA_0001} == before  # every value, byte for byte
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []  # indexes, constraints
        new_columns = "SELECT count(*) FROM devices WHERE enrollment_open IS NOT NULL"
        assert connection.execute(text(new_columns)).scalar_one() == len(before["devices"])
        assert connection.execute(text("SELECT crl_number FROM authorities")).scalars().all() == [0, 0]
        assert connection.execute(text("SELECT count(*) FROM status_feed")).scalar_one() == 1
    with store.session() as session:
        result = audit.verify(session)
        assert result.ok and result.entries == len(before["audit_events"]), result.problem
        if store.is_sqlite:  # the migration switched enforcement off for itself only
            assert session.execute(text("PRAGMA foreign_keys")).scalar_one() == 1
        session.commit()

    # The constraints hold on the migrated rows: no serial or fingerprint twice.
    charger = next(r for r in before["certificates"] if r[6] == "CP-0003")
    insert_copy = text(
        "INSERT INTO certificates (serial, authority_id, profile, status, subject, not_before, not_after, "
        "fingerprint_sha256, public_key_sha256, created_at) "
        "VALUES (:serial, :authority, 'charger', 'valid', 'CN=CP-0003', :at, :at, :fingerprint, 'x', :at)"
    )
    for serial, fingerprint in ((charger[1], None), ("0BADC0DE", charger[10])):
        with pytest.raises(IntegrityError), store.engine.begin() as connection:
            connection.execute(
                insert_copy,
                {"serial": serial, "authority": charger[2], "fingerprint": fingerprint, "at": "2026-01-01 00:00:00"},
            )

    # And the installation goes on: responses pre-signed for what it held, issue, revoke, CRL, audit.
    status = Presigner(token)
    now = datetime.now(UTC)
    with store.session() as session:
        answerable = session.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(
                Certificate.status.in_(("valid", "revoked")), Certificate.profile != "root", Certificate.not_after > now
            )
        )
        assert refresh(session, status, now) == answerable
        assert session.scalar(select(func.count()).select_from(OcspResponse)) == answerable
        issuing = default_issuing_ca(session, "production")
        issuer = issuer_for(issuing, token)
        row = issue(
            session,
            issuer,
            IssueRequest(get_profile("charger"), make_key().public_key(), "CP-0000", device_id=1),
            actor="test",
            status=status,
        )
        revoke(session, row.serial, "superseded", actor="test", status=status)
        published = publish_crl(session, issuer, issuing, tmp_path / "pki", now=datetime.now(UTC))
        crl = x509.load_der_x509_crl(published.path.read_bytes())
        assert {format(entry.serial_number, "X") for entry in crl} == {
            r[1] for r in before["certificates"] if r[4] == "revoked" and r[3] == "charger"
        } | {row.serial}
        result = audit.verify(session)
        assert result.ok and result.entries > len(before["audit_events"]), result.problem
        session.commit()
    store.dispose()
