"""Pre-signed OCSP responses and the status change feed the responders watch.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "ocsp_responses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("authority_id", sa.Integer(), nullable=False),
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("hash_algorithm", sa.String(length=8), nullable=False),
        sa.Column("cert_status", sa.String(length=8), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("this_update", sa.DateTime(), nullable=False),
        sa.Column("next_update", sa.DateTime(), nullable=False),
        sa.Column("signer_serial", sa.String(length=40), nullable=False),
        sa.ForeignKeyConstraint(["authority_id"], ["authorities.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("authority_id", "serial", "hash_algorithm", name="uq_ocsp_lookup"),
    )
    op.create_index("ix_ocsp_responses_next_update", "ocsp_responses", ["next_update"])
    op.create_index("ix_certificates_profile_authority", "certificates", ["profile", "authority_id"])
    feed = op.create_table(
        "status_feed",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("counter", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(feed, [{"id": 1, "counter": 0}])


def downgrade() -> None:
    op.drop_index("ix_certificates_profile_authority", table_name="certificates")
    op.drop_table("status_feed")
    op.drop_index("ix_ocsp_responses_next_update", table_name="ocsp_responses")
    op.drop_table("ocsp_responses")
