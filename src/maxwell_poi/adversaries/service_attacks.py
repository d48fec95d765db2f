"""Adversaries of the control plane itself: real clients that attack its API over HTTP.

    python -m maxwell_poi.adversaries.service_attacks NAME --server URL [options]   (prints JSON)

    other-agents-lease   an enrolled agent reads, disputes and asks the EAR of another agent's lease
    replay-after-restart resubmits receipts the control plane took in before it restarted, and
                         variants of them (another receipt for a settled lease)
    bid-flood            one agent places bids as fast as it can, to bloat the book and crowd out others
    node-impersonation   a client with its own key poses as the enrolled node: pulls leases, and hands
                         in evidence it signed itself for a real lease

Each returns an `AttackOutcome`: attempts, how many the service refused (4xx with a reason) and how
many it accepted — a defence holds when `accepted_harmful` is 0 and no answer was a 5xx.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..node.attest import NodeKey, sign_evidence
from ..observer.evidence import LeaseEvidence
from ..protocol.keys import AgentKey
from ..service.client import ServiceClient, ServiceRefused


@dataclass
class AttackOutcome:
    name: str
    attempts: int = 0
    refused: int = 0  # 4xx with {expected, got}
    accepted_harmful: int = 0  # the service did what the attacker wanted
    server_errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # a few of the refusals, verbatim

    @property
    def held(self) -> bool:
        return self.attempts > 0 and self.accepted_harmful == 0 and self.server_errors == 0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "held": self.held}


class Tally:
    """Counts each attempt by the service's answer."""

    def __init__(self, name: str) -> None:
        self.outcome = AttackOutcome(name)
        self._statuses: Counter[str] = Counter()

    def expect_refusal(self, call: Any) -> Any:
        """Try `call()`; a 4xx is the defence holding, a 2xx is the attack succeeding."""
        self.outcome.attempts += 1
        try:
            answer = call()
        except ServiceRefused as exc:
            self._statuses[str(exc.status)] += 1
            if exc.status >= 500:
                self.outcome.server_errors += 1
            else:
                self.outcome.refused += 1
                if len(self.outcome.reasons) < 5:
                    self.outcome.reasons.append(str(exc)[:300])
            return None
        self._statuses["2xx"] += 1
        self.outcome.accepted_harmful += 1
        return answer

    def done(self) -> AttackOutcome:
        self.outcome.statuses = dict(self._statuses)
        return self.outcome


def other_agents_lease(mallory: ServiceClient, victim_lease_ids: list[str]) -> AttackOutcome:
    tally = Tally("other-agents-lease")
    for lease_id in victim_lease_ids:
        tally.expect_refusal(lambda lid=lease_id: mallory.lease(lid))
        tally.expect_refusal(lambda lid=lease_id: mallory.ear(lid))
        tally.expect_refusal(lambda lid=lease_id: mallory.dispute(lid, "that was my work"))
    return tally.done()


def replay_after_restart(node: ServiceClient, taken_in: list[dict[str, str]]) -> AttackOutcome:
    """`taken_in`: [{lease_id, receipt, evidence}] the service accepted before it restarted. A
    resubmission must come back as the duplicate it is (no money moves); another lease's receipt
    and evidence under a settled lease id must be refused."""
    tally = Tally("replay-after-restart")
    for i, item in enumerate(taken_in):
        tally.outcome.attempts += 1
        answer = node.intake(item["lease_id"], item["receipt"].encode(), item["evidence"].encode())
        if not answer.duplicate:
            tally.outcome.accepted_harmful += 1  # taken in twice: money would move twice
        other = taken_in[(i + 1) % len(taken_in)]
        if other is not item:
            tally.expect_refusal(
                lambda o=other, it=item: node.intake(
                    it["lease_id"], o["receipt"].encode(), o["evidence"].encode()
                )
            )
    return tally.done()


def bid_flood(agent: ServiceClient, model_id: str, bids: int, price: int = 1) -> AttackOutcome:
    """Bids until refused; every bid past the service's per-agent cap is an attempt that must fail."""
    tally = Tally("bid-flood")
    stored = 0
    for i in range(bids):
        body = {
            "bid_id": f"flood-{uuid.uuid4().hex[:12]}-{i}",
            "model_id": model_id,
            "job": {"kind": "generate", "prompt": "flood", "max_new_tokens": 1},
            "price_micro_per_j": price,
            "stake_micro": 0,
        }
        try:
            agent.bid(body)
            stored += 1
        except ServiceRefused as exc:
            tally.outcome.attempts += 1
            tally.outcome.refused += exc.status < 500
            tally.outcome.server_errors += exc.status >= 500
            if len(tally.outcome.reasons) < 1:
                tally.outcome.reasons.append(str(exc)[:300])
    out = tally.done()
    out.statuses["stored"] = stored
    return out


def node_impersonation(
    server: str, node_id: str, lease_id: str, receipt: bytes, http: Any = None
) -> AttackOutcome:
    """A client that is not the node: its own key, the node's id; and forged evidence for `lease_id`."""
    tally = Tally("node-impersonation")
    fake = NodeKey.generate()
    as_node = ServiceClient(server, key=fake, principal=f"node:{node_id}", http=http)
    tally.expect_refusal(lambda: as_node.pull(1e6, []))
    evidence = _forged_evidence()
    for claimed in (node_id, "node-of-my-own"):  # the enrolled node's name, and one never enrolled
        signed = sign_evidence(
            evidence, lease_id, receipt, node_id=claimed, sandbox={"source": "none"}, key=fake
        )
        tally.expect_refusal(lambda s=signed: as_node.intake(lease_id, receipt, s))
    return tally.done()


def _forged_evidence() -> LeaseEvidence:
    """Evidence that says whatever the forger likes: plenty of CPU, a full stream."""
    return LeaseEvidence(
        started_at=0.0,
        finished_at=1.0,
        wall_s=1.0,
        cpu_s=1.0,
        max_rss_kb=1 << 20,
        bytes_in=100,
        bytes_out=100,
        sha256_in="0" * 64,
        sha256_out="0" * 64,
        exit_code=None,
        regime="resident",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m maxwell_poi.adversaries.service_attacks", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "name", choices=["other-agents-lease", "replay-after-restart", "bid-flood", "node-impersonation"]
    )
    p.add_argument("--server", required=True)
    p.add_argument("--key", type=Path, help="the attacker's agent key (other-agents-lease, bid-flood)")
    p.add_argument("--agent-id")
    p.add_argument("--lease", action="append", default=[], help="a victim's lease id (repeatable)")
    p.add_argument(
        "--store", type=Path, help="replay: JSON list of {lease_id, receipt, evidence} taken in before"
    )
    p.add_argument("--node-id", default="local")
    p.add_argument("--model", default="gpt2-micro")
    p.add_argument("--bids", type=int, default=1000)
    args = p.parse_args(argv)
    agent = (
        ServiceClient(args.server, key=AgentKey.load(args.key), principal=f"agent:{args.agent_id}")
        if args.key
        else None
    )
    if args.name == "other-agents-lease":
        outcome = other_agents_lease(agent, args.lease)
    elif args.name == "bid-flood":
        outcome = bid_flood(agent, args.model, args.bids)
    elif args.name == "replay-after-restart":
        outcome = replay_after_restart(ServiceClient(args.server), json.loads(args.store.read_text()))
    else:
        taken = json.loads(args.store.read_text())[0]
        outcome = node_impersonation(args.server, args.node_id, taken["lease_id"], taken["receipt"].encode())
    print(json.dumps(outcome.as_dict(), indent=2))
    return 0 if outcome.held else 1


if __name__ == "__main__":
    sys.exit(main())
