"""L3 challenges of exact-tier leases: each opening Maxwell asked of an agent through its node.

Revision ID: cp0003
Revises: cp0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "cp0003"
down_revision = "cp0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cp_challenges",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("cp_leases.lease_id"), nullable=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("keys", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("asked_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("answered_at", sa.Float(), nullable=True),
        sa.Column("answer", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint("status IN ('open', 'answered', 'late')", name="ck_cp_challenges_status"),
        sa.CheckConstraint("kind IN ('l3', 'bisect', 'settle')", name="ck_cp_challenges_kind"),
    )
    op.create_index("ix_cp_challenges_lease_id", "cp_challenges", ["lease_id"])
    op.create_index("ix_cp_challenges_node_id", "cp_challenges", ["node_id"])
    op.create_index("ix_cp_challenges_status", "cp_challenges", ["status"])


def downgrade() -> None:
    op.drop_table("cp_challenges")
