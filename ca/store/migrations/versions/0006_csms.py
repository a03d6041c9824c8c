"""The CSMS API: CSMS clients, their API tokens, and durable asynchronous signing jobs.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "csms_clients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("environment", sa.String(length=16), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "csms_tokens",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["client_id"], ["csms_clients.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_csms_tokens_client_id", "csms_tokens", ["client_id"])
    op.create_table(
        "csms_sign_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(length=32), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("charging_station_id", sa.String(length=64), nullable=False),
        sa.Column("certificate_type", sa.String(length=32), nullable=False),
        sa.Column("csr", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("claim", sa.String(length=32), nullable=True),
        sa.Column("claimed_at", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("certificate_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=True),
        sa.Column("error", sa.String(length=512), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["certificate_id"], ["certificates.id"]),
        sa.ForeignKeyConstraint(["client_id"], ["csms_clients.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("public_id"),
    )
    op.create_index("ix_csms_sign_jobs_client_id", "csms_sign_jobs", ["client_id"])
    op.create_index("ix_csms_sign_jobs_state_claimed", "csms_sign_jobs", ["state", "claimed_at"])


def downgrade() -> None:
    op.drop_index("ix_csms_sign_jobs_state_claimed", table_name="csms_sign_jobs")
    op.drop_index("ix_csms_sign_jobs_client_id", table_name="csms_sign_jobs")
    op.drop_table("csms_sign_jobs")
    op.drop_index("ix_csms_tokens_client_id", table_name="csms_tokens")
    op.drop_table("csms_tokens")
    op.drop_table("csms_clients")
