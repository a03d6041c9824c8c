"""OCPP 2.1: the ``oem-root`` CA role and two columns of asynchronous signing jobs.

- ``authorities.role`` may be ``oem-root``: a vehicle manufacturer's root an operator imported
  (status ``external``) for chargers to install as ``OEMRootCertificate``.
- ``csms_sign_jobs.request_id`` (SignCertificateRequest.requestId, echoed when the job is read)
  and ``csms_sign_jobs.root_id`` (the root its hashRootCertificate named), both optional.

The values are written out here, not read from ``ca.kinds`` (see 0010).

Revision ID: 0012
Revises: 0011
Create Date: 2027-02-01 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ck_authorities_role"
ROLES = (
    "'root', 'issuing', 'manufacturer', 'v2g-root', 'v2g-sub-ca-1', 'v2g-sub-ca-2', "
    "'v2g20-root', 'v2g20-sub-ca-1', 'v2g20-sub-ca-2'"
)
BEFORE = f"role IN ({ROLES})"
AFTER = f"role IN ({ROLES}, 'oem-root')"


def _replace(condition: str) -> None:
    # On SQLite, batch mode rebuilds the table with the new constraint (SQLite cannot alter one).
    with op.batch_alter_table("authorities") as batch:
        batch.drop_constraint(NAME, type_="check")
        batch.create_check_constraint(NAME, condition)


def upgrade() -> None:
    _replace(AFTER)
    with op.batch_alter_table("csms_sign_jobs") as batch:
        batch.add_column(sa.Column("request_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("root_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_csms_sign_jobs_root_id", "authorities", ["root_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("csms_sign_jobs") as batch:
        batch.drop_constraint("fk_csms_sign_jobs_root_id", type_="foreignkey")
        batch.drop_column("root_id")
        batch.drop_column("request_id")
    # Refuses (the CHECK fails) while an OEM root is stored: remove them first.
    _replace(BEFORE)
