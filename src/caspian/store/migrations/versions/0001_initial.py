"""Users, their entitlements and API keys; exchanges and products.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("all_exchanges", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("created_time", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("name", name="uq_users_name"),
    )
    op.create_table(
        "entitlements",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("exchange_code", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_entitlements_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "exchange_code", name="pk_entitlements"),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(20), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_time", sa.DateTime(), nullable=False),
        sa.Column("revoked", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_api_keys_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("key_id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_user_id", "api_keys", ["user_id"])
    op.create_table(
        "exchanges",
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_exchanges"),
    )
    op.create_table(
        "products",
        sa.Column("caspian_code", sa.String(128), nullable=False),
        sa.Column("exchange", sa.String(32), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("pseudo_code", sa.Text(), nullable=False),
        sa.Column("tora_code", sa.Text(), nullable=False),
        sa.Column("tora_market", sa.Text(), nullable=False),
        sa.Column("native_code", sa.Text(), nullable=False),
        sa.Column("native_code_v2", sa.Text(), nullable=False),
        sa.Column("ccy_from", sa.Text(), nullable=False),
        sa.Column("ccy_to", sa.Text(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("lot_size", sa.Text(), nullable=False),
        sa.Column("tick_size", sa.Text(), nullable=False),
        sa.Column("tick_rule", sa.Text(), nullable=False),
        sa.Column("multiplier", sa.Text(), nullable=True),
        sa.Column("expire_date", sa.Text(), nullable=True),
        sa.Column("last_trading_date", sa.Text(), nullable=True),
        sa.Column("strike", sa.Text(), nullable=True),
        sa.Column("underlying_caspian_code", sa.Text(), nullable=True),
        sa.Column("created_time", sa.DateTime(), nullable=False),
        sa.Column("updated_time", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["exchange"], ["exchanges.code"], name="fk_products_exchange_exchanges"
        ),
        sa.PrimaryKeyConstraint("caspian_code", name="pk_products"),
    )
    op.create_index("ix_products_exchange", "products", ["exchange"])


def downgrade() -> None:
    op.drop_table("products")
    op.drop_table("exchanges")
    op.drop_table("api_keys")
    op.drop_table("entitlements")
    op.drop_table("users")
