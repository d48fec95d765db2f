"""The five audit paths (one-shot, node, control plane, `poi verify`, gateway), each fed a lease and
a receipt and the device class a Maxwell node measured ("" = none): what tests/test_tolerance_rule.py
and tests/test_native_audit.py run every path through."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from inproc_gateway import REQUESTER, plane, relay
from typer.testing import CliRunner

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.gateway.openai_wire import CompletionRequest
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.node.channel import AgentRun
from maxwell_poi.node.node import Node
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import AttestationResult, LayerName, LayerResult
from maxwell_poi.registry.models import Registry
from maxwell_poi.service.audit_backends import AuditJob, AuditRunner
from maxwell_poi.verifier.policy import Verifier


def swapped_once(registry: Registry, make: Callable[[Any], Any]) -> SwappedProver:
    """A prover answering with `make(the leased model)`, built once per model, claiming the leased one."""
    made: dict[str, Any] = {}

    def swap(lease: Lease, reg: Registry) -> Any:
        if lease.model_id not in made:
            made[lease.model_id] = make(reg.load(lease.model_id))
        return made[lease.model_id]

    return SwappedProver(AgentKey.generate(), swap, registry=registry)


@dataclass(frozen=True)
class Case:
    lease: Lease
    receipt: bytes
    prover: SwappedProver

    @property
    def agent_key(self) -> AgentKey:
        return self.prover.key


def evidence(device_class: str) -> LeaseEvidence:
    now = time.time()
    return LeaseEvidence(
        started_at=now - 1,
        finished_at=now,
        wall_s=1.0,
        cpu_s=0.5,
        max_rss_kb=0,
        bytes_in=0,
        bytes_out=0,
        sha256_in="",
        sha256_out="",
        exit_code=0,
        device_class=device_class,
        regime="resident",
    )


def one_shot(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """`poi run`'s stack (Verifier.default) on the runner's evidence."""
    verifier = Verifier.default(registry, Keyring({"agent-1": case.agent_key.public_hex}))
    return verifier.appraise(case.lease, case.receipt, evidence(device)).layer(LayerName.AUDIT)


def node(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """A standalone node's own appraisal (Node._appraise, as Node.serve calls it)."""
    verifier = Verifier.default(registry, Keyring({"agent-1": case.agent_key.public_hex}))
    agent = SimpleNamespace(sandbox=SimpleNamespace(describe=lambda: {}))
    with Node("node-a", NodeKey.generate(), verifier, registry) as n:
        done = n._appraise(agent, case.lease, AgentRun(case.receipt, evidence(device), False))  # type: ignore[arg-type]
    assert done.result is not None
    return done.result.layer(LayerName.AUDIT)


def service(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """The control plane's queued audit: the job a worker runs, with the node's evidence."""
    job = AuditJob.of(case.lease, case.receipt, evidence(device), time.time(), case.agent_key.public_hex)
    return AttestationResult.from_dict(AuditRunner(registry).run(job)).layer(LayerName.AUDIT)


def poi_verify(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """`poi verify`, given the node's signed evidence and key (none at all when not measured)."""
    from maxwell_poi.cli import app

    (tmp / "lease.json").write_text(case.lease.to_json())
    (tmp / "receipt.json").write_bytes(case.receipt)
    Keyring({"agent-1": case.agent_key.public_hex}).save(tmp / "keyring.json")
    argv = ["verify", "--lease", str(tmp / "lease.json"), "--receipt", str(tmp / "receipt.json")]
    argv += ["--keyring", str(tmp / "keyring.json"), "--json"]
    if device:
        key = NodeKey.generate()
        signed = sign_evidence(
            evidence(device), case.lease.lease_id, case.receipt, node_id="node-a", sandbox={}, key=key
        )
        (tmp / "evidence.dsse.json").write_bytes(signed)
        (tmp / "node.pub").write_text(key.public_hex + "\n")
        argv += ["--evidence", str(tmp / "evidence.dsse.json"), "--node-key", str(tmp / "node.pub")]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code in (0, 1), out.output
    result = AttestationResult.from_dict(json.loads(out.stdout))
    return result.layer(LayerName.AUDIT)


def gateway(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """The gateway's streaming audit, in process: a control plane whose node signed `device` into
    its pull, a directed lease issued by Gateway.start (audited, as a canary's is), the nudged
    prover's tokens and chunks relayed as they come, and the L4 result intake would record."""
    precision = case.lease.precision
    with plane(
        tmp, registry, case.agent_key, case.lease.model_id, device_class=device, precision=precision
    ) as gw:
        job = case.lease.job
        assert isinstance(job, GenerateJob)
        request = CompletionRequest(  # the case's sampling too: a greedy case stays one fixed trial
            model=case.lease.model_id,
            prompt=job.prompt,
            max_tokens=job.max_new_tokens,
            temperature=job.temperature,
            top_k=job.top_k,
        )
        lease = gw.start(REQUESTER, request, audited=True).lease
        receipt = case.prover.run(lease)
        relay(gw, registry, lease, receipt)
        result = gw.audited(lease.lease_id, receipt)
    assert result is not None
    return result


PATHS: dict[str, Callable[[Case, str, Registry, Path], LayerResult]] = {
    "one-shot": one_shot,
    "node": node,
    "service": service,
    "poi-verify": poi_verify,
    "gateway": gateway,
}
