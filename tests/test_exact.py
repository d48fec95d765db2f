"""L3 exact layer audits on real GPT-2 models (gpt2-micro): the agent commits its activation trace in
a v3 receipt; Maxwell draws blocks to open after the receipt is in, checks the opening against the
trace root and each opened block with Freivalds and its own replay of the nonlinear parts. Honest
leases pass; each cheat below is caught by name."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from maxwell_poi.node.resident_runs import serve_wave, start_resident
from maxwell_poi.node.runs import honest_agent_argv
from maxwell_poi.protocol.errors import ReceiptFormatError
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import PREDICATE_TYPE, PREDICATE_V2, max_receipt_bytes, open_receipt
from maxwell_poi.protocol.result import LayerName, Status, Verdict
from maxwell_poi.protocol.trace import Opening, Trace, opening_from_line, verify_opening
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.prover.w8a8 import IntTraceRecorder
from maxwell_poi.registry.forward import generate
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.registry.w8a8 import quantized
from maxwell_poi.verifier.exact import (
    FreivaldsKey,
    IntFreivaldsKey,
    appraise_opening,
    check_block_int,
    draw_blocks,
)
from maxwell_poi.verifier.policy import Verifier

MODEL = "gpt2-micro"
AGENT = "alice"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


@pytest.fixture(scope="module")
def key_of_maxwell(registry: Registry) -> FreivaldsKey:
    return FreivaldsKey.for_model(registry.load(MODEL))


def run(prover: Prover, tokens: int = 12) -> tuple[Lease, bytes, Trace]:
    lease = Lease.issue(AGENT, MODEL, GenerateJob(prompt="The river bends", max_new_tokens=tokens))
    raw = prover.run(lease)
    return lease, raw, Trace.load(prover.trace_dir / f"{lease.lease_id}.npz")


def claims(registry: Registry, lease: Lease, raw: bytes):
    return open_receipt(raw, max_receipt_bytes(lease, registry.reference(MODEL).hidden)).claims


def l3(registry, key, lease, raw, opening, blocks):
    return appraise_opening(
        claims(registry, lease, raw), lease.nonce_bytes, registry.load(MODEL), key, blocks, opening
    )


@pytest.fixture(scope="module")
def honest(tmp_path_factory, registry):
    key = AgentKey.generate()
    prover = Prover(key, registry, trace_dir=tmp_path_factory.mktemp("traces"))
    return key, prover, *run(prover)


def test_an_honest_lease_passes_l3_and_still_every_other_layer(honest, registry, key_of_maxwell) -> None:
    key, _prover, lease, raw, trace = honest
    c = claims(registry, lease, raw)
    assert json.loads(_payload(raw))["predicateType"] == PREDICATE_TYPE
    assert c.trace == trace.root(lease.nonce_bytes)  # the signed root is the kept trace's
    verdict = Verifier.offline(registry, Keyring({"alice": key.public_hex})).appraise(lease, raw)
    assert verdict.verdict is Verdict.AFFIRMING, verdict.reason  # v3 passes L0 and L4 as v2 did
    blocks = draw_blocks(trace.blocks, 2)
    result = l3(registry, key_of_maxwell, lease, raw, Opening.of(trace, lease.nonce_bytes, blocks), blocks)
    assert (result.layer, result.status) == (LayerName.EXACT, Status.PASS), result.reason
    assert result.details["blocks"] == blocks


def _payload(raw: bytes) -> str:
    return base64.b64decode(json.loads(raw)["payload"]).decode()


def test_every_block_of_the_honest_trace_holds(honest, registry, key_of_maxwell) -> None:
    _key, _prover, lease, raw, trace = honest
    blocks = list(range(trace.blocks))
    result = l3(registry, key_of_maxwell, lease, raw, Opening.of(trace, lease.nonce_bytes, blocks), blocks)
    assert result.status is Status.PASS, result.reason
    worst = max(max(r.values()) for r in result.details["residuals"].values())
    assert worst < result.details["tolerance"] / 5  # honest residuals sit far under the tolerance


def cheat_trace(registry: Registry, tmp: Path, change) -> tuple[Lease, bytes, Trace]:
    """An agent whose model copy is changed by `change(model)` before it serves the lease."""
    prover = Prover(AgentKey.generate(), registry, trace_dir=tmp)
    model = registry.load(MODEL).copied_to(torch.float32)
    change(model)
    prover._converted[(MODEL, "fp32")] = model  # the agent runs its changed copy
    return run(prover)


def noisy_block(block: int):
    def change(model) -> None:
        with torch.no_grad():
            w = model.layers[block].mlp.c_fc.weight
            w.mul_(1 + 0.001 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))

    return change


def skipped_head(block: int, head: int = 0):
    def change(model) -> None:
        attn = model.layers[block].attn
        width = attn.c_proj.weight.shape[0] // attn.num_heads

        def zero_head(_module, args):  # the attention context loses one head before c_proj
            context = args[0].clone()
            context[..., head * width : (head + 1) * width] = 0
            return (context,)

        attn.c_proj.register_forward_pre_hook(zero_head)

    return change


def bf16_fc(block: int):
    def change(model) -> None:
        fc = model.layers[block].mlp.c_fc

        def low_precision(_module, args, _output):  # this one product in bfloat16
            x = args[0].to(torch.bfloat16)
            return (x @ fc.weight.to(torch.bfloat16) + fc.bias.to(torch.bfloat16)).to(torch.float32)

        fc.register_forward_hook(low_precision)

    return change


def no_causal_mask(block: int):
    """The prompt's positions also attend to later prompt positions (a wrong mask) in one block."""

    def change(model) -> None:
        attn = model.layers[block].attn
        seen: list[torch.Tensor] = []
        attn.c_attn.register_forward_hook(lambda _m, _i, out: seen.append(out))

        def unmasked(_module, args):
            qkv = seen.pop()
            if qkv.shape[1] < 2:  # a decode step: one position, nothing to unmask
                return args
            heads, d = attn.num_heads, qkv.shape[-1] // 3
            q, k, v = (z.reshape(*z.shape[:2], heads, d // heads).transpose(1, 2) for z in qkv.split(d, -1))
            context = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, -1) @ v
            return (context.transpose(1, 2).reshape(*qkv.shape[:2], d),)

        attn.c_proj.register_forward_pre_hook(unmasked)

    return change


@pytest.mark.parametrize(
    ("change", "block", "op"),
    [
        (noisy_block(1), 1, "fc"),
        (skipped_head(0), 0, "attn"),
        (no_causal_mask(1), 1, "attn"),
        (bf16_fc(1), 1, "fc"),
    ],
    ids=[
        "wrong-weights-in-one-block",
        "attention-head-skipped",
        "attention-without-its-mask",
        "one-product-in-bf16",
    ],
)
def test_a_cheat_in_one_block_is_named_when_that_block_is_opened(
    change, block, op, registry, key_of_maxwell, tmp_path
) -> None:
    lease, raw, trace = cheat_trace(registry, tmp_path, change)
    result = l3(registry, key_of_maxwell, lease, raw, Opening.of(trace, lease.nonce_bytes, [block]), [block])
    assert result.status is Status.FAIL and f"block {block} {op}" in result.reason, result.reason
    others = [b for b in range(trace.blocks) if b != block]
    clean = l3(registry, key_of_maxwell, lease, raw, Opening.of(trace, lease.nonce_bytes, others), others)
    assert clean.status is Status.PASS, clean.reason  # the other blocks followed from their inputs


def test_an_opened_tensor_that_is_not_the_committed_one_fails(honest, registry, key_of_maxwell) -> None:
    _key, _prover, lease, raw, trace = honest
    opening = Opening.of(trace, lease.nonce_bytes, [0])
    forged = dict(opening.tensors)
    forged[(0, "fc")] = np.asarray(forged[(0, "fc")]) * 1.0001
    result = l3(registry, key_of_maxwell, lease, raw, Opening(forged, opening.leaves), [0])
    assert result.status is Status.FAIL and "differs from the committed tensor" in result.reason


def test_no_opening_or_no_trace_root_fails(honest, registry, key_of_maxwell, tmp_path) -> None:
    _key, _prover, lease, raw, _trace = honest
    refused = l3(registry, key_of_maxwell, lease, raw, None, [0])
    assert refused.status is Status.FAIL and "none came in time" in refused.reason
    untraced = Prover(AgentKey.generate(), registry)  # no trace dir: a receipt without a root
    lease2 = Lease.issue("alice", MODEL, GenerateJob(prompt="x y", max_new_tokens=4))
    raw2 = untraced.run(lease2)
    result = l3(registry, key_of_maxwell, lease2, raw2, None, [0])
    assert result.status is Status.FAIL and "trace root" in result.reason


def test_a_v2_receipt_cannot_carry_a_trace_root(honest, registry) -> None:
    _key, _prover, lease, raw, _trace = honest
    statement = json.loads(_payload(raw))
    statement["predicateType"] = PREDICATE_V2
    envelope = json.loads(raw)
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(ReceiptFormatError, match="v2"):
        open_receipt(json.dumps(envelope).encode(), 1 << 24)


def test_challenges_are_drawn_without_repeats_and_cover_the_model() -> None:
    draws = [draw_blocks(12, 3) for _ in range(200)]
    assert all(len(set(d)) == 3 and all(0 <= b < 12 for b in d) for d in draws)
    assert {b for d in draws for b in d} == set(range(12))


def test_the_cli_opens_checks_and_disputes_a_kept_trace(honest, tmp_path) -> None:
    """`poi audit-exact` and `poi dispute` on files, as an operator runs them; a trace file whose
    tensors were changed after signing fails the opening."""
    _key, prover, lease, raw, trace = honest
    (tmp_path / "lease.json").write_text(lease.to_json())
    (tmp_path / "r.json").write_bytes(raw)
    kept = prover.trace_dir / f"{lease.lease_id}.npz"
    args = ["--lease", "lease.json", "--receipt", "r.json", "--json"]
    checked = poi("audit-exact", *args, "--trace", str(kept), "--per-opening", "1", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr.decode()[-800:]
    passed = json.loads(checked.stdout)
    assert passed["status"] == "pass" and passed["details"]["checked"] == list(range(trace.blocks))
    assert passed["details"]["openings"] == [[b] for b in range(trace.blocks)]  # one block per opening
    disputed = poi("dispute", *args, "--trace", str(kept), cwd=tmp_path)
    assert disputed.returncode == 0 and json.loads(disputed.stdout)["agent_wins"] is True
    tensors = dict(trace.tensors)
    tensors[(0, "fc")] = tensors[(0, "fc")] + 1e-3
    Trace(tensors, trace.blocks).save(tmp_path / "edited.npz")
    edited = poi("audit-exact", *args, "--trace", "edited.npz", cwd=tmp_path)
    # the edited file's own digests no longer rebuild the signed root: the opening is refused
    assert edited.returncode == 1 and json.loads(edited.stdout)["reason"].startswith("opening:")
    missing = poi("audit-exact", *args, "--trace", "nope.npz", cwd=tmp_path)
    assert missing.returncode == 2 and b"cannot read the trace" in missing.stderr


def poi(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maxwell_poi", *args], cwd=cwd, capture_output=True, timeout=300
    )


# -- exact integer mode (W8A8) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def int_trace(registry):
    variant = quantized(registry.load("gpt2-mini"))
    with IntTraceRecorder(variant) as recorder:
        generate(variant, variant.encode_prompt("The river bends"), 10, SeededSampler(b"s" * 32, 0.8, 50))
    return variant, recorder.trace(), IntFreivaldsKey.for_model(variant)


def int_opened(trace: Trace, block: int) -> dict:
    return {op: trace.tensors[(block, op)].copy() for op in trace.ops}


def test_an_honest_w8a8_trace_passes_every_block_exactly(int_trace) -> None:
    variant, trace, key = int_trace
    assert trace.tensors[(0, "fc.xq")].dtype == np.int8 and trace.tensors[(0, "fc.acc")].dtype == np.int32
    nonce = b"n" * 32
    opening = Opening.of(trace, nonce, [0, 1, 2, 3])
    assert verify_opening(opening, nonce, trace.root(nonce), trace.blocks, trace.ops) is None
    for b in range(trace.blocks):
        check = check_block_int(variant, key, b, int_opened(trace, b), trace.block_output(b))
        assert check.ok, check.reason
    assert key.soundness_error <= 2.0**-40  # two vectors from [0, 2^20) per operation


def test_w8a8_cheats_are_caught_with_zero_tolerance(int_trace, registry) -> None:
    variant, trace, key = int_trace
    off_by_one = int_opened(trace, 1)
    off_by_one["fc.acc"][3, 5] += 1  # one accumulator entry one unit off
    check = check_block_int(variant, key, 1, off_by_one, trace.block_output(1))
    assert not check.ok and "block 1 fc" in check.reason and "int32 accumulator" in check.reason
    other = quantized(registry.load("gpt2-mini"))
    with torch.no_grad():
        other.layers[2].mlp.c_proj.weight_q[0, 0] += 1  # one int8 weight of one block differs
    with IntTraceRecorder(other) as recorder:
        generate(other, other.encode_prompt("The river bends"), 10, SeededSampler(b"s" * 32, 0.8, 50))
    wrong = recorder.trace()
    check = check_block_int(variant, key, 2, int_opened(wrong, 2), wrong.block_output(2))
    assert not check.ok and "block 2 mlp" in check.reason, check.reason
    shifted = int_opened(trace, 0)
    shifted["qkv.xq"] = np.clip(shifted["qkv.xq"].astype(np.int16) + 3, -127, 127).astype(np.int8)
    check = check_block_int(variant, key, 0, shifted, trace.block_output(0))
    assert not check.ok and "steps from Maxwell's replay" in check.reason


# -- challenges over a resident agent's channel ---------------------------------------------------


def test_a_resident_agent_answers_a_challenge_and_one_without_a_trace_refuses(
    registry, key_of_maxwell, tmp_path
):
    """Real resident `poi agent` processes: Maxwell writes the challenge line after the receipt is
    in; the opening comes back on the channel and passes L3. Without a kept trace, the agent refuses;
    a challenge for a lease the agent never had times out or is refused: both fail L3."""
    agent_key = AgentKey.generate()
    agent_key.save(tmp_path / "a.pem")
    argv = honest_agent_argv(tmp_path / "a.pem", "--resident", "--trace-dir", str(tmp_path / "traces"))
    lease = Lease.issue(AGENT, MODEL, GenerateJob(prompt="The river bends", max_new_tokens=8))
    with start_resident(argv, "tracer") as agent:
        (run,) = serve_wave(agent, [lease], registry)
        blocks = draw_blocks(2, 1)
        keys = sorted(
            Opening.of(Trace.load(tmp_path / "traces" / f"{lease.lease_id}.npz"), b"", blocks).tensors
        )
        answer = agent.open(lease.lease_id, keys, timeout_s=60)
        assert not isinstance(answer, str), answer
        result = l3(registry, key_of_maxwell, lease, run.receipt, opening_from_line(answer.line), blocks)
        assert result.status is Status.PASS, result.reason
        unknown = agent.open("f" * 32, keys, timeout_s=20)
        assert isinstance(unknown, str) and "refused" in unknown and "no kept trace" in unknown
    plain = honest_agent_argv(tmp_path / "a.pem", "--resident")
    with start_resident(plain, "plain") as agent:
        (run,) = serve_wave(
            agent,
            [lease2 := Lease.issue(AGENT, MODEL, GenerateJob(prompt="x y", max_new_tokens=4))],
            registry,
        )
        refused = agent.open(lease2.lease_id, [(0, "x")], timeout_s=20)
        assert isinstance(refused, str) and "keeps no trace" in refused
