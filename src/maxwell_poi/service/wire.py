"""Request and response bodies of the control plane's HTTP API (pydantic: they are the OpenAPI spec).

Requests are `Strict` (an unknown field is a 422); responses are what the routes declare as their
`response_model` and what `ServiceClient` returns, so the server and its client speak one contract.
"""

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
    device_class: str = Field(
        default="",
        max_length=256,
        description="the node's hardware class (as in its evidence): bids for it are priced with the "
        "profile of that class; empty: unknown, and each bid's reason says so",
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
    cpu_wait_s: float | None = Field(
        default=None,
        ge=0,
        le=86_400,
        description="how long the agent's sandbox waited for a CPU while it answered, as the node "
        "measured it (run-queue delay; never the agent's word); extends the deadline by at most the "
        "question's `cpu_wait_cap_s`. Absent: not measured, no extension",
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


# -- responses: anyone ------------------------------------------------------------------------------


class Health(BaseModel):
    status: str
    db: str = Field(description="the database dialect (sqlite, postgresql)")
    audit_queue: int
    process: int = Field(
        description="the API process that answered (its pid; `poi serve --workers N` runs N)"
    )
    audit_lead: bool = Field(description="whether this process runs the audits (one per database)")


class EarKey(BaseModel):
    """Maxwell's EAR signing key as a JWK (OKP, Ed25519)."""

    kty: str
    crv: str
    x: str
    kid: str
    alg: str


# -- responses: Maxwell -----------------------------------------------------------------------------


class AgentView(BaseModel):
    agent_id: str
    public_key: str
    command: list[str]


class NodeView(BaseModel):
    node_id: str
    public_key: str


class DepositAnswer(BaseModel):
    transfer_id: int
    created: bool = Field(description="False: this idempotency key deposited before; nothing moved now")
    agent_id: str
    wallet_micro: int
    escrow_micro: int


class PolicyView(BaseModel):
    """The tier policy in force (economics.TierPolicy)."""

    medium_from_value: float
    high_from_value: float
    audit_cost_fraction: float
    upgrade_headroom_factor: float
    margin: float
    exact_from_value: float | None
    exact_cost_fraction: float


class LedgerCheckView(BaseModel):
    ok: bool
    problems: list[str]
    accounts: int
    transfers: int
    entries: int


class LedgerReport(BaseModel):
    balances: dict[str, int] = Field(description="every account's balance, micro-units")
    check: LedgerCheckView


class ConfigView(BaseModel):
    """The control plane's settings (service.ServiceConfig): the database without its password, and
    where the admin token comes from instead of the token."""

    model_config = ConfigDict(extra="allow")  # a setting added to ServiceConfig still shows
    db: str
    host: str
    port: int
    admin_token: str


class ChallengeView(BaseModel):
    """One opening asked of an exact-tier lease's agent (admin view)."""

    challenge_id: int
    kind: str
    keys: list[tuple[int, str]] = Field(description="[block, op] of each tensor asked for")
    status: str
    asked_at: float
    delivered_at: float | None = Field(default=None, description="when a pull of the node took it")
    deadline: float
    answered_at: float | None
    answer_bytes: int


# -- responses: agents ------------------------------------------------------------------------------


class BidView(BaseModel):
    bid_id: str
    agent_id: str
    model_id: str
    price_micro_per_j: int
    stake_micro: int
    expected_j: float
    status: str
    reason: str
    lease_id: str | None


class LayerView(BaseModel):
    """One verification layer's result (protocol.result.LayerResult.as_dict)."""

    layer: str
    status: str
    reason: str
    score: float | None = None
    cost_s: float = 0.0
    details: dict[str, Any] = Field(default_factory=dict)


class VerdictView(BaseModel):
    verdict: str
    final: bool
    audit_drawn: bool
    reason: str
    layers: list[LayerView]
    energy_j: float
    energy_memo: str
    charge_micro: int
    stake_outcome: str
    appraised_at: float


class LeaseView(BaseModel):
    lease_id: str
    agent_id: str
    node_id: str
    status: str = Field(
        description="pulled, audit_pending, settled, expired (no receipt reached Maxwell) or failed "
        "(the node handed in no receipt: the agent never started or crashed; nothing charged, the "
        "stake returned, the cause in the verdict's reason)"
    )
    tier: str
    audit_probability: float
    tier_reason: str
    price_micro_per_j: int
    hold_micro: int
    stake_micro: int
    lease: dict[str, Any] = Field(description="the signed lease (protocol.lease.Lease)")
    verdict: VerdictView | None = None


class EarAnswer(BaseModel):
    lease_id: str
    ear: str = Field(description="an EAR JWT signed by Maxwell (key: GET /v1/ear-key)")


class DisputeView(BaseModel):
    lease_id: str
    statement: str
    created_at: float


class BalanceView(BaseModel):
    agent_id: str
    wallet_micro: int
    escrow_micro: int


# -- responses: nodes -------------------------------------------------------------------------------


class PulledLeaseView(BaseModel):
    lease: dict[str, Any] = Field(description="the signed lease (protocol.lease.Lease)")
    command: list[str] = Field(description="the agent's enrolled command (argv)")
    tier: str
    audit_probability: float
    stream_to: str | None = Field(description="where to relay its tokens as they arrive (gateway leases)")


class OpenChallenge(BaseModel):
    """An L3 challenge waiting for the node's agent: open these tensors before `timeout_s` (counted
    from this delivery), extended by the sandbox's measured CPU wait up to `cpu_wait_cap_s`."""

    challenge_id: int
    lease_id: str
    agent_id: str
    keys: list[tuple[int, str]]
    timeout_s: float
    cpu_wait_cap_s: float = 0.0


class PullAnswer(BaseModel):
    node_id: str
    leases: list[PulledLeaseView]
    challenges: list[OpenChallenge]


class OpeningAnswer(BaseModel):
    challenge_id: int
    lease_id: str
    status: str


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


class DashboardView(BaseModel):
    """What the dashboard page draws (service.dashboard.snapshot); each row is the page's own view."""

    generated_at: float
    limits: dict[str, int] = Field(description="how many of each kind the snapshot holds at most")
    agents: list[dict[str, Any]]
    nodes: list[dict[str, Any]]
    leases: list[dict[str, Any]]
    balances: list[dict[str, Any]] = Field(description="wallet and escrow balances over time")
    traces: list[dict[str, Any]] = Field(description="token/CPU traces of the newest leases with a receipt")
    completions: list[dict[str, Any]]
