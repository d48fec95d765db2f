"""Whether and where a gateway request may become a lease (issue 23, item 6: infrastructure limits
are not cheating, and not the requester's bill): refused at once, before any lease or hold, when no
node could ever run it — past the model's context (400) or past every enrolled node's full
capacity (413) — and, when it could, the node it goes to, telling a busy node (503 with
Retry-After) from a gone one (503).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..economics.energy import WATTS_PER_CORE_ESTIMATE
from ..protocol.lease import GenerateJob
from ..registry.models import Registry
from ..service.control import ControlPlane
from ..service.errors import ApiError
from ..service.market import MICRO, exact_capable
from ..service.schema import LeaseRow, NodeRow, OfferRow
from ..service.states import LeaseState
from .openai_wire import ChatRequest, CompletionRequest

NODE_FRESH_S = 60.0  # a node that pulled (or relayed, or took a lease) within this long is alive
BUSY_WAIT_S = 5.0  # how long a request waits for a busy node's next pull before its 503
BUSY_POLL_S = 0.25
RETRY_AFTER_S = 5  # the Retry-After of a 503 for a busy node (or one short of headroom right now)
ROUND_S = 60.0  # node.headroom.HORIZON_S, the round a headroom covers (a sibling: not imported)
CPU_CLASS = re.compile(r"cpu:.*:(\d+)cores")  # observer.host.device_class of a CPU node


class Unavailable(ApiError):
    """A 503 that will pass: the route adds `Retry-After` (a node busy, or short of headroom now)."""

    def __init__(self, expected: str, got: str, code: str) -> None:
        super().__init__(503, expected, got, code=code, retry_after_s=RETRY_AFTER_S)


@dataclass(frozen=True)
class NodeState:
    """What the gateway knows of one enrolled node when choosing where a lease goes."""

    node_id: str
    last_seen: float  # its last pull (0: never)
    headroom_j: float
    device_class: str
    taken: int  # leases in flight it was handed (issued by its last pull): it is running them
    waiting: int  # leases in flight issued after its last pull: its next pull picks them up
    newest_issued: float  # when the newest lease in flight on it was issued (0: none)
    last_relay: float  # its last relay of a gateway lease (0: none)

    @property
    def busy(self) -> bool:
        """Running leases its last pull handed it: it pulls again, and sees a new lease, only once
        they are handed in (a pull returns a node's unfinished leases, so an idle node has none)."""
        return self.taken > 0

    def alive(self, now: float) -> bool:
        """Pulled, relayed or took a lease recently: a node running a long lease is not gone."""
        return max(self.last_seen, self.last_relay, self.newest_issued) > now - NODE_FRESH_S


def full_capacity_j(device_class: str, reported_j: float) -> float | None:
    """The most headroom a node reports when idle. A CPU node measures idle share x cores x W/core
    x the round's horizon (node.headroom.cpu_headroom), so idle it reports cores x W x horizon; one
    that reported more (another measure) has at least that. None where the class does not say
    (a GPU: its power limit is not in the class): the gateway never refuses on a guess."""
    match = CPU_CLASS.fullmatch(device_class)
    if match is None:
        return None
    return max(int(match.group(1)) * WATTS_PER_CORE_ESTIMATE * ROUND_S, reported_j)


def refuse_beyond_context(
    registry: Registry, model_id: str, request: CompletionRequest | ChatRequest, prompt_tokens: int
) -> None:
    """400 (OpenAI's status for context_length_exceeded: a request to change, not a server
    state) for prompt + max_tokens past the model's positions: the agent could not compute
    them, nor the audit replay them."""
    limit = registry.reference(model_id).max_positions
    new = request.new_tokens
    if prompt_tokens + new <= limit:
        return
    field = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
    raise ApiError(
        400,
        f"{field} + prompt tokens <= {limit} (the context length of {model_id!r})",
        f"{new} + {prompt_tokens} = {new + prompt_tokens}",
        type="invalid_request_error",
        code="context_length_exceeded",
        param=field,
    )


def refuse_unservable(
    control: ControlPlane, model_id: str, job: GenerateJob, offer: OfferRow, prompt_tokens: int
) -> None:
    """413 for a lease no enrolled node could take even idle: its expected energy (lease +
    verification, as the tier policy counts it when it defers) beyond every node's full
    capacity. 413, not 400 or 503: the request is well formed but too large for this network
    (RFC 9110: larger than the server is able to process), and waiting will not help; a
    smaller max_tokens or prompt will. A node whose capacity is unknown here (a GPU) or that
    has room when idle leaves it to the 503s of `choose_node`."""
    with Session(control.ledger.engine) as session:
        nodes = session.execute(select(NodeRow.node_id, NodeRow.device_class, NodeRow.headroom_j)).all()
    if not nodes:
        return
    market, most = control.market, None
    for node_id, device_class, headroom_j in nodes:
        capacity = full_capacity_j(device_class or "", headroom_j or 0.0)
        if capacity is None:
            return
        expected = market.expected_j(model_id, job, device_class or None)
        choice = market.policy.choose(
            value=offer.price_micro_per_j * expected / MICRO,
            stake=offer.stake_micro / MICRO,
            lease_energy_j=expected,
            headroom_j=capacity,
            price_per_j=offer.price_micro_per_j / MICRO,
            exact_ok=exact_capable(control.registry, model_id),
        )
        if not choice.deferred:
            return
        need = choice.lease_energy_j + choice.verification_energy_j
        if most is None or capacity > most[1]:
            most = (node_id, capacity, need)
    assert most is not None
    node_id, capacity, need = most
    raise ApiError(
        413,
        f"a lease some node can run: expected energy (lease + verification) <= {capacity:.1f} J, "
        f"the full capacity of the largest enrolled node ({node_id!r}, idle)",
        f"{need:.1f} J for max_tokens {job.max_new_tokens} + {prompt_tokens} prompt tokens; "
        "ask for fewer tokens",
        type="invalid_request_error",
        code="request_too_large",
        param="max_tokens",
    )


def node_states(engine: Engine, relays: dict[str, float]) -> list[NodeState]:
    """Every enrolled node with its leases in flight, and `relays`: its last relay (time.time())."""
    now = time.time()
    with Session(engine) as session:
        rows = session.execute(
            select(NodeRow.node_id, NodeRow.last_seen, NodeRow.headroom_j, NodeRow.device_class)
        ).all()
        leases = session.execute(
            select(LeaseRow.node_id, LeaseRow.issued_at).where(
                LeaseRow.status == LeaseState.PULLED, LeaseRow.deadline > now
            )
        ).all()
    out = []
    for node_id, last_seen, headroom_j, device_class in rows:
        seen = last_seen or 0.0
        issued = [t for n, t in leases if n == node_id]
        taken = sum(t <= seen for t in issued)
        out.append(
            NodeState(
                node_id,
                seen,
                headroom_j or 0.0,
                device_class or "",
                taken,
                len(issued) - taken,
                max(issued, default=0.0),
                relays.get(node_id, 0.0),
            )
        )
    return out


def choose_node(states: Callable[[], list[NodeState]], model_id: str, wait_s: float) -> str:
    """The node the lease goes to: one that pulled within NODE_FRESH_S and is not running leases
    it was handed (fewest leases waiting for its next pull, then the most recently seen). When
    every live node is busy, wait up to `wait_s` for one's next pull, then 503 saying so (busy,
    with Retry-After) — distinct from no live node at all (gone)."""
    give_up = time.monotonic() + wait_s
    while True:
        now = time.time()
        nodes = states()
        ready = [n for n in nodes if n.last_seen > now - NODE_FRESH_S and not n.busy]
        if ready:
            return min(ready, key=lambda n: (n.waiting, -n.last_seen)).node_id
        busy = [n for n in nodes if n.busy and n.alive(now)]
        if not busy:
            raise ApiError(
                503,
                f"a node serving {model_id!r}",
                f"no node pulled, relayed or took a lease in the last {NODE_FRESH_S:.0f} s",
                code="no_node",
            )
        if time.monotonic() >= give_up:
            n = min(busy, key=lambda n: n.taken)
            raise Unavailable(
                f"a node free to take a lease for {model_id!r}",
                f"node {n.node_id!r} busy with {n.taken} lease{'s' * (n.taken != 1)} "
                f"(waited {wait_s:g} s for its next pull); retry",
                "node_busy",
            )
        time.sleep(BUSY_POLL_S)


def fresh_pull(control: ControlPlane, node_id: str, wait_s: float) -> bool:
    """Wake `node_id`'s long-polling pull and wait up to `wait_s` for its next one (which reports
    its headroom afresh); whether it came."""
    asked = time.time()
    control.market.wake()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with Session(control.ledger.engine) as session:
            seen = session.scalar(select(NodeRow.last_seen).where(NodeRow.node_id == node_id))
        if seen is not None and seen > asked:
            return True
        time.sleep(BUSY_POLL_S)
    return False
