"""In-process intake with made-up receipts, for tests about who settles and audits a lease (not about
appraisal): a stand-in for the inline layers, node-signed made-up evidence, and one issued lease."""

from __future__ import annotations

import time

from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.result import AttestationResult, LayerName, LayerResult, Status
from maxwell_poi.service import ControlPlane
from maxwell_poi.service.market import PulledLease
from maxwell_poi.service.wire import BidBody, Deposit, EnrollAgent, EnrollNode, IntakeBody, PullBody

JOB = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}


class PassingInline:
    """Stands in for L0-L2 so that the lease is accepted and goes to its drawn L4 audit: the test is
    about who queues and runs the audit, not about appraisal (the audit workers' L0 + L4 then judge
    the receipt, and refuse the made-up one)."""

    def appraise(self, lease: Lease, _receipt: bytes, _evidence: object) -> AttestationResult:
        layers = (LayerResult(LayerName.INTEGRITY, Status.PASS, "stand-in for the inline layers"),)
        return AttestationResult(lease.lease_id, lease.agent_id, lease.model_id, layers)


def made_up_intake(lease_id: str, node_key: NodeKey, node_id: str = "n1") -> IntakeBody:
    """A receipt nobody signed, with evidence the node did sign (made up: the inline layers are
    stood in for, and the audit refuses the receipt)."""
    receipt = b'{"not": "a receipt the audit can replay"}'
    now = time.time()
    evidence = LeaseEvidence(
        started_at=now - 1, finished_at=now, wall_s=1.0, cpu_s=0.5, max_rss_kb=1000, bytes_in=10,
        bytes_out=20, sha256_in="0" * 64, sha256_out="1" * 64, exit_code=0, regime="resident",
    )  # fmt: skip
    signed = sign_evidence(evidence, lease_id, receipt, node_id=node_id, sandbox={}, key=node_key)
    return IntakeBody(lease_id=lease_id, receipt=receipt.decode(), evidence=signed.decode())


def one_lease(cp: ControlPlane, node_key: NodeKey, stake_micro: int = 100_000) -> PulledLease:
    """Node n1 and agent alice enrolled on `cp`, alice funded, one of her bids won and pulled."""
    cp.enroll_node(EnrollNode(node_id="n1", public_key=node_key.public_hex))
    cp.enroll_agent(EnrollAgent(agent_id="alice", public_key=AgentKey.generate().public_hex, command=[]))
    cp.deposit(Deposit(agent_id="alice", amount_micro=10_000_000, key="d"))
    bid = {"bid_id": "b1", "model_id": "gpt2-micro", "job": JOB, "price_micro_per_j": 100}
    cp.market.place_bid("alice", BidBody.model_validate({**bid, "stake_micro": stake_micro}))
    (pulled,) = cp.market.pull("n1", PullBody(headroom_j=1e6, agents=[], max_leases=4))
    return pulled
