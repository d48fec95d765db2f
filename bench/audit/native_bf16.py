"""Native bf16 audits (issue 26 item 3): a bf16 claim re-executed in bf16 on the prover's own class.

Against Maxwell's fp32 reference, int8-rounded weights hide inside what honest bf16 rounding needs
(bf16_int8.json; on the H200 an int8-under-bf16 cheat passed 1 of 2). When the node measured the
prover on the verifier's class, the audit can instead re-execute in bf16 with the same class's
kernels: honest bf16 then differs only by accumulation order (threads, batching, decode vs prefill),
while other weights differ everywhere. The audit's rule (verifier.thresholds.NATIVE): pass if the
answer matches the bf16 reference within the native set, or the fp32 reference within the same-class
fp32 set (a bf16 claim served at fp32 is an honest upgrade).

Per model, in process (L4 reads only the receipt's claims): honest bf16-claim variants (bf16 at 1 and
2 threads, in a batch of 4, speculative, bf16-rounded weights with fp32 compute, served at fp32) and
cheats claiming bf16 (int8-rounded weights with bf16 or fp32 compute, 1 % weight noise in bf16, a
cheap draft). The native set's fingerprint bounds are fitted on half of the honest runs (every other
one: min_close = half the worst close fraction seen; max_median_rel = twice the worst median
error seen, at least 2^-10), its token bounds copied from the same-class bf16 set; the other half is
the held-out honest false-reject rate. Catch rates use the fitted set. Writes the set with its
provenance to src/maxwell_poi/data/native_audit.json and the measurements to
bench/results/bf16_int8.json (`native_audit`).

    python -m bench.audit.native_bf16                     # fit and evaluate on poi-lm
    python -m bench.audit.native_bf16 --held-out-model gpt2-small --honest 10 --cheats 10
                                                          # the shipped set on a model it never saw
    python -m bench.audit.native_bf16 --quick             # gpt2-micro, a few runs, writes under /tmp
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.audit.reliability import machine  # noqa: E402
from bench.common.results import commit, write_results  # noqa: E402
from bench.common.stats import rate_block  # noqa: E402
from bench.common.variants import PROMPTS, Variant, swapped  # noqa: E402
from maxwell_poi.adversaries.cheap_draft import DraftProver  # noqa: E402
from maxwell_poi.adversaries.perturbed_weights import perturbed  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import int8_rounded  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.prover.sdk import Prover, with_dtype  # noqa: E402
from maxwell_poi.prover.speculative import SpeculativeProver  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.audit import fingerprints_match, measure_generation, token_choice  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds, Tolerance  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "bf16_int8.json": ["native_audit", "native_audit_held_out_model"]
}  # the keys this script writes (bench/common/results.py)
NATIVE_FILE = ROOT / "src/maxwell_poi/data/native_audit.json"
DRAFTS = {"poi-lm": "poi-lm-draft", "gpt2-small": "gpt2-mini", "gpt2-micro": "gpt2-micro"}
BF16 = torch.bfloat16


def honest(registry: Registry, key: AgentKey, draft: str) -> dict[str, Variant]:
    def swap(make) -> Prover:
        return swapped(key, registry, make)

    return {
        "bf16-2threads": Variant("bf16-2threads", Prover(key, registry), threads=2, precision="bf16"),
        "bf16-1thread": Variant("bf16-1thread", Prover(key, registry), threads=1, precision="bf16"),
        "bf16-batch4": Variant("bf16-batch4", Prover(key, registry, batch=4), precision="bf16"),
        "bf16-speculative": Variant(
            "bf16-speculative", SpeculativeProver(key, draft, registry=registry), precision="bf16"
        ),
        "bf16-weights-fp32-compute": Variant(
            "bf16-weights-fp32-compute",
            swap(lambda m: with_dtype(with_dtype(m, BF16), torch.float32)),
            precision="bf16",
        ),
        "served-at-fp32": Variant("served-at-fp32", swap(lambda m: m), precision="bf16"),
    }


def cheats(registry: Registry, key: AgentKey, draft: str) -> dict[str, Variant]:
    def swap(make) -> Prover:
        return swapped(key, registry, make)

    return {
        "int8-weights-bf16-compute": Variant(
            "int8-weights-bf16-compute", swap(lambda m: with_dtype(int8_rounded(m), BF16)), precision="bf16"
        ),
        "int8-weights-fp32-compute": Variant(
            "int8-weights-fp32-compute", swap(int8_rounded), precision="bf16"
        ),
        "noise-1%-bf16": Variant(
            "noise-1%-bf16", swap(lambda m: with_dtype(perturbed(m, 0.01), BF16)), precision="bf16"
        ),
        "cheap-draft": Variant("cheap-draft", DraftProver(key, draft, registry=registry), precision="bf16"),
    }


def measure(
    model_id: str, variant: Variant, n: int, refs: dict, edges: dict, tokens: int, offset: int
) -> list:
    """n bf16-claim leases answered by `variant`, each re-executed on the bf16 and fp32 references."""
    rows = []
    for i in range(n):
        job = GenerateJob(
            # a numbered prompt: greedy leases of a repeated prompt would be the same trial again
            prompt=f"{PROMPTS[(i + offset) % len(PROMPTS)]} ({i + offset})",
            max_new_tokens=tokens,
            temperature=0.8 if i % 2 else 0.0,
            chunk=16,
        )
        lease = Lease.issue("agent-1", model_id, job, precision="bf16")
        claims = variant.claims(lease)
        rows.append({p: measure_generation(lease, claims, refs[p], edges[p]) for p in ("bf16", "fp32")})
    return rows


def passes(m, tol: Tolerance) -> bool:
    return token_choice(m, tol) is None and fingerprints_match(m.chunks, tol) is None


def judged(row: dict, native: Tolerance, fp32: Tolerance) -> dict:
    """The audit's native rule on one run (AuditLayer._reexecute): bf16 first, then fp32."""
    return {"native": passes(row["bf16"], native), "fp32": passes(row["fp32"], fp32)}


def fit(calibration: list[dict], same_bf16: Tolerance) -> Tolerance:
    """The native set from honest bf16-computed runs only (see the module docstring)."""
    closes = [r["bf16"].worst_close for r in calibration]
    medians = [r["bf16"].worst_median_rel for r in calibration]
    return Tolerance(
        min_close=round(min(closes) / 2, 4),
        max_median_rel=float(max(2 * max(medians), 2.0**-10)),
        token_gap=same_bf16.token_gap,
        embed_max_abs=same_bf16.embed_max_abs,
        logit_tol=same_bf16.logit_tol,
    )


def per_run(rows: list[dict]) -> list[list[float]]:
    """Each run as [native worst close, native worst median error, native token gap, fp32 worst
    close, fp32 worst median error] (what a different rule would be judged on)."""
    return [
        [
            round(r["bf16"].worst_close, 4),
            float(r["bf16"].worst_median_rel),
            round(r["bf16"].max_gap, 5),
            round(r["fp32"].worst_close, 4),
            float(r["fp32"].worst_median_rel),
        ]
        for r in rows
    ]


def summary(rows: list[dict]) -> dict:
    b = [r["bf16"] for r in rows]
    f = [r["fp32"] for r in rows]
    return {
        "runs": len(rows),
        "native_worst_close_min": min(m.worst_close for m in b),
        "native_worst_median_rel_max": max(m.worst_median_rel for m in b),
        "native_worst_median_rel_min": min(m.worst_median_rel for m in b),
        "native_max_token_gap": max(m.max_gap for m in b),
        "fp32_worst_close_min": min(m.worst_close for m in f),
        "fp32_worst_median_rel_max": max(m.worst_median_rel for m in f),
    }


def evaluate(m: dict, native: Tolerance, same_fp32: Tolerance, shipped: Thresholds, every: int = 2) -> dict:
    """One model's held-out honest runs (every other one, or all: `every` 1) and all its cheat
    runs, judged."""
    held = {name: rows[every - 1 :: every] for name, rows in m["honest"].items()}
    honest_out = {}
    for name, rows in held.items():
        verdicts = [judged(r, native, same_fp32) for r in rows]
        rejects = sum(not (v["native"] or v["fp32"]) for v in verdicts)
        honest_out[name] = {
            **rate_block(rejects, len(rows), "rejects"),
            "passed_native": sum(v["native"] for v in verdicts),
            "passed_fp32_only": sum(v["fp32"] and not v["native"] for v in verdicts),
            **summary(m["honest"][name]),
            "runs_measured": per_run(m["honest"][name]),
        }
    old = shipped.for_precision("bf16", same_class=True)  # the set bf16 claims had before
    cheat_out = {}
    for name, rows in m["cheats"].items():
        verdicts = [judged(r, native, same_fp32) for r in rows]
        caught = sum(not (v["native"] or v["fp32"]) for v in verdicts)
        cheat_out[name] = {
            **rate_block(caught, len(rows)),
            "caught_by_same_class_bf16_vs_fp32": sum(not passes(r["fp32"], old) for r in rows),
            **summary(rows),
            "runs_measured": per_run(rows),
        }
    all_held = [r for rows in held.values() for r in rows]
    rejects = sum(not any(judged(r, native, same_fp32).values()) for r in all_held)
    return {
        "honest_held_out": rate_block(rejects, len(all_held), "rejects"),
        "honest_by_variant": honest_out,
        "cheats": cheat_out,
    }


def brief(per_model: dict) -> dict:
    return {
        m: {
            "honest": f"{v['honest_held_out']['rejects']}/{v['honest_held_out']['trials']} rejected",
            "cheats": {c: f"{x['caught']}/{x['trials']}" for c, x in v["cheats"].items()},
        }
        for m, v in per_model.items()
    }


def shipped_native() -> Tolerance:
    native = Thresholds.load().native
    if "bf16" not in native:
        raise SystemExit("--held-out-model: expected a shipped bf16 native set; run without it first")
    return native["bf16"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="poi-lm")
    ap.add_argument(
        "--held-out-model",
        default="",
        help="judge this model's runs by the shipped native set (fitted without it); writes only "
        "native_audit_held_out_model",
    )
    ap.add_argument("--honest", type=int, default=50, help="runs per honest variant and model")
    ap.add_argument("--cheats", type=int, default=40, help="runs per cheat and model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="gpt2-micro, 4 runs each, writes under /tmp")
    args = ap.parse_args()
    if args.quick:
        args.models, args.honest, args.cheats = "gpt2-micro", 4, 2
    if args.held_out_model:
        args.models = args.held_out_model
    out_dir = Path("/tmp/native_bf16") if args.quick else None
    t0 = time.time()
    registry, key = Registry(), AgentKey.generate()
    shipped = Thresholds.load(native_path=Path("/nonexistent"))  # the sets this one is built beside
    same_bf16, same_fp32 = shipped.same_class["bf16"], shipped.same_class["fp32"]
    edges = {"bf16": same_bf16.logit_tol, "fp32": same_fp32.logit_tol}
    runs: dict[str, dict[str, dict[str, list]]] = {}
    for model_id in args.models.split(","):
        ref32 = registry.load(model_id)
        refs = {"fp32": ref32, "bf16": with_dtype(ref32, BF16)}
        draft = DRAFTS[model_id]
        runs[model_id] = {"honest": {}, "cheats": {}}
        for kind, variants, n in (
            ("honest", honest(registry, key, draft), args.honest),
            ("cheats", cheats(registry, key, draft), args.cheats),
        ):
            for name, v in variants.items():
                runs[model_id][kind][name] = measure(
                    model_id, v, n, refs, edges, args.tokens, offset=len(name)
                )
                print(f"[{time.time() - t0:7.1f} s] {model_id} {name}: {n} runs", flush=True)
    # fit on every other honest run that computed in bf16 (served-at-fp32 is judged, never fitted)
    calibration = [
        r
        for m in runs.values()
        for name, rows in m["honest"].items()
        if name != "served-at-fp32"
        for r in rows[::2]
    ]
    native = shipped_native() if args.held_out_model else fit(calibration, same_bf16)
    every = 1 if args.held_out_model else 2  # a held-out model's runs are all held out
    per_model = {m: evaluate(v, native, same_fp32, shipped, every) for m, v in runs.items()}
    if args.held_out_model:
        out = {
            "what": "the shipped native bf16 set (fitted on other models) judging a model it never saw",
            "native_set": vars(native),
            "per_model": per_model,
            "machine": machine(),
            "seconds": round(time.time() - t0, 1),
        }
        path = out_dir / "bf16_int8.json" if out_dir else None
        write_results("bf16_int8.json", {"native_audit_held_out_model": out}, writes=WRITES, path=path)
        print(json.dumps(brief(per_model), indent=1))
        return
    provenance = {
        "source": "bench/results/bf16_int8.json (native_audit), python -m bench.audit.native_bf16",
        "fitted_on": f"{len(calibration)} honest bf16-computed runs, every other one",
        "models": list(runs),
        "class": machine()["numerics_class"],
        "commit": commit(),
        "token_bounds": "copied from the same-class bf16 set (not fitted here)",
    }
    result = {
        "what": "bf16 claims re-executed in bf16 on the prover's own class (native) or at fp32 "
        "(served at fp32)",
        "rule": "pass if within the native set against the bf16 reference, or within the same-class fp32 set "
        "against the fp32 reference",
        "native_set": vars(native),
        "fitted_on_runs": len(calibration),
        "tokens_per_lease": args.tokens,
        "per_model": per_model,
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
    }
    write_results(
        "bf16_int8.json",
        {"native_audit": result},
        writes=WRITES,
        path=out_dir / "bf16_int8.json" if out_dir else None,
    )
    native_file = out_dir / "native_audit.json" if out_dir else NATIVE_FILE
    native_file.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(native_file.read_text()) if native_file.exists() else {}
    kept.update(  # the decode-replay set (bench/audit/native_replay.py) is kept
        {
            "_note": kept.get(
                "_note", "written by python -m bench.audit.native_bf16 (see verifier/thresholds.py)"
            ),
            "precisions": {"bf16": {"tolerance": vars(native), "provenance": provenance}},
        }
    )
    native_file.write_text(json.dumps(kept, indent=1) + "\n")
    print(json.dumps(brief(per_model), indent=1))


if __name__ == "__main__":
    main()
