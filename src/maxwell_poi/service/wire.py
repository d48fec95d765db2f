"""Request and response bodies of the control plane's HTTP API (pydantic: they are the OpenAPI spec)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..protocol.lease import Job, Precision

ID = r"^[A-Za-z0-9_.:-]{1,128}$"
AGENT_ID = r"^[A-Za-z0-9_.-]{1,128}$"  # no ':' (ledger account names are kind:agent)
HEX_KEY = r"^[0-9a-f]{64}$"
MAX_MICRO = 10**15  # a billion money units: beyond any plausible amount, well inside int64


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EnrollAgent(Strict):
    agent_id: str = Field(pattern=AGENT_ID)
    public_key: str = Field(pattern=HEX_KEY, description="Ed25519 public key, 64 hex characters")
    command: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="the agent program a node runs in its sandbox (argv); empty: nodes must know it",
    )


class EnrollNode(Strict):
    node_id: str = Field(pattern=ID)
    public_key: str = Field(pattern=HEX_KEY)


class Deposit(Strict):
    agent_id: str = Field(pattern=AGENT_ID)
    amount_micro: int = Field(gt=0, le=MAX_MICRO)
    key: str = Field(min_length=1, max_length=128, description="idempotency key: the same key deposits once")


class PolicyBody(Strict):
    medium_from_value: float = Field(ge=0, le=1e12)
    high_from_value: float = Field(ge=0, le=1e12)
    audit_cost_fraction: float = Field(gt=0, le=1)
    upgrade_headroom_factor: float = Field(ge=1, le=1e6)
    margin: float = Field(ge=0, le=100)
    exact_from_value: float | None = Field(
        default=None, ge=0, le=1e12, description="value from which leases go to the exact tier (None: never)"
    )
    exact_cost_fraction: float = Field(default=0.02, gt=0, le=1)


class BidBody(Strict):
    bid_id: str = Field(pattern=ID, description="the agent's name for this bid: resending it is harmless")
    model_id: str = Field(min_length=1, max_length=128)
    precision: Precision = "fp32"
    job: Job
    price_micro_per_j: int = Field(ge=1, le=MAX_MICRO, description="most it pays per measured joule")
    stake_micro: int = Field(ge=0, le=MAX_MICRO, description="escrowed with the lease, slashed if it cheats")


class PullBody(Strict):
    headroom_j: float = Field(ge=0, le=1e12, description="the node's thermal budget for this round")
    agents: list[str] = Field(default_factory=list, max_length=1024, description="agents it can run")
    max_leases: int = Field(default=16, ge=1, le=1024)
    wait_s: float = Field(
        default=0.0, ge=0, le=30, description="long poll: with nothing to hand out, wait up to this long"
    )


class IntakeBody(Strict):
    lease_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    receipt: str = Field(
        max_length=16 << 20,
        description="what the agent answered, verbatim (empty when it answered nothing: L0 judges that too)",
    )
    evidence: str = Field(min_length=1, max_length=16 << 20, description="the node's signed evidence (DSSE)")


class DisputeBody(Strict):
    statement: str = Field(min_length=1, max_length=20_000)


class OpeningBody(Strict):
    """A resident agent's answer to an L3 challenge, relayed verbatim by the lease's node."""

    challenge_id: int = Field(ge=1, le=2**62)
    lease_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    line: str = Field(
        max_length=16 << 20,
        description='the agent\'s opening line ({"o": ...}) or refusal ({"x": ...}), verbatim; '
        "empty when the agent gave none",
    )


class ErrorDetail(BaseModel):
    status: int
    expected: str
    got: str
    message: str
    problems: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    """Every refusal (4xx): what was expected and what came."""

    error: ErrorDetail


class IntakeAnswer(BaseModel):
    lease_id: str
    duplicate: bool
    verdict: str
    final: bool
    audit_drawn: bool
    reason: str
    energy_j: float
    charge_micro: int
    stake_outcome: str


class LeaseView(BaseModel):
    lease_id: str
    agent_id: str
    node_id: str
    status: str
    tier: str
    audit_probability: float
    tier_reason: str
    price_micro_per_j: int
    hold_micro: int
    stake_micro: int
    lease: dict[str, Any]
    verdict: dict[str, Any] | None = None
