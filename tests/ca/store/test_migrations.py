"""Alembic migrations, on SQLite and PostgreSQL: from empty to exactly the schema the models describe, and from
the first release with data in it to head without losing a row or breaking the audit chain."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from sqlalchemy import Connection, event, func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ca import audit
from ca.audit import checkpoints
from ca.authorities.hierarchy import Hierarchy, HierarchyRequest, init_hierarchy
from ca.authorities.issuers import default_issuing_ca, issuer_for
from ca.authorities.rotation import rotate_issuing_ca
from ca.enrollment.pipeline import Credentials, enroll, reenroll
from ca.errors import PolicyError
from ca.issuance.flow import IssueRequest, issue
from ca.issuance.profiles import get_profile
from ca.keys.pkcs11_token import Token
from ca.kinds import CaRole, CaStatus, CertStatus, JobState
from ca.registry.campaigns import start_campaign
from ca.registry.devices import add_device, get_device
from ca.registry.secrets import issue_secret
from ca.reports import campaigns, expiring, inventory
from ca.status.certificates import get_certificate, list_certificates
from ca.status.revocation import revoke, revoke_due
from ca.store.engine import CODE_HEAD, MIGRATIONS, Store, alembic_config
from ca.store.models import (
    AuditEvent,
    AuditHead,
    Authority,
    Base,
    Certificate,
    Device,
    EnrollmentSecret,
    OcspResponse,
)
from ca.work import Work
from crl.publisher import publish_all, publish_crl, revocation_summary, revoked_rows, status_counter
from ocsp.presign import Presigner, refresh
from ocsp.signer_service import OnDemandSigner
from ocsp.source import StoreSource
from tests.conftest import MigratedSchema, database
from tests.helpers import ROOT, make_csr, make_key


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


def _schema(store: Store) -> dict[str, object]:
    inspector = inspect(store.engine)
    return {
        table: (
            [(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)],
            sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)),
            sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
            sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in inspector.get_foreign_keys(table)),
            inspector.get_pk_constraint(table)["constrained_columns"],
        )
        for table in sorted(inspector.get_table_names())
    }


def test_the_test_fixtures_copied_schema_is_the_migrated_one(
    db_url: str, migrated_schema: MigratedSchema, tmp_path: Path
) -> None:
    """The ``store`` fixture copies a migrated schema instead of migrating each test's database;
    the copy (the second use, whatever ran first in this process) must be the migration's result."""
    kind = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    migrated = Store(db_url)
    migrated.upgrade()
    for attempt in ("first", "second"):
        with database(kind, tmp_path / attempt) as url:
            migrated_schema.apply(url)
            copied = Store(url)
            assert copied.current_revision() == copied.head_revision()
            assert _schema(copied) == _schema(migrated)
            with copied.engine.connect() as connection:
                assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            with copied.session() as session:
                assert session.execute(select(AuditHead.seq, AuditHead.hash)).one() == (0, "0" * 64)
            copied.dispose()
    migrated.dispose()


def test_hot_lookups_are_indexed(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade()
    inspector = inspect(store.engine)
    indexed = {tuple(index["column_names"]) for index in inspector.get_indexes("certificates")}
    unique = {tuple(c["column_names"]) for c in inspector.get_unique_constraints("certificates")}
    assert ("authority_id", "serial") in indexed  # OCSP: issuer + serial
    assert ("not_after",) in indexed  # expiry listings, and (status, not_after) ranges that the metrics'
    # expiry count reads alone (0012)
    assert ("status", "not_after", "authority_id", "profile", "revoke_after") in indexed
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


def test_the_code_knows_its_head_revision_as_alembic_does() -> None:
    """``ensure_schema`` compares with ``CODE_HEAD`` (the newest file's prefix) so that a current schema
    needs no Alembic; that holds only while every revision is its file's prefix, down from the one before."""
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(alembic_config())
    files = sorted(path.name for path in (MIGRATIONS / "versions").glob("*.py"))
    assert [script.revision for script in reversed(list(scripts.walk_revisions()))] == [name[:4] for name in files]
    for script in scripts.walk_revisions():
        assert script.down_revision == (f"{int(script.revision) - 1:04d}" if script.revision != "0001" else None)
    assert CODE_HEAD == scripts.get_current_head() == files[-1][:4]


def test_ensure_schema_upgrades_an_older_schema_and_leaves_a_current_one_alone(db_url: str) -> None:
    store = Store(db_url)
    store.upgrade("0016")
    store.ensure_schema()
    assert store.current_revision() == CODE_HEAD
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    store.ensure_schema()
    assert [s for s in statements if "alembic_version" in s] == ["SELECT version_num FROM alembic_version"]
    assert not [s for s in statements if not s.lstrip().upper().startswith(("SELECT", "PRAGMA", "BEGIN"))], (
        "nothing written"
    )
    store.dispose()


def test_a_process_whose_schema_is_current_never_imports_alembic(db_url: str) -> None:
    """Every CLI command and service process opens the store; Alembic costs each ~0.15 s of CPU."""
    store = Store(db_url)
    store.upgrade()
    store.dispose()
    program = (
        "import sys\n"
        "from ca.store.engine import Store\n"
        f"store = Store({db_url!r})\n"
        "store.ensure_schema()\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'alembic'))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("table", "column", "kind"),
    [
        ("authorities", "role", CaRole),
        ("authorities", "status", CaStatus),
        ("certificates", "status", CertStatus),
        ("csms_sign_jobs", "state", JobState),
    ],
)
def test_the_database_keeps_each_vocabulary_closed(db_url: str, table: str, column: str, kind: type) -> None:
    """Every value the code knows is accepted by the migrated schema's CHECK; anything else is refused."""
    store = Store(db_url)
    store.ensure_schema()
    with store.engine.connect() as connection:
        # The constraint's own condition, evaluated by the database for each value (no row needed).
        checks = [c for c in inspect(connection).get_check_constraints(table) if column in c["sqltext"]]
        assert len(checks) == 1, checks
        condition = checks[0]["sqltext"]
        for value in [*kind, "bogus", "VALID"]:
            accepted = connection.execute(
                text(f"SELECT 1 WHERE {condition.replace(column, '(CAST(:v AS VARCHAR(64)))', 1)}"), {"v": str(value)}
            ).first()
            assert (accepted is not None) == (value in set(kind)), (table, column, value)
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
            Work(session=session, actor="cli:ops", status=status, token=token),
            request=HierarchyRequest(organization="Acme Charging", country="DE"),
        )
        issuer = issuer_for(hierarchy.issuing, token)
        for n in range(4):
            device = add_device(Work(session, "cli:ops"), serial=f"CP-{n:04d}", model="Wallbox 22")
            row = issue(
                Work(session, "cli:ops", status=status),
                issuer=issuer,
                request=IssueRequest(
                    get_profile("charger"), make_key().public_key(), device.serial, device_id=device.id
                ),
            )
            if n == 1:
                revoke(Work(session, "cli:ops", status=status), serial=row.serial, reason="keyCompromise")
            if n == 2:
                revoke(Work(session, "cli:ops", status=status), serial=row.serial, reason="certificateHold")
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
        # Every device of the release already had its certificate: none is open for a first enrollment.
        assert connection.execute(text("SELECT count(*) FROM devices WHERE enrollment_open")).scalar_one() == 0
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
            Work(session, "test", status=status),
            issuer=issuer,
            request=IssueRequest(get_profile("charger"), make_key().public_key(), "CP-0000", device_id=1),
        )
        revoke(Work(session, "test", status=status), serial=row.serial, reason="superseded")
        published = publish_crl(session, issuer, issuing, tmp_path / "pki", now=datetime.now(UTC))
        crl = x509.load_der_x509_crl(published.path.read_bytes())
        assert {format(entry.serial_number, "X") for entry in crl} == {
            r[1] for r in before["certificates"] if r[4] == "revoked" and r[3] == "charger"
        } | {row.serial}
        # The tables 0009 added work on the migrated chain: anonymous noise summarised into it.
        audit.count_noise(session, address="192.0.2.1", action="enrollment.refused", code="bad_csr")
        session.commit()
        assert audit.flush_all_noise(session) == 1
        made = checkpoints.checkpoint(session, token, tmp_path)  # and signed checkpoints of it
        assert made is not None and checkpoints.verify(session, lambda: token, tmp_path).ok
        result = audit.verify(session)
        assert result.ok and result.entries > len(before["audit_events"]), result.problem
        session.commit()
    store.dispose()


def test_the_key_registry_and_ca_status_are_filled_from_a_first_release_database(
    db_url: str, token: Token, tmp_path: Path
) -> None:
    """0008: every key certified before goes to the identity of its first certificate (so one key,
    one identity holds for the fleet as it was), and a CA whose own certificate had been revoked
    (before CA status existed) is marked revoked with every CA under it."""
    store = Store(db_url)
    before = _populate_first_release(store, token, tmp_path)
    issuing = next(row for row in before["authorities"] if row[2] == "issuing")
    with store.engine.begin() as connection:  # the release let an issuing CA's certificate be revoked
        connection.execute(
            text("UPDATE certificates SET status = 'revoked', revocation_reason = 'keyCompromise' WHERE serial = :s"),
            {"s": issuing[10]},
        )
    store.upgrade()
    with store.engine.connect() as connection:
        owners = dict(connection.execute(text("SELECT public_key_sha256, identity FROM key_owners")).all())
        statuses = dict(connection.execute(text("SELECT role, status FROM authorities")).all())
    kept = [row for row in before["certificates"] if row[4] != "aborted"]
    assert set(owners) == {row[11] for row in kept}
    chargers = {row[6]: row for row in kept if row[3] == "charger" and row[13] is not None}
    assert {owners[row[11]] for row in chargers.values()} == {f"device:{row[13]}" for row in chargers.values()}
    assert owners["ab" * 32] == "charger:CP-9999", "a reservation without a device: profile and CN"
    assert statuses == {"root": "active", "issuing": "revoked"}
    with store.session() as session:
        with pytest.raises(PolicyError, match="revoked: it signs nothing"):
            issuer_for(session.get(Authority, issuing[0]), token)  # type: ignore[arg-type]
        session.commit()
    store.dispose()


# -- every statement on a hot path uses an index ----------------------------------------------
# Tables that grow with the fleet; the others (authorities, audit_head, status_feed) hold a few rows.
GROWING = {"certificates", "devices", "enrollment_secrets", "ocsp_responses", "audit_events"}
# partial indexes: each holds only the rows of its predicate, so walking one is not a full scan
PARTIAL = {"ix_certificates_ocsp_signers", "ix_certificates_crl_entries"}
FLEET = 20_000  # certificates: enough for the planners to prefer a full scan wherever no index fits


@pytest.fixture
def large_store(store: Store, session: Session, hierarchy: Hierarchy, status: Presigner) -> Store:
    """A fleet's worth of rows (chargers, devices, secrets, responses), then ANALYZE, so both planners
    choose as they would in production: an equality lookup without an index becomes a full scan."""
    now = datetime.now(UTC)
    signer = status.signer_for(session, hierarchy.issuing.id, now)
    assert signer is not None
    devices = [
        {"serial": f"CP-F{n:06d}", "environment": "production", "enabled": True, "enrollment_open": n % 4 == 0,
         "created_at": now}
        for n in range(FLEET // 4)
    ]  # fmt: skip
    session.execute(insert(Device), devices)
    first_device = session.scalar(select(func.min(Device.id)).where(Device.serial.like("CP-F%")))
    assert first_device is not None
    certificates, responses, secrets = [], [], []
    for n in range(FLEET):
        serial = f"{0x4000 + n:X}F00D"
        revoked = n % 100 == 0
        certificates.append(
            {"serial": serial, "authority_id": hierarchy.issuing.id, "profile": "charger",
             "status": "revoked" if revoked else "valid", "subject": f"CN=CP-F{n // 4:06d}",
             "common_name": f"CP-F{n // 4:06d}", "not_before": now - timedelta(days=n % 700),
             "not_after": now + timedelta(days=1 + n % 730, seconds=n), "der": b"\x30\x00",
             "fingerprint_sha256": f"{n:064x}", "public_key_sha256": f"{n:064X}", "device_id": first_device + n // 4,
             "revoked_at": now if revoked else None, "revocation_reason": "keyCompromise" if revoked else None,
             "created_at": now}
        )  # fmt: skip
        responses.append(
            {"authority_id": hierarchy.issuing.id, "serial": serial, "hash_algorithm": "sha1",
             "cert_status": "revoked" if revoked else "good", "der": b"\x30\x00", "this_update": now,
             "next_update": now + timedelta(days=3650), "signer_serial": signer.serial}
        )  # the refresher finds nothing due among them  # fmt: skip
        if n % 4 == 0:
            secrets.append(
                {"device_id": first_device + n // 4, "secret_hash": f"{n:064x}", "expires_at": now + timedelta(days=1),
                 "created_at": now}
            )  # fmt: skip
    for table, rows in ((Certificate, certificates), (OcspResponse, responses), (EnrollmentSecret, secrets)):
        for offset in range(0, len(rows), 5000):
            session.execute(insert(table), rows[offset : offset + 5000])
    session.commit()
    with store.engine.begin() as connection:
        for table in sorted(GROWING):
            connection.exec_driver_sql(f"ANALYZE {table}")
    return store


def _unindexed(store: Store, statement: str, parameters: object) -> list[str]:
    """Where the planner would read a growing table without an index condition, in its own words.

    SQLite: ``EXPLAIN QUERY PLAN`` says SCAN (a walk of the whole table or index) rather than SEARCH.
    PostgreSQL: ``EXPLAIN`` shows a Seq Scan, or an index scan without an Index Cond (a full walk).
    A walk of a partial index (``PARTIAL``) is not one: it holds only the rows its predicate selects,
    e.g. the revocation summary counting every revoked certificate.
    """
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if store.is_sqlite:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            details = [row[3] for row in cursor.fetchall()]
            return [
                d
                for d in details
                if d.startswith("SCAN ") and d.split()[1] in GROWING and not PARTIAL.intersection(d.split())
            ]
        cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        plan = cursor.fetchone()[0]
        problems, nodes = [], [plan[0]["Plan"]]
        while nodes:
            node = nodes.pop()
            nodes.extend(node.get("Plans", []))
            if node.get("Relation Name") not in GROWING or node.get("Index Name") in PARTIAL:
                continue
            kind = node["Node Type"]
            if kind == "Seq Scan" or (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node):
                problems.append(f"{kind} on {node['Relation Name']}")
        return problems
    finally:
        raw.rollback()
        raw.close()


def test_the_plan_check_sees_a_full_scan(large_store: Store) -> None:
    """The check below can fail: a lookup by a column without an index is reported, one with an index is not."""
    marker = "?" if large_store.is_sqlite else "%(value)s"
    for column, value, indexed in (("subject", "CN=CP-F000001", False), ("serial", "4001F00D", True)):
        parameters = (value,) if large_store.is_sqlite else {"value": value}
        problems = _unindexed(large_store, f"SELECT id FROM certificates WHERE {column} = {marker}", parameters)
        assert (problems == []) is indexed, (column, problems)


def test_every_hot_path_statement_uses_an_index(
    large_store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner, tmp_path: Path
) -> None:
    """Run the hot paths for real, record every statement they send, and ask the planner about each.

    EST enrollment and re-enrollment (secret, device, key, fingerprint, supersede), revocation by
    serial, the OCSP responder's lookup, the on-demand signer, the refresher, CRL publication and
    the --watch poll, expiring certificates, the superseded sweep, device and certificate by serial.
    """
    issuing = hierarchy.issuing
    issuer = issuer_for(issuing, token)
    for n in range(3):
        add_device(Work(session, "test"), serial=f"CP-{n}")
    secret = issue_secret(Work(session, "test"), device=get_device(session, "CP-0"))
    key = make_key()
    csr = x509.load_pem_x509_csr(make_csr("CP-0", key=key)).public_bytes(serialization.Encoding.DER)
    now = datetime.now(UTC)

    recorded: list[tuple[str, str, object]] = []
    current = ["set-up"]

    def record(_conn, _cursor, statement: str, parameters: object, _context, executemany: bool) -> None:
        if not executemany:
            recorded.append((current[0], statement, parameters))

    store = large_store
    event.listen(store.engine, "before_cursor_execute", record)
    try:
        current[0] = "EST simpleenroll"
        first = enroll(
            Work(session, "test", status=status, issuers=lambda _a: issuer),
            authority=issuing,
            csr=csr,
            credentials=Credentials("CP-0", secret),
        )
        current[0] = "EST simplereenroll"
        second = reenroll(
            Work(session, "test", status=status, issuers=lambda _a: issuer),
            authority=issuing,
            csr=csr,
            credentials=Credentials(client_certificate=first.der),
        )
        current[0] = "revoke by serial"
        revoke(Work(session, "test", status=status), serial=second.serial, reason="keyCompromise")
        current[0] = "OCSP on-demand signer"
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(x509.load_der_x509_certificate(first.der), issuer.certificate, hashes.SHA256())
            .build()
        )
        assert OnDemandSigner(store, status).respond(request.public_bytes(serialization.Encoding.DER)) != b""
        current[0] = "OCSP refresh"
        refresh(session, status, now)
        current[0] = "CRL publication"
        publish_all(session, token, tmp_path / "pki")
        current[0] = "CRL --watch poll"
        status_counter(session)
        revocation_summary(session)
        current[0] = "expiring certificates"
        list_certificates(session, now, expiring_within=timedelta(days=30), limit=100)
        current[0] = "superseded sweep"
        revoke_due(Work(session, "system:supersede", status=status))
        current[0] = "device by serial"
        get_device(session, "CP-1")
        current[0] = "certificate by serial"
        get_certificate(session, first.serial)
        session.commit()
    finally:
        event.remove(store.engine, "before_cursor_execute", record)

    # The responder reads through the DBAPI (no engine events): its one statement, as it sends it.
    source = StoreSource(Store(store.url.render_as_string(hide_password=False), read_only=True))
    recorded.append(("OCSP responder", source._lookup, (issuing.id, first.serial, "sha1")))
    assert source.response(issuing.id, int(first.serial, 16), "sha1") is not None
    source.store.dispose()

    checked: dict[str, int] = {}
    problems = []
    for operation, statement, parameters in recorded:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if operation == "set-up" or verb not in ("SELECT", "UPDATE", "DELETE"):
            continue  # INSERTs find no rows; BEGIN, PRAGMA and the like plan nothing
        if not any(table in statement for table in GROWING):
            continue
        checked[operation] = checked.get(operation, 0) + 1
        for problem in _unindexed(store, statement, parameters):
            problems.append(f"{operation}: {problem} in {' '.join(statement.split())[:300]}")
    assert problems == []
    expected = {
        "EST simpleenroll", "EST simplereenroll", "revoke by serial", "OCSP on-demand signer", "OCSP refresh",
        "CRL publication", "CRL --watch poll", "expiring certificates", "superseded sweep", "device by serial",
        "certificate by serial", "OCSP responder",
    }  # fmt: skip
    assert set(checked) == expected, checked  # every path sent statements that were checked


def test_a_crls_entries_are_read_from_their_covering_index(large_store: Store, hierarchy: Hierarchy) -> None:
    """The CRL's rows come from ``ix_certificates_crl_entries`` (revoked rows only, every column the
    entry needs), not from the table: the planners match a partial index only to the same literal."""
    sent: list[tuple[str, object]] = []

    def record(_conn, _cursor, statement: str, parameters: object, _context, _executemany: bool) -> None:
        sent.append((statement, parameters))

    event.listen(large_store.engine, "before_cursor_execute", record)
    try:
        with large_store.session() as session:
            rows = list(revoked_rows(session, hierarchy.issuing, datetime.now(UTC)))
    finally:
        event.remove(large_store.engine, "before_cursor_execute", record)
    assert len(rows) == FLEET // 100  # every hundredth certificate of the fleet is revoked
    [(statement, parameters)] = [(s, p) for s, p in sent if "revoked_at" in s]
    raw = large_store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if large_store.is_sqlite:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            assert [row[3] for row in cursor.fetchall()] == [
                "SEARCH certificates USING COVERING INDEX ix_certificates_crl_entries (authority_id=? AND not_after>?)"
            ]
        else:
            cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
            nodes, used = [cursor.fetchone()[0][0]["Plan"]], []
            while nodes:
                node = nodes.pop()
                nodes.extend(node.get("Plans", []))
                used.append((node["Node Type"], node.get("Index Name")))
            assert ("Seq Scan", None) not in used, used
            assert "ix_certificates_crl_entries" in {name for _, name in used}, used
    finally:
        raw.rollback()
        raw.close()


# -- the operations reports ---------------------------------------------------------------------
def _whole_reads(store: Store, statement: str, parameters: object, growing: set[str]) -> tuple[set[str], list[str]]:
    """(growing tables read whole, whole reads that repeat). A read repeats on a nested loop's inner side
    (once per outer row): what makes a report quadratic. One pass over a table is what counting all its
    rows costs, or a hash join's build side; PostgreSQL may make two (a hash join on a second alias)."""
    raw = store.engine.raw_connection()
    try:
        cursor = raw.cursor()
        if store.is_sqlite:
            cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters)
            scans = [row[3].split()[1] for row in cursor.fetchall() if row[3].startswith("SCAN ")]
            tables = [name for name in scans if name in growing]
            # SQLite joins are nested loops in plan order: only the outermost loop may walk a whole table.
            return set(tables), [f"SCAN {name} inside a loop" for name in tables[1:]]
        cursor.execute(f"EXPLAIN (FORMAT JSON) {statement}", parameters)
        plan = cursor.fetchone()[0]
        whole: dict[str, int] = {}
        problems: list[str] = []
        nodes = [(plan[0]["Plan"], False)]
        while nodes:
            node, repeated = nodes.pop()
            for child in node.get("Plans", []):
                inner = node["Node Type"] == "Nested Loop" and child.get("Parent Relationship") == "Inner"
                nodes.append((child, repeated or inner))
            table = node.get("Relation Name")
            kind = node["Node Type"]
            if table in growing and (
                kind == "Seq Scan" or (kind in ("Index Scan", "Index Only Scan") and "Index Cond" not in node)
            ):
                whole[table] = whole.get(table, 0) + 1
                if repeated:
                    problems.append(f"{kind} on {table} inside a nested loop")
        return set(whole), problems
    finally:
        raw.rollback()
        raw.close()


def test_report_statements_use_indexes(
    large_store: Store, session: Session, hierarchy: Hierarchy, token: Token, status: Presigner
) -> None:
    """`report expiring` reads one index range of (status, not_after); `report campaign` finds refusals by
    the audit action's index; neither, nor `report inventory` (which counts every row, so reads each
    table once), ever reads a table once per row of another."""
    rotate_issuing_ca(Work(session, "test", status=status, token=token), ca_name=hierarchy.issuing.name)
    started, size = start_campaign(Work(session, "test"), from_ca=hierarchy.issuing.name)
    assert size == FLEET // 4
    # An audit log of a fleet's size, so that the refusal lookup of campaign progress meets a real choice.
    now = datetime.now(UTC)
    entries = [
        {"seq": 1_000_000 + n, "at": now - timedelta(minutes=n), "actor": "est", "action": "certificate.issued",
         "subject": f"{n:X}", "details": "{}", "prev_hash": "0" * 64, "hash": "0" * 64}
        for n in range(FLEET)
    ]  # fmt: skip
    session.execute(insert(AuditEvent), entries)
    session.commit()
    growing = GROWING | {"campaign_devices"}
    with large_store.engine.begin() as connection:
        for table in ("campaign_devices", "audit_events"):
            connection.exec_driver_sql(f"ANALYZE {table}")

    recorded: list[tuple[str, str, object]] = []
    current = ["set-up"]

    def record(_conn, _cursor, statement: str, parameters: object, _context, executemany: bool) -> None:
        if not executemany:
            recorded.append((current[0], statement, parameters))

    event.listen(large_store.engine, "before_cursor_execute", record)
    try:
        current[0] = "expiring"
        assert expiring(session, now, within=timedelta(days=30), profile="charger").tables[0].rows
        expiring(session, now, within=timedelta(days=30), environment="production")
        current[0] = "campaign"
        assert campaigns(session, now).tables[0].rows[0][5] == FLEET // 4
        assert len(campaigns(session, now, name=str(started.id)).tables[1].rows) == FLEET // 4
        current[0] = "inventory"
        counted = inventory(session, now)
        assert sum(row[-1] for row in counted.tables[1].rows) >= FLEET
    finally:
        event.remove(large_store.engine, "before_cursor_execute", record)

    # What each report may not read whole: the table its filter selects from.
    selective = {"expiring": {"certificates"}, "campaign": {"audit_events"}, "inventory": set()}
    problems, checked = [], set()
    for operation, statement, parameters in recorded:
        verb = statement.lstrip().split(None, 1)[0].upper()
        if verb not in ("SELECT", "UPDATE", "DELETE") or not any(table in statement for table in growing):
            continue
        checked.add(operation)
        flat = " ".join(statement.split())[:300]
        whole, repeated = _whole_reads(large_store, statement, parameters, growing)
        problems += [f"{operation}: {problem} in {flat}" for problem in repeated]
        problems += [f"{operation}: {table} read whole in {flat}" for table in whole & selective[operation]]
    assert problems == [], "\n".join(problems)
    assert checked == {"expiring", "campaign", "inventory"}
