"""One CRL writer at a time: a lease row that `crl publish --watch` processes compete for.

``holder`` names the publisher holding the lease, ``expires`` is in the database's own clock
(Unix seconds) so nodes with skewed clocks agree, and ``term`` rises with every change of holder:
the CRL number is allocated only in a statement that finds the lease still held by the same
holder and term (crl/leader.py).

Revision ID: 0015
Revises: 0013
Create Date: 2026-12-10 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    lease = op.create_table(
        "crl_leader",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("holder", sa.String(length=200), nullable=True),
        sa.Column("term", sa.BigInteger(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.CheckConstraint("id = 1", name="ck_crl_leader_one_row"),
    )
    op.bulk_insert(lease, [{"id": 1, "holder": None, "term": 0, "expires": 0.0}])


def downgrade() -> None:
    op.drop_table("crl_leader")
