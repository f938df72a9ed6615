"""The cluster's registry of open stream sessions: gateways and their sessions.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gateways",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_time", sa.DateTime(), nullable=False),
        sa.Column("seen_time", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_gateways"),
    )
    op.create_table(
        "stream_sessions",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("gateway_id", sa.String(16), nullable=False),
        sa.Column("user_name", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(20), nullable=True),
        sa.Column("peer", sa.Text(), nullable=False),
        sa.Column("opened_time", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["gateway_id"],
            ["gateways.id"],
            name="fk_stream_sessions_gateway_id_gateways",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_stream_sessions"),
    )
    op.create_index("ix_stream_sessions_gateway_id", "stream_sessions", ["gateway_id"])


def downgrade() -> None:
    op.drop_table("stream_sessions")
    op.drop_table("gateways")
