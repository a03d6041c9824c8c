"""The ISO 15118-20 V2G hierarchy's CA roles: ``v2g20-root``, ``v2g20-sub-ca-1``, ``v2g20-sub-ca-2``.

An ISO 15118-20 hierarchy (secp521r1) is a set of CAs of its own beside the ISO 15118-2 one in the
same environment, told apart by role; this widens the CHECK constraint on ``authorities.role``.
The values are written out here, not read from ``ca.kinds`` (see 0010).

Revision ID: 0011
Revises: 0010
Create Date: 2027-01-12 09:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ck_authorities_role"
BEFORE = "role IN ('root', 'issuing', 'manufacturer', 'v2g-root', 'v2g-sub-ca-1', 'v2g-sub-ca-2')"
AFTER = (
    "role IN ('root', 'issuing', 'manufacturer', 'v2g-root', 'v2g-sub-ca-1', 'v2g-sub-ca-2', "
    "'v2g20-root', 'v2g20-sub-ca-1', 'v2g20-sub-ca-2')"
)


def _replace(condition: str) -> None:
    # On SQLite, batch mode rebuilds the table with the new constraint (SQLite cannot alter one).
    with op.batch_alter_table("authorities") as batch:
        batch.drop_constraint(NAME, type_="check")
        batch.create_check_constraint(NAME, condition)


def upgrade() -> None:
    _replace(AFTER)


def downgrade() -> None:
    # Refuses (the CHECK fails) while an ISO 15118-20 CA is stored: retire and remove them first.
    _replace(BEFORE)
