"""Device enrollment: one-time secrets, the anti-cloning flag, supersede grace periods.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 16:47:18.470697
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "enrollment_secrets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.Integer(), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("secret_hash"),
    )
    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrollment_secrets_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoke_after", sa.DateTime(), nullable=True))
        batch_op.create_index(batch_op.f("ix_certificates_revoke_after"), ["revoke_after"], unique=False)

    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("enrollment_open", sa.Boolean(), server_default=sa.true(), nullable=False))

    # A device that already holds a certificate has had its first enrollment: the upgrade must not
    # re-open it (anti-cloning; `chargepki device reset` re-opens it on purpose).
    devices = sa.table("devices", sa.column("id", sa.Integer), sa.column("enrollment_open", sa.Boolean))
    certificates = sa.table("certificates", sa.column("device_id", sa.Integer), sa.column("status", sa.String))
    enrolled = (
        sa.select(sa.literal(1))
        .where(certificates.c.device_id == devices.c.id, certificates.c.status.in_(("valid", "revoked")))
        .exists()
    )
    op.execute(devices.update().where(enrolled).values(enrollment_open=False))


def downgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("enrollment_open")

    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_certificates_revoke_after"))
        batch_op.drop_column("revoke_after")

    with op.batch_alter_table("enrollment_secrets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrollment_secrets_device_id"))

    op.drop_table("enrollment_secrets")
