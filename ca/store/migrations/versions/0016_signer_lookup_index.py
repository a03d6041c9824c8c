"""The certificates' (profile, authority_id) index also carries status and not_after.

Every issuance and every revocation looks up its CA's current delegated OCSP signer
(``ocsp.presign._CURRENT_SIGNER``: profile, CA and status equal, not_after in range, newest
first). With only (profile, authority_id) SQLite, which has no statistics unless someone runs
ANALYZE, preferred ``ix_certificates_status_not_after`` and walked every valid unexpired
certificate of the store: about 25 ms at 1,000,000 rows, twice per re-enrollment and under the
writer lock, which held a fleet rotation at ~20 re-enrollments/s (bench/rotation.py). With three
equal columns and the order in the index the planner takes this one and reads a handful of
entries. It replaces the old index under the same name, so what used (profile, authority_id)
still does and a write maintains as many indexes as before.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_certificates_profile_authority"


def upgrade() -> None:
    op.drop_index(NAME, table_name="certificates")
    op.create_index(NAME, "certificates", ["profile", "authority_id", "status", "not_after"])


def downgrade() -> None:
    op.drop_index(NAME, table_name="certificates")
    op.create_index(NAME, "certificates", ["profile", "authority_id"])
