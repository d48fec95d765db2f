"""Failed leases (issue 23): `cp_leases.status` may be 'failed' — the node handed in no receipt
(its agent never started or crashed), so nothing was charged and the stake went back.

Only the CHECK constraint widens; no row changes (ledger.check_constraints says how, per database).

Revision ID: cp0005
Revises: cp0004
"""

from __future__ import annotations

from alembic import op

from maxwell_poi.ledger.check_constraints import replace_check

revision = "cp0005"
down_revision = "cp0004"
branch_labels = None
depends_on = None

TABLE = "cp_leases"
NAME = "ck_cp_leases_status"
BEFORE = "status IN ('issued', 'pulled', 'audit_pending', 'settled', 'expired')"
AFTER = "status IN ('issued', 'pulled', 'audit_pending', 'settled', 'expired', 'failed')"


def upgrade() -> None:
    _replace_check(BEFORE, AFTER)


def downgrade() -> None:
    # a failed lease moved no money and has its verdict row: read back as settled
    op.execute(f"UPDATE {TABLE} SET status = 'settled' WHERE status = 'failed'")
    _replace_check(AFTER, BEFORE)


def _replace_check(old: str, new: str) -> None:
    replace_check(op, TABLE, NAME, old, new)
