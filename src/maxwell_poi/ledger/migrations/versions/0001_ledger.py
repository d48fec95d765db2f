"""The ledger's first schema: accounts, transfers, entries.

Revision ID: 0001
Revises: none

Frozen on purpose: it spells the tables out instead of importing the models, so a later change
to the models needs a new revision rather than silently rewriting history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ACCOUNT_KINDS = "kind IN ('wallet', 'escrow', 'revenue', 'external')"
TRANSFER_KINDS = (
    "kind IN ('deposit', 'energy_debit', 'stake_escrow', 'stake_release', 'stake_slash', 'other')"
)
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("allow_negative", sa.Boolean(), nullable=False),
        sa.Column("balance_micro", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(ACCOUNT_KINDS, name="ck_accounts_kind"),
        sa.CheckConstraint("NOT allow_negative OR kind = 'external'", name="ck_accounts_negative_external"),
        sa.CheckConstraint("allow_negative OR balance_micro >= 0", name="ck_accounts_balance_floor"),
        sa.UniqueConstraint("name", name="uq_accounts_name"),
    )
    op.create_table(
        "transfers",
        sa.Column("id", ID, primary_key=True),
        sa.Column("idempotency_key", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("memo", sa.Text(), nullable=False),
        sa.Column("lease_id", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(TRANSFER_KINDS, name="ck_transfers_kind"),
        sa.UniqueConstraint("idempotency_key", name="uq_transfers_idempotency_key"),
    )
    op.create_index("ix_transfers_lease_id", "transfers", ["lease_id"])
    op.create_table(
        "entries",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "transfer_id", ID, sa.ForeignKey("transfers.id", name="fk_entries_transfer"), nullable=False
        ),
        sa.Column(
            "account_id",
            sa.Integer(),
            sa.ForeignKey("accounts.id", name="fk_entries_account"),
            nullable=False,
        ),
        sa.Column("amount_micro", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount_micro <> 0", name="ck_entries_nonzero"),
        sa.UniqueConstraint("transfer_id", "account_id", name="uq_entries_transfer_account"),
    )
    op.create_index("ix_entries_transfer_id", "entries", ["transfer_id"])
    op.create_index("ix_entries_account_id", "entries", ["account_id"])


def downgrade() -> None:
    op.drop_table("entries")
    op.drop_table("transfers")
    op.drop_table("accounts")
