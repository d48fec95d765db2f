"""L1's workload classifier on resident-sandbox evidence: retrain, judge on held-out trials, decide.

Records `--trials` rounds of the demo's honest agents (1 and 2 threads; batched windows are not
judged by the classifier and are left out) and the physics adversaries (sleeper, busy loop, CPU
miner, power burner, fast fabricator), each on two claimed models (GPT-2-small and the trained
poi-lm), every agent resident in its measured sandbox. Features are the classifier's own
(`verifier/classify.py`, profile-relative). Evaluation is leave-one-trial-out: a forest trained on
the other trials scores each held-out run. Reported for the retrained and for the shipped classifier:
ROC AUC of 1 - P(inference), honest rejects and attacks caught at the policy's threshold
(P(inference) < 0.2), and how many of those catches no other L1 check made ("added").

Also leave-one-model-out: trained on one claimed model's runs, judged on the other's (a model it
never saw, as every newly registered model is). Decision rule: the retrained classifier replaces
the shipped table only if, held out both ways, it rejects no honest run and adds at least one
catch (each way); otherwise the JSON says it is not kept and the shipped table is left alone.

    python -m bench.signals.classifier --trials 4      # writes bench/results/classifier.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from sklearn.metrics import roc_auc_score  # noqa: E402

from bench.common.results import write_results  # noqa: E402
from bench.common.stats import upper95  # noqa: E402
from bench.signals.recordings import WORKLOAD, attack_of, load_runs  # noqa: E402
from maxwell_poi.demo.generation import Demo, DemoConfig  # noqa: E402
from maxwell_poi.observer.evidence import LeaseEvidence  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.registry.profiles import ProfileStore  # noqa: E402
from maxwell_poi.verifier.classify import FEATURES, INFERENCE, WorkloadClassifier, trace_features  # noqa: E402
from maxwell_poi.verifier.thermodynamic import CLASSIFIER_REJECT_BELOW  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "classifier.json": [
        "what",
        "models",
        "attacks",
        "trials",
        "runs",
        "features",
        "reject_below",
        "retrained_held_out",
        "retrained_other_model",
        "shipped_on_same_runs",
        "kept",
        "decision",
        "seconds",
        "rows",
    ]
}  # the keys of bench/results/classifier.json this script writes (bench/common/results.py)
PHYSICS = [a for a in WORKLOAD if a]
MODELS = [("gpt2-small", "gpt2-mini", "gpt2-small-alt"), ("poi-lm", "poi-lm-draft", "poi-lm-init")]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def record(work: Path, trials: int) -> list[tuple[int, Path]]:
    out = []
    for t in range(trials):
        for model, small, alt in MODELS:
            folder = work / f"{model}-trial{t}"
            cfg = DemoConfig(
                model=model,
                small=small,
                alt=alt,
                second_model=None,
                embed_model=None,
                attacks=PHYSICS,
                out=folder,
            )
            Demo(cfg).run(lambda label, i, n, t=t, m=model: log(f"{m} trial {t}: {i}/{n} {label}"))
            out.append((t, folder))
    return out


def rows_of(folders: list[tuple[int, Path]]) -> list[dict]:
    registry, store, rows = Registry(), ProfileStore(), []
    for trial, folder in folders:
        for run in load_runs([folder]):
            attack = attack_of(run)
            if attack not in WORKLOAD:
                continue
            ev = LeaseEvidence.from_dict(run["evidence"])
            if ev.co_leases:  # a batch's window: the classifier does not judge it
                continue
            lease = run["lease"]
            profile = store.get(lease.model_id, ev.profile_key)
            f = (
                trace_features(ev, profile, registry.reference(lease.model_id), lease.precision)
                if profile
                else None
            )
            if f is None:
                continue
            l1 = next(r for r in run["result"]["layers"] if r["layer"] == "L1-thermodynamic")
            other = l1["status"] == "fail" and not l1["reason"].startswith("trace shape")
            rows.append(
                {
                    **f,
                    "label": WORKLOAD[attack],
                    "trial": trial,
                    "model": lease.model_id,
                    "agent": run["dir"].name,
                    "other_l1_caught": other,
                }
            )
    return rows


def judge(rows: list[dict], p_inference: np.ndarray) -> dict:
    honest = np.array([r["label"] == INFERENCE for r in rows])
    reject = p_inference < CLASSIFIER_REJECT_BELOW
    other = np.array([r["other_l1_caught"] for r in rows])
    k_h, n_h = int((reject & honest).sum()), int(honest.sum())
    return {
        "auc": round(float(roc_auc_score(~honest, 1 - p_inference)), 4) if 0 < n_h < len(rows) else None,
        "honest_rejects": k_h,
        "honest_runs": n_h,
        "honest_reject_upper95": round(upper95(k_h, n_h), 4),
        "honest_p_inference": {
            "min": round(float(p_inference[honest].min()), 3),
            "median": round(float(np.median(p_inference[honest])), 3),
        },
        "attacks_caught": int((reject & ~honest).sum()),
        "attack_runs": int((~honest).sum()),
        "added": int((reject & ~honest & ~other).sum()),
        "attacks_missed_by_other_l1": int((~honest & ~other).sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/poi-classifier"))
    ap.add_argument("--reuse", action="store_true", help="score the recordings already under --work")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/classifier.json")
    ap.add_argument("--table-out", type=Path, default=ROOT / "src/maxwell_poi/data/workload_features.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folders = (
        [(int(p.name.rsplit("trial", 1)[1]), p) for p in sorted(args.work.glob("*-trial*"))]
        if args.reuse
        else record(args.work, args.trials)
    )
    rows = rows_of(folders)
    trials = sorted({r["trial"] for r in rows})
    held = np.zeros(len(rows))
    for t in trials:
        train = [r for r in rows if r["trial"] != t]
        clf = WorkloadClassifier(train)
        for i, r in enumerate(rows):
            if r["trial"] == t:
                held[i] = clf.predict(r)[2]["p_inference"]
    # and across models: trained on one claimed model, judged on the other (a model it never saw)
    cross = np.zeros(len(rows))
    for model in sorted({r["model"] for r in rows}):
        clf = WorkloadClassifier([r for r in rows if r["model"] != model])
        for i, r in enumerate(rows):
            if r["model"] == model:
                cross[i] = clf.predict(r)[2]["p_inference"]
    shipped = WorkloadClassifier.load()
    shipped_p = np.array([shipped.predict(r)[2]["p_inference"] for r in rows]) if shipped else None
    retrained = judge(rows, held)
    other_model = judge(rows, cross)
    keep = all(j["honest_rejects"] == 0 and j["added"] > 0 for j in (retrained, other_model))
    result = {
        "what": "L1 workload classifier on resident-sandbox evidence, leave-one-trial-out",
        "models": [m for m, _, _ in MODELS],
        "attacks": PHYSICS,
        "trials": len(trials),
        "runs": len(rows),
        "features": FEATURES,
        "reject_below": CLASSIFIER_REJECT_BELOW,
        "retrained_held_out": retrained,
        "retrained_other_model": other_model,
        "shipped_on_same_runs": judge(rows, shipped_p) if shipped_p is not None else None,
        "kept": keep,
        "decision": "retrained table shipped"
        if keep
        else "not kept: held out (other rounds or the other model) it rejects honest runs or adds no catch",
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    }
    write_results("classifier.json", result, writes=WRITES, path=args.out)
    if keep:
        args.table_out.write_text(
            json.dumps(
                {
                    "what": "workload classifier training table (bench/signals/classifier.py): "
                    "resident-sandbox runs",
                    "features": FEATURES,
                    "rows": [{k: r[k] for k in [*FEATURES, "label"]} for r in rows],
                },
                indent=1,
            )
        )
    log(
        json.dumps(
            {k: result[k] for k in ("retrained_held_out", "shipped_on_same_runs", "decision")}, indent=1
        )
    )


if __name__ == "__main__":
    main()
