"""GPU L1 from NVML, evaluated on the committed H200 traces, held out by run; fits the shipped
parameters (src/maxwell_poi/data/gpu_signals.json) that verifier/gpu_signals.py loads.

    python -m bench.gpu_signals.evaluate            # ~10 s, CPU only (reads data/traces/gpu/)

Runs: a and b (HF generate, launch-bound; idle, miner, burner, inference of four shapes) and c
(a CUDA-graph serving loop at batch 1/8/32, a speculative pair, idle). Held-out splits train on
some runs and test on another; the shipped parameters are fitted on all three, energy floors on c
(the only run that is not launch-bound). What the numbers mean: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.results import ROOT, write_results
from maxwell_poi.observer.telemetry.replay import ReplaySource
from maxwell_poi.verifier.gpu_signals import FEATURES, INFERENCE, OTHER, GpuSignals, card_of, window_features

WRITES = {
    "gpu_signals.json": [
        "what",
        "card",
        "runs",
        "features",
        "workload_class_heldout",
        "workload_confusion",
        "model_class_heldout",
        "model_class_confusion",
        "honest_false_reject",
        "energy_per_token_floors",
        "energy_floor_heldout",
        "shipped",
    ]
}
TRACES = ROOT / "data" / "traces" / "gpu"
RUNS = ("run_a", "run_b", "run_c_serving")
SHIPPED = ROOT / "src" / "maxwell_poi" / "data" / "gpu_signals.json"
# size classes by parameter count (a design choice, not fitted): GPT-2-small, ~1B, ~7B, larger
SIZE_CLASSES = [
    {"name": "small", "max_params": 4e8},
    {"name": "1B", "max_params": 3e9},
    {"name": "7B", "max_params": 2e10},
    {"name": "large", "max_params": 1e15},
]
RADIUS_FACTOR = 1.5  # "other" beyond 1.5x the farthest training window from its own centroid
ENERGY_MARGIN = 0.8  # floor = 80 % of the least J/token an honest serving window showed
SPLITS = [
    (("run_a",), "run_b"),
    (("run_b",), "run_a"),
    (("run_a", "run_b"), "run_c_serving"),
    (("run_a", "run_c_serving"), "run_b"),
    (("run_b", "run_c_serving"), "run_a"),
]


def load_run(run: str) -> list[dict[str, Any]]:
    """Every recording of a run: its label, model, work and NVML window (replayed: trust RECORDED)."""
    index = json.loads((TRACES / run / "index.json").read_text())
    params = {k: v["params"] for k, v in index.get("models", {}).items()}
    rows = []
    for rec in index["recordings"]:
        name = rec["files"]["nvml:0"]
        path = TRACES / run / name if (TRACES / run / name).exists() else TRACES / run / "traces" / name
        src = ReplaySource(path)
        src.begin_window()
        m = src.end_window()
        work = rec.get("work", {})
        rows.append(
            {
                "run": run,
                "key": rec["key"],
                "rep": rec["rep"],
                "kind": rec["kind"],
                "model": rec["model"],
                "params": params.get(rec["model"]),
                "batch": work.get("batch", 1),
                "steps": work.get("decode_steps", 0),
                "tokens": work.get("new_tokens", 0),
                "m": m,
                "x": window_features(m),
            }
        )
    return rows


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Centroids, the "other" radius and the effective DRAM bandwidth from training windows."""
    cents = {}
    for kind in sorted({r["kind"] for r in rows}):
        xs = np.array([[r["x"][f] for f in FEATURES] for r in rows if r["kind"] == kind])
        cents[kind] = [round(float(v), 5) for v in xs.mean(axis=0)]
    far = max(
        float(np.linalg.norm(np.array([r["x"][f] for f in FEATURES]) - np.array(cents[r["kind"]])))
        for r in rows
    )
    # a decode step reads every weight once (bf16: 2 bytes each): bandwidth at 100 % DRAM activity
    bw = [
        2
        * r["params"]
        * r["steps"]
        / (
            r["m"].series["dram_bw_util"][np.isfinite(r["m"].series["dram_bw_util"])].mean()
            / 100
            * r["m"].duration_s
        )
        for r in rows
        if r["kind"] == INFERENCE and r["steps"]
    ]
    return {
        "centroids": cents,
        "other_radius": round(RADIUS_FACTOR * far, 4),
        "dram_bw_bytes_per_s": float(np.median(bw)) if bw else math.nan,
    }


def signals(fitted: dict[str, Any], card: str, floors: dict[str, dict[str, float]]) -> GpuSignals:
    return GpuSignals.from_dict(
        {
            **fitted,
            "card": card,
            "size_classes": SIZE_CLASSES,
            "energy_floors": floors,
            "energy_margin": ENERGY_MARGIN,
        }
    )


def confusion(pairs: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for want, got in pairs:
        out.setdefault(want, {}).setdefault(got, 0)
        out[want][got] += 1
    return out


def energy_floors(rows: list[dict[str, Any]], sig: GpuSignals) -> dict[str, dict[str, float]]:
    """Least J per token per size class and batch among honest serving windows (run c)."""
    best: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kind"] != INFERENCE or not r["tokens"]:
            continue
        size, batch = sig.size_class(r["params"]), str(r["batch"])
        per = r["m"].totals["energy_j"] / r["tokens"]
        best.setdefault(size, {})[batch] = round(min(best.get(size, {}).get(batch, math.inf), per), 5)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out", type=Path, default=None, help="results file (default bench/results/gpu_signals.json)"
    )
    ap.add_argument("--shipped-out", type=Path, default=SHIPPED)
    args = ap.parse_args()
    rows = {run: load_run(run) for run in RUNS}
    card = card_of(rows["run_a"][0]["m"])
    floors = energy_floors(rows["run_c_serving"], signals(fit(rows["run_c_serving"]), card, {}))

    workload, model_cls, false_reject, energy_ho = {}, {}, {}, {}
    wl_conf, mc_conf = {}, {}
    for train, test in SPLITS:
        name = "+".join(train) + "->" + test
        sig = signals(fit([r for t in train for r in rows[t]]), card, floors)
        pairs = [(r["kind"], sig.classify(r["x"])[0]) for r in rows[test]]
        workload[name] = {"correct": sum(a == b for a, b in pairs), "total": len(pairs)}
        wl_conf[name] = confusion(pairs)
        inf = [r for r in rows[test] if r["kind"] == INFERENCE]
        size_pairs = [
            (sig.size_class(r["params"]), sig.size_class(sig.implied_params(r["m"], r["steps"], "bf16")))
            for r in inf
        ]
        model_cls[name] = {"correct": sum(a == b for a, b in size_pairs), "total": len(size_pairs)}
        mc_conf[name] = confusion(size_pairs)
        l1 = [
            sig.judge(
                r["m"],
                steps=r["steps"],
                tokens=r["tokens"],
                batch=r["batch"],
                claimed_params=r["params"],
                precision="bf16",
            )
            for r in inf
        ]
        false_reject[name] = {
            "workload_contraindicated": sum(b not in (INFERENCE, OTHER) for a, b in pairs if a == INFERENCE),
            "workload_other": sum(b == OTHER for a, b in pairs if a == INFERENCE),
            "model_size_rejects": sum(a != b for a, b in size_pairs),
            "any_check_rejects": sum(any(c.ok is False for c in checks) for checks in l1),
            "not_measured": dict(Counter(c.name for checks in l1 for c in checks if c.ok is None)),
            "trials": len(inf),
        }
        if test != "run_c_serving":  # floors come from run c: runs a and b are held out for them
            judged = [sig.energy(r["m"], r["tokens"], sig.size_class(r["params"]), r["batch"]) for r in inf]
            energy_ho[test] = {
                "below_floor": sum(c.ok is False for c in judged),
                "not_measured": sum(c.ok is None for c in judged),
                "trials": len(judged),
            }

    shipped = {
        **fit([r for run in RUNS for r in rows[run]]),
        "card": card,
        "size_classes": SIZE_CLASSES,
        "energy_floors": floors,
        "energy_margin": ENERGY_MARGIN,
    }
    shipped_doc = {
        "_note": "written by python -m bench.gpu_signals.evaluate from data/traces/gpu/{run_a,run_b,"
        "run_c_serving}; read by maxwell_poi.verifier.gpu_signals",
        **shipped,
    }
    args.shipped_out.write_text(json.dumps(shipped_doc, indent=2) + "\n")
    commits = {run: json.loads((TRACES / run / "index.json").read_text()).get("commit") for run in RUNS}
    write_results(
        "gpu_signals.json",
        {
            "what": "GPU L1 from NVML windows (workload, model size, energy per token), held out by run",
            "card": card,
            "runs": {
                run: {
                    "windows": len(rows[run]),
                    "by_kind": dict(Counter(r["kind"] for r in rows[run])),
                    "trace_commit": commits[run],
                }
                for run in RUNS
            },
            "features": FEATURES,
            "workload_class_heldout": workload,
            "workload_confusion": wl_conf,
            "model_class_heldout": model_cls,
            "model_class_confusion": mc_conf,
            "honest_false_reject": false_reject,
            "energy_per_token_floors": {"j_per_token_min_run_c": floors, "margin": ENERGY_MARGIN},
            "energy_floor_heldout": energy_ho,
            "shipped": {k: shipped[k] for k in ("other_radius", "dram_bw_bytes_per_s")},
        },
        writes=WRITES,
        path=args.out,
    )
    print(
        json.dumps(
            {
                "workload": workload,
                "model": model_cls,
                "false_reject": false_reject,
                "energy": energy_ho,
                "floors": floors,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
