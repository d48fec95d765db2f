"""L3 exact audits and disputes on Llama blocks (RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, nn.Linear): the trained poi-lm (4 x 256) and the seeded llama-small (8 x 512, GQA 8/4)
served through the prover SDK, and a tiny seeded Llama whose linear layers carry biases. Honest
leases pass every block; each cheat in one block is named by block and operation when that block is
opened, and found by bisection in a dispute."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt
from maxwell_poi.protocol.result import Status, Verdict
from maxwell_poi.protocol.trace import LLAMA_OPS, Opening, Trace, verify_opening
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.prover.trace import TraceRecorder
from maxwell_poi.registry.blocks import architecture, linears, rotary_embedding
from maxwell_poi.registry.forward import generate
from maxwell_poi.registry.models import LoadedModel, Registry, find_final_norm, find_layers
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.verifier.dispute import bisect, recompute_block, reference_inputs
from maxwell_poi.verifier.exact import (
    FP32_TOLERANCE,
    SCREEN,
    FreivaldsKey,
    appraise_opening,
    audit_blocks,
    check_block,
)
from maxwell_poi.verifier.policy import Verifier

PROMPT = "The old mill by the river"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


@pytest.fixture(scope="module")
def keys(registry: Registry) -> dict[str, FreivaldsKey]:
    return {m: FreivaldsKey.for_model(registry.load(m)) for m in ("poi-lm", "llama-small")}


def serve(registry: Registry, model_id: str, tmp: Path, change=None, agent: AgentKey | None = None):
    """(lease, receipt bytes, the kept trace) from an agent whose model copy is changed by `change`."""
    prover = Prover(agent or AgentKey.generate(), registry, trace_dir=tmp)
    if change:
        model = registry.load(model_id).copied_to(torch.float32)
        change(model)
        prover._converted[(model_id, "fp32")] = model  # the agent runs its changed copy
    lease = Lease.issue("alice", model_id, GenerateJob(prompt=PROMPT, max_new_tokens=10))
    raw = prover.run(lease)
    return lease, raw, Trace.load(tmp / f"{lease.lease_id}.npz")


def claims_of(registry: Registry, lease: Lease, raw: bytes):
    return open_receipt(raw, max_receipt_bytes(lease, registry.reference(lease.model_id).hidden)).claims


def l3(registry, keys, lease, raw, trace: Trace, blocks: list[int], opening: Opening | None = None):
    opening = opening or Opening.of(trace, lease.nonce_bytes, blocks)
    model = registry.load(lease.model_id)
    return appraise_opening(
        claims_of(registry, lease, raw), lease.nonce_bytes, model, keys[lease.model_id], blocks, opening
    )


# -- honest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["poi-lm", "llama-small"])
def test_an_honest_llama_lease_commits_its_ops_and_every_block_holds(model_id, registry, keys, tmp_path):
    lease, raw, trace = serve(registry, model_id, tmp_path)
    model = registry.load(model_id)
    assert architecture(model) == "llama" and trace.ops == LLAMA_OPS
    cfg = model.module.config
    head = cfg.hidden_size // cfg.num_attention_heads
    assert trace.tensors[(0, "k")].shape[1] == cfg.num_key_value_heads * head  # GQA on llama-small
    assert trace.tensors[(0, "gate")].shape[1] == cfg.intermediate_size
    assert claims_of(registry, lease, raw).trace == trace.root(lease.nonce_bytes)
    blocks = list(range(trace.blocks))
    result = l3(registry, keys, lease, raw, trace, blocks)
    assert result.status is Status.PASS, result.reason
    worst = max(max(r.values()) for r in result.details["residuals"].values())
    assert worst < result.details["tolerance"] / 5  # honest residuals sit far under the tolerance


def test_an_honest_v3_llama_receipt_still_passes_every_other_layer(registry, tmp_path) -> None:
    agent = AgentKey.generate()
    lease, raw, _trace = serve(registry, "poi-lm", tmp_path, agent=agent)
    verdict = Verifier.offline(registry, Keyring({"alice": agent.public_hex})).appraise(lease, raw)
    assert verdict.verdict is Verdict.AFFIRMING, verdict.reason


def test_maxwells_llama_block_recomputation_matches_an_honest_commitment(registry, tmp_path) -> None:
    _lease, _raw, trace = serve(registry, "llama-small", tmp_path)
    mine = recompute_block(registry.load("llama-small"), 3, trace.tensors[(3, "x")])
    for op in LLAMA_OPS[1:]:
        assert np.allclose(mine[op], trace.tensors[(3, op)], rtol=0, atol=1e-4), op
    assert np.allclose(mine["out"], trace.tensors[(4, "x")], rtol=0, atol=1e-4)  # causal, rotary as served


def test_the_float32_screen_decides_as_float64_does(registry, keys, tmp_path) -> None:
    """Products run in float32 first; a group near or past the tolerance is decided in float64. On
    honest blocks and on rows scaled by (1 + c) around the tolerance both decide alike."""
    _lease, _raw, trace = serve(registry, "llama-small", tmp_path)
    model, key = registry.load("llama-small"), keys["llama-small"]
    for b in range(trace.blocks):
        opened = {op: trace.tensors[(b, op)] for op in LLAMA_OPS}
        fast = check_block(model, key, b, opened, trace.block_output(b))
        slow = check_block(model, key, b, opened, trace.block_output(b), precise=True)
        assert fast.ok and slow.ok, (fast.reason, slow.reason)
        gaps = [abs(fast.residuals[op] - slow.residuals[op]) for op in LLAMA_OPS[1:]]
        assert max(gaps) < SCREEN * FP32_TOLERANCE / 4  # float32 rounding, far under the screen
    opened = {op: trace.tensors[(2, op)].copy() for op in LLAMA_OPS}
    row = int(np.abs(opened["gate"]).sum(axis=1).argmax())
    decisions = []
    for c in (FP32_TOLERANCE * f for f in (0.003, 0.3, 0.6, 1, 2, 10, 100)):
        forged = dict(opened, gate=opened["gate"].copy())
        forged["gate"][row] *= 1 + c
        fast = check_block(model, key, 2, forged, trace.block_output(2))
        slow = check_block(model, key, 2, forged, trace.block_output(2), precise=True)
        assert fast.ok == slow.ok, (c, fast.reason, slow.reason)
        if not fast.ok:
            # the failing group was decided in float64 (the gate row's change can fail `down`, whose
            # input it feeds, while gate's own group stays under the screen in float32)
            assert fast.failed_op == slow.failed_op, (fast.reason, slow.reason)
            assert fast.residuals[fast.failed_op] == slow.residuals[slow.failed_op]
        decisions.append(fast.ok)
    assert decisions[0] and not decisions[-1]  # the sweep crosses the tolerance


# -- cheats in one block --------------------------------------------------------------------------


def noisy(block: int, op: str = "down", scale: float = 0.001):
    def change(model) -> None:
        with torch.no_grad():
            w = linears(model.layers[block])[op].weight
            w.mul_(1 + scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))

    return change


def bf16(block: int, op: str = "gate"):
    def change(model) -> None:
        layer = linears(model.layers[block])[op]

        def low_precision(_module, args, _output):  # this one product in bfloat16
            return F.linear(args[0].to(torch.bfloat16), layer.weight.to(torch.bfloat16)).to(torch.float32)

        layer.register_forward_hook(low_precision)

    return change


def skipped_head(block: int, head: int = 1):
    def change(model) -> None:
        attn = model.layers[block].self_attn

        def zero_head(_module, args):  # the attention context loses one head before o_proj
            context = args[0].clone()
            context[..., head * attn.head_dim : (head + 1) * attn.head_dim] = 0
            return (context,)

        attn.o_proj.register_forward_pre_hook(zero_head)

    return change


def no_causal_mask(block: int):
    """The prompt's positions also attend to later prompt positions in one block (sdpa, no mask)."""

    def change(model) -> None:
        model.layers[block].self_attn.is_causal = False

    return change


def stretched_positions(block: int, by: int = 2):
    """One block's rotary embedding at the wrong positions (p·2). A uniform shift (p + c) would be
    no cheat: attention scores depend on position differences only, and L3 rightly lets it pass."""

    def change(model) -> None:
        rotary = rotary_embedding(model)

        def shift(_module, args, kwargs):
            kwargs["position_embeddings"] = rotary(args[0], kwargs["position_ids"] * by)
            return args, kwargs

        model.layers[block].register_forward_pre_hook(shift, with_kwargs=True)

    return change


@pytest.mark.parametrize(
    ("model_id", "change", "block", "op"),
    [
        ("poi-lm", noisy(2), 2, "down"),
        ("llama-small", noisy(5), 5, "down"),
        ("poi-lm", bf16(1), 1, "gate"),
        ("llama-small", bf16(6, "k"), 6, "k"),
        ("poi-lm", skipped_head(0), 0, "o"),
        ("llama-small", skipped_head(4, head=7), 4, "o"),
        ("poi-lm", no_causal_mask(3), 3, "o"),
        ("llama-small", stretched_positions(2), 2, "o"),
    ],
    ids=[
        "wrong-down-weights",
        "wrong-down-weights-gqa",
        "gate-in-bf16",
        "k-in-bf16-gqa",
        "head-skipped",
        "head-skipped-gqa",
        "attention-without-its-mask",
        "rotary-at-wrong-positions-gqa",
    ],
)
def test_a_cheat_in_one_llama_block_is_named_when_that_block_is_opened(
    model_id, change, block, op, registry, keys, tmp_path
) -> None:
    lease, raw, trace = serve(registry, model_id, tmp_path, change)
    result = l3(registry, keys, lease, raw, trace, [block])
    assert result.status is Status.FAIL and f"block {block} {op}:" in result.reason, result.reason
    others = [b for b in range(trace.blocks) if b != block]
    clean = l3(registry, keys, lease, raw, trace, others)
    assert clean.status is Status.PASS, clean.reason  # the other blocks followed from their inputs


def test_an_opened_llama_tensor_that_is_not_the_committed_one_fails(registry, keys, tmp_path) -> None:
    lease, raw, trace = serve(registry, "poi-lm", tmp_path)
    opening = Opening.of(trace, lease.nonce_bytes, [1])
    assert l3(registry, keys, lease, raw, trace, [1], opening).status is Status.PASS
    forged = dict(opening.tensors)
    forged[(1, "up")] = np.asarray(forged[(1, "up")]) * 1.0001
    result = l3(registry, keys, lease, raw, trace, [1], Opening(forged, opening.leaves))
    assert result.status is Status.FAIL and "block 1 up differs from the committed tensor" in result.reason
    # the same bytes in another shape rebuild the root (leaves bind bytes): the check refuses the shape
    reshaped = dict(opening.tensors)
    q = reshaped[(1, "q")]
    reshaped[(1, "q")] = q.reshape(q.shape[0] * 2, q.shape[1] // 2)
    again = Opening(reshaped, opening.leaves)
    assert (
        verify_opening(again, lease.nonce_bytes, trace.root(lease.nonce_bytes), trace.blocks, LLAMA_OPS)
        is None
    )
    result = l3(registry, keys, lease, raw, trace, [1], again)
    assert result.status is Status.FAIL and "block 1 q: expected an opened tensor of shape" in result.reason


# -- disputes -------------------------------------------------------------------------------------


def dispute(registry, lease, raw, trace, model_id, asked: list | None = None):
    model = registry.load(model_id)
    claims = claims_of(registry, lease, raw)
    reference = reference_inputs(model, model.encode_prompt(PROMPT), claims.tokens())

    def open_tensors(keys):
        if asked is not None:
            asked.append(keys)
        return Opening({k: trace.tensors[k] for k in keys}, trace.leaves(lease.nonce_bytes))

    return bisect(model, reference, claims.trace, lease.nonce_bytes, open_tensors)


@pytest.mark.parametrize(
    ("model_id", "change", "bad", "op"),
    [
        ("poi-lm", None, None, None),
        ("poi-lm", noisy(0, "up", 0.01), 0, "up"),
        ("poi-lm", noisy(3, scale=0.01), 3, "down"),
        ("llama-small", None, None, None),
        ("llama-small", noisy(5, "v", 0.01), 5, "v"),
        ("llama-small", skipped_head(2), 2, "o"),
    ],
)
def test_a_llama_dispute_names_the_wrong_block_and_operation(registry, tmp_path, model_id, change, bad, op):
    """1 % weight noise, as in the GPT-2 disputes: bisection compares block inputs with Maxwell's own
    prefill at a state tolerance (verifier.dispute.STATE_TOL) that 0.1 % noise in poi-lm stays under."""
    lease, raw, trace = serve(registry, model_id, tmp_path, change)
    asked: list = []
    result = dispute(registry, lease, raw, trace, model_id, asked)
    if change is None:
        assert result.agent_wins and result.block is None, result.reason
        return
    assert not result.agent_wins and (result.block, result.op) == (bad, op), result.reason
    assert f"block {bad} {op}:" in result.reason
    assert len(result.probes) <= 2 + math.ceil(math.log2(trace.blocks))  # both ends, then bisection
    assert len(asked[-1]) == len(LLAMA_OPS) + 1  # then one whole block and its output


# -- nn.Linear with biases (y = x·Wᵀ + b) -----------------------------------------------------------


def tiny_llama(registry: Registry) -> LoadedModel:
    """A seeded 2 x 64 Llama (GQA 4/2) whose every linear layer has a (random) bias."""
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, max_position_embeddings=256,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        module = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for block in find_layers(module, 2):
                for layer in linears(block).values():
                    layer.bias.normal_(0, 0.5)  # the init leaves biases at zero: make them count
    base = registry.load("poi-lm")
    return LoadedModel(
        base.spec, module, base.tokenizer, find_layers(module, 2), find_final_norm(module), base.reference
    )


def tiny_trace(model: LoadedModel) -> Trace:
    with TraceRecorder(model) as recorder:
        generate(model, [1, 5, 9, 33, 70, 2], 8, SeededSampler(b"s" * 32, 0.8, 20))
    return recorder.trace()


def test_linear_layers_with_biases_are_checked_with_their_bias(registry) -> None:
    model = tiny_llama(registry)
    key = FreivaldsKey.for_model(model)
    trace = tiny_trace(model)
    nonce = b"n" * 32
    checks = audit_blocks(model, key, Opening.of(trace, nonce, [0, 1]), [0, 1])
    assert all(c.ok for c in checks), [c.reason for c in checks]
    with torch.no_grad():
        model.layers[1].self_attn.v_proj.bias[3] += 0.01  # the agent's v bias differs in one entry
    wrong = tiny_trace(model)
    opened = {op: wrong.tensors[(1, op)] for op in LLAMA_OPS}
    check = check_block(model, key, 1, opened, wrong.block_output(1))
    assert not check.ok and check.failed_op == "v", check.reason


# -- the operator's CLI ---------------------------------------------------------------------------


def test_the_cli_checks_and_disputes_a_kept_llama_trace(registry, tmp_path) -> None:
    lease, raw, _trace = serve(registry, "poi-lm", tmp_path / "traces", noisy(1, scale=0.01))
    (tmp_path / "lease.json").write_text(lease.to_json())
    (tmp_path / "r.json").write_bytes(raw)
    args = ["--lease", "lease.json", "--receipt", "r.json", "--json"]
    kept = str(tmp_path / "traces" / f"{lease.lease_id}.npz")
    checked = poi("audit-exact", *args, "--trace", kept, cwd=tmp_path)  # every block
    assert checked.returncode == 1, checked.stderr.decode()[-800:]
    assert "block 1 down:" in json.loads(checked.stdout)["reason"]
    disputed = poi("dispute", *args, "--trace", kept, cwd=tmp_path)
    found = json.loads(disputed.stdout)
    assert disputed.returncode == 1 and (found["block"], found["op"]) == (1, "down"), found


def poi(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maxwell_poi", *args], cwd=cwd, capture_output=True, timeout=300
    )
