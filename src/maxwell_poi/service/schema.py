"""The control plane's own tables (the ledger's are in ledger.schema): who is enrolled, what was bid,
which leases were issued to which node, what came back, and the verdict each lease got.

Replay refusal lives here, not in memory: `cp_receipts.lease_id` is the primary key, so a lease is
taken in at most once — across restarts and across concurrent submissions (the database decides
the race). Created by `service/migrations`; a test compares these models with the migrations.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..protocol.result import Verdict
from .states import (
    BidState,
    ChallengeKind,
    ChallengeState,
    CompletionState,
    LeaseState,
    StakeOutcome,
    values,
)

# the CHECK constraints list exactly the enums' values (the same strings migration 0001 wrote, or
# a later one widened a list to: 0005 added the failed lease state)
BID_STATES = values(BidState)
LEASE_STATES = values(LeaseState)
VERDICTS = values(Verdict)
STAKE_OUTCOMES = values(StakeOutcome)
CHALLENGE_STATES = values(ChallengeState)
CHALLENGE_KINDS = values(ChallengeKind)
COMPLETION_STATES = values(CompletionState)
ID_LENGTH = 128


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class ServiceBase(DeclarativeBase):
    pass


class AgentRow(ServiceBase):
    __tablename__ = "cp_agents"
    agent_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    command: Mapped[str] = mapped_column(Text, default="[]")  # JSON argv the node runs in its sandbox
    enrolled_at: Mapped[float] = mapped_column(Float)


class NodeRow(ServiceBase):
    __tablename__ = "cp_nodes"
    node_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    public_key: Mapped[str] = mapped_column(String(64))
    enrolled_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    headroom_j: Mapped[float] = mapped_column(Float, default=0.0)  # last reported thermal budget
    # the hardware class it signed into its last pull: its bids are priced with that class's profile
    device_class: Mapped[str] = mapped_column(String(256), default="", server_default="")


class BidRow(ServiceBase):
    __tablename__ = "cp_bids"
    __table_args__ = (
        UniqueConstraint("agent_id", "bid_id", name="uq_cp_bids_agent_bid"),
        CheckConstraint(_one_of("status", BID_STATES), name="ck_cp_bids_status"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("cp_agents.agent_id"), index=True)
    bid_id: Mapped[str] = mapped_column(String(ID_LENGTH))  # the agent's name for it (idempotency)
    request_sha256: Mapped[str] = mapped_column(String(64))  # the same bid_id must mean the same bid
    model_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    precision: Mapped[str] = mapped_column(String(8))
    job: Mapped[str] = mapped_column(Text)  # JSON of the lease job
    price_micro_per_j: Mapped[int] = mapped_column(BigInteger)
    stake_micro: Mapped[int] = mapped_column(BigInteger)
    expected_j: Mapped[float] = mapped_column(Float)  # Maxwell's estimate, from the model's profile
    status: Mapped[str] = mapped_column(String(16), index=True, default=BidState.OPEN)  # its first state
    reason: Mapped[str] = mapped_column(Text, default="")
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)


class LeaseRow(ServiceBase):
    __tablename__ = "cp_leases"
    __table_args__ = (CheckConstraint(_one_of("status", LEASE_STATES), name="ck_cp_leases_status"),)
    lease_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("cp_agents.agent_id"), index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("cp_nodes.node_id"), index=True)
    bid_pk: Mapped[int] = mapped_column(ForeignKey("cp_bids.id"))
    lease_json: Mapped[str] = mapped_column(Text)
    tier: Mapped[str] = mapped_column(String(8))
    audit_probability: Mapped[float] = mapped_column(Float)
    tier_reason: Mapped[str] = mapped_column(Text, default="")
    price_micro_per_j: Mapped[int] = mapped_column(BigInteger)  # the round's uniform clearing price
    hold_micro: Mapped[int] = mapped_column(BigInteger)
    stake_micro: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True)
    issued_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)


class ReceiptRow(ServiceBase):
    __tablename__ = "cp_receipts"
    lease_id: Mapped[str] = mapped_column(ForeignKey("cp_leases.lease_id"), primary_key=True)
    receipt_sha256: Mapped[str] = mapped_column(String(64))
    evidence_sha256: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    receipt: Mapped[bytes] = mapped_column(LargeBinary)  # kept for the queued audit and disputes
    evidence: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[float] = mapped_column(Float)


class VerdictRow(ServiceBase):
    __tablename__ = "cp_verdicts"
    __table_args__ = (
        CheckConstraint(_one_of("verdict", VERDICTS), name="ck_cp_verdicts_verdict"),
        CheckConstraint(_one_of("stake_outcome", STAKE_OUTCOMES), name="ck_cp_verdicts_stake"),
    )
    lease_id: Mapped[str] = mapped_column(ForeignKey("cp_leases.lease_id"), primary_key=True)
    verdict: Mapped[str] = mapped_column(String(16), index=True)
    final: Mapped[bool] = mapped_column(Boolean)  # False while a drawn audit is queued
    audit_drawn: Mapped[bool] = mapped_column(Boolean)
    layers: Mapped[str] = mapped_column(Text)  # JSON: the AttestationResult's layers
    reason: Mapped[str] = mapped_column(Text)
    energy_j: Mapped[float] = mapped_column(Float)
    energy_memo: Mapped[str] = mapped_column(Text)
    charge_micro: Mapped[int] = mapped_column(BigInteger)
    stake_outcome: Mapped[str] = mapped_column(String(16))
    appraised_at: Mapped[float] = mapped_column(Float)


class DisputeRow(ServiceBase):
    __tablename__ = "cp_disputes"
    lease_id: Mapped[str] = mapped_column(ForeignKey("cp_leases.lease_id"), primary_key=True)
    statement: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class SettingRow(ServiceBase):
    """Settings that belong to this control plane's database (the tier policy), not to the host."""

    __tablename__ = "cp_settings"
    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    value: Mapped[str] = mapped_column(Text)  # JSON


class ChallengeRow(ServiceBase):
    """One opening Maxwell asked of an exact-tier lease's agent (through the lease's node): which
    traced tensors, when a pull of the node took it (`delivered_at`, None: never), by when, and what
    came back (verbatim; judged by service.exact_audits). The deadline counts from delivery
    (service.challenges)."""

    __tablename__ = "cp_challenges"
    __table_args__ = (
        CheckConstraint(_one_of("status", CHALLENGE_STATES), name="ck_cp_challenges_status"),
        CheckConstraint(_one_of("kind", CHALLENGE_KINDS), name="ck_cp_challenges_kind"),
    )
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    lease_id: Mapped[str] = mapped_column(ForeignKey("cp_leases.lease_id"), index=True)
    node_id: Mapped[str] = mapped_column(String(ID_LENGTH), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # l3: a part of every block; bisect / settle: a dispute's
    keys: Mapped[str] = mapped_column(Text)  # JSON [[block, op], ...]
    status: Mapped[str] = mapped_column(String(16), index=True)
    asked_at: Mapped[float] = mapped_column(Float)
    delivered_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # Maxwell's clock (cp0007)
    deadline: Mapped[float] = mapped_column(Float)
    answered_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    answer: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class OfferRow(ServiceBase):
    """An agent's standing offer to serve a model through the gateway (gateway.auction)."""

    __tablename__ = "cp_offers"
    agent_id: Mapped[str] = mapped_column(ForeignKey("cp_agents.agent_id"), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    precision: Mapped[str] = mapped_column(String(8))
    ask_micro_per_token: Mapped[int] = mapped_column(BigInteger)  # what the agent asks a requester
    price_micro_per_j: Mapped[int] = mapped_column(BigInteger)  # what it pays Maxwell for energy
    stake_micro: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[float] = mapped_column(Float)


class RequesterRow(ServiceBase):
    """Who may call the gateway: an API key, kept only as its SHA-256."""

    __tablename__ = "cp_requesters"
    requester_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    enrolled_at: Mapped[float] = mapped_column(Float)


class CompletionRow(ServiceBase):
    """One gateway completion: its lease, the price per token the auction set, the requester's
    hold, and what was finally charged (0 when the lease was cut off or not affirmed)."""

    __tablename__ = "cp_completions"
    __table_args__ = (CheckConstraint(_one_of("status", COMPLETION_STATES), name="ck_cp_completions_status"),)
    lease_id: Mapped[str] = mapped_column(ForeignKey("cp_leases.lease_id"), primary_key=True)
    requester_id: Mapped[str] = mapped_column(ForeignKey("cp_requesters.requester_id"), index=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    price_micro_per_token: Mapped[int] = mapped_column(BigInteger)
    hold_micro: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    tokens: Mapped[int] = mapped_column(Integer)
    charge_micro: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)
