"""Revocable users: disabled users, a per-user "tokens not before" stamp, and the tokens of
stream sessions ended on the server.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ALTER TABLE, never batch mode: on SQLite that copies the table and drops the
    # old one, and with foreign keys on, dropping users cascades to their keys.
    op.add_column(
        "users", sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.add_column("users", sa.Column("tokens_not_before", sa.DateTime(), nullable=True))
    op.create_table(
        "ended_tokens",
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("expires_time", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name="pk_ended_tokens"),
    )
    op.create_index("ix_ended_tokens_expires_time", "ended_tokens", ["expires_time"])


def downgrade() -> None:
    op.drop_table("ended_tokens")
    op.drop_column("users", "tokens_not_before")
    op.drop_column("users", "disabled")
