"""L3-zk (EZKL) on a tiny registered GPT-2 (1 block, d 8, 4 positions, test SRS): the agent commits
its trace in a v3 receipt, proves the challenged attention half with the proving key of Maxwell's
circuit, and Maxwell verifies under its own key and binds the proof's instances to the trace root.
The honest proof passes; each adversary of issue 13 is refused, by name."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from maxwell_poi.circuits.block_circuit import (
    BlockProof,
    CircuitConfig,
    ZkChallenge,
    block_digest,
    circuit_for,
    quantize,
)
from maxwell_poi.cli import app
from maxwell_poi.protocol.errors import PoiError
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt
from maxwell_poi.protocol.result import LayerName, Status
from maxwell_poi.protocol.trace import Opening, Trace
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.prover.zk import prove_block
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier.zk import appraise_block_proof

pytest.importorskip("ezkl")

MODEL = "gpt2-zk-tiny"
# 4 positions; a 2^10-row range table and 4 columns keep the circuit at 2^13 rows (seconds to prove)
CONFIG = CircuitConfig(tokens=4, decomp_base_bits=10, decomp_legs=3, inner_cols=4)
CONFIG_JSON = json.dumps({"tokens": 4, "decomp_base_bits": 10, "decomp_legs": 3, "inner_cols": 4})
CHALLENGE = ZkChallenge(block=0, kind="attn", start=0, tokens=4)


def _tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=8, n_layer=1, n_head=1, n_positions=64))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registered tiny GPT-2, an honest lease with its receipt and kept trace, Maxwell's circuit."""
    root = tmp_path_factory.mktemp("zk")
    _tiny_gpt2(0).save_pretrained(root / "tiny")
    registry = Registry(root / "models.json")
    registry.add_local(MODEL, root / "tiny")
    model = registry.load(MODEL)
    prover = Prover(AgentKey.generate(), registry, trace_dir=root / "traces")

    def lease_run(prompt: str):
        lease = Lease.issue("alice", MODEL, GenerateJob(prompt=prompt, max_new_tokens=4))
        raw = prover.run(lease)
        claims = open_receipt(raw, max_receipt_bytes(lease, model.reference.hidden)).claims
        return lease, raw, claims, Trace.load(root / "traces" / f"{lease.lease_id}.npz")

    maxwell = circuit_for(model, 0, "attn", CONFIG, home=root / "maxwell", allow_test_srs=True)
    return dict(
        root=root,
        registry=registry,
        model=model,
        lease_run=lease_run,
        circuit=maxwell,
        honest=lease_run("The river bends"),
    )


@contextlib.contextmanager
def xfail_on_prover_deadlock() -> Iterator[None]:
    """ezkl 23.0.5's prover holds the GIL in create_proof while a rayon worker logs through pyo3-log,
    which waits for the GIL: seen with gdb on this host (vorner/pyo3-log#65). The stall rule kills
    it; a test that needs a proof cannot run, and says so (not a pass)."""
    try:
        yield
    except PoiError as exc:
        if "deadlocked" not in str(exc):
            raise
        pytest.xfail(f"ezkl prover deadlock (pyo3-log / GIL, upstream): {exc}")


@pytest.fixture(scope="module")
def honest_proof(world) -> BlockProof:
    _lease, _raw, _claims, trace = world["honest"]
    with xfail_on_prover_deadlock():
        return prove_block(world["circuit"], trace.tensors, CHALLENGE)


def appraise(world, proof: BlockProof | None, challenge: ZkChallenge = CHALLENGE, opening=None):
    lease, _raw, claims, trace = world["honest"]
    opening = opening or Opening.of(trace, lease.nonce_bytes, [challenge.block])
    return appraise_block_proof(claims, lease.nonce_bytes, world["circuit"], challenge, 1, opening, proof)


def test_the_honest_challenged_block_proves_verifies_and_binds(world, honest_proof) -> None:
    result = appraise(world, honest_proof)
    assert result.layer is LayerName.ZK
    assert result.status is Status.PASS, result.reason
    assert result.details["srs"].startswith("test-only")
    # the proof's public inputs are exactly the committed block input (4 x 8) at the circuit's scale
    import ezkl

    inst = [ezkl.felt_to_int(f) for f in honest_proof.proof["instances"][0]]
    _lease, _raw, _claims, trace = world["honest"]
    assert inst[:32] == quantize(trace.tensors[(0, "x")][:4], world["circuit"].input_scale).ravel().tolist()
    assert len(inst) == 64 and result.details["output_units"] <= result.details["tolerance_units"]


def test_the_demos_challenge_draws_proves_verifies_and_binds(world, honest_proof) -> None:
    """`poi demo`'s L3-zk ending (cli.zk.demo_zk_challenge: Maxwell draws the block, the agent
    proves, Maxwell verifies and binds), on this module's tiny model: test_cli's demo run skips it.
    It asks for `honest_proof` first: where this host's prover deadlocked on that one, the test
    xfails at once instead of waiting out the stall rule's three attempts again (~190 s)."""
    from maxwell_poi.cli.zk import demo_zk_challenge

    lease, raw, _claims, trace = world["honest"]
    with xfail_on_prover_deadlock():
        result = demo_zk_challenge(world["model"], lease, raw, trace, kind="attn", config=CONFIG)
    assert result.layer is LayerName.ZK and result.status is Status.PASS, result.reason
    assert result.details["proof_bytes"] > 0 and result.details["width"] == 8


def test_keys_are_cached_with_the_model_reference_values(world) -> None:
    again = circuit_for(
        world["model"], 0, "attn", CONFIG, home=world["root"] / "maxwell", allow_test_srs=True
    )
    assert again.folder == world["circuit"].folder
    assert again.path("vk").read_bytes() == world["circuit"].path("vk").read_bytes()
    assert again.weights_digest == block_digest(world["model"].layers[0])
    assert again.setup == world["circuit"].setup  # read back, not set up again


def test_a_proof_for_other_inputs_is_refused_by_the_binding(world) -> None:
    _lease, _raw, _claims, other = world["lease_run"]("A different prompt entirely")
    proof = prove_block(world["circuit"], other.tensors, CHALLENGE)
    result = appraise(world, proof)
    assert result.status is Status.FAIL
    assert "binding: the proof's input is not the committed block 0 attn input" in result.reason
    assert "expected" in result.reason and "got" in result.reason
    world["other_proof"] = proof


def test_a_tampered_proof_is_refused(world, honest_proof) -> None:
    flipped = list(honest_proof.proof["proof"])  # the proof's bytes
    flipped[200] ^= 1
    result = appraise(world, replace(honest_proof, proof={**honest_proof.proof, "proof": flipped}))
    assert result.status is Status.FAIL
    assert "expected a proof that verifies under Maxwell's key" in result.reason


def test_another_proof_wearing_this_receipts_instances_is_refused(world, honest_proof) -> None:
    other = world.get("other_proof") or pytest.skip("needs the other-input proof")
    swapped = {**other.proof, "instances": honest_proof.proof["instances"]}
    result = appraise(world, replace(other, proof=swapped))
    assert result.status is Status.FAIL
    assert "does not" in result.reason and "verifies under Maxwell's key" in result.reason


def test_a_proof_made_with_another_models_keys_is_refused(world) -> None:
    model = world["model"]
    other = model.with_module(_tiny_gpt2(1).eval())  # same architecture, other weights
    theirs = circuit_for(other, 0, "attn", CONFIG, home=world["root"] / "agent", allow_test_srs=True)
    assert theirs.weights_digest != world["circuit"].weights_digest
    _lease, _raw, _claims, trace = world["honest"]
    result = appraise(world, prove_block(theirs, trace.tensors, CHALLENGE))
    assert result.status is Status.FAIL
    assert "verifies under Maxwell's key for gpt2-zk-tiny attn-b0" in result.reason


def test_a_proof_of_the_right_block_with_one_weight_changed_is_refused(world) -> None:
    model = world["model"]
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        module.transformer.h[0].attn.c_attn.weight[3, 5] += 0.05  # one weight of the challenged block
    changed = circuit_for(
        model.with_module(module), 0, "attn", CONFIG, home=world["root"] / "agent-w", allow_test_srs=True
    )
    _lease, _raw, _claims, trace = world["honest"]
    result = appraise(world, prove_block(changed, trace.tensors, CHALLENGE))
    assert result.status is Status.FAIL
    assert "expected a proof that verifies under Maxwell's key" in result.reason


def test_a_proof_for_another_challenge_or_a_forged_opening_is_refused(world, honest_proof) -> None:
    elsewhere = ZkChallenge(block=0, kind="mlp", start=0, tokens=4)
    result = appraise(world, replace(honest_proof, challenge=elsewhere))
    assert result.status is Status.FAIL and "expected one for challenge" in result.reason
    lease, _raw, _claims, trace = world["honest"]
    opening = Opening.of(trace, lease.nonce_bytes, [0])
    forged = Opening({**opening.tensors, (0, "x"): opening.tensors[(0, "x")] * 1.01}, opening.leaves)
    result = appraise(world, honest_proof, opening=forged)
    assert result.status is Status.FAIL and "differs from the committed tensor" in result.reason
    assert appraise(world, None).status is Status.FAIL


def test_cli_prove_block_and_verify_block(world, honest_proof, monkeypatch) -> None:
    root = world["root"]
    home = root / "cli-home"  # the CLI's $POI_HOME: the same registry, Maxwell's cached keys and SRS
    home.mkdir(exist_ok=True)
    (home / "models.json").write_text((root / "models.json").read_text())
    (home / "circuits").symlink_to(root / "maxwell")
    (home / "srs").symlink_to(root / "srs")
    monkeypatch.setenv("POI_HOME", str(home))
    lease, raw, _claims, _trace = world["honest"]
    (root / "lease.json").write_text(lease.to_json())
    (root / "receipt.json").write_bytes(raw)
    files = [
        "--lease",
        str(root / "lease.json"),
        "--receipt",
        str(root / "receipt.json"),
        "--trace",
        str(root / "traces" / f"{lease.lease_id}.npz"),
        "--config",
        CONFIG_JSON,
        "--allow-test-srs",
    ]
    runner = CliRunner()
    proved = runner.invoke(app, ["prove-block", *files, "--out", str(root / "proof.json")])
    assert proved.exit_code == 0, proved.output
    ok = runner.invoke(app, ["verify-block", *files, "--proof", str(root / "proof.json"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["status"] == "pass"
    bad = json.loads((root / "proof.json").read_text())
    bad["challenge"]["start"] = 1
    (root / "bad.json").write_text(json.dumps(bad))
    refused = runner.invoke(app, ["verify-block", *files, "--proof", str(root / "bad.json")])
    assert refused.exit_code == 1, refused.output


# A stand-in for ezkl_child.py: `sleep` is the deadlocked prover with every thread asleep; `light` is
# the one seen in CI, asleep but for a helper thread burning ~1 % of a core; `busy` works (one core)
FAKE_CHILD = """
import json, pathlib, sys, threading, time
args = json.loads(sys.argv[2])
marker = pathlib.Path(args["marker"])
attempt = int(marker.read_text()) + 1 if marker.exists() else 1
marker.write_text(str(attempt))

def spin(busy_s, idle_s, until):
    while time.monotonic() < until:
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            pass
        time.sleep(idle_s)

mode = args["mode"]
if mode == "light" or (mode == "light-once" and attempt == 1):
    threading.Thread(target=spin, args=(0.001, 0.099, time.monotonic() + 60), daemon=True).start()
    time.sleep(60)
elif mode == "hang" or (mode == "once" and attempt == 1):
    time.sleep(60)
elif mode == "busy":
    spin(1.0, 0.0, time.monotonic() + float(args["seconds"]))
pathlib.Path(args["peak"]).write_text("1024")
"""


@pytest.fixture
def fake_child(tmp_path, monkeypatch):
    from maxwell_poi.circuits import capped

    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    monkeypatch.setattr(capped, "CHILD", child)
    return capped


def _attempts(marker) -> int:
    return int(marker.read_text())


def test_a_deadlocked_ezkl_child_is_killed_and_run_again(fake_child, tmp_path) -> None:
    """ezkl 23.0.5's prover can deadlock (the GIL held across rayon workers that log through pyo3-log):
    a child that burns no CPU is killed and the step run again; one that never finishes is refused."""
    once = fake_child.run_capped("prove", {"mode": "once", "marker": str(tmp_path / "m1")}, stall_s=1.0)
    assert once.peak_gb > 0 and _attempts(tmp_path / "m1") == 2  # the second attempt finished
    with pytest.raises(PoiError, match="deadlocked 3 times"):
        fake_child.run_capped("prove", {"mode": "hang", "marker": str(tmp_path / "m2")}, stall_s=1.0)
    assert _attempts(tmp_path / "m2") == 3


def test_a_deadlocked_child_with_a_lightly_spinning_thread_is_killed_as_stalled(fake_child, tmp_path) -> None:
    """The CI hang: the deadlocked child's helper thread burns ~1 % of a core, so its CPU time keeps
    rising; the rule is on its rate over the window, which stays under STALL_RATE."""
    marker = tmp_path / "light"
    t0 = time.monotonic()
    with pytest.raises(PoiError, match=r"deadlocked 3 times \(CPU rate over 1 s: expected >= 2% of a core"):
        fake_child.run_capped("prove", {"mode": "light", "marker": str(marker)}, stall_s=1.0)
    assert _attempts(marker) == 3
    assert time.monotonic() - t0 < 60  # killed by the rate rule, not by the child ending its sleep
    once = fake_child.run_capped("prove", {"mode": "light-once", "marker": str(tmp_path / "l1")}, stall_s=1.0)
    assert once.peak_gb > 0 and _attempts(tmp_path / "l1") == 2


def test_a_working_child_is_not_taken_for_a_stalled_one(fake_child, tmp_path) -> None:
    marker = tmp_path / "busy"
    step = fake_child.run_capped(
        "prove", {"mode": "busy", "seconds": "4", "marker": str(marker)}, stall_s=1.0
    )
    assert step.seconds >= 4 and _attempts(marker) == 1


def test_a_step_past_its_timeout_is_refused_with_the_limit(fake_child, tmp_path) -> None:
    marker = tmp_path / "slow"
    with pytest.raises(PoiError, match="expected to finish within 2 s, it did not"):
        fake_child.run_capped(
            "prove", {"mode": "busy", "seconds": "30", "marker": str(marker)}, timeout_s=2.0, stall_s=10.0
        )
    assert _attempts(marker) == 1  # a timeout is not retried


def test_the_step_timeout_grows_with_the_circuit_between_a_floor_and_a_cap(tmp_path) -> None:
    from maxwell_poi.circuits.capped import TIMEOUT_CAP_S, TIMEOUT_FLOOR_S, _logrows, step_timeout_s

    assert step_timeout_s(13) == TIMEOUT_FLOOR_S  # this file's circuits (2^13 rows)
    assert step_timeout_s(19) == 960.0 > 212.5  # the slowest measured step (bench/results/zk.json, d=384)
    assert step_timeout_s(20) == 2 * step_timeout_s(19) == 1920.0  # doubling with each logrow
    assert step_timeout_s(24) == step_timeout_s(None) == TIMEOUT_CAP_S
    (tmp_path / "settings.json").write_text(json.dumps({"run_args": {"logrows": 17}}))
    assert _logrows({"folder": str(tmp_path)}) == 17
    assert _logrows({"folder": str(tmp_path / "missing")}) is None
