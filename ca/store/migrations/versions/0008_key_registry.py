"""One key, one identity in the database (``key_owners``), and CAs whose certificate is revoked stop.

``key_owners`` is filled from every certificate that was not abandoned: each key goes to the
identity of its first certificate (``issuance.key_identity``: ``device:<id>``, ``secc:<SECC ID>``,
else ``<profile>:<CN>``). A CA whose own certificate was revoked before CA status existed is
marked ``revoked``, and so is every CA under it (hierarchies are at most four deep).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_owners",
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("identity", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("public_key_sha256"),
    )
    op.execute(
        """
        INSERT INTO key_owners (public_key_sha256, identity, created_at)
        SELECT c.public_key_sha256,
               CASE
                   WHEN c.profile = 'v2g-secc' THEN 'secc:' || COALESCE(c.common_name, '')
                   WHEN c.device_id IS NOT NULL THEN 'device:' || CAST(c.device_id AS VARCHAR(20))
                   ELSE c.profile || ':' || COALESCE(c.common_name, '')
               END,
               c.created_at
        FROM certificates c
        WHERE c.id IN (SELECT MIN(id) FROM certificates WHERE status <> 'aborted' GROUP BY public_key_sha256)
        """
    )
    revoked_certificate = """
        EXISTS (SELECT 1 FROM certificates c WHERE c.serial = authorities.serial
                AND c.authority_id = authorities.parent_id AND c.status = 'revoked')
    """
    op.execute(
        f"UPDATE authorities SET status = 'revoked' WHERE status IN ('active', 'retired') AND {revoked_certificate}"
    )
    for _level in range(3):  # the CAs under a revoked CA, one level at a time
        op.execute(
            "UPDATE authorities SET status = 'revoked' WHERE status IN ('active', 'retired') AND parent_id IN "
            "(SELECT id FROM (SELECT id FROM authorities WHERE status = 'revoked') AS revoked)"
        )


def downgrade() -> None:
    op.drop_table("key_owners")
