"""Can a bf16 claim exclude int8-rounded weights? Token-choice margins accumulated over leases.

Under a bf16 claim L4 must tolerate bf16 rounding (a logit allowance at near-ties), and int8-rounded
weights stay inside it (0/6 flagged in the calibration). DiFR (arXiv 2511.20621) separates 4-bit
quantisation from same-seed token statistics over ~300 tokens. Here, on the trained model: per
lease, the raw token-choice statistics against Maxwell's fp32 reference with no allowance —
positions where the output is not the reference's seeded pick (`mismatches`) and the summed score
gaps — for honest bf16 provers and for int8-rounded weights (computing in bf16 and in fp32), then
the same summed over windows of 1..N consecutive leases of one agent. Reports ROC AUC per window and
the catch rate at a threshold above every honest window seen (zero honest rejects measured; with
its one-sided 95 % bound).

    python -m bench.audit.bf16_int8                 # writes bench/results/bf16_int8.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from sklearn.metrics import roc_auc_score  # noqa: E402

from bench.common.results import write_results  # noqa: E402
from bench.common.stats import upper95  # noqa: E402
from bench.common.variants import PROMPTS, swapped  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import int8_rounded  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.prover.sdk import Prover, with_dtype  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.audit import measure_generation  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "bf16_int8.json": [
        "what",
        "model",
        "tokens_per_lease",
        "leases_per_variant",
        "temperature",
        "per_lease_mean",
        "by_window",
        "seconds",
    ]
}  # the keys of bench/results/bf16_int8.json this script writes (bench/common/results.py)


def per_lease(prover: Prover, registry: Registry, model: str, n: int, tokens: int, offset: int) -> list[dict]:
    reference = registry.load(model)
    rows = []
    for i in range(n):
        job = GenerateJob(prompt=PROMPTS[(i + offset) % len(PROMPTS)], max_new_tokens=tokens, temperature=0.8)
        lease = Lease.issue("agent-1", model, job, precision="bf16")
        m = measure_generation(lease, prover.claims(lease), reference, 0.0)
        rows.append({"mismatches": int((m.gaps > 0).sum()), "gap_sum": float(m.gaps.sum())})
    return rows


def windows(values: np.ndarray, size: int) -> np.ndarray:
    """Sums over consecutive non-overlapping windows of `size` leases."""
    usable = len(values) // size * size
    return values[:usable].reshape(-1, size).sum(axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="poi-lm")
    ap.add_argument("--leases", type=int, default=200, help="leases per variant")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--windows", default="1,2,5,10")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/bf16_int8.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    registry, key = Registry(), AgentKey.generate()
    variants = {
        "honest-bf16": Prover(key, registry),
        "int8-weights-bf16-compute": swapped(
            key, registry, lambda m: with_dtype(int8_rounded(m), torch.bfloat16)
        ),
        "int8-weights-fp32-compute": swapped(key, registry, int8_rounded),
    }
    t0 = time.perf_counter()
    data = {}
    for i, (name, prover) in enumerate(variants.items()):
        data[name] = per_lease(prover, registry, args.model, args.leases, args.tokens, offset=i)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    result = {
        "what": "token-choice statistics under a bf16 claim, honest bf16 vs int8-rounded weights",
        "model": args.model,
        "tokens_per_lease": args.tokens,
        "leases_per_variant": args.leases,
        "temperature": 0.8,
        "per_lease_mean": {
            n: {k: float(np.mean([r[k] for r in rows])) for k in ("mismatches", "gap_sum")}
            for n, rows in data.items()
        },
        "by_window": {},
    }
    honest = data["honest-bf16"]
    for size in [int(w) for w in args.windows.split(",")]:
        row = {"tokens": size * args.tokens}
        for stat in ("mismatches", "gap_sum"):
            h = windows(np.array([r[stat] for r in honest], dtype=float), size)
            for cheat in ("int8-weights-bf16-compute", "int8-weights-fp32-compute"):
                c = windows(np.array([r[stat] for r in data[cheat]], dtype=float), size)
                labels = np.r_[np.zeros(len(h)), np.ones(len(c))]
                caught = int((c > h.max()).sum())
                row[f"{stat}|{cheat}"] = {
                    "auc": round(float(roc_auc_score(labels, np.r_[h, c])), 4),
                    "threshold": float(h.max()),
                    "caught": caught,
                    "windows": len(c),
                    "honest_windows": len(h),
                    "honest_false_reject_upper95": round(upper95(0, len(h)), 4),
                }
        result["by_window"][str(size)] = row
        print(f"window {size}: {json.dumps(row)}", flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_results("bf16_int8.json", result, writes=WRITES, path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
