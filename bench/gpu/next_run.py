"""The second GPU run (issue 26, item 4): four measurements, most valuable first, each under its own
time sub-budget, written into one JSON after every trial (gpu_env.Run: a failure is recorded with
its traceback and the run goes on; a trial that no longer fits is listed in `skipped`).

- audit7b: the L4 audit speed-up at a serving size. A Llama-2-7B shape (32 x 4096, 32 heads,
  SwiGLU 11008, vocab 32,000), seeded random weights made on the GPU (fp32, and a bf16 copy of the
  same weights), generating 256 tokens per row with the project's prover (`Prover.generate`: the
  seeded sampler, KV cache, fingerprint recorder) at batch 1 and 8, bf16 and strict fp32 (TF32 off,
  math SDPA); against Maxwell's L4 audit of the lease's receipt (`verifier.audit.measure_generation`:
  one prefill over prompt + output on the fp32 reference, the seeded-choice and fingerprint checks,
  on the GPU, strict fp32), and the same audit in the claimed precision (bf16 reference) for bf16
  claims. Also the generation of the same shapes by a serving loop that is not launch-bound
  (serving.StaticDecoder: static KV cache, CUDA-graph decode steps, greedy), for the speed-up
  against a fast server. When a cell's generation would not fit its share of the budget, fewer
  tokens are generated and the cell says so (`new_tokens`, `tokens_reduced`).
- native_replay: is the native bf16 audit's decode replay bit-exact on a GPU? (On the CPU it
  reproduces honest bf16 provers exactly.) poi-lm, then gpt2-small: 6 bf16-claim leases (32 tokens,
  chunk 16) answered on the GPU by the honest bf16 Prover, the honest SpeculativeProver (its receipt
  declares its passes) and int8-rounded weights computing in bf16 (a cheat); each answer re-executed
  on a separate bf16 copy on the same GPU as a decode replay (verifier.audit.measure_generation with
  protocol.schedule's passes) and as one bf16 prefill: per run the worst chunk's close fraction and
  median relative error and the max token gap, per variant how many runs had every chunk 100 % close,
  and one replay's time against one prefill's and the generation's.
- exact_gpu: the exact tier (L3) on GPU traces: gpt2-small and llama-small provers on the GPU
  (strict fp32, and bf16) record the activation trace (`Prover(trace_dir=...)`, prover.trace), it
  goes to the CPU and every block is checked there by `verifier.exact` (Freivalds + replay against
  the fp32 reference): the verdict at the project's tolerance, and every block's residuals measured
  in float64 without a tolerance (bf16 ones also against the bf16-rounded weights); then a cheat
  with 0.1 % multiplicative noise on one block's linear weights, caught or not.
- capacity: a timed capacity challenge: seeded bf16 matrices filling ~80 % of the free GPU memory,
  multiplied in a fixed order, reduced to a sha256 digest; repeated passes (time, spread, digest
  equality), host<->device bandwidth (pinned and pageable), the time to regenerate the matrices from
  the seed, and derived numbers: moving them over PCIe (a relay) and re-uploading the half that a
  card with half the memory cannot hold, per pass.

    python bench/gpu/next_run.py --out $OUT/gpu_next.json --budget-s 280
    python bench/gpu/next_run.py --device cpu --quick --out /tmp/gpu_next.json    # CPU smoke, ~1 min
    python bench/gpu/next_run.py --device cpu --quick --sections native_replay --out /tmp/gpu_next.json

`--device cpu --quick` runs tiny shapes on the CPU (no CUDA graphs, no PCIe): its numbers test the
script only, and the file says `"kind": "cpu-smoke"`. The NVML traces of the serving loop are
`collect_traces.py --plan serving` (bench/gpu/run_all.sh next runs both).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_env  # bench/gpu/gpu_env.py: environment block, atomic JSON write, Run (stdlib only)

FORMAT = "maxwell-poi-gpu-next/v1"
SECTIONS = ("audit7b", "native_replay", "exact_gpu", "capacity")  # in priority order
# seconds per section (GPU), 265 in all, inside run_all.sh's POI_NEXT_MAIN_S (280); the H200 run
# before native_replay used 137 / 165 (audit7b), 15 / 60 (exact_gpu), 14 / 40 (capacity)
BUDGETS = {"audit7b": 150.0, "native_replay": 45.0, "exact_gpu": 40.0, "capacity": 30.0}
PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
]
log = gpu_env.log


def _sig3(x: float) -> float:
    return float(f"{x:.3g}")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def free_gpu(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (small derived times must not round to 0)."""
    return float(f"{x:.{digits}g}")


def median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 5) if xs else None


@contextlib.contextmanager
def strict(precision: str) -> Iterator[None]:
    """cross_hardware.strict_fp32: math SDPA for an fp32 claim (TF32 is off for the whole run)."""
    import cross_hardware

    with cross_hardware.strict_fp32(precision):
        yield


# ---------------------------------------------------------------------------------------------
# audit7b


def loaded_model(module: Any, shape: Any, model_id: str) -> Any:
    """A LoadedModel around a module built on the GPU (the registry builds on the CPU in fp32 and
    digests every weight: minutes for 7B). Its `weights_digest` is a stand-in, NOT a digest of the
    weights: sha256 of the spec (the receipt needs 64 hex digits; nothing here checks it)."""
    from maxwell_poi.registry.models import (
        LoadedModel,
        ModelSpec,
        ReferenceValues,
        find_final_norm,
        find_layers,
        shared_tokenizer,
    )

    cfg = module.config
    params = sum(p.numel() for p in module.parameters())
    embed = module.get_input_embeddings().weight.numel()
    spec = ModelSpec(model_id, "causal-lm", "llama", shape.description, config=dict(shape.config), seed=0)
    reference = ReferenceValues(
        model_id=model_id,
        weights_digest=hashlib.sha256(repr(spec.as_dict()).encode()).hexdigest(),  # of the spec only
        param_count=params,
        flops_per_token=2 * (params - embed),
        dtype="float32",
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        vocab=cfg.vocab_size,
        max_positions=cfg.max_position_embeddings,
    )
    return LoadedModel(
        spec=spec,
        module=module,
        tokenizer=shared_tokenizer(),
        layers=find_layers(module, cfg.num_hidden_layers),
        final_norm=find_final_norm(module),
        reference=reference,
    )


def audit7b(run: gpu_env.Run, args: argparse.Namespace) -> None:
    import collect_traces
    import torch

    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.verifier.thresholds import Thresholds

    dev = args.device
    out = run.result.setdefault("audit7b", {})
    shape = next(s for s in collect_traces.MODELS if s.key == "llama2-7b")
    model_id = "llama2-7b-shape" + ("-TINY" if args.quick else "")
    out.update(
        {
            "model": model_id,
            "shape": shape.description + ("; TINY stand-in config (--quick)" if args.quick else ""),
            "generation": "maxwell_poi Prover.generate: the project's honest prover (registry.forward."
            "generate; at batch > 1 the lease row plus greedy peers; seeded sampler, temperature 0.8, "
            "top-k 50; KV cache; fingerprint recorder), eager HF modules",
            "generation_graphed": "serving.StaticDecoder: static KV cache, each decode step one CUDA graph "
            "replay, greedy, no host sync per token (a serving engine's loop; eager on a CPU)",
            "audit": "verifier.audit.measure_generation + token_choice + fingerprints_match (cross-class "
            "thresholds) of the lease row's receipt: one prefill over prompt + output on Maxwell's fp32 "
            "reference on the GPU, strict fp32 (TF32 off, math SDPA), as cross_hardware.py's GPU audit",
            "audit_claimed": "the same audit on the bf16 copy (bf16 claims only): an audit in the claimed "
            "precision",
            "speedup_definitions": {
                "audit_speedup": "median generate_s / median audit_s (the batch's generation vs one audit)",
                "audit_speedup_per_lease": "median generate_s / (batch x median audit_s)",
                "graphed_*": "the same with graphed_generate_s",
            },
            "cells": {},
        }
    )
    models: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        t = time.monotonic()
        fp32 = collect_traces.build_model(shape, dev, args.quick, dtype=torch.float32)
        sync(dev)
        t32 = time.monotonic() - t
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)  # the same weights, rounded
        sync(dev)
        models["fp32"] = loaded_model(fp32, shape, model_id)
        models["bf16"] = loaded_model(bf16, shape, model_id)
        facts = collect_traces.model_facts(bf16)
        facts.update(build_fp32_s=round(t32, 2), build_s=round(time.monotonic() - t, 2))
        if dev.startswith("cuda"):
            facts["gpu_memory_allocated_gb"] = round(torch.cuda.memory_allocated() / 1e9, 2)
        return facts

    facts = run.trial("audit7b", "build", build)
    if facts is None:
        return
    out["model_facts"] = facts
    run.save()
    thresholds = Thresholds.load()
    key = AgentKey.generate()
    cells = [("bf16", 1), ("fp32", 1), ("bf16", 8), ("fp32", 8)]
    for i, (precision, batch) in enumerate(cells):
        try:
            audit_cell(run, args, out["cells"], models, (precision, batch), len(cells) - i, thresholds, key)
        finally:
            free_gpu(dev)
    models.clear()
    free_gpu(dev)


def audit_cell(
    run: gpu_env.Run,
    args: argparse.Namespace,
    cells: dict[str, Any],
    models: dict[str, Any],
    what: tuple[str, int],
    cells_left: int,
    thresholds: Any,
    key: Any,
) -> None:
    """One (precision, batch) cell: a warm-up, then `reps` timed repetitions, each a trial."""
    import serving
    import torch

    from maxwell_poi.protocol.lease import GenerateJob, Lease
    from maxwell_poi.protocol.receipt import token_output
    from maxwell_poi.prover.sdk import Prover, batch_peers, claims_for
    from maxwell_poi.verifier.audit import fingerprints_match, measure_generation, token_choice

    precision, batch = what
    dev = args.device
    name = f"{precision}/b{batch}"
    model, reference = models[precision], models["fp32"]
    prover = Prover(key, device=dev, batch=batch)
    tol = thresholds.for_precision(precision, same_class=False)
    cell = cells[name] = {
        "precision": precision,
        "batch": batch,
        "planned_tokens": args.tokens,
        "reps_planned": args.reps,
        "generate_s": [],
        "graphed_generate_s": [],
        "audit_s": [],
        "audit_claimed_s": [],
        "verdicts": [],
    }
    state: dict[str, Any] = {}

    def lease_for(prompt: str, tokens: int) -> Any:
        job = GenerateJob(prompt=prompt, max_new_tokens=tokens, temperature=0.8)
        return Lease.issue("gpu", model.spec.model_id, job, precision=precision)

    def rows(prompt: str) -> torch.Tensor:
        ids = model.encode_prompt(prompt)
        peers = batch_peers(len(ids), batch - 1, model.reference.vocab)
        return torch.tensor([ids, *peers], device=dev)

    def audit(lease: Any, claims: Any, on: Any) -> tuple[float, Any]:
        sync(dev)
        t = time.perf_counter()
        with strict("fp32" if on is reference else precision):
            m = measure_generation(lease, claims, on, tol.logit_tol)
        sync(dev)
        return time.perf_counter() - t, m

    def once(tokens: int, prompt: str) -> dict[str, Any]:
        lease = lease_for(prompt, tokens)
        sync(dev)
        t = time.perf_counter()
        with strict(precision):
            out_tokens, builder = prover.generate(lease, model)
        sync(dev)
        gen = time.perf_counter() - t
        claims = claims_for(
            lease, model.reference, builder, output=token_output(out_tokens, model.reference.vocab)
        )
        audit_s, m = audit(lease, claims, reference)
        claimed_s = audit(lease, claims, model)[0] if precision == "bf16" else None
        problem = token_choice(m, tol) or fingerprints_match(m.chunks, tol)
        dec = state["decoder"]
        ids = rows(prompt)
        sync(dev)
        t = time.perf_counter()
        with strict(precision):
            dec.generate(ids, tokens)
        sync(dev)
        graphed = time.perf_counter() - t
        return {
            "gen": gen,
            "graphed": graphed,
            "audit": audit_s,
            "claimed": claimed_s,
            "tokens": len(out_tokens),
            "prompt_tokens": int(ids.shape[1]),
            "verdict": "pass" if problem is None else "fail",
            "reason": (problem.reason if problem else "")[:200],
            "worst_close": round(m.worst_close, 4),
            "max_token_gap": round(m.max_gap, 5),
        }

    def warmup() -> dict[str, Any]:
        prompt_len = len(model.encode_prompt(max(PROMPTS, key=len)))
        longest = max(args.tokens, 2 * args.warmup_tokens)
        dec = serving.StaticDecoder(model.module, batch, prompt_len + longest + 1)
        with strict(precision):
            dec.capture()
        state["decoder"] = dec
        once(args.warmup_tokens, PROMPTS[0])  # first calls: kernel selection, allocator, caches
        r = once(2 * args.warmup_tokens, PROMPTS[0])  # the time per token the budget is planned from
        return {**r, "graph_capture_s": dec.capture_s, "graph_error": dec.graph_error}

    w = run.trial("audit7b", f"{name} warm-up", warmup)
    if w is None:
        return
    cell["warmup"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in w.items()}
    cell["generation_loop_graphed"] = state["decoder"].graphed
    # tokens that fit this cell's share of what is left, from the warm-up's time per token
    per_token = w["gen"] / max(w["tokens"], 1)
    per_rep_fixed = 2 * w["audit"] + (w["claimed"] or 0.0) + 1.0
    share = run.left("audit7b") / max(cells_left, 1) / max(args.reps, 1)
    tokens = args.tokens
    if share != float("inf"):
        fit = int((share - per_rep_fixed) / (1.3 * per_token + 1e-9))
        if fit < tokens:
            tokens = max(args.min_tokens, fit)
            cell["tokens_reduced"] = (
                f"{args.tokens} tokens would not fit this cell's share of the budget ({share:.0f} s per "
                f"repetition; the warm-up's second call took {per_token * 1e3:.1f} ms per token): {tokens} "
                "generated"
            )
            log(f"audit7b {name}: {cell['tokens_reduced']}")
    cell["new_tokens"] = tokens
    need = 1.3 * per_token * tokens + per_rep_fixed
    for rep in range(args.reps):
        r = run.trial(
            "audit7b", f"{name} rep {rep}", lambda rep=rep: once(tokens, PROMPTS[(rep + 1) % 4]), need_s=need
        )
        if r is None:
            continue
        cell["generate_s"].append(round(r["gen"], 4))
        cell["graphed_generate_s"].append(round(r["graphed"], 4))
        cell["audit_s"].append(round(r["audit"], 5))
        if r["claimed"] is not None:
            cell["audit_claimed_s"].append(round(r["claimed"], 5))
        cell["tokens"] = r["tokens"]
        cell["prompt_tokens"] = r["prompt_tokens"]
        cell["verdicts"].append({k: r[k] for k in ("verdict", "reason", "worst_close", "max_token_gap")})
        gen, graphed, aud = (median(cell[k]) for k in ("generate_s", "graphed_generate_s", "audit_s"))
        # three significant digits: a slow CPU smoke run's ratios are well below 1 (two decimals of
        # 0.1175 are 2 % off, more than the per-lease figure's check allows)
        cell["audit_speedup"] = _sig3(gen / aud)
        cell["audit_speedup_per_lease"] = _sig3(gen / (batch * aud))
        cell["graphed_audit_speedup"] = _sig3(graphed / aud)
        cell["graphed_audit_speedup_per_lease"] = _sig3(graphed / (batch * aud))
        cell["ms_per_token_step"] = round(1e3 * gen / r["tokens"], 2)
        cell["graphed_ms_per_token_step"] = round(1e3 * graphed / r["tokens"], 2)
        if cell["audit_claimed_s"]:
            claimed = median(cell["audit_claimed_s"])
            cell["claimed_precision_audit_speedup"] = round(gen / claimed, 2)
        log(
            f"audit7b {name} rep {rep}: generate {r['gen']:.2f}s graphed {r['graphed']:.2f}s "
            f"audit {r['audit'] * 1e3:.1f}ms ({r['tokens']} tokens) {r['verdict']}"
        )
        run.save()
    state.clear()


# ---------------------------------------------------------------------------------------------
# native_replay

REPLAY_DRAFTS = {"poi-lm": "poi-lm-draft", "gpt2-small": "gpt2-mini", "gpt2-micro": "gpt2-micro"}
REPLAY_VARIANTS = ("honest-bf16", "honest-speculative", "int8-weights-bf16-compute")


def native_replay(run: gpu_env.Run, args: argparse.Namespace) -> None:
    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.registry.models import Registry
    from maxwell_poi.verifier.thresholds import Thresholds

    out = run.result.setdefault("native_replay", {})
    thresholds = Thresholds.load()
    edge = thresholds.same_class["bf16"].logit_tol
    replay_sets = thresholds.replay.get("bf16", {})  # per model (verifier.thresholds)
    out.update(
        {
            "question": "is a bf16 decode replay on the GPU bit-exact against the same GPU's bf16 decode, "
            "as it is on the CPU (every fingerprint chunk 100 % close for honest provers)?",
            "leases": f"{args.replay_leases} bf16-claim GenerateJobs per model, {args.replay_tokens} tokens, "
            "chunk 16, numbered prompts, temperature alternating 0 / 0.8; each answered by every variant",
            "variants": {
                "honest-bf16": "Prover(device=GPU): the registry's weights rounded to bf16, one token per "
                "pass",
                "honest-speculative": "SpeculativeProver(draft, block 4, device=GPU): bf16, blocks of tokens "
                "per pass, declared in the receipt's runtime['decode']",
                "int8-weights-bf16-compute": "adversaries.precision_downgrade.int8_rounded weights (per-row "
                "weight-only int8) computing in bf16 on the GPU, claiming the model (a cheat)",
            },
            "replay": "verifier.audit.measure_generation(schedule=schedule_of(runtime)): the "
            "answer re-executed the way it was decoded, on a separate bf16 copy of the registry's weights "
            "on the same GPU (Maxwell's reference)",
            "prefill": "measure_generation(schedule=None): one bf16 prefill over prompt + output (the native "
            "rule before the replay)",
            "per_run": "worst chunk's close fraction, worst chunk's median relative error, max token gap; "
            "all_chunks_close: every chunk 100 % close",
            "logit_tol": edge,
            "replay_sets": {m: vars(t) for m, t in replay_sets.items()},
            "drafts": {m: REPLAY_DRAFTS[m] for m in args.replay_models},
            "models": {},
        }
    )
    registry, key = Registry(), AgentKey.generate()
    for i, model_id in enumerate(args.replay_models):
        # each model gets an equal share of what is left (time the first leaves over goes on)
        until = time.monotonic() + run.left("native_replay") / (len(args.replay_models) - i)
        try:
            replay_model(
                run, args, out["models"], (registry, key), model_id, until, edge, replay_sets.get(model_id)
            )
        finally:
            free_gpu(args.device)
    out["summary"] = {
        model_id: {
            variant: f"{s['replay']['runs_all_chunks_close']}/{s['runs']} runs every chunk 100 % close under "
            f"the replay ({s['prefill']['runs_all_chunks_close']}/{s['runs']} under a prefill); worst chunk "
            f"close {s['replay']['worst_close']['min']}-{s['replay']['worst_close']['max']}"
            for variant, s in m.get("by_variant", {}).items()
        }
        for model_id, m in out["models"].items()
    }
    run.save()


def replay_model(
    run: gpu_env.Run,
    args: argparse.Namespace,
    models: dict[str, Any],
    registry_key: tuple[Any, Any],
    model_id: str,
    until: float,
    edge: float,
    replay_set: Any,
) -> None:
    """One model: its three provers and Maxwell's bf16 copy on the device, a warm-up (first-call
    kernel selection, not timed), then the leases, each answered by every variant (one trial each)."""
    import torch

    from maxwell_poi.adversaries._agent import SwappedProver
    from maxwell_poi.adversaries.precision_downgrade import int8_rounded
    from maxwell_poi.protocol.lease import GenerateJob, Lease
    from maxwell_poi.protocol.schedule import schedule_of
    from maxwell_poi.prover.sdk import Prover, with_dtype
    from maxwell_poi.prover.speculative import SpeculativeProver
    from maxwell_poi.verifier.audit import fingerprints_match, measure_generation, token_choice

    dev, section = args.device, "native_replay"
    registry, key = registry_key
    cell = models[model_id] = {"runs": {v: [] for v in REPLAY_VARIANTS}}
    state: dict[str, Any] = {}

    def on_device(m: Any) -> Any:
        return m if dev == "cpu" else m.copied_to(dev)

    def setup() -> dict[str, Any]:
        t = time.monotonic()
        ref32 = registry.load(model_id)
        state["ref"] = on_device(with_dtype(ref32, torch.bfloat16))  # Maxwell's copy, not a prover's
        cheat = on_device(with_dtype(int8_rounded(ref32), torch.bfloat16))
        state["provers"] = {
            "honest-bf16": Prover(key, registry, device=dev),
            "honest-speculative": SpeculativeProver(
                key, REPLAY_DRAFTS[model_id], registry=registry, device=dev
            ),
            "int8-weights-bf16-compute": SwappedProver(
                key, lambda _lease, _reg: cheat, registry=registry, device=dev
            ),
        }
        return {
            "params": sum(p.numel() for p in ref32.module.parameters()),
            "setup_s": round(time.monotonic() - t, 2),
        }

    def lease_for(i: int, tokens: int) -> Any:
        job = GenerateJob(
            prompt=f"{PROMPTS[i % len(PROMPTS)]} ({i})",  # numbered: greedy leases are not one trial again
            max_new_tokens=tokens,
            temperature=0.8 if i % 2 else 0.0,
            chunk=16,
        )
        return Lease.issue("gpu", model_id, job, precision="bf16")

    def timed(fn: Any) -> tuple[Any, float]:
        sync(dev)
        t = time.perf_counter()
        value = fn()
        sync(dev)
        return value, time.perf_counter() - t

    def measured(m: Any) -> dict[str, Any]:
        within = None
        if replay_set is not None:
            within = token_choice(m, replay_set) is None and fingerprints_match(m.chunks, replay_set) is None
        return {
            "worst_close": round(m.worst_close, 4),
            "worst_median_rel": sig(float(m.worst_median_rel)),
            "max_token_gap": round(m.max_gap, 5),
            "all_chunks_close": m.worst_close == 1.0,
            "within_replay_set": within,
        }

    def answer(variant: str, lease: Any) -> dict[str, Any]:
        claims, gen_s = timed(lambda: state["provers"][variant].claims(lease))
        schedule = schedule_of(claims.runtime, len(claims.tokens()))
        ref = state["ref"]
        replay, replay_s = timed(lambda: measure_generation(lease, claims, ref, edge, schedule))
        prefill, prefill_s = timed(lambda: measure_generation(lease, claims, ref, edge))
        return {
            "tokens": len(claims.tokens()),
            "temperature": lease.job.temperature,
            "declared_schedule": schedule.declared,
            "passes": len(schedule.passes),
            "replay": measured(replay),
            "prefill": measured(prefill),
            "generate_s": round(gen_s, 5),
            "replay_s": round(replay_s, 5),
            "prefill_s": round(prefill_s, 5),
        }

    facts = run.trial(section, f"{model_id} setup", setup)
    if facts is None:
        return
    cell.update(facts)
    warm = run.trial(
        section,
        f"{model_id} warm-up",
        lambda: timed(lambda: [answer(v, lease_for(0, 8)) for v in REPLAY_VARIANTS])[1],
    )
    if warm is None:
        return
    cell["warmup_s"] = round(warm, 3)
    run.save()
    for i in range(args.replay_leases):
        lease = lease_for(i + 1, args.replay_tokens)
        for variant in REPLAY_VARIANTS:
            name = f"{model_id}/{variant} lease {i}"
            if time.monotonic() > until:
                run.skip(section, name, "budget: this model's share of the section is spent")
                continue
            r = run.trial(section, name, lambda v=variant, lease=lease: answer(v, lease))
            if r is None:
                continue
            cell["runs"][variant].append(r)
            cell["by_variant"] = {v: replay_summary(rows) for v, rows in cell["runs"].items() if rows}
            log(
                f"native_replay {name}: replay close {r['replay']['worst_close']} gap "
                f"{r['replay']['max_token_gap']}, prefill close {r['prefill']['worst_close']}; generate "
                f"{r['generate_s']:.3f}s replay {r['replay_s']:.3f}s prefill {r['prefill_s']:.3f}s"
            )
            run.save()
    state.clear()


def replay_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's runs: min / median / max of each measure, the runs with every chunk 100 %
    close, and the median times (what one replay costs against a prefill and the generation)."""

    def spread(xs: list[float]) -> dict[str, float]:
        return {"min": min(xs), "median": sig(statistics.median(xs)), "max": max(xs)}

    out: dict[str, Any] = {"runs": len(rows), "declared_schedule": sum(r["declared_schedule"] for r in rows)}
    for how in ("replay", "prefill"):
        ms = [r[how] for r in rows]
        within = [m["within_replay_set"] for m in ms if m["within_replay_set"] is not None]
        out[how] = {
            **{k: spread([m[k] for m in ms]) for k in ("worst_close", "worst_median_rel", "max_token_gap")},
            "runs_all_chunks_close": sum(m["all_chunks_close"] for m in ms),
            "runs_within_replay_set": sum(within) if within else None,
        }
    gen, rep, pre = (statistics.median(r[k] for r in rows) for k in ("generate_s", "replay_s", "prefill_s"))
    out["median_s"] = {"generate": sig(gen), "replay": sig(rep), "prefill": sig(pre)}
    out["replay_over_prefill"] = _sig3(rep / pre)
    out["generate_over_replay"] = _sig3(gen / rep)
    out["generate_over_prefill"] = _sig3(gen / pre)
    return out


# ---------------------------------------------------------------------------------------------
# exact_gpu


def exact_gpu(run: gpu_env.Run, args: argparse.Namespace) -> None:
    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.registry.models import Registry
    from maxwell_poi.verifier.exact import FP32_TOLERANCE

    out = run.result.setdefault("exact_gpu", {})
    out.update(
        {
            "tolerance_fp32": FP32_TOLERANCE,
            "tokens": args.exact_tokens,
            "prover": "maxwell_poi Prover(device=GPU, trace_dir=...): the activation trace (prover.trace) "
            "recorded on the GPU, kept as float32 on the host; fp32 claims in strict fp32 (TF32 off, math "
            "SDPA), bf16 claims on a bf16 copy of the weights; greedy",
            "check": "on the CPU: verifier.exact.appraise_opening over every block at the fp32 tolerance "
            "(the verdict), and check_block(precise=True, tol=inf) per block for every residual in float64 "
            "(the measurement; a verdict stops at a block's first failing operation)",
            "cheat": "0.1 % multiplicative noise (weight *= 1 + 0.001 * N(0,1)) on every linear weight of "
            "the middle block, on the prover's GPU copy (in its dtype)",
            "cells": {},
        }
    )
    registry, key = Registry(), AgentKey.generate()
    workdir = Path(tempfile.mkdtemp(prefix="poi-exact-gpu-"))
    for model_id in args.exact_models:
        try:
            exact_model(run, args, out["cells"], registry, key, workdir, model_id)
        finally:
            free_gpu(args.device)


class ExactModel:
    """One model's exact-tier trials: the CPU reference, Maxwell's secret vectors (for the fp32
    weights and for the bf16-rounded ones), and a prover trial (honest or with the one-block cheat)."""

    def __init__(self, registry: Any, model_id: str) -> None:
        import torch

        from maxwell_poi.protocol.trace import OPS_BY_ARCH
        from maxwell_poi.registry.blocks import require_architecture
        from maxwell_poi.verifier.exact import FreivaldsKey

        t = time.monotonic()
        self.model_id, self.registry = model_id, registry
        self.ref = registry.load(model_id)
        self.key = FreivaldsKey.for_model(self.ref)
        self.rounded = self.ref.copied_to(torch.bfloat16).copied_to(torch.float32)
        self.rounded_key = FreivaldsKey.for_model(self.rounded)
        self.ops = OPS_BY_ARCH[require_architecture(self.ref)]
        self.blocks = list(range(len(self.ref.layers)))
        self.bad = len(self.blocks) // 2
        self.setup_s = round(time.monotonic() - t, 2)

    def measured(self, trace: Any, model: Any, fkey: Any) -> dict[str, Any]:
        """Every block's residuals in float64, no tolerance (check_block stops at a failing op)."""
        from maxwell_poi.protocol.trace import output_key
        from maxwell_poi.verifier.exact import check_block

        per = {}
        for b in self.blocks:
            opened = {op: trace.tensors[(b, op)] for op in self.ops}
            output = trace.tensors[output_key(b, trace.blocks)]
            c = check_block(model, fkey, b, opened, output, float("inf"), precise=True)
            worst_op = max(c.residuals, key=c.residuals.get)
            per[str(b)] = {
                "max": c.residuals[worst_op],
                "op": worst_op,
                "residuals": {k: float(f"{v:.4g}") for k, v in c.residuals.items()},
            }
        return per

    def cheat(self, model: Any) -> float:
        """0.1 % noise on the middle block's linear weights, in place; the share of weights changed."""
        import torch

        from maxwell_poi.registry.blocks import linears

        g = torch.Generator(device="cpu").manual_seed(26)
        changed = total = 0
        with torch.no_grad():
            for module in linears(model.layers[self.bad]).values():
                w = module.weight
                noise = torch.randn(w.shape, generator=g).to(w.device, torch.float32)
                new = (w.float() * (1 + 1e-3 * noise)).to(w.dtype)
                changed += int((new != w).sum())
                total += w.numel()
                w.copy_(new)
        return round(changed / total, 4)  # bf16 rounding keeps some weights as they were

    def trial(self, args: argparse.Namespace, key: Any, workdir: Path, precision: str, cheat: bool) -> dict:
        from maxwell_poi.protocol.lease import GenerateJob, Lease
        from maxwell_poi.protocol.trace import Opening, Trace
        from maxwell_poi.prover.sdk import Prover
        from maxwell_poi.verifier.exact import appraise_opening

        dev = args.device
        prover = Prover(key, self.registry, device=dev, trace_dir=workdir)
        job = GenerateJob(prompt=PROMPTS[2], max_new_tokens=args.exact_tokens, temperature=0.0)
        lease = Lease.issue("gpu", self.model_id, job, precision=precision)
        changed = self.cheat(prover.model_for(lease)) if cheat else None
        sync(dev)
        t = time.perf_counter()
        with strict(precision):
            claims = prover.claims(lease)
        sync(dev)
        gen = time.perf_counter() - t
        trace = Trace.load(workdir / f"{lease.lease_id}.npz")
        nonce, blocks = lease.nonce_bytes, self.blocks
        t = time.perf_counter()
        result = appraise_opening(claims, nonce, self.ref, self.key, blocks, Opening.of(trace, nonce, blocks))
        check_s = time.perf_counter() - t
        per = self.measured(trace, self.ref, self.key)
        row: dict[str, Any] = {
            "verdict": result.status.value,
            "reason": result.reason[:300],
            "positions": trace.positions,
            "trace_mb": round(trace.nbytes / 2**20, 2),
            "generate_with_trace_s": round(gen, 3),
            "cpu_check_all_blocks_s": round(check_s, 3),
            "worst_residual": max(v["max"] for v in per.values()),
            "per_block": per,
        }
        if cheat:
            others = [v["max"] for b, v in per.items() if int(b) != self.bad]
            caught = result.status.value == "fail"
            row.update(
                cheat_block=self.bad,
                cheat_weights_changed_fraction=changed,
                cheat_block_residual=per[str(self.bad)]["max"],
                other_blocks_worst_residual=max(others) if others else None,
                caught=caught,
                caught_at_cheat_block=caught and f"block {self.bad} " in result.reason,
            )
        if precision == "bf16":
            vs_rounded = self.measured(trace, self.rounded, self.rounded_key)
            row["vs_bf16_rounded_weights"] = {
                "worst_residual": max(v["max"] for v in vs_rounded.values()),
                "per_block_max": {b: v["max"] for b, v in vs_rounded.items()},
            }
        for p in workdir.glob(f"{lease.lease_id}.*"):
            p.unlink()
        return row


def exact_model(
    run: gpu_env.Run,
    args: argparse.Namespace,
    cells: dict[str, Any],
    registry: Any,
    key: Any,
    workdir: Path,
    model_id: str,
) -> None:
    m = run.trial("exact_gpu", f"{model_id} setup", lambda: ExactModel(registry, model_id))
    if m is None:
        return
    for precision in ("fp32", "bf16"):
        for cheat in (False, True):
            name = f"{model_id}/{precision}/{'cheat' if cheat else 'honest'}"
            row = run.trial("exact_gpu", name, lambda p=precision, c=cheat: m.trial(args, key, workdir, p, c))
            if row is None:
                continue
            cells[name] = {"blocks": len(m.blocks), "setup_s": m.setup_s, **row}
            log(
                f"exact_gpu {name}: {row['verdict']} worst {row['worst_residual']:.3g}"
                + (f" caught={row['caught']}" if cheat else "")
            )
            run.save()


# ---------------------------------------------------------------------------------------------
# capacity


def bandwidth(device: str, nbytes: int, reps: int = 3) -> dict[str, Any]:
    """Host<->device copies of `nbytes`: GB/s (1e9 B/s), best of `reps`, pageable and (where the
    machine lets it pin that much) pinned host memory."""
    import torch

    dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    out: dict[str, Any] = {}
    copies = {
        "h2d_pageable_gb_s": lambda: dev_buf.copy_(pageable),
        "d2h_pageable_gb_s": lambda: pageable.copy_(dev_buf),
    }
    try:
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        copies["h2d_pinned_gb_s"] = lambda: dev_buf.copy_(pinned, non_blocking=True)
        copies["d2h_pinned_gb_s"] = lambda: pinned.copy_(dev_buf, non_blocking=True)
    except RuntimeError as e:  # a guest may refuse to pin 1 GiB: the pageable rates still stand
        out["pinned_error"] = f"{type(e).__name__}: {e}"[:300]
    for name, fn in copies.items():
        best = float("inf")
        for _ in range(reps):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best = min(best, time.perf_counter() - t)
        out[name] = round(nbytes / best / 1e9, 2)
    return out


def capacity(run: gpu_env.Run, args: argparse.Namespace) -> None:
    import torch

    dev = args.device
    gpu = dev.startswith("cuda")
    free_gpu(dev)
    out = run.result.setdefault("capacity", {})
    n = args.cap_n
    per = n * n * 2  # bf16
    if gpu:
        free, total = torch.cuda.mem_get_info()
        count = int(args.cap_fraction * free / per)
    else:
        free = total = None
        count = args.cap_count
    out.update(
        {
            "challenge": "seeded bf16 matrices M_0..M_{count-1} (N(0,1/n) entries, torch.Generator on the "
            "device, seed 26); acc = M_0 @ M_1 @ ... @ M_{count-1} left to right in bf16; digest = "
            "sha256 of (acc in fp32 @ a seeded fp32 vector) rounded to fp16",
            "n": n,
            "matrix_bytes": per,
            "free_bytes_before": free,
            "total_bytes": total,
            "fraction_of_free": args.cap_fraction if gpu else None,
            "count_planned": count,
        }
    )
    state: dict[str, Any] = {}

    def fill() -> dict[str, Any]:
        """The matrices, from the seed; if the allocator runs out, again with 20 % fewer (recorded)."""
        retries = []
        want = count
        while True:
            g = torch.Generator(device=dev).manual_seed(26)
            t = time.perf_counter()
            mats: list[Any] = []
            try:
                for _ in range(want):
                    mats.append(
                        torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16).mul_(n**-0.5)
                    )
                probe = torch.randn(n, generator=g, device=dev, dtype=torch.float32)
                sync(dev)
                break
            except torch.OutOfMemoryError as e:
                if len(retries) >= 3:
                    raise
                retries.append(f"{want} matrices: {type(e).__name__}")
                mats.clear()
                free_gpu(dev)
                want = int(want * 0.8)
        state.update(mats=mats, probe=probe, count=want)
        return {"fill_s": round(time.perf_counter() - t, 4), "fill_retries": retries}

    def one_pass() -> tuple[float, str]:
        mats = state["mats"]
        sync(dev)
        t = time.perf_counter()
        acc = mats[0]
        for m in mats[1:]:
            acc = acc @ m
        r = (acc.float() @ state["probe"]).to(torch.float16).cpu().numpy()
        digest = hashlib.sha256(r.tobytes()).hexdigest()
        return time.perf_counter() - t, digest

    # fit: a pass must leave time for the others; fewer matrices if one matmul says it would not
    def estimate() -> dict[str, Any]:
        g = torch.Generator(device=dev).manual_seed(1)
        a = torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16)
        b = a @ a  # warm-up
        sync(dev)
        t = time.perf_counter()
        for _ in range(10):
            b = a @ a
        sync(dev)
        del a, b
        return {"matmul_s": (time.perf_counter() - t) / 10}

    est = run.trial("capacity", "estimate", estimate)
    if est is None:
        return
    per_pass = est["matmul_s"] * count
    left = run.left("capacity")
    passes = args.cap_reps + 1
    if left != float("inf") and per_pass * passes > 0.6 * left:
        fit = max(2, int(0.6 * left / passes / est["matmul_s"]))
        if fit < count:
            out["count_reduced"] = (
                f"{count} matrices (~{per_pass:.1f} s a pass) would not fit {passes} passes in "
                f"{0.6 * left:.0f} s: {fit} used"
            )
            count = fit
    out["count"] = count
    out["matrices_bytes"] = count * per
    out["matmul_s_estimate"] = round(est["matmul_s"], 6)
    f = run.trial("capacity", "fill", fill)
    if f is None:
        return
    out.update(f)
    count = out["count"] = state["count"]
    out["matrices_bytes"] = count * per
    if gpu:
        out["memory_allocated_bytes"] = torch.cuda.memory_allocated()
        out["free_bytes_filled"] = torch.cuda.mem_get_info()[0]
    run.save()
    times, digests = [], []
    for rep in range(passes):
        r = run.trial("capacity", f"pass {rep}", one_pass)
        if r is None:
            continue
        if rep == 0:
            out["warmup_pass_s"] = round(r[0], 4)
        else:
            times.append(r[0])
        digests.append(r[1])
        out["pass_s"] = [round(x, 4) for x in times]
        out["digests"] = digests
        out["digests_equal"] = len(set(digests)) == 1
        if times:
            out["pass_s_median"] = median(times)
            out["pass_s_min"], out["pass_s_max"] = round(min(times), 4), round(max(times), 4)
            out["pass_s_spread"] = round((max(times) - min(times)) / statistics.median(times), 4)
            out["pass_s_stdev"] = round(statistics.stdev(times), 5) if len(times) > 1 else None
            out["tflops"] = round(2 * n**3 * (count - 1) / statistics.median(times) / 1e12, 1)
        log(f"capacity pass {rep}: {r[0]:.3f}s digest {r[1][:16]}")
        run.save()

    def regenerate() -> dict[str, Any]:
        """The matrices again from the seed, in place: what a card that dropped them would pay."""
        g = torch.Generator(device=dev).manual_seed(26)
        sync(dev)
        t = time.perf_counter()
        for m in state["mats"]:
            torch.randn(n, n, generator=g, device=dev, dtype=torch.bfloat16, out=m).mul_(n**-0.5)
        sync(dev)
        return {"regenerate_all_s": round(time.perf_counter() - t, 4)}

    r = run.trial("capacity", "regenerate", regenerate)
    if r is not None:
        out.update(r)
        # the same generator calls as `fill`: a pass must give the same digest
        again = run.trial("capacity", "pass after regeneration", one_pass)
        if again is not None:
            out["digest_after_regeneration_equal"] = bool(digests) and again[1] == digests[0]
    state.clear()
    free_gpu(dev)
    if not gpu:
        out["pcie_note"] = "CPU smoke run: host-to-host copies, not PCIe (the code path only)"
    bw = run.trial("capacity", "pcie bandwidth", lambda: bandwidth(dev, args.pcie_mb * 2**20))
    if bw is None:
        return
    out["pcie"] = {"bytes_per_copy": args.pcie_mb * 2**20, **bw}
    basis = "h2d_pinned_gb_s" if "h2d_pinned_gb_s" in bw else "h2d_pageable_gb_s"
    h2d = bw[basis] * 1e9
    total_bytes = count * per
    med = out.get("pass_s_median")
    regen = out.get("regenerate_all_s")
    with_reupload = med + total_bytes / 2 / h2d if med else None
    out["derived"] = {
        "h2d_basis": basis,
        "relay_upload_all_s": sig(total_bytes / h2d),
        "half_memory_card_reupload_per_pass_s": sig(total_bytes / 2 / h2d),
        "half_memory_card_regenerate_half_s": sig(regen / 2) if regen is not None else None,
        "half_memory_card_pass_s_with_reupload": sig(with_reupload) if med else None,
        "half_memory_card_slowdown_with_reupload": sig(with_reupload / med) if med else None,
    }
    run.save()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes, few tokens, 1 rep")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list ({','.join(SECTIONS)})")
    ap.add_argument("--budget-s", type=float, help="no trial starts after this many seconds (all sections)")
    ap.add_argument(
        "--section-budgets",
        help="name=seconds,... per section from its start (default "
        + ",".join(f"{k}={v:g}" for k, v in BUDGETS.items())
        + "; --quick: none)",
    )
    ap.add_argument("--tokens", type=int, help="audit7b: new tokens per row (256; --quick 16)")
    ap.add_argument("--min-tokens", type=int, default=32, help="audit7b: fewest tokens a cell is cut to")
    ap.add_argument("--warmup-tokens", type=int, help="audit7b: tokens of the warm-up calls (8; --quick 2)")
    ap.add_argument("--reps", type=int, help="audit7b: timed repetitions per cell (2; --quick 1)")
    ap.add_argument(
        "--replay-models", help="native_replay: comma list (poi-lm,gpt2-small; --quick gpt2-micro)"
    )
    ap.add_argument("--replay-leases", type=int, help="native_replay: leases per model (6; --quick 2)")
    ap.add_argument("--replay-tokens", type=int, default=32, help="native_replay: new tokens per lease")
    ap.add_argument(
        "--exact-models", help="exact_gpu: comma list (gpt2-small,llama-small; --quick gpt2-micro)"
    )
    ap.add_argument("--exact-tokens", type=int, help="exact_gpu: new tokens (32; --quick 8)")
    ap.add_argument("--cap-n", type=int, help="capacity: matrix side (8192; --quick 128)")
    ap.add_argument("--cap-fraction", type=float, default=0.8, help="capacity: share of free GPU memory")
    ap.add_argument("--cap-count", type=int, default=8, help="capacity: matrices on a CPU")
    ap.add_argument("--cap-reps", type=int, help="capacity: timed passes after a warm-up (5; --quick 2)")
    ap.add_argument("--pcie-mb", type=int, help="capacity: bytes per bandwidth copy (1024 MiB; --quick 4)")
    ap.add_argument("--commit", help="the project commit (default $POI_COMMIT, else git rev-parse HEAD)")
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "gpu_next.json"
    )
    args = ap.parse_args(argv)
    q = args.quick
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    budgets = {} if q else dict(BUDGETS)
    for item in filter(None, (args.section_budgets or "").split(",")):
        name, _, value = item.partition("=")
        if name not in SECTIONS:
            ap.error(f"--section-budgets: unknown section {name!r}")
        budgets[name] = float(value)
    args.budgets = budgets
    args.tokens = args.tokens or (16 if q else 256)
    args.min_tokens = min(args.min_tokens, args.tokens)
    args.warmup_tokens = args.warmup_tokens or (2 if q else 8)
    args.reps = args.reps if args.reps is not None else (1 if q else 2)
    args.replay_models = (args.replay_models or ("gpt2-micro" if q else "poi-lm,gpt2-small")).split(",")
    unknown = [m for m in args.replay_models if m not in REPLAY_DRAFTS]
    if unknown:
        ap.error(f"--replay-models: no draft known for {unknown}; known: {', '.join(REPLAY_DRAFTS)}")
    args.replay_leases = args.replay_leases if args.replay_leases is not None else (2 if q else 6)
    args.exact_models = (args.exact_models or ("gpt2-micro" if q else "gpt2-small,llama-small")).split(",")
    args.exact_tokens = args.exact_tokens or (8 if q else 32)
    args.cap_n = args.cap_n or (128 if q else 8192)
    args.cap_reps = args.cap_reps if args.cap_reps is not None else (2 if q else 5)
    args.pcie_mb = args.pcie_mb or (4 if q else 1024)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    gpu = args.device.startswith("cuda")
    # fp32 claims mean fp32, not TF32 (as cross_hardware.py; changes nothing on a CPU)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    commit = gpu_env.commit_of(args.commit)
    result: dict[str, Any] = {
        "format": FORMAT,
        "what": "issue 26 item 4: L4 audit speed-up at a 7B shape, a bf16 decode replay on the GPU, the "
        "exact tier on GPU traces, a timed capacity challenge",
        "kind": "gpu" if gpu else "cpu-smoke",
        "card": torch.cuda.get_device_name(0)
        if gpu and torch.cuda.is_available()
        else "none (CPU smoke run)",
        "commit": commit,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "precision": {
            "policy": "TF32 off for the whole run (cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False, "
            "float32_matmul_precision 'highest'); fp32 claims and Maxwell's fp32 audits run attention on the "
            "math SDPA backend (cross_hardware.strict_fp32); bf16 claims the default backends",
            "settings": gpu_env.precision_settings(),
        },
        "config": {
            "device": args.device,
            "quick": args.quick,
            "sections": args.sections,
            "budget_s": args.budget_s,
            "section_budgets_s": args.budgets,
            "tokens": args.tokens,
            "reps": args.reps,
            "replay_models": args.replay_models,
            "replay_leases": args.replay_leases,
            "replay_tokens": args.replay_tokens,
            "exact_models": args.exact_models,
            "exact_tokens": args.exact_tokens,
            "cap_n": args.cap_n,
            "cap_reps": args.cap_reps,
        },
        "sections": {},
        "errors": [],
        "skipped": [],
        "complete": False,
    }
    run = gpu_env.Run(args.out, result, args.budget_s)

    def on_term(signum: int, frame: Any) -> None:
        raise gpu_env.Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result["env"] = gpu_env.environment(commit)
        if gpu and torch.cuda.is_available():
            result["env"]["gpu_memory_total_bytes"] = torch.cuda.mem_get_info()[1]
        run.save()
        if gpu and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch (--device cpu for a smoke run)")
        for name in args.sections:
            t = time.monotonic()
            budget = args.budgets.get(name)
            if budget is not None:
                run.section(name, budget)
            result["sections"][name] = {"status": "running", "budget_s": budget}
            run.save()
            try:
                globals()[name](run, args)  # looked up now (tests replace one)
                status = "done"
            except Exception as e:
                run.error(name, None, e)
                status = "failed"
            finally:
                free_gpu(args.device)
            result["sections"][name] = {
                "status": status,
                "budget_s": budget,
                "wall_s": round(time.monotonic() - t, 1),
            }
            run.save()
        result["complete"] = (
            all(s.get("status") == "done" for s in result["sections"].values())
            and not result["errors"]
            and not result["skipped"]
        )
    except gpu_env.Terminated as e:
        result["terminated"] = f"{e} after {time.monotonic() - run.t0:.0f} s"
        log(f"terminated ({e}): saving what was measured")
    except Exception as e:
        run.error("setup", None, e)
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.save()
    log(f"wrote {args.out}: {len(result['errors'])} errors, {len(result['skipped'])} skipped")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
