"""The fleet console: one-time login links and sessions; the audit's event counters gain an actor.

``audit_noise`` counted only refusals of anonymous callers; the console's page views are counted
there too, per admin, so each minute of viewing becomes one summary entry in the chain instead of
one entry per page. The new ``actor`` column ('' for anonymous) joins the primary key.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOISE_KEY = ["address", "minute", "action", "code"]


def _rebuild_noise(key: list[str], *, with_actor: bool) -> None:
    """audit_noise again with ``key`` as its primary key, rows copied (a primary key cannot change in place
    on SQLite, and a copy says the same on both databases)."""
    columns = [
        sa.Column("address", sa.String(length=128), nullable=False),
        sa.Column("minute", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
    ]
    if with_actor:
        columns.append(sa.Column("actor", sa.String(length=128), nullable=False, server_default=""))
    op.create_table("audit_noise_new", *columns, sa.PrimaryKeyConstraint(*key, name="pk_audit_noise"))
    copied = "address, minute, action, code, count"
    where = "" if with_actor else " WHERE actor = ''"  # page views have no place in the old key
    op.execute(f"INSERT INTO audit_noise_new ({copied}) SELECT {copied} FROM audit_noise{where}")
    op.drop_index("ix_audit_noise_minute", table_name="audit_noise")
    op.drop_table("audit_noise")
    op.rename_table("audit_noise_new", "audit_noise")
    op.create_index("ix_audit_noise_minute", "audit_noise", ["minute"])


def upgrade() -> None:
    _rebuild_noise([*_NOISE_KEY, "actor"], with_actor=True)
    op.create_table(
        "console_links",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.String(length=64), nullable=False),
        sa.Column("link_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["link_id"], ["console_links.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("session_hash"),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_expires_at", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("console_links")
    _rebuild_noise(_NOISE_KEY, with_actor=False)
