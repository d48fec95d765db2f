"""The OpenAI-compatible gateway's tables: agents' standing offers to serve a model, requesters
(API keys, stored as SHA-256), and one row per completion (its lease, its price and what it cost).

Revision ID: cp0002
Revises: cp0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "cp0002"
down_revision = "cp0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cp_offers",
        sa.Column("agent_id", sa.String(128), sa.ForeignKey("cp_agents.agent_id"), primary_key=True),
        sa.Column("model_id", sa.String(128), primary_key=True),
        sa.Column("precision", sa.String(8), nullable=False),
        sa.Column("ask_micro_per_token", sa.BigInteger(), nullable=False),
        sa.Column("price_micro_per_j", sa.BigInteger(), nullable=False),
        sa.Column("stake_micro", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_requesters",
        sa.Column("requester_id", sa.String(128), primary_key=True),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("enrolled_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_completions",
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("cp_leases.lease_id"), primary_key=True),
        sa.Column(
            "requester_id", sa.String(128), sa.ForeignKey("cp_requesters.requester_id"), nullable=False
        ),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("price_micro_per_token", sa.BigInteger(), nullable=False),
        sa.Column("hold_micro", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("charge_micro", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.CheckConstraint(
            "status IN ('streaming', 'paid', 'refunded', 'cut')", name="ck_cp_completions_status"
        ),
    )
    op.create_index("ix_cp_completions_requester_id", "cp_completions", ["requester_id"])


def downgrade() -> None:
    for table in ("cp_completions", "cp_requesters", "cp_offers"):
        op.drop_table(table)
