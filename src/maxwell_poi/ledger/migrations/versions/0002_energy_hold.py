"""A transfer kind for the energy budget a lease holds from the wallet until its energy is measured.

Revision ID: 0002
Revises: 0001

The control plane holds a lease's maximum energy charge when it issues the lease (`energy_hold`),
so that the debit of the measured joules can never fail for want of funds; the settlement debits
the measured amount and returns the rest. Batch mode, because SQLite can only change a CHECK
constraint by copying the table.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

OLD = "kind IN ('deposit', 'energy_debit', 'stake_escrow', 'stake_release', 'stake_slash', 'other')"
NEW = (
    "kind IN ('deposit', 'energy_hold', 'energy_debit', 'stake_escrow', 'stake_release', 'stake_slash', "
    "'other')"
)


def _kinds(check: str) -> None:
    with op.batch_alter_table("transfers") as batch:
        batch.drop_constraint("ck_transfers_kind", type_="check")
        batch.create_check_constraint("ck_transfers_kind", check)


def upgrade() -> None:
    _kinds(NEW)


def downgrade() -> None:
    _kinds(OLD)
