"""One tolerance rule everywhere (issue 24, item 4): every audit path chooses the L4 tolerance set by
`verifier.thresholds.choose_tolerance` from the class pair Maxwell's node measured, and says in its
result which set and pair it used.

The adversary that found the gap: the gateway's streaming audit always applied the cross-class set,
so an agent the node measured on the verifier's own class passed with an error only that looser set
allows. Here each path is fed the same thing — a receipt whose fingerprints are nudged ~7e-4 off
(adversaries.nudged_fingerprints: honest tokens, committed values inside the cross-class set, outside
the same-class one) — once with evidence of the node measuring the prover on this host's class, where
it must fail under the same-class set, and once without a measured class, where it passes under the
cross-class set with a reason saying the class was not measured. A path that ignores the measured
class passes both; one that ignores the rule's fail-closed answer fails the second.
"""

from __future__ import annotations

import ast
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from inproc_gateway import REQUESTER, plane, relay
from typer.testing import CliRunner

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.nudged_fingerprints import nudged
from maxwell_poi.gateway.openai_wire import CompletionRequest
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.node.channel import AgentRun
from maxwell_poi.node.node import Node
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.host import numerics_class, this_device
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import AttestationResult, LayerName, LayerResult, Status
from maxwell_poi.registry.models import Registry
from maxwell_poi.service.audit_backends import AuditJob, AuditRunner
from maxwell_poi.verifier.policy import Verifier
from maxwell_poi.verifier.thresholds import CROSS, SAME, Thresholds, choose_tolerance

MODEL, TOKENS = "gpt2-micro", 16
SRC = Path(__file__).resolve().parents[1] / "src" / "maxwell_poi"
RULE_FILE = SRC / "verifier" / "thresholds.py"
# what only the rule may read: the sets, the class pairs, and the lookup of one set
SETS = frozenset({"for_precision", "by_precision", "same_class", "measured_pair", "class_pairs"})


# -- the rule itself -----------------------------------------------------------------------------


def test_the_rule_picks_same_class_only_for_a_measured_matching_class() -> None:
    t = Thresholds.load()
    here = this_device()
    same = choose_tolerance(t, "fp32", here, here)
    assert same.tolerance_set == SAME and same.tolerance == t.for_precision("fp32", same_class=True)
    assert same.class_pair == f"{numerics_class(here)} -> {numerics_class(here)}" and same.prover_measured
    other = choose_tolerance(t, "fp32", "cuda:NVIDIA H100", here)
    assert other.tolerance_set == CROSS and "another class" in other.reason
    for unmeasured in (None, ""):  # fail closed: the looser set, saying the class was not measured
        c = choose_tolerance(t, "fp32", unmeasured, here)
        assert c.tolerance_set == CROSS and c.tolerance == t.for_precision("fp32")
        assert "not measured" in c.reason and "not measured" in c.label() and not c.prover_measured
        assert c.class_pair.startswith("unknown -> ")
    pair = choose_tolerance(t, "fp32", "cuda:NVIDIA H200@strict-fp32", "cpu:Any CPU")
    assert pair.tolerance_set == SAME and "(measured pair)" in pair.class_pair and pair.provenance
    assert choose_tolerance(t, "bf16", "cuda:NVIDIA H200@strict-fp32", "cpu:Any CPU").tolerance_set == CROSS


def test_a_same_class_without_a_calibrated_set_says_so(tmp_path: Path) -> None:
    """Where no same-class set was calibrated for a precision, the result does not claim one."""
    data = json.loads(Path(RULE_FILE.parent.parent / "data" / "thresholds.json").read_text())
    data["same_class"].pop("bf16")
    path = tmp_path / "t.json"
    path.write_text(json.dumps(data))
    c = choose_tolerance(Thresholds.load(path), "bf16", this_device(), this_device())
    assert c.tolerance_set == CROSS and "no same-class set" in c.reason


# -- every path, fed the same nudged receipt ------------------------------------------------------


@dataclass(frozen=True)
class Case:
    lease: Lease
    receipt: bytes
    prover: SwappedProver

    @property
    def agent_key(self) -> AgentKey:
        return self.prover.key


@pytest.fixture(scope="module")
def cheat(registry: Registry) -> SwappedProver:
    made: dict[str, Any] = {}

    def swap(lease: Lease, reg: Registry) -> Any:
        if lease.model_id not in made:
            made[lease.model_id] = nudged(reg.load(lease.model_id))
        return made[lease.model_id]

    return SwappedProver(AgentKey.generate(), swap, registry=registry)


def _lease() -> Lease:
    job = GenerateJob(prompt="The history of the river", max_new_tokens=TOKENS, temperature=0.8, chunk=8)
    return Lease.issue("agent-1", MODEL, job)


def _evidence(device_class: str) -> LeaseEvidence:
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
    return verifier.appraise(case.lease, case.receipt, _evidence(device)).layer(LayerName.AUDIT)


def node(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """A standalone node's own appraisal (Node._appraise, as Node.serve calls it)."""
    verifier = Verifier.default(registry, Keyring({"agent-1": case.agent_key.public_hex}))
    agent = SimpleNamespace(sandbox=SimpleNamespace(describe=lambda: {}))
    with Node("node-a", NodeKey.generate(), verifier, registry) as n:
        done = n._appraise(agent, case.lease, AgentRun(case.receipt, _evidence(device), False))  # type: ignore[arg-type]
    assert done.result is not None
    return done.result.layer(LayerName.AUDIT)


def service(case: Case, device: str, registry: Registry, tmp: Path) -> LayerResult:
    """The control plane's queued audit: the job a worker runs, with the node's evidence."""
    job = AuditJob.of(case.lease, case.receipt, _evidence(device), time.time(), case.agent_key.public_hex)
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
            _evidence(device), case.lease.lease_id, case.receipt, node_id="node-a", sandbox={}, key=key
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
    with plane(tmp, registry, case.agent_key, MODEL, device_class=device) as gw:
        request = CompletionRequest(model=MODEL, prompt="The history of the river", max_tokens=TOKENS)
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


@pytest.fixture(scope="module")
def case(cheat: SwappedProver) -> Case:
    lease = _lease()
    return Case(lease, cheat.run(lease), cheat)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_every_audit_path_applies_the_rule(path: str, case: Case, registry: Registry, tmp_path: Path) -> None:
    run = PATHS[path]
    for sub in ("same", "unmeasured"):
        (tmp_path / sub).mkdir()
    strict = run(case, this_device(), registry, tmp_path / "same")
    assert strict.status is Status.FAIL, f"{path}: {strict.reason}"
    assert strict.details["tolerance"] == SAME and "[same-class tolerance" in strict.reason, strict.reason
    loose = run(case, "", registry, tmp_path / "unmeasured")
    assert loose.status is Status.PASS, (
        f"{path}: the nudged receipt should pass the cross-class set: {loose.reason}"
    )
    assert loose.details["tolerance"] == CROSS and "not measured" in loose.reason, loose.reason


def test_poi_verify_refuses_evidence_another_key_signed(case: Case, tmp_path: Path) -> None:
    """An agent must not choose its own set: evidence the named node's key did not sign is refused."""
    from maxwell_poi.cli import app

    (tmp_path / "lease.json").write_text(case.lease.to_json())
    (tmp_path / "receipt.json").write_bytes(case.receipt)
    Keyring({"agent-1": case.agent_key.public_hex}).save(tmp_path / "keyring.json")
    forged = sign_evidence(
        _evidence("cuda:NVIDIA H100"),
        case.lease.lease_id,
        case.receipt,
        node_id="node-a",
        sandbox={},
        key=NodeKey.generate(),
    )
    (tmp_path / "evidence.dsse.json").write_bytes(forged)
    (tmp_path / "node.pub").write_text(NodeKey.generate().public_hex)
    argv = ["verify", "--lease", str(tmp_path / "lease.json"), "--receipt", str(tmp_path / "receipt.json")]
    argv += ["--keyring", str(tmp_path / "keyring.json"), "--evidence", str(tmp_path / "evidence.dsse.json")]
    argv += ["--node-key", str(tmp_path / "node.pub")]
    out = CliRunner().invoke(app, argv)
    assert out.exit_code == 2 and "evidence" in out.output, out.output


# -- structure: nothing but the rule reads the sets -----------------------------------------------


def set_readers(root: Path) -> list[str]:
    """`file:line name` of every read of a tolerance set or class pair outside the rule's module
    (and, inside it, outside `choose_tolerance` and the Thresholds class that holds them)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        allowed: set[int] = set()
        if path.resolve() == RULE_FILE.resolve():
            for top in tree.body:
                if isinstance(top, ast.ClassDef | ast.FunctionDef) and top.name in (
                    "Thresholds",
                    "choose_tolerance",
                ):
                    allowed.update(id(n) for n in ast.walk(top))
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and n.attr in SETS and id(n) not in allowed:
                found.append(f"{path.relative_to(root.parent)}:{n.lineno} {n.attr}")
    return found


def test_no_module_but_the_rule_reads_the_tolerance_sets() -> None:
    assert not set_readers(SRC), "read the sets only through verifier.thresholds.choose_tolerance"


def test_the_structural_check_can_fail(tmp_path: Path) -> None:
    """A planted gateway module that picks the cross-class set itself is reported."""
    pkg = tmp_path / "maxwell_poi" / "gateway"
    pkg.mkdir(parents=True)
    (pkg / "bad.py").write_text(
        "def tol(t, lease):\n    return t.for_precision(lease.precision, same_class=False)\n"
    )
    assert set_readers(tmp_path / "maxwell_poi") == ["maxwell_poi/gateway/bad.py:2 for_precision"]


def test_the_verdict_reason_names_the_set_and_the_pair(case: Case, registry: Registry) -> None:
    """The reason a requester or operator reads names the set and the pair (not only the details)."""
    strict = one_shot(case, this_device(), registry, Path("."))
    pair = f"{numerics_class(this_device())} -> {numerics_class(this_device())}"
    assert f"[same-class tolerance, {pair}]" in strict.reason
