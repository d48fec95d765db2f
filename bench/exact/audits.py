"""L3 exact layer audits (issue 12): what the activation trace costs the prover, what an exact check
of opened blocks costs Maxwell against recomputing them, and how a one-block cheat is caught per
challenge — fp32 claims on GPT-2 and Llama blocks, this CPU, ratios within one run. Every ratio's two
sides are timed in the same process, interleaved (A, B, A, B, ...), median of several.

- `trace_overhead_ratio`: generation with the trace recorder over generation without (interleaved).
- `trace_bytes_per_token`: bytes of float32 tensors the agent keeps per position computed.
- `freivalds_vs_recompute`: checking one block (Freivalds on its linear operations + Maxwell's
  replay of norms, attention, activations, residuals) over recomputing that block's forward,
  GPT-2-small width; `freivalds_vs_recompute_by_width` beside it (GPT-2 blocks, 64 positions) and
  `freivalds_vs_recompute_by_width_llama` (Llama blocks: SwiGLU 2.75·d, GQA 8:1). Interleaved, each
  side runs right after the other (so each meets caches the other left); `..._back_to_back` times
  each side several times in a row (caches warm for both), as this bench did before.
- `exact_audit_vs_generation` / `exact_audit_vs_prefill`: every block checked at every position,
  over generating the same tokens / over L4's one prefill — GPT-2-small, a ~1B GPT-2 shape (d 2048,
  20 blocks) and `llama_1b`, a TinyLlama-1.1B shape (d 2048, MLP 5632, 22 blocks, 32 query / 4 key-value
  heads, vocabulary 30,522), all with seeded weights.
- `detection_after_k`: a cheater with 0.1 % noise on one block's MLP weights; each challenge opens one
  block drawn by Maxwell; caught per challenge and after k challenges (measured, and 1-(1-p)^k);
  `llama_detection_after_k` the same on llama-small (noise on one down_proj).
- `dispute_cost_vs_full_audit`: a dispute by bisection (verifier.dispute) down to the one wrong
  block and operation, against one full L4 prefill of the same answer; `llama_dispute` on llama-small.
- `exact_integer_mode`: the W8A8 variant (registry.w8a8): honest blocks pass at zero tolerance on
  the products, the soundness error per operation, and what checking costs against recomputing.
- `calibration_fp32` (and its summary `honest_fp32_residuals`): honest residuals (threads 1 and 2,
  batch 1 and 4) against 0.1 % weight noise on each linear operation, per model; the separation.

    python -m bench.exact.audits     # writes bench/results/exact.json (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import os
import secrets
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from bench.exact.calibration import calibrate  # noqa: E402
from maxwell_poi.protocol.trace import Opening, verify_opening
from maxwell_poi.prover.harness import quiet_libraries
from maxwell_poi.prover.trace import TraceRecorder
from maxwell_poi.prover.w8a8 import IntTraceRecorder
from maxwell_poi.registry.blocks import architecture, linears, rotary_embedding
from maxwell_poi.registry.forward import generate, prefill
from maxwell_poi.registry.models import LoadedModel, Registry, find_final_norm, find_layers
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.registry.w8a8 import quantized
from maxwell_poi.verifier.dispute import bisect, reference_inputs
from maxwell_poi.verifier.exact import (
    FP32_TOLERANCE,
    SCREEN,
    FreivaldsKey,
    IntFreivaldsKey,
    audit_blocks,
    check_block,
    check_block_int,
)

quiet_libraries()
from bench.common.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "exact.json": [
        "tolerance_fp32",
        "float32_screen",
        "host_cores",
        "torch_threads",
        "note",
        "trace_overhead_ratio",
        "trace_bytes_per_token",
        "freivalds_vs_recompute",
        "freivalds_vs_recompute_back_to_back",
        "freivalds_vs_recompute_by_width",
        "freivalds_vs_recompute_by_width_back_to_back",
        "freivalds_vs_recompute_by_width_llama",
        "freivalds_vs_recompute_by_width_llama_back_to_back",
        "llama_1b",
        "exact_audit_vs_generation",
        "exact_audit_vs_prefill",
        "shapes",
        "detection_after_k",
        "llama_detection_after_k",
        "exact_integer_mode",
        "dispute_cost_vs_full_audit",
        "dispute",
        "llama_dispute",
        "calibration_fp32",
        "honest_fp32_residuals",
        "not_measured_yet",
        "bench_s",
        "measured_at",
    ]
}  # the keys of bench/results/exact.json this script writes (bench/common/results.py)
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
PROMPT = "The history of the river is long and it begins"


def timed(fn, repeats: int = 3) -> float:
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return statistics.median(best)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, timed in turn (A, B, A, B, ...) after one untimed call each,
    so both sides of a ratio meet the same machine (other processes share this CPU)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def recompute_one(model: LoadedModel, x) -> Callable[[], object]:
    """Recomputing one block's forward from its input [T, d] (Llama: the rotary table made once
    outside, as a forward pass shares it between blocks; causal by the model's own attention)."""
    hidden = torch.from_numpy(x).unsqueeze(0)
    kwargs = {}
    if architecture(model) == "llama":
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        kwargs = {
            "position_ids": positions,
            "position_embeddings": rotary_embedding(model)(hidden, positions),
        }

    def run() -> object:
        with torch.no_grad():
            return model.layers[0](hidden, **kwargs)

    return run


def check_vs_recompute(model: LoadedModel, key: FreivaldsKey, trace, rounds: int) -> dict:
    """One block (block 0): checking / recomputing, interleaved and back to back."""
    opened, output = _ops(trace, 0), trace.block_output(0)
    check = lambda: check_block(model, key, 0, opened, output)  # noqa: E731
    recompute = recompute_one(model, trace.tensors[(0, "x")])
    both = interleaved({"check": check, "recompute": recompute}, rounds)
    warm = timed(check, rounds) / timed(recompute, rounds)
    return {"interleaved": round(both["check"] / both["recompute"], 4), "back_to_back": round(warm, 4)}


def traced(model: LoadedModel, prompt: list[int], tokens: int):
    with TraceRecorder(model) as rec:
        out = generate(model, prompt, tokens, SeededSampler(b"s" * 32, 0.8, 50))
    return out, rec.trace()


def big_gpt2(base: LoadedModel, width: int = 2048, blocks: int = 20) -> LoadedModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=base.reference.vocab, n_embd=width, n_layer=blocks, n_head=width // 128)
    module = GPT2LMHeadModel(cfg).eval()
    return wrap(base, module, blocks)


def big_llama(base: LoadedModel, blocks: int = 22) -> LoadedModel:
    """A TinyLlama-1.1B shape with seeded weights, driven like llama-small (its tokenizer)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=base.reference.vocab, **{**TINYLLAMA, "num_hidden_layers": blocks})
    return wrap(base, LlamaForCausalLM(cfg).eval(), blocks)


def small_block(arch: str, width: int) -> torch.nn.Module:
    """A one-block seeded model of `width` (GPT-2: 4·d MLP; Llama: SwiGLU 2.75·d, GQA 8:1)."""
    torch.manual_seed(width)
    heads = max(1, width // 64)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=width, n_layer=1, n_head=heads)).eval()
    shape = dict(hidden_size=width, intermediate_size=width * 11 // 4, num_attention_heads=heads)
    cfg = LlamaConfig(vocab_size=64, num_hidden_layers=1, num_key_value_heads=max(1, heads // 8), **shape)
    return LlamaForCausalLM(cfg).eval()


def wrap(base: LoadedModel, module: torch.nn.Module, blocks: int) -> LoadedModel:
    """A seeded module of another shape, driven like a registry model (tokenizer of `base`)."""
    layers = find_layers(module, blocks)
    return LoadedModel(base.spec, module, base.tokenizer, layers, find_final_norm(module), base.reference)


def exact_vs(model: LoadedModel, tokens: int, rounds: int = 3) -> dict:
    prompt = model.encode_prompt(PROMPT)
    out, trace = traced(model, prompt, tokens)
    nonce = os.urandom(32)
    key = FreivaldsKey.for_model(model)
    blocks = list(range(trace.blocks))
    opening = Opening.of(trace, nonce, blocks)
    assert verify_opening(opening, nonce, trace.root(nonce), trace.blocks, trace.ops) is None
    checks = audit_blocks(model, key, opening, blocks)
    assert all(c.ok for c in checks), [c.reason for c in checks if not c.ok]
    precise = [
        check_block(model, key, b, _ops(trace, b), trace.block_output(b), precise=True) for b in blocks
    ]
    times = interleaved(
        {
            "audit": lambda: audit_blocks(model, key, opening, blocks),
            "generate": lambda: generate(model, prompt, tokens, SeededSampler(b"s" * 32, 0.8, 50)),
            "prefill": lambda: prefill(model, prompt, out),
        },
        rounds,
    )
    one = check_vs_recompute(model, key, trace, 15)
    cfg = model.module.config
    return {
        "architecture": architecture(model),
        "blocks": trace.blocks,
        "width": cfg.hidden_size,
        "positions": trace.positions,
        "exact_audit_s": round(times["audit"], 5),
        "exact_audit_vs_generation": round(times["audit"] / times["generate"], 4),
        "exact_audit_vs_prefill": round(times["audit"] / times["prefill"], 4),
        "freivalds_vs_recompute": one["interleaved"],
        "freivalds_vs_recompute_back_to_back": one["back_to_back"],
        "trace_bytes_per_token": round(trace.nbytes / trace.positions),
        "max_honest_residual": max(r for c in precise for r in c.residuals.values()),
    }


def _ops(trace, block: int) -> dict:
    return {op: trace.tensors[(block, op)] for op in trace.ops}


def overhead(model: LoadedModel, tokens: int, rounds: int) -> float:
    prompt = model.encode_prompt(PROMPT)
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        traced(model, prompt, tokens)
        t1 = time.perf_counter()
        generate(model, prompt, tokens, SeededSampler(b"s" * 32, 0.8, 50))
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    return statistics.median(ratios)


def by_width(base: LoadedModel, arch: str, widths: list[int], positions: int = 64) -> dict:
    out, warm = {}, {}
    for width in widths:
        module = small_block(arch, width)
        model = wrap(base, module, 1)
        with TraceRecorder(model) as rec, torch.no_grad():
            module(torch.randint(0, 64, (1, positions)))
        one = check_vs_recompute(model, FreivaldsKey.for_model(model), rec.trace(), 15)
        out[str(width)], warm[str(width)] = one["interleaved"], one["back_to_back"]
    return {"interleaved": out, "back_to_back": warm}


def detection(model: LoadedModel, trials: int, ks: list[int], op: str = "fc") -> dict:
    """One challenge opens one block drawn by Maxwell; the cheat sits in one block's `op` weights."""
    prompt = model.encode_prompt(PROMPT)
    honest = Registry().load(model.spec.model_id)
    cheat = honest.copied_to(torch.float32)
    bad_block = secrets.randbelow(len(cheat.layers))
    with torch.no_grad():
        w = linears(cheat.layers[bad_block])[op].weight
        w.mul_(1 + 0.001 * torch.randn_like(w))
    _, trace = traced(cheat, prompt, 16)
    _, honest_trace = traced(honest, prompt, 16)
    nonce = os.urandom(32)
    key = FreivaldsKey.for_model(honest)
    caught, honest_failed, smallest_cheat = 0, 0, float("inf")
    for _ in range(trials):
        b = secrets.randbelow(trace.blocks)
        (c,) = audit_blocks(honest, key, Opening.of(trace, nonce, [b]), [b])
        (h,) = audit_blocks(honest, key, Opening.of(honest_trace, nonce, [b]), [b])
        caught += not c.ok
        honest_failed += not h.ok
        if b == bad_block:
            smallest_cheat = min(smallest_cheat, max(c.residuals.values()))
    p = caught / trials
    return {
        "blocks": trace.blocks,
        "cheat": f"0.1% multiplicative noise on one block's {op} weights",
        "per_challenge": {
            "caught": caught,
            "of": trials,
            "rate": round(p, 4),
            "expected": round(1 / trace.blocks, 4),
        },
        "after_k": {str(k): round(1 - (1 - p) ** k, 4) for k in ks},
        "honest_failed": {"failed": honest_failed, "of": trials},
        "smallest_cheat_residual_when_opened": smallest_cheat,
    }


def dispute_cost(model: LoadedModel, bad: int, op: str = "mlp", repeats: int = 5) -> dict:
    """A dispute on a trace whose block `bad` has 1 % weight noise: Maxwell's reference (one prefill
    with hooks, what an L4 audit already runs) and the bisection (openings, their checks against
    the root, one block recomputed), against a full L4 prefill of the same answer."""
    cheat = Registry().load(model.spec.model_id).copied_to(torch.float32)
    with torch.no_grad():
        w = linears(cheat.layers[bad])[op].weight
        w.mul_(1 + 0.01 * torch.randn_like(w))
    prompt = model.encode_prompt(PROMPT)
    tokens, trace = traced(cheat, prompt, 32)
    nonce = os.urandom(32)
    root, leaves = trace.root(nonce), trace.leaves(nonce)

    def open_tensors(keys):
        return Opening({k: trace.tensors[k] for k in keys}, leaves)

    reference = reference_inputs(model, prompt, tokens)
    results = []
    times = interleaved(
        {
            "reference": lambda: reference_inputs(model, prompt, tokens),
            "bisect": lambda: results.append(bisect(model, reference, root, nonce, open_tensors)),
            "full": lambda: prefill(model, prompt, tokens),
        },
        repeats,
    )
    assert all((r.block, r.op) == (bad, op) for r in results), results[0].reason
    reference_s, full = times["reference"], times["full"]
    bisect_s = statistics.median(r.cost_s for r in results)
    return {
        "dispute_cost_vs_full_audit": round(bisect_s / full, 4),
        "dispute_with_reference_vs_full_audit": round((bisect_s + reference_s) / full, 4),
        "model": model.spec.model_id,
        "cheat": f"1% multiplicative noise on block {bad}'s {op} weights",
        "blocks": len(model.layers),
        "probes": len(results[0].probes),
        "found": {"block": results[0].block, "op": results[0].op},
        "how": "bisection's own cost (openings checked against the root + one block recomputed) over one "
        "L4 prefill; with the reference: plus Maxwell's hooked prefill, which an L4 audit that "
        "disagreed has already run",
    }


def int8_mode(model: LoadedModel, tokens: int) -> dict:
    """The exact integer mode on the W8A8 variant: honest blocks pass at zero tolerance; checking one
    block / recomputing it; every block at every position / generating the same tokens."""
    variant = quantized(model)
    prompt = variant.encode_prompt(PROMPT)
    sampler = lambda: SeededSampler(b"s" * 32, 0.8, 50)  # noqa: E731
    with IntTraceRecorder(variant) as recorder:
        generate(variant, prompt, tokens, sampler())
    trace = recorder.trace()
    key = IntFreivaldsKey.for_model(variant)

    def opened(b: int) -> dict:
        return {op: trace.tensors[(b, op)] for op in trace.ops}

    def all_blocks() -> list:
        return [
            check_block_int(variant, key, b, opened(b), trace.block_output(b)) for b in range(trace.blocks)
        ]

    checks = all_blocks()
    assert all(c.ok for c in checks), [c.reason for c in checks if not c.ok]
    times = interleaved(
        {"audit": all_blocks, "generate": lambda: generate(variant, prompt, tokens, sampler())}, 3
    )
    audit, gen = times["audit"], times["generate"]
    one_block = interleaved(
        {
            "check": lambda: check_block_int(variant, key, 0, opened(0), trace.block_output(0)),
            "recompute": recompute_one(variant, trace.tensors[(0, "x")]),
        },
        15,
    )
    one, recompute = one_block["check"], one_block["recompute"]
    return {
        "model": f"{model.spec.model_id} W8A8 (registry.w8a8)",
        "honest_blocks_passed": f"{sum(c.ok for c in checks)}/{len(checks)}",
        "tolerance_on_products": 0,
        "soundness_error_per_operation": key.soundness_error,
        "check_vs_recompute_one_block": round(one / recompute, 4),
        "exact_audit_vs_generation": round(audit / gen, 4),
        "trace_bytes_per_token": round(trace.nbytes / trace.positions),
        "max_input_steps_from_replay": max(
            v for c in checks for k, v in c.residuals.items() if k.endswith("xq_steps")
        ),
    }


def llama_1b(registry: Registry, blocks: int, tokens: int) -> dict:
    """The TinyLlama-1.1B shape (seeded): every block checked / generation and prefill; one block."""
    got = exact_vs(big_llama(registry.load("llama-small"), blocks), tokens)
    gc.collect()
    shape = {**TINYLLAMA, "num_hidden_layers": blocks, "vocab_size": registry.reference("llama-small").vocab}
    got["shape"] = shape
    got["layers"] = (
        "all 22 of TinyLlama's blocks" if blocks == TINYLLAMA["num_hidden_layers"]
        else f"{blocks} of TinyLlama's 22 blocks (time)"
    )  # fmt: skip
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--trials", type=int, default=120)
    p.add_argument("--skip-1b", action="store_true", help="leave out the ~1B shapes (4 GB each, minutes)")
    p.add_argument("--llama-blocks", type=int, default=TINYLLAMA["num_hidden_layers"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU stalls 2)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "exact.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)  # two threads on a shared 2-core CPU wait on each other
    t0 = time.perf_counter()
    registry = Registry()
    small = registry.load("gpt2-small")
    result: dict = {
        "tolerance_fp32": FP32_TOLERANCE,
        "float32_screen": SCREEN * FP32_TOLERANCE,
        "host_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "note": "ran on a shared 2-core VM (other agents' processes used the same CPU meanwhile), one torch "
        "thread (with two, a thread descheduled by another process stalls every product for a scheduler "
        "tick); every ratio's two sides are timed in this one process, interleaved, median of several",
    }
    result["trace_overhead_ratio"] = round(overhead(small, args.tokens, 5), 4)
    shapes = {"gpt2-small": exact_vs(small, args.tokens)}
    result["trace_bytes_per_token"] = shapes["gpt2-small"]["trace_bytes_per_token"]
    result["freivalds_vs_recompute"] = shapes["gpt2-small"]["freivalds_vs_recompute"]
    result["freivalds_vs_recompute_back_to_back"] = shapes["gpt2-small"][
        "freivalds_vs_recompute_back_to_back"
    ]
    widths = [256, 768, 1536, 2048]
    gpt2_widths, llama_widths = by_width(small, "gpt2", widths), by_width(small, "llama", widths)
    result["freivalds_vs_recompute_by_width"] = gpt2_widths["interleaved"]
    result["freivalds_vs_recompute_by_width_back_to_back"] = gpt2_widths["back_to_back"]
    result["freivalds_vs_recompute_by_width_llama"] = llama_widths["interleaved"]
    result["freivalds_vs_recompute_by_width_llama_back_to_back"] = llama_widths["back_to_back"]
    shapes["llama-small"] = exact_vs(registry.load("llama-small"), args.tokens)
    if not args.skip_1b:
        shapes["gpt2-shape-1b (d2048 x 20, seeded)"] = exact_vs(big_gpt2(small), 16)
        gc.collect()
        result["llama_1b"] = llama_1b(registry, args.llama_blocks, 16)
        shapes["llama-shape-1b (TinyLlama 2048 x 22, GQA 32/4, seeded)"] = result["llama_1b"]
    result["exact_audit_vs_generation"] = {k: v["exact_audit_vs_generation"] for k, v in shapes.items()}
    result["exact_audit_vs_prefill"] = {k: v["exact_audit_vs_prefill"] for k, v in shapes.items()}
    result["shapes"] = shapes
    result["detection_after_k"] = detection(small, args.trials, [1, 4, 12, 24, 48])
    llama_small = registry.load("llama-small")
    result["llama_detection_after_k"] = detection(llama_small, args.trials, [1, 4, 8, 16, 32], op="down")
    result["exact_integer_mode"] = int8_mode(small, args.tokens)
    dispute = dispute_cost(small, bad=7)
    result["dispute_cost_vs_full_audit"] = dispute["dispute_cost_vs_full_audit"]
    result["dispute"] = dispute
    result["llama_dispute"] = dispute_cost(llama_small, bad=5, op="down")
    shapes_worst = {k: v["max_honest_residual"] for k, v in shapes.items()}  # each shape's honest trace
    calibration = calibrate(registry, ["gpt2-small", "llama-small", "poi-lm"], also_honest=shapes_worst)
    result["calibration_fp32"] = calibration
    result["honest_fp32_residuals"] = {
        "worst": calibration["honest_worst"],
        "separation": calibration["separation"],
        "cheat_smallest_0.1%_noise": calibration["cheat_smallest"],
        "tolerance": FP32_TOLERANCE,
        "trials": {"honest": calibration["honest_trials"], "cheat": calibration["cheat_trials"]},
    }
    result["not_measured_yet"] = [
        "residuals of traces computed on a GPU and checked on a CPU (no GPU on this machine)",
        "Llama blocks in the exact integer (W8A8) mode",
    ]
    result["bench_s"] = round(time.perf_counter() - t0)
    result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_results("exact.json", result, writes=WRITES, path=args.out)
    print({k: v for k, v in result.items() if k not in ("shapes", "calibration_fp32")})


if __name__ == "__main__":
    main()
