"""Maxwell's revenue accounts are summed when read (ledger.summed, issue 25): their cached balance,
which every settlement used to update, is set to 0 and stays 0. No money moves: their balance was
always the sum of their entries (check_ledger proves it), and that sum is what readers now get.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SUMMED = ("maxwell:energy", "maxwell:slashed")  # schema.SUMMED_ACCOUNTS as of this revision
accounts = sa.table("accounts", sa.column("name", sa.String), sa.column("balance_micro", sa.BigInteger))


def upgrade() -> None:
    op.execute(accounts.update().where(accounts.c.name.in_(SUMMED)).values(balance_micro=0))


def downgrade() -> None:
    op.execute(
        sa.text(
            "UPDATE accounts SET balance_micro = (SELECT COALESCE(SUM(amount_micro), 0) FROM entries "
            "WHERE entries.account_id = accounts.id) WHERE name IN ('maxwell:energy', 'maxwell:slashed')"
        )
    )
