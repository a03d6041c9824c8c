"""A partial index of the CAs' delegated OCSP signers: (authority_id, not_after) where profile is
'ocsp-signer'.

Every issuance and every revocation looks up its CA's current delegated OCSP signer
(``ocsp.presign._CURRENT_SIGNER``: the CA equal, not_after in range, newest first). SQLite, which
has no statistics unless someone runs ANALYZE, answered that through
``ix_certificates_status_not_after`` and walked every valid unexpired certificate: about 25 ms at
1,000,000 rows, twice per re-enrollment and under the writer lock, which held a fleet rotation at
~20 re-enrollments/s (bench/rotation.py). This index holds only the signers (a handful per CA), so
it costs a charger's certificate nothing to maintain, and no other statement is drawn to it: a
first version widened (profile, authority_id) with status and not_after instead, and PostgreSQL
without statistics then chose it for the device's superseded certificates (62 ms).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-04 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_certificates_ocsp_signers"
SIGNERS = sa.text("profile = 'ocsp-signer'")


def upgrade() -> None:
    op.create_index(NAME, "certificates", ["authority_id", "not_after"], sqlite_where=SIGNERS, postgresql_where=SIGNERS)


def downgrade() -> None:
    op.drop_index(NAME, table_name="certificates")
