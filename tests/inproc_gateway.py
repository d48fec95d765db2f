"""A gateway in process, without HTTP or agents, for tests that drive one lease by hand: a control
plane on SQLite whose one node signed a device class into its pull, one enrolled and funded agent
offering a model, one requester; the lease comes from Gateway.start as a request's would, and the
answer is relayed token by token as a node would relay it (import it with
``from inproc_gateway import plane, relay``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from maxwell_poi.economics.tiers import TierPolicy
from maxwell_poi.gateway import Gateway
from maxwell_poi.gateway.delivery import Delivery, DeliveryPolicy
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.protocol.fingerprint import chunk_spans
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.registry.models import Registry
from maxwell_poi.service import ControlPlane, ServiceConfig
from maxwell_poi.service.wire import Deposit, EnrollAgent, EnrollNode, PolicyBody, PullBody

AGENT, NODE, REQUESTER = "agent-1", "node-a", "req"


@contextlib.contextmanager
def plane(
    tmp: Path,
    registry: Registry,
    agent_key: AgentKey,
    model_id: str,
    *,
    device_class: str,
    delivery: Delivery | str = Delivery.IMMEDIATE,
    low_tier: bool = False,
    precision: str = "fp32",
) -> Iterator[Gateway]:
    """`delivery`: the server's default; `low_tier`: no lease is audited unless it must be;
    `precision`: the agent's offer's."""
    tmp.mkdir(parents=True, exist_ok=True)
    config = ServiceConfig(
        db=str(tmp / "cp.sqlite"), admin_token="t" * 32, audit_backend="thread", canary_rate=0.0
    )
    control = ControlPlane(config, registry=registry)
    try:
        if low_tier:
            never = {"medium_from_value": 1e9, "high_from_value": 1e9, "upgrade_headroom_factor": 1e6}
            control.set_policy(PolicyBody(**{**asdict(TierPolicy()), **never}))
        control.enroll_agent(EnrollAgent(agent_id=AGENT, public_key=agent_key.public_hex))
        control.deposit(Deposit(agent_id=AGENT, amount_micro=50_000_000, key="fund"))
        control.enroll_node(EnrollNode(node_id=NODE, public_key=NodeKey.generate().public_hex))
        control.market.pull(NODE, PullBody(headroom_j=1e6, agents=[AGENT], device_class=device_class))
        gw = Gateway(control, delivery=DeliveryPolicy(str(delivery)))
        gw.enroll_requester(REQUESTER, 10**9)
        gw.offer(AGENT, model_id, precision, 1, 20, 1000)
        yield gw
    finally:
        control.close()


def relay(
    gw: Gateway,
    registry: Registry,
    lease: Lease,
    receipt: bytes,
    *,
    tokens: list[int] | None = None,
    after_each: Callable[[int], None] | None = None,
) -> str | None:
    """Relay the receipt's answer (or `tokens` in its place) one token per relay, each fingerprint
    chunk once the prover would have committed it; `after_each(i)` after token i's relay (a reader
    draining the requester's queue). The cut reason, or None."""
    job = lease.job
    assert isinstance(job, GenerateJob)
    claims = open_receipt(receipt, 1 << 24).claims
    answer = claims.tokens() if tokens is None else tokens
    prompt_len = len(registry.encode_prompt(lease.model_id, job.prompt))
    spans = chunk_spans(prompt_len, len(answer), job.chunk)
    data = claims.fingerprint_bytes()
    size = len(data) // len(spans)
    due: dict[int, list[int]] = {}
    for k, (_s, e) in enumerate(spans):
        due.setdefault(min(max(e - prompt_len, 0), len(answer) - 1), []).append(k)
    for i, token in enumerate(answer):
        chunks = [(k, data[k * size : (k + 1) * size]) for k in due.get(i, [])]
        cut = gw.relay(NODE, lease.lease_id, [[i, token, 0.01 * i, 0.01 * i]], chunks)
        if after_each is not None:
            after_each(i)
        if cut:
            return cut  # the node stops relaying
    return None


__all__ = ["AGENT", "NODE", "REQUESTER", "plane", "relay"]
