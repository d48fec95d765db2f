"""Calibrate the audit tolerances (L4) from measured distributions of honest runs and cheats.

Honest variants: fp32 with 1 and 2 threads, in a batch of 4 and decoded speculatively (the draft
proposes, the claimed model decides); bf16 provers (claiming bf16) checked by the fp32 verifier.
Cheats: bf16 and int8 downgrades, 1% weight noise, other weights, a smaller model, skipped
layers, cheap-draft decoding. Every run is a real forward pass, on the trained poi-lm and the
GPT-2-small-shaped seeded model (generation; thresholds must hold for both) and the pretrained
MiniLM (embeddings).

Two tolerance sets come out: cross-class (floors for other hardware's kernels; the default) and
same-class (the node measured the prover's device to be the verifier's kind: derived from this
class's honest runs only, never looser than cross-class). `margins_by_model` shows how far each
model's honest and cheating runs lie apart.

Writes bench/results/calibration.json (every run's statistics, the thresholds and their margins)
and src/maxwell_poi/data/thresholds.json (what the verifier loads).

    make calibrate            # or: python -m bench.audit.calibrate --prompts 6 --tokens 64
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from maxwell_poi.adversaries._agent import SwappedProver  # noqa: E402
from maxwell_poi.adversaries.cheap_draft import DraftProver  # noqa: E402
from maxwell_poi.adversaries.perturbed_weights import perturbed  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import downgraded  # noqa: E402
from maxwell_poi.adversaries.skipped_layers import early_exit  # noqa: E402
from maxwell_poi.observer.host import numerics_class, this_device  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease  # noqa: E402
from maxwell_poi.prover.sdk import Prover  # noqa: E402
from maxwell_poi.prover.speculative import SpeculativeProver  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.audit import measure_embedding, measure_generation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "calibration.json": [
        "what",
        "device",
        "model",
        "embed_model",
        "tokens",
        "rule",
        "floors",
        "thresholds",
        "same_class_thresholds",
        "same_class_class",
        "same_class_rule",
        "separation",
        "same_class_separation",
        "margins_by_model",
        "runs",
    ]
}  # the keys of bench/results/calibration.json this script writes (bench/common/results.py)
PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
    "The recipe calls for two cups of flour and",
    "Quantum computers differ from classical ones because",
    "The committee met on Tuesday to discuss the budget",
    "She opened the letter and read the first line:",
]
TEXTS = [
    "Maxwell verifies inference.",
    "A GPU hypervisor meters energy per lease.",
    "The cat sat on the mat.",
    "Stock markets fell sharply on Monday after the announcement.",
    "How do I reset my password?",
    "Photosynthesis converts light into chemical energy.",
]
# floors: the smallest tolerance we accept even when every honest run agreed exactly, so that
# float32 reruns on other CPU kernels (different summation order) still pass
TOKEN_ONLY = {"cheap-draft"}
FLOORS = {
    "fp32": {"token_gap": 1e-3, "median_rel": 2.0**-10, "embed": 1e-5},
    "bf16": {"token_gap": 5e-2, "median_rel": 2.0**-7, "embed": 1e-3},
}


def cheats(registry: Registry, key: AgentKey, small: str, alt: str) -> dict[str, Prover]:
    def swap(fn):
        return SwappedProver(key, fn, registry=registry)

    return {
        "precision-bf16": swap(lambda lease, reg: downgraded(reg.load(lease.model_id), "bf16")),
        "precision-int8": swap(lambda lease, reg: downgraded(reg.load(lease.model_id), "int8")),
        "perturbed-weights-1%": swap(lambda lease, reg: perturbed(reg.load(lease.model_id), 0.01)),
        "other-weights": swap(lambda _lease, reg: reg.load(alt)),
        "smaller-model": swap(lambda _lease, reg: reg.load(small)),
        "skipped-layers": swap(lambda lease, reg: early_exit(reg.load(lease.model_id), 0.5)),
        "cheap-draft": DraftProver(key, small),
    }


def logit_noise(args, registry: Registry, log, model_id: str) -> dict[str, float]:
    """How far honest rounding moves logits: bf16 and fp32 prefill of the same sequences, read on
    the top candidates where sampling decisions are made."""
    from maxwell_poi.prover.sdk import with_dtype
    from maxwell_poi.registry.forward import prefill

    reference = registry.load(model_id)
    low = with_dtype(reference, torch.bfloat16)
    diffs = []
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        ids = reference.encode_prompt(prompt)
        gen = torch.Generator().manual_seed(i)
        cont = torch.randint(1000, reference.reference.vocab, (args.tokens,), generator=gen).tolist()
        _, fp32 = prefill(reference, ids, cont)
        _, bf16 = prefill(low, ids, cont)
        top = torch.topk(fp32, 64, dim=1).indices
        diffs.append((fp32.gather(1, top) - bf16.float().gather(1, top)).abs().flatten())
    d = torch.cat(diffs)
    out = {"bf16_p99": float(torch.quantile(d, 0.99)), "bf16_max": float(d.max())}
    log(
        f"{model_id}: bf16 vs fp32 logit error on top candidates: "
        f"p99 {out['bf16_p99']:.4g}, max {out['bf16_max']:.4g}"
    )
    return out


def generation_runs(
    args, registry: Registry, key: AgentKey, log, edge: dict[str, float], model_id: str, small: str, alt: str
) -> list[dict]:
    reference = registry.load(model_id)
    honest = {
        "honest-fp32-1thread": (Prover(key, registry), 1, "fp32"),
        "honest-fp32-2threads": (Prover(key, registry), 2, "fp32"),
        "honest-fp32-batch4": (Prover(key, registry, batch=4), 2, "fp32"),
        "honest-fp32-speculative": (SpeculativeProver(key, small, registry=registry), 2, "fp32"),
        "honest-bf16": (Prover(key, registry), 2, "bf16"),
    }
    bad = cheats(registry, key, small, alt)
    runs = []
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        temperature = 0.8 if i % 2 == 0 else 0.0
        plan = [(name, p, threads, prec, True) for name, (p, threads, prec) in honest.items()]
        plan += [(name, p, 2, "fp32", False) for name, p in bad.items()]
        for name, prover, threads, precision, is_honest in plan:
            torch.set_num_threads(threads)
            job = GenerateJob(prompt=prompt, max_new_tokens=args.tokens, temperature=temperature)
            lease = Lease.issue("calib", model_id, job, precision=precision)
            t0 = time.perf_counter()
            claims = prover.claims(lease)
            torch.set_num_threads(2)
            m = measure_generation(lease, claims, reference, edge[precision])
            # the same run judged with the bf16 claim's rounding allowance (cheats face both claims)
            m16 = m if precision == "bf16" else measure_generation(lease, claims, reference, edge["bf16"])
            runs.append(
                {
                    "max_token_gap_bf16": m16.max_gap,
                    "job": "generate",
                    "model": model_id,
                    "variant": name,
                    "honest": is_honest,
                    "precision": precision,
                    "prompt": i,
                    "temperature": temperature,
                    "max_token_gap": m.max_gap,
                    "worst_close": m.worst_close,
                    "worst_median_rel": m.worst_median_rel,
                    "seconds": round(time.perf_counter() - t0, 3),
                }
            )
            log(
                f"gen  {model_id} {name:24s} prompt {i} T={temperature}: gap {m.max_gap:.3g} "
                f"close {m.worst_close:.3f} median {m.worst_median_rel:.3g}"
            )
    return runs


def embedding_runs(args, registry: Registry, key: AgentKey, log) -> list[dict]:
    reference = registry.load(args.embed_model)
    plan = [
        ("honest-fp32-1thread", Prover(key, registry), 1, "fp32", True),
        ("honest-fp32-2threads", Prover(key, registry), 2, "fp32", True),
        ("honest-bf16", Prover(key, registry), 2, "bf16", True),
        (
            "precision-bf16",
            SwappedProver(
                key, lambda lease, reg: downgraded(reg.load(lease.model_id), "bf16"), registry=registry
            ),
            2,
            "fp32",
            False,
        ),
        (
            "precision-int8",
            SwappedProver(
                key, lambda lease, reg: downgraded(reg.load(lease.model_id), "int8"), registry=registry
            ),
            2,
            "fp32",
            False,
        ),
        (
            "skipped-layers",
            SwappedProver(
                key, lambda lease, reg: early_exit(reg.load(lease.model_id), 0.5), registry=registry
            ),
            2,
            "fp32",
            False,
        ),
        (
            "perturbed-weights-1%",
            SwappedProver(
                key, lambda lease, reg: perturbed(reg.load(lease.model_id), 0.01), registry=registry
            ),
            2,
            "fp32",
            False,
        ),
    ]
    runs = []
    for text_i, text in enumerate(TEXTS):
        for name, prover, threads, precision, is_honest in plan:
            torch.set_num_threads(threads)
            lease = Lease.issue("calib", args.embed_model, EmbedJob(texts=[text]), precision=precision)
            claims = prover.claims(lease)
            torch.set_num_threads(2)
            m = measure_embedding(lease, claims, reference)
            runs.append(
                {
                    "job": "embed",
                    "variant": name,
                    "honest": is_honest,
                    "precision": precision,
                    "text": text_i,
                    "max_embedding_diff": m.max_diff,
                    "worst_close": m.worst_close,
                    "worst_median_rel": m.worst_median_rel,
                }
            )
            log(f"emb  {name:24s} text {text_i}: diff {m.max_diff:.3g} close {m.worst_close:.3f}")
    return runs


def _between(low: float, high: float) -> float:
    """Geometric midpoint of two positive numbers (arithmetic when one is 0)."""
    return math.sqrt(low * high) if low > 0 and high > 0 else (low + high) / 2


def derive(gen: list[dict], emb: list[dict], edge: dict[str, float]) -> tuple[dict, dict]:
    thresholds, report = {}, {}
    for precision in ("fp32", "bf16"):
        floor = FLOORS[precision]
        # a bf16 claim may legitimately be served at fp32; an fp32 claim may not be served at bf16
        honest_prec = {"fp32": {"fp32"}, "bf16": {"fp32", "bf16"}}[precision]
        h = [r for r in gen if r["honest"] and r["precision"] in honest_prec]
        c = [
            r
            for r in gen
            if not r["honest"] and not (precision == "bf16" and r["variant"] == "precision-bf16")
        ]
        # cheap-draft really runs the leased model for its fingerprints; only the token check is meant
        # to catch it, so it does not enter the fingerprint separation
        cf = [r for r in c if r["variant"] not in TOKEN_ONLY]
        h_close = min(r["worst_close"] for r in h)
        c_close = max(r["worst_close"] for r in cf)
        h_med = max(max(r["worst_median_rel"] for r in h), floor["median_rel"])
        c_med = min(r["worst_median_rel"] for r in cf)
        gap = "max_token_gap" if precision == "fp32" else "max_token_gap_bf16"
        h_gap = max(max(r[gap] for r in h), floor["token_gap"] / 4)
        # separated: halfway between; overlapping: keep honest runs passing with a 2x margin
        min_close = (h_close + c_close) / 2 if h_close > c_close else h_close / 2
        max_med = max(1.5 * h_med, _between(h_med, c_med)) if c_med > h_med else 1.5 * h_med
        token_gap = max(floor["token_gap"], 4 * h_gap)
        he = [r for r in emb if r["honest"] and r["precision"] in honest_prec]
        ce = [
            r
            for r in emb
            if not r["honest"] and not (precision == "bf16" and r["variant"] == "precision-bf16")
        ]
        he_diff = max(max(r["max_embedding_diff"] for r in he), floor["embed"] / 4)
        ce_diff = min(r["max_embedding_diff"] for r in ce)
        embed = max(1.5 * he_diff, _between(he_diff, ce_diff)) if ce_diff > he_diff else he_diff * 1.5
        thresholds[precision] = {
            "min_close": round(min_close, 4),
            "max_median_rel": float(f"{max_med:.4g}"),
            "token_gap": float(f"{token_gap:.4g}"),
            "embed_max_abs": float(f"{embed:.4g}"),
            "logit_tol": float(f"{edge[precision]:.4g}"),
        }
        if not all(math.isfinite(v) for v in thresholds[precision].values()):
            raise SystemExit(
                f"calibration produced a non-finite threshold for {precision}: {thresholds[precision]}"
            )
        by_variant = {}
        for r in c:
            v = by_variant.setdefault(r["variant"], {"runs": 0, "fingerprint_flags": 0, "token_flags": 0})
            v["runs"] += 1
            v["fingerprint_flags"] += r["worst_close"] < min_close or r["worst_median_rel"] > max_med
            v["token_flags"] += r[gap] > token_gap
        report[precision] = {
            "honest_runs": len(h),
            "cheat_runs": len(c),
            "honest_worst_close": h_close,
            "cheat_best_close": c_close,
            "honest_worst_median_rel": max(r["worst_median_rel"] for r in h),
            "cheat_best_median_rel": c_med,
            "honest_max_token_gap": max(r[gap] for r in h),
            "fingerprint_separated": h_close > c_close or c_med > h_med,
            "not_separated_by_fingerprint": sorted(
                {
                    r["variant"]
                    for r in cf
                    if r["worst_close"] >= min_close and r["worst_median_rel"] <= max_med
                }
            ),
            "close_margin": round(h_close - c_close, 4),
            "median_rel_ratio": (c_med / h_med) if h_med else None,
            "honest_embed_max_diff": max(r["max_embedding_diff"] for r in he),
            "cheat_embed_min_diff": ce_diff,
            "cheats_flagged": by_variant,
            "honest_flagged": sum(
                r["worst_close"] < min_close or r["worst_median_rel"] > max_med or r[gap] > token_gap
                for r in h
            ),
        }
    return thresholds, report


SAME_CLASS_MIN = {"min_close_slack": 0.05, "median_rel_floor": 2.0**-12, "token_gap_floor": 1e-4}


def derive_same_class(gen: list[dict], cross: dict) -> tuple[dict, dict]:
    """Near-exact tolerances for a prover measured to run on the verifier's kind of device: twice
    the honest deficit in close values (at least SAME_CLASS_MIN's slack), twice the honest median
    error and four times the honest token gap (with floors); never looser than cross-class."""
    out, report = {}, {}
    for precision in ("fp32", "bf16"):
        h = [r for r in gen if r["honest"] and r["precision"] == precision]
        gap = "max_token_gap" if precision == "fp32" else "max_token_gap_bf16"
        h_close = min(r["worst_close"] for r in h)
        h_med = max(r["worst_median_rel"] for r in h)
        h_gap = max(r[gap] for r in h)
        c = cross[precision]
        min_close = max(c["min_close"], h_close - max(SAME_CLASS_MIN["min_close_slack"], 1 - h_close))
        max_med = min(c["max_median_rel"], max(2 * h_med, SAME_CLASS_MIN["median_rel_floor"]))
        token_gap = min(c["token_gap"], max(4 * h_gap, SAME_CLASS_MIN["token_gap_floor"]))
        out[precision] = {
            **c,
            "min_close": round(min_close, 4),
            "max_median_rel": float(f"{max_med:.4g}"),
            "token_gap": float(f"{token_gap:.4g}"),
        }
        cheats_caught = {}
        for r in gen:
            if r["honest"] or (precision == "bf16" and r["variant"] == "precision-bf16"):
                continue
            v = cheats_caught.setdefault(r["variant"], {"runs": 0, "flagged": 0})
            v["runs"] += 1
            v["flagged"] += (
                r["worst_close"] < min_close or r["worst_median_rel"] > max_med or r[gap] > token_gap
            )
        report[precision] = {
            "honest_runs": len(h),
            "honest_worst_close": h_close,
            "honest_worst_median_rel": h_med,
            "honest_max_token_gap": h_gap,
            "cheats_flagged": cheats_caught,
            "honest_flagged": sum(
                r["worst_close"] < min_close or r["worst_median_rel"] > max_med or r[gap] > token_gap
                for r in h
            ),
        }
    return out, report


def margins_by_model(gen: list[dict]) -> dict:
    """How far apart honest (fp32) and cheating runs lie, per model: the quantities the thresholds
    sit between."""
    out = {}
    for model in sorted({r["model"] for r in gen}):
        h = [r for r in gen if r["model"] == model and r["honest"] and r["precision"] == "fp32"]
        c = [r for r in gen if r["model"] == model and not r["honest"] and r["variant"] not in TOKEN_ONLY]
        d = [r for r in gen if r["model"] == model and r["variant"] in TOKEN_ONLY]
        h_close, c_close = min(r["worst_close"] for r in h), max(r["worst_close"] for r in c)
        h_med, c_med = max(r["worst_median_rel"] for r in h), min(r["worst_median_rel"] for r in c)
        out[model] = {
            "honest_worst_close": h_close,
            "cheat_best_close": c_close,
            "close_margin": round(h_close - c_close, 4),
            "honest_worst_median_rel": h_med,
            "cheat_best_median_rel": c_med,
            "median_rel_ratio": round(c_med / h_med, 2) if h_med else None,
            "honest_max_token_gap": max(r["max_token_gap"] for r in h),
            "cheap_draft_min_token_gap": min((r["max_token_gap"] for r in d), default=None),
            "closest_cheat_by_close": max(c, key=lambda r: r["worst_close"])["variant"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="poi-lm,gpt2-small", help="comma-separated claimed models")
    ap.add_argument("--small", default="poi-lm-draft,gpt2-mini", help="per model: its draft / small model")
    ap.add_argument("--alt", default="poi-lm-init,gpt2-small-alt", help="per model: other weights")
    ap.add_argument("--embed-model", default="minilm-l6-v2")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/calibration.json")
    ap.add_argument("--thresholds-out", type=Path, default=ROOT / "src/maxwell_poi/data/thresholds.json")
    args = ap.parse_args()
    registry = Registry()
    key = AgentKey.generate()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    models = list(zip(args.model.split(","), args.small.split(","), args.alt.split(","), strict=True))
    noise = {m: logit_noise(args, registry, log, m) for m, _, _ in models}
    # fp32: other CPU kernels move logits by ~1e-5; bf16: the measured worst case, with 50% margin
    edge = {"fp32": 1e-4, "bf16": 1.5 * max(n["bf16_max"] for n in noise.values())}
    gen = [
        r for m, small, alt in models for r in generation_runs(args, registry, key, log, edge, m, small, alt)
    ]
    emb = embedding_runs(args, registry, key, log)
    thresholds, report = derive(gen, emb, edge)
    same_class, same_report = derive_same_class(gen, thresholds)
    report["logit_noise"] = noise
    result = {
        "what": "L4 audit calibration: honest vs cheating provers, measured by the fp32 CPU verifier",
        "device": f"CPU {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "model": args.model,
        "embed_model": args.embed_model,
        "tokens": args.tokens,
        "rule": "min_close = midpoint of honest worst and cheat best; max_median_rel = geometric midpoint "
        "of honest worst (floored) and cheat best; token_gap = max(floor, 4 x honest max); "
        "embed_max_abs = geometric midpoint",
        "floors": FLOORS,
        "thresholds": thresholds,
        "same_class_thresholds": same_class,
        "same_class_class": numerics_class(this_device()),
        "same_class_rule": derive_same_class.__doc__,
        "separation": report,
        "same_class_separation": same_report,
        "margins_by_model": margins_by_model(gen),
        "runs": {"generate": gen, "embed": emb},
    }
    write_results("calibration.json", result, writes=WRITES, path=args.out)
    args.thresholds_out.write_text(
        json.dumps(
            {
                "_note": f"written by bench/audit/calibrate.py; data in bench/results/{args.out.name}",
                **thresholds,
                "same_class": same_class,
            },
            indent=2,
        )
    )
    print(
        json.dumps(
            {
                "thresholds": thresholds,
                "same_class": same_class,
                "separation": report,
                "same_class_separation": same_report,
                "margins": result["margins_by_model"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
