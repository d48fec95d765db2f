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
from pathlib import Path

import pytest
from audit_paths import PATHS, Case, evidence, one_shot, swapped_once
from typer.testing import CliRunner

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.nudged_fingerprints import nudged
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.observer.host import numerics_class, this_device
from maxwell_poi.protocol.keys import Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import Status
from maxwell_poi.registry.models import Registry
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


@pytest.fixture(scope="module")
def cheat(registry: Registry) -> SwappedProver:
    return swapped_once(registry, nudged)


def _lease() -> Lease:
    job = GenerateJob(prompt="The history of the river", max_new_tokens=TOKENS, temperature=0.8, chunk=8)
    return Lease.issue("agent-1", MODEL, job)


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
        evidence("cuda:NVIDIA H100"),
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
