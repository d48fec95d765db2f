"""When a pull of the lease's node took an L3 question (`cp_challenges.delivered_at`, Maxwell's clock;
NULL: never): a question no node took before its deadline is Maxwell's failure, not the agent's
silence, and an agent's time counts from delivery (service.challenges).

Questions asked before this revision were judged with their deadline counted from asking, as if
delivered then: they are read back as delivered at `asked_at`, so no old verdict changes meaning.

Revision ID: cp0007
Revises: cp0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "cp0007"
down_revision = "cp0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cp_challenges", sa.Column("delivered_at", sa.Float(), nullable=True))
    op.execute("UPDATE cp_challenges SET delivered_at = asked_at")


def downgrade() -> None:
    with op.batch_alter_table("cp_challenges") as batch:  # SQLite drops a column only by rebuilding the table
        batch.drop_column("delivered_at")
