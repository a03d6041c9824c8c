"""CRL numbers: the last number each CA used, raised atomically by publishers.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 17:32:30.276158
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("authorities", schema=None) as batch_op:
        batch_op.add_column(sa.Column("crl_number", sa.BigInteger(), server_default="0", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("authorities", schema=None) as batch_op:
        batch_op.drop_column("crl_number")
