"""Measured hardware-class pairs: which prover class -> verifier class pairs earn the same-class
(near-exact) tolerance, read from committed cross-hardware results; writes
src/maxwell_poi/data/class_pairs.json (read by verifier/thresholds.py).

    python -m bench.audit.class_pairs      # reads bench/results/gpu_core.json

A pair is written only when every honest trial of that precision on that card, verified by the
fp32 CPU reference, met the shipped same-class tolerance: every chunk's close fraction at or above
its min_close, median error at or below its max_median_rel, token gap at or below its token_gap.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common.results import ROOT
from maxwell_poi.verifier.thresholds import Thresholds

CORE = ROOT / "bench" / "results" / "gpu_core.json"
OUT = ROOT / "src" / "maxwell_poi" / "data" / "class_pairs.json"
# gpu_core.json's "fp32" acceptance cells ran with TF32 off and math attention (bench/gpu/README.md)
MODES = {"fp32": "strict-fp32"}


def pairs_from(core: dict[str, Any], thresholds: Thresholds) -> list[dict[str, Any]]:
    out = []
    for precision, mode in MODES.items():
        cells = {k: v for k, v in core["acceptance"].items() if k.endswith("/" + precision)}
        runs = [r for c in cells.values() for r in c["runs"]]
        tol = thresholds.same_class.get(precision)
        if not runs or tol is None:
            continue
        within = [
            r["worst_close"] >= tol.min_close
            and r["worst_median_rel"] <= tol.max_median_rel
            and r["max_token_gap"] <= tol.token_gap
            and r["verdict"] == "affirming"
            for r in runs
        ]
        if not all(within):
            continue
        out.append(
            {
                "prover": f"cuda:{core['card']}@{mode}",
                "verifier": "cpu:*",
                "precision": precision,
                "provenance": {
                    "source": "bench/results/gpu_core.json (acceptance)",
                    "card": core["card"],
                    "driver": core["env"]["cuda"]["driver"],
                    "torch": core["env"]["cuda"]["torch"],
                    "commit": core["commit"],
                    "models": sorted(k.split("/")[0] for k in cells),
                    "runs": len(runs),
                    "within_same_class": sum(within),
                    "worst_close_min": min(r["worst_close"] for r in runs),
                    "worst_median_rel_max": max(r["worst_median_rel"] for r in runs),
                    "max_token_gap_max": max(r["max_token_gap"] for r in runs),
                    "verifier_cpu": f"{core['env']['machine']}, {core['env']['cpu_count']} cores",
                    "verifier_cpu_model": None,  # gpu_core.json does not record it
                },
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--core", type=Path, default=CORE)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    core = json.loads(args.core.read_text())
    pairs = pairs_from(core, Thresholds.load())
    note = "written by python -m bench.audit.class_pairs from bench/results/gpu_core.json"
    doc = {"_note": note, "pairs": pairs}
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
