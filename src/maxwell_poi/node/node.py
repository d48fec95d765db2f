"""A Maxwell node: starts each agent once in its own sandbox, hands it leases, measures, appraises
and signs the evidence.

The node is the trust anchor of the measurements: what it signs is what its own sandbox
accounting, clock and channel saw (observer.resident), never what an agent reported. The verdict
it attaches is a convenience for a standalone node; a control plane re-appraises from the signed
evidence and the receipt (observer.attest.open_evidence).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..protocol.lease import Lease
from ..protocol.result import AttestationResult
from ..registry.models import Registry
from ..verifier.policy import Verifier
from .attest import NodeKey, sign_evidence
from .channel import AgentRun
from .probe import WorkProbes
from .resident import ResidentAgent, StreamWatch
from .resident_runs import serve_wave, start_resident


@dataclass(frozen=True)
class NodeResult:
    lease: Lease
    run: AgentRun
    result: AttestationResult | None  # None on a node that leaves appraisal to its control plane
    signed_evidence: bytes  # DSSE envelope, observer.attest
    verify_s: float

    def summary(self) -> dict:
        ev = self.run.evidence
        return {
            "lease_id": self.lease.lease_id,
            "agent_id": self.lease.agent_id,
            "model_id": self.lease.model_id,
            "verdict": self.result.verdict.value if self.result else "not appraised here",
            "caught_by": [str(n) for n in self.result.caught_by] if self.result else [],
            "reason": self.result.reason if self.result else "",
            "accounting": ev.accounting.get("source", "rusage"),
            "batch": 1 + ev.co_leases,
            "lease_wall_s": round(ev.wall_s, 4),
            "sandbox_cpu_s": round(ev.cpu_s, 4),
            "verify_s": round(self.verify_s, 4),
        }


class Node:
    """Resident agents by agent id; `serve(agent_id, leases)` hands the leases over at once (the
    agent may batch them) and returns each appraised, with its signed evidence."""

    def __init__(
        self, node_id: str, key: NodeKey, verifier: Verifier | None, registry: Registry | None = None
    ) -> None:
        """`verifier=None`: a node under a control plane, which appraises from the signed evidence."""
        self.node_id = node_id
        self.key = key
        self.verifier = verifier
        self.registry = registry or Registry()
        self.agents: dict[str, ResidentAgent] = {}
        self.probes = WorkProbes(self.registry)  # every generation lease is probed (node.probe)

    def start_agent(self, agent_id: str, argv: Sequence[str], cwd: str | None = None) -> ResidentAgent:
        if agent_id in self.agents:
            raise ValueError(f"agent {agent_id!r} is already running on node {self.node_id}")
        self.agents[agent_id] = start_resident(list(argv), agent_id, cwd, probes=self.probes)
        return self.agents[agent_id]

    def agent(self, agent_id: str) -> ResidentAgent:
        try:
            return self.agents[agent_id]
        except KeyError:
            known = ", ".join(sorted(self.agents)) or "none"
            raise KeyError(
                f"no resident agent {agent_id!r} on node {self.node_id} (running: {known})"
            ) from None

    def serve(
        self,
        agent_id: str,
        leases: Sequence[Lease],
        timeout_s: float | None = None,
        watch: Callable[[Lease], StreamWatch | None] | None = None,
    ) -> list[NodeResult]:
        agent = self.agent(agent_id)
        runs = serve_wave(agent, leases, self.registry, timeout_s, watch)
        return [self._appraise(agent, lease, run) for lease, run in zip(leases, runs, strict=True)]

    def _appraise(self, agent: ResidentAgent, lease: Lease, run: AgentRun) -> NodeResult:
        t0 = time.perf_counter()
        result = self.verifier.appraise(lease, run.receipt, run.evidence) if self.verifier else None
        verify_s = time.perf_counter() - t0
        signed = sign_evidence(
            run.evidence,
            lease.lease_id,
            run.receipt,
            node_id=self.node_id,
            sandbox=agent.sandbox.describe(),
            key=self.key,
        )
        return NodeResult(lease, run, result, signed, verify_s)

    def stop_agent(self, agent_id: str) -> None:
        """Close the agent's input and stop its sandbox (everything in it, children included)."""
        self.agents.pop(agent_id).close()

    def close(self) -> None:
        for agent in self.agents.values():
            agent.close()
        self.agents.clear()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
