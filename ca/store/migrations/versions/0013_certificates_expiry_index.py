"""The certificates' (status, not_after) index also carries authority_id, profile and revoke_after.

What the metrics count at each scrape, the valid certificates not superseded by a renewal that
expire within 90 days per CA and profile (``metrics.store.expiring_certificates``), then reads the
index alone instead of fetching every such row from the table: at 1,000,000 rows on SQLite that was
80,000 row fetches, about a second (bench/metrics_cost.py). The index replaces the old one under the
same name, so every statement that used (status, not_after) still does, and a write maintains as
many indexes as before (slightly wider entries).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 18:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = "ix_certificates_status_not_after"


def upgrade() -> None:
    op.drop_index(NAME, table_name="certificates")
    op.create_index(NAME, "certificates", ["status", "not_after", "authority_id", "profile", "revoke_after"])


def downgrade() -> None:
    op.drop_index(NAME, table_name="certificates")
    op.create_index(NAME, "certificates", ["status", "not_after"])
