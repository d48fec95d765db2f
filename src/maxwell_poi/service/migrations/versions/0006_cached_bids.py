"""Cached bids (issue 23): `cp_bids.status` may be 'cached' — an identical greedy job of the same
agent won in the same round, so this bid is answered by that lease (its `lease_id`) and has no
lease, hold, charge or stake of its own (service.market).

Only the CHECK constraint widens; no row changes (ledger.check_constraints says how, per database).

Revision ID: cp0006
Revises: cp0005
"""

from __future__ import annotations

from alembic import op

from maxwell_poi.ledger.check_constraints import replace_check

revision = "cp0006"
down_revision = "cp0005"
branch_labels = None
depends_on = None

TABLE = "cp_bids"
NAME = "ck_cp_bids_status"
BEFORE = "status IN ('open', 'won', 'refused', 'expired')"
AFTER = "status IN ('open', 'won', 'refused', 'expired', 'cached')"


def upgrade() -> None:
    replace_check(op, TABLE, NAME, BEFORE, AFTER)


def downgrade() -> None:
    # a cached bid moved no money and points at the lease that answered it: read back as won
    op.execute(f"UPDATE {TABLE} SET status = 'won' WHERE status = 'cached'")
    replace_check(op, TABLE, NAME, AFTER, BEFORE)
