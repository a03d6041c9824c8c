"""CHECK constraints on CA roles, CA and certificate statuses and signing-job states.

The values are written out here, not read from ``ca.kinds``: a migration describes the schema
as it was at this revision; a later vocabulary needs a later migration.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 14:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "authorities": {
        "ck_authorities_role": (
            "role IN ('root', 'issuing', 'manufacturer', 'v2g-root', 'v2g-sub-ca-1', 'v2g-sub-ca-2')"
        ),
        "ck_authorities_status": "status IN ('active', 'retired', 'revoked', 'external')",
    },
    "certificates": {"ck_certificates_status": "status IN ('pending', 'valid', 'revoked', 'aborted')"},
    "csms_sign_jobs": {"ck_csms_sign_jobs_state": "state IN ('queued', 'running', 'signed', 'refused')"},
}


def upgrade() -> None:
    # On SQLite, batch mode rebuilds each table with the constraint (SQLite cannot add one in place).
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            for name, condition in checks.items():
                batch.create_check_constraint(name, condition)


def downgrade() -> None:
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table) as batch:
            for name in checks:
                batch.drop_constraint(name, type_="check")
