"""The control plane's first schema: agents, nodes, bids, leases, receipts, verdicts, disputes, settings.

Revision ID: cp0001
Revises: none

Frozen on purpose (spelled out, not imported from the models): a later model change needs a new
revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "cp0001"
down_revision = None
branch_labels = None
depends_on = None


def _check(column: str, values: tuple[str, ...], name: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(f"{column} IN ({', '.join(repr(v) for v in values)})", name=name)


def upgrade() -> None:
    op.create_table(
        "cp_agents",
        sa.Column("agent_id", sa.String(128), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("enrolled_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_nodes",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("public_key", sa.String(64), nullable=False),
        sa.Column("enrolled_at", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=True),
        sa.Column("headroom_j", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_bids",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("agent_id", sa.String(128), sa.ForeignKey("cp_agents.agent_id"), nullable=False),
        sa.Column("bid_id", sa.String(128), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("model_id", sa.String(128), nullable=False),
        sa.Column("precision", sa.String(8), nullable=False),
        sa.Column("job", sa.Text(), nullable=False),
        sa.Column("price_micro_per_j", sa.BigInteger(), nullable=False),
        sa.Column("stake_micro", sa.BigInteger(), nullable=False),
        sa.Column("expected_j", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("lease_id", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.UniqueConstraint("agent_id", "bid_id", name="uq_cp_bids_agent_bid"),
        _check("status", ("open", "won", "refused", "expired"), "ck_cp_bids_status"),
    )
    op.create_index("ix_cp_bids_agent_id", "cp_bids", ["agent_id"])
    op.create_index("ix_cp_bids_status", "cp_bids", ["status"])
    op.create_table(
        "cp_leases",
        sa.Column("lease_id", sa.String(32), primary_key=True),
        sa.Column("agent_id", sa.String(128), sa.ForeignKey("cp_agents.agent_id"), nullable=False),
        sa.Column("node_id", sa.String(128), sa.ForeignKey("cp_nodes.node_id"), nullable=False),
        sa.Column("bid_pk", sa.Integer(), sa.ForeignKey("cp_bids.id"), nullable=False),
        sa.Column("lease_json", sa.Text(), nullable=False),
        sa.Column("tier", sa.String(8), nullable=False),
        sa.Column("audit_probability", sa.Float(), nullable=False),
        sa.Column("tier_reason", sa.Text(), nullable=False),
        sa.Column("price_micro_per_j", sa.BigInteger(), nullable=False),
        sa.Column("hold_micro", sa.BigInteger(), nullable=False),
        sa.Column("stake_micro", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("issued_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        _check("status", ("issued", "pulled", "audit_pending", "settled", "expired"), "ck_cp_leases_status"),
    )
    op.create_index("ix_cp_leases_agent_id", "cp_leases", ["agent_id"])
    op.create_index("ix_cp_leases_node_id", "cp_leases", ["node_id"])
    op.create_index("ix_cp_leases_status", "cp_leases", ["status"])
    op.create_table(
        "cp_receipts",
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("cp_leases.lease_id"), primary_key=True),
        sa.Column("receipt_sha256", sa.String(64), nullable=False),
        sa.Column("evidence_sha256", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("receipt", sa.LargeBinary(), nullable=False),
        sa.Column("evidence", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_verdicts",
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("cp_leases.lease_id"), primary_key=True),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("final", sa.Boolean(), nullable=False),
        sa.Column("audit_drawn", sa.Boolean(), nullable=False),
        sa.Column("layers", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("energy_j", sa.Float(), nullable=False),
        sa.Column("energy_memo", sa.Text(), nullable=False),
        sa.Column("charge_micro", sa.BigInteger(), nullable=False),
        sa.Column("stake_outcome", sa.String(16), nullable=False),
        sa.Column("appraised_at", sa.Float(), nullable=False),
        _check("verdict", ("affirming", "warning", "contraindicated"), "ck_cp_verdicts_verdict"),
        _check("stake_outcome", ("released", "slashed", "held", "pending", "none"), "ck_cp_verdicts_stake"),
    )
    op.create_index("ix_cp_verdicts_verdict", "cp_verdicts", ["verdict"])
    op.create_table(
        "cp_disputes",
        sa.Column("lease_id", sa.String(32), sa.ForeignKey("cp_leases.lease_id"), primary_key=True),
        sa.Column("statement", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "cp_settings",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "cp_settings",
        "cp_disputes",
        "cp_verdicts",
        "cp_receipts",
        "cp_leases",
        "cp_bids",
        "cp_nodes",
        "cp_agents",
    ):
        op.drop_table(table)
