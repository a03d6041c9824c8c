"""The current-signer lookup that every issuance and revocation runs reads a handful of index
entries, however many certificates the CA has issued.

A timing-free guard: the database's own query plan. Without the partial index of signers SQLite
(no statistics unless someone runs ANALYZE) walked every valid unexpired certificate through
(status, not_after): ~25 ms per lookup at 1,000,000 rows, twice per re-enrollment under the
writer lock (bench/rotation.py).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, text
from sqlalchemy.orm import Session

from ca.authorities.hierarchy import Hierarchy
from ca.kinds import CertStatus
from ca.store.models import Certificate
from ocsp.presign import _CURRENT_SIGNER, Presigner

INDEX = "ix_certificates_ocsp_signers"


def _fleet(session: Session, authority_id: int, count: int) -> None:
    """``count`` valid charger certificates of the CA, expiring over the next two years."""
    now = datetime.now(UTC)
    rows = [
        {
            "serial": f"{0x7000000000 + n:X}",
            "authority_id": authority_id,
            "profile": "charger",
            "status": CertStatus.VALID,
            "subject": f"CN=CP-{n:06d}",
            "common_name": f"CP-{n:06d}",
            "not_before": now - timedelta(days=1),
            "not_after": now + timedelta(days=1 + n % 730),
            "der": b"\x30" * 64,
            "fingerprint_sha256": f"{n:064x}",
            "public_key_sha256": f"{n + 10**9:064x}",
            "created_at": now,
        }
        for n in range(count)
    ]
    session.execute(insert(Certificate), rows)
    session.commit()


def _plan(session: Session, authority_id: int) -> str:
    """The database's plan for the lookup as the presigner sends it (PostgreSQL after ANALYZE,
    as autovacuum leaves a live table; SQLite as it is, without statistics)."""
    dialect = session.get_bind().dialect
    compiled = _CURRENT_SIGNER.statement(dialect).compile(dialect=dialect)
    values = compiled.construct_params({"authority_id": authority_id, "now": datetime.now(UTC).replace(tzinfo=None)})
    if dialect.name == "sqlite":
        ordered = [values[name] for name in compiled.positiontup or []]
        parameters = [v.strftime("%Y-%m-%d %H:%M:%S.%f") if isinstance(v, datetime) else v for v in ordered]
        cursor = session.connection().connection.driver_connection.execute(
            f"EXPLAIN QUERY PLAN {compiled.string}", parameters
        )
        return "\n".join(str(row[-1]) for row in cursor.fetchall())
    session.execute(text("ANALYZE certificates"))
    return "\n".join(row[0] for row in session.connection().exec_driver_sql(f"EXPLAIN {compiled.string}", values))


def test_the_current_signer_is_found_through_its_own_index(
    session: Session, hierarchy: Hierarchy, status: Presigner
) -> None:
    authority_id = hierarchy.issuing.id
    _fleet(session, authority_id, 3000)
    plan = _plan(session, authority_id)
    if session.get_bind().dialect.name == "sqlite":
        assert INDEX in plan, plan
    else:  # with statistics PostgreSQL may as well take (profile, authority_id): a handful of rows either way
        assert INDEX in plan or "ix_certificates_profile_authority" in plan, plan
    assert "ix_certificates_status_not_after" not in plan and "Seq Scan on certificates" not in plan, plan
    signer = status.signer_for(session, authority_id, datetime.now(UTC))  # and it finds the signer
    assert signer is not None and signer.serial == hierarchy.ocsp_signer.serial
