"""Issue 3 benchmarks: Maxwell's own signals (L1 thermodynamic, L2 boundary) on CPU recordings.

    make signals        # python -m bench.signals.recordings  → bench/results/signals.json

1. sampling overhead of the Observer at 10 Hz (fraction of one core);
2. recordings: the demo's honest agents and every adversary program, run through Maxwell's runner
   with telemetry on the claimed model (gpt2-small by default), `--trials` times; plus honest runs
   of four models for model identification; traces are written to data/traces/cpu/;
3. per attack class: caught by L1 alone, L2 alone, L1-or-L2 (the policy), the fused score, and
   L4; honest false rejects of each;
4. the workload classifier (inference vs idle vs busy loop vs miner vs burner vs fabricator) and
   model identification from the traces, on a held-out split: confusion matrices and per-class
   false-accept / false-reject;
5. L1 + L2 appraisal time on a recorded trace (p50 / p99).

Everything is measured on this machine's CPU from real runs; nothing is simulated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from bench.signals.sampling_overhead import measure_sampling_overhead  # noqa: E402
from maxwell_poi.demo.generation import Demo, DemoConfig  # noqa: E402
from maxwell_poi.node.runs import honest_runs, measure_profile  # noqa: E402
from maxwell_poi.observer.evidence import LeaseEvidence  # noqa: E402
from maxwell_poi.observer.host import this_device  # noqa: E402
from maxwell_poi.observer.telemetry import Measurement, save_trace  # noqa: E402
from maxwell_poi.protocol.lease import Lease  # noqa: E402
from maxwell_poi.protocol.receipt import open_receipt  # noqa: E402
from maxwell_poi.protocol.result import LayerName  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.registry.profiles import ProfileStore  # noqa: E402
from maxwell_poi.verifier.appraisal import Appraisal  # noqa: E402
from maxwell_poi.verifier.boundary import BoundaryLayer  # noqa: E402
from maxwell_poi.verifier.classify import FEATURES, trace_features  # noqa: E402
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "signals.json": [
        "what",
        "device",
        "command",
        "model",
        "tokens",
        "trials",
        "sampling_overhead",
        "sampling_overhead_cpu_fraction",
        "sampling_overhead_goal",
        "detection",
        "physics_attacks_caught_without_audit",
        "honest_false_reject",
        "workload_classifier",
        "model_identification",
        "l1_l2_appraisal_ms",
        "wall_s",
    ]
}  # the keys of bench/results/signals.json this script writes (bench/common/results.py)
WORKLOAD = {  # attack class -> what its trace is (classifier label)
    None: "inference",
    "sleeper": "idle",
    "busy-loop": "busy-loop",
    "cpu-miner": "miner",
    "power-burner": "burner",
    "fast-fabricator": "fabricator",
}
L1, L2, L4 = LayerName.THERMODYNAMIC, LayerName.BOUNDARY, LayerName.AUDIT


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_runs(dirs: list[Path]) -> list[dict]:
    runs = []
    for base in dirs:
        for run_dir in sorted(base.glob("*/runs/*")) + sorted(base.glob("runs/*")):
            if run_dir.name.endswith("-priming") or not (run_dir / "result.json").exists():
                continue
            result = json.loads((run_dir / "result.json").read_text())
            lease = Lease.from_json((run_dir / "lease.json").read_text())
            runs.append(
                {
                    "dir": run_dir,
                    "lease": lease,
                    "result": result,
                    "evidence": json.loads((run_dir / "evidence.json").read_text()),
                }
            )
    return runs


def attack_of(run: dict) -> str | None:
    """The attack class of a demo run (its run.json; older runs: the folder name)."""
    meta = run["dir"] / "run.json"
    if meta.exists():
        return json.loads(meta.read_text())["attack"]
    name = run["dir"].name.split("-", 1)[1]
    if name.startswith("honest"):  # older demos named the forger's and the thief's runs after the victim
        reason = run["result"]["reason"]
        if "signature" in reason:
            return "forged-signature" if "not in the keyring" in reason else "other-agents-lease"
        return None
    return name


def status(run: dict, layer: str) -> str:
    return next(r["status"] for r in run["result"]["layers"] if r["layer"] == layer)


def record(args, out_dirs: list[Path]) -> None:
    for t in range(args.trials):
        out = args.work / f"trial{t}"
        cfg = DemoConfig(
            model=args.model,
            small="gpt2-mini",
            alt="gpt2-small-alt",
            second_model=None,
            embed_model=None,
            tokens=args.tokens,
            out=out,
        )
        Demo(cfg).run(lambda label, i, n, t=t: log(f"trial {t}: {i}/{n} {label}"))
        out_dirs.append(out)


def model_id_runs(args, registry: Registry) -> list[dict]:
    """Honest runs of several models: can the trace tell which model ran?"""
    rows = []
    for model in args.id_models:
        for i, (_threads, ev) in enumerate(honest_runs(model, args.id_runs, args.tokens, registry=registry)):
            wall, cpu, n = ev.decode_window
            u = ev.telemetry["process"].series.get("cpu_util", np.array([]))
            rows.append(
                {
                    "model": model,
                    "cpu_ms_per_token": 1000 * cpu / n,
                    "interval_ms": 1000 * wall / n,
                    "peak_rss_mb": ev.peak_rss_mb(),
                    "cores_busy": cpu / wall,
                    "util_mean": float(np.nanmean(u)) if u.size else 0.0,
                }
            )
            if i == 0:
                save_trace(
                    _labelled(ev.telemetry["process"], f"{model} inference (honest)"),
                    args.traces / f"honest-{model}.json.gz",
                )
            log(f"model-id {model} run {i}: {rows[-1]['cpu_ms_per_token']:.1f} CPU-ms/token")
    return rows


def _labelled(m: Measurement, label: str) -> Measurement:
    from dataclasses import replace

    return replace(m, label=label)


def split_eval(x: np.ndarray, y: list[str], seed: int = 0) -> dict:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import train_test_split

    labels = sorted(set(y))
    strat = y if min(Counter(y).values()) >= 2 else None
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=strat)
    model = RandomForestClassifier(n_estimators=200, random_state=seed, min_samples_leaf=2).fit(xtr, ytr)
    pred = model.predict(xte)
    cm = confusion_matrix(yte, pred, labels=labels)
    per_class = {}
    for i, lab in enumerate(labels):
        tp = cm[i, i]
        fn = cm[i].sum() - tp
        fp = cm[:, i].sum() - tp
        negatives = cm.sum() - cm[i].sum()
        per_class[lab] = {
            "test_n": int(cm[i].sum()),
            "false_reject": round(fn / max(cm[i].sum(), 1), 4),
            "false_accept": round(fp / max(negatives, 1), 4),
        }
    return {
        "labels": labels,
        "train_n": len(ytr),
        "test_n": len(yte),
        "accuracy": round(float(np.mean(pred == np.array(yte))), 4),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
    }


def fused_scores(feats: list[dict], honest: list[bool], seed: int = 0) -> dict:
    """Logistic regression on L1/L2 features, cross-validated: one probability of honest work."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.array([[float(np.clip(f[k], -50, 50)) for k in FEATURES] for f in feats])
    y = np.array(honest, dtype=int)
    folds = min(5, int(min(y.sum(), len(y) - y.sum())))
    if folds < 2:
        return {"note": "too few runs of one class for cross-validation"}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    p = cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]
    return {"p_honest": p.tolist(), "folds": folds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--reuse", type=Path, nargs="*", default=[], help="demo output dirs to analyse too")
    ap.add_argument(
        "--id-models", nargs="*", default=["gpt2-small", "llama-small", "gpt2-mini", "gpt2-micro"]
    )
    ap.add_argument("--id-runs", type=int, default=6)
    ap.add_argument("--work", type=Path, default=Path("/tmp/poi-signals"))
    ap.add_argument("--traces", type=Path, default=ROOT / "data/traces/cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/signals.json")
    ap.add_argument("--features-out", type=Path, default=ROOT / "src/maxwell_poi/data/workload_features.json")
    ap.add_argument(
        "--analyse-only",
        action="store_true",
        help="record nothing: analyse the runs already in --work and keep the model-id runs",
    )
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.traces.mkdir(parents=True, exist_ok=True)
    started = time.time()
    registry = Registry()
    store = ProfileStore()
    for model in {args.model, *args.id_models}:
        if store.get(model, this_device()) is None:
            log(f"profiling {model}")
            store.put(measure_profile(model, registry=registry, tokens=args.tokens))

    overhead = measure_sampling_overhead(15.0, 10.0)
    log(f"sampling overhead {overhead}")
    dirs = list(args.reuse)
    if args.analyse_only:
        dirs += sorted(args.work.glob("trial*"))
    else:
        record(args, dirs)
    runs = [r for r in load_runs(dirs) if r["lease"].model_id == args.model]
    log(f"{len(runs)} recorded runs")

    # per-attack detection, layer by layer
    per: dict[str, dict] = defaultdict(lambda: Counter())
    feats, feat_labels, fuse_rows = [], [], []
    thermo = ThermodynamicLayer(registry, store)  # without the classifier: physics checks alone
    for run in runs:
        attack = attack_of(run)
        name = attack or "honest"
        c = per[name]
        c["trials"] += 1
        l1, l2, l4 = (status(run, x) for x in (L1, L2, L4))
        c["l1"] += l1 == "fail"
        c["l2"] += l2 == "fail"
        c["l1_or_l2"] += l1 == "fail" or l2 == "fail"
        c["l4"] += l4 == "fail"
        c["any"] += run["result"]["verdict"] != "affirming"
        ev = LeaseEvidence.from_dict(run["evidence"])
        profile = store.get(args.model, ev.device_class)
        ref = registry.reference(args.model)
        f = trace_features(ev, profile, ref, run["lease"].precision) if profile else None
        if f is not None:
            if attack in WORKLOAD:
                feats.append(f)
                feat_labels.append(WORKLOAD[attack])
            fuse_rows.append((name, f))
        if (
            name in ("honest", "sleeper", "busy-loop", "cpu-miner", "power-burner", "fast-fabricator")
            and not (args.traces / f"{name}.json.gz").exists()
            and "process" in ev.telemetry
        ):
            save_trace(
                _labelled(ev.telemetry["process"], f"{name} ({args.model})"), args.traces / f"{name}.json.gz"
            )

    # fused L1+L2 score (logistic regression, cross-validated) vs each alone
    fused = fused_scores([f for _, f in fuse_rows], [n == "honest" for n, _ in fuse_rows])
    if "p_honest" in fused:
        for (name, _), p in zip(fuse_rows, fused["p_honest"], strict=True):
            per[name]["fused"] += p < 0.5
            per[name]["fused_trials"] += 1

    classifier = (
        split_eval(np.array([[float(np.clip(f[k], -50, 50)) for k in FEATURES] for f in feats]), feat_labels)
        if len(set(feat_labels)) >= 2
        else {"note": "too few classes"}
    )
    args.features_out.write_text(
        json.dumps(
            {
                "what": "workload classifier training table (bench/signals/recordings.py); "
                "profile-relative features",
                "features": FEATURES,
                "rows": [{**f, "label": lab} for f, lab in zip(feats, feat_labels, strict=True)],
            },
            indent=1,
        )
    )

    id_keys = ["cpu_ms_per_token", "interval_ms", "peak_rss_mb", "cores_busy", "util_mean"]
    if args.analyse_only and args.out.exists():
        id_rows = json.loads(args.out.read_text())["model_identification"]["runs"]
    else:
        id_rows = model_id_runs(args, registry)
    model_id = split_eval(np.array([[r[k] for k in id_keys] for r in id_rows]), [r["model"] for r in id_rows])

    # L1 + L2 appraisal time on one recorded honest run
    honest_run = next(r for r in runs if attack_of(r) is None)
    ev = LeaseEvidence.from_dict(honest_run["evidence"])
    raw = (honest_run["dir"] / "receipt.json").read_bytes()
    ctx = Appraisal(lease=honest_run["lease"], raw=raw, evidence=ev, receipt=open_receipt(raw, 1 << 24))
    boundary = BoundaryLayer(store)
    times = []
    for _ in range(2000):
        t0 = time.perf_counter()
        thermo.appraise(ctx)
        boundary.appraise(ctx)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1000

    detection = {}
    for name, c in sorted(per.items()):
        n = c["trials"]
        detection[name] = {
            "trials": n,
            "L1": c["l1"],
            "L2": c["l2"],
            "L1_or_L2": c["l1_or_l2"],
            "fused_L1_L2": c["fused"],
            "fused_trials": c["fused_trials"],
            "L4": c["l4"],
            "rejected_by_policy": c["any"],
        }
    physics = ["sleeper", "busy-loop", "cpu-miner", "power-burner", "fast-fabricator"]
    result = {
        "what": "Maxwell's own signals (issue 3): L1 thermodynamic + L2 boundary on CPU recordings",
        "device": f"CPU {platform.machine()}, {os.cpu_count()} cores; no GPU (GPU traces: bench/gpu/)",
        "command": "make signals  (python -m bench.signals.recordings)",
        "model": args.model,
        "tokens": args.tokens,
        "trials": args.trials,
        "sampling_overhead": overhead,
        "sampling_overhead_cpu_fraction": overhead["sampling_overhead_cpu_fraction"],
        "sampling_overhead_goal": 0.005,
        "detection": detection,
        "physics_attacks_caught_without_audit": {
            k: f"{detection[k]['L1_or_L2']}/{detection[k]['trials']}" for k in physics if k in detection
        },
        "honest_false_reject": {
            k: f"{detection['honest'][k]}/{detection['honest']['trials']}"
            for k in ("L1", "L2", "L1_or_L2", "fused_L1_L2")
        }
        if "honest" in detection
        else {},
        "workload_classifier": classifier,
        "model_identification": {**model_id, "features": id_keys, "runs": id_rows},
        "l1_l2_appraisal_ms": {
            "p50": round(float(np.percentile(ms, 50)), 4),
            "p99": round(float(np.percentile(ms, 99)), 4),
            "goal_p99": 1.0,
        },
        "wall_s": round(time.time() - started, 1),
    }
    write_results("signals.json", result, writes=WRITES, path=args.out)
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "sampling_overhead_cpu_fraction",
                    "physics_attacks_caught_without_audit",
                    "honest_false_reject",
                    "l1_l2_appraisal_ms",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
