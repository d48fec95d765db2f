"""The hardware class a node signs into its pull (`PullBody.device_class`): bids for that node are
priced with that class's profile, not the control plane host's.

Revision ID: cp0004
Revises: cp0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "cp0004"
down_revision = "cp0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cp_nodes", sa.Column("device_class", sa.String(256), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("cp_nodes") as batch:  # SQLite drops a column only by rebuilding the table
        batch.drop_column("device_class")
