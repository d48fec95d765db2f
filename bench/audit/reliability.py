"""Error rates of the L4 audit: honest false rejects and attack catch rates, with exact bounds.

Every trial is a fresh lease (fresh nonce, so fresh sampling noise) on one of the honest
variants (fp32 at 1 and 2 threads, in a batch of 4, speculative decoding, bf16 compute under a
bf16 claim) or one of the attack classes of bench/common/variants.py, a prompt from
_variants.PROMPTS, 16/32/48 new tokens, temperature alternating 0 / 0.8 (top-k 40 or all),
fingerprint chunks of 16 tokens. Maxwell re-executes the claimed model once per tolerance set
(once in all when both sets share the logit allowance) and judges the receipt's claims exactly as
AuditLayer does: `token_choice(m, tol) or fingerprints_match(m.chunks, tol)`, under the
cross-class tolerances (the default for in-process runs: no node measured the prover's device)
and the same-class ones.

Writes bench/results/reliability.json (rewritten atomically every ~100 trials, so a crash keeps
what was measured) and bench/results/reliability_roc.png.

    make reliability     # or: python -m bench.audit.reliability [--honest 3000 --attack-trials 50]
    python -m bench.audit.reliability --quick     # seconds, seeded tiny models, writes under /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import Counter
from itertools import product
from pathlib import Path

import torch

from bench.common.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "reliability.json": [
        "what",
        "complete",
        "method",
        "model",
        "draft",
        "other",
        "chunk",
        "lengths",
        "sampling",
        "prompts",
        "machine",
        "tolerances",
        "command",
        "seconds",
        "honest_trials",
        "honest_rejects",
        "honest_false_reject",
        "honest_false_reject_upper95",
        "honest_variants",
        "min_trials_per_attack",
        "attacks",
        "by_tolerance",
        "roc",
        "goal",
        "goal_same_class",
        "trial_columns",
        "roc_plot",
        "prover_errors",
        "trials",
    ]
}  # the keys of bench/results/reliability.json this script writes (bench/common/results.py)

from maxwell_poi.prover.harness import quiet_libraries  # noqa: E402

quiet_libraries()

from bench.common import stats as _stats  # noqa: E402
from bench.common.variants import DRAFT, MODEL, OTHER, PROMPTS, Variant, attack_variants, honest_variants  # noqa: E402
from maxwell_poi.observer.host import numerics_class, this_device  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.registry.models import LoadedModel, Registry  # noqa: E402
from maxwell_poi.verifier.audit import (  # noqa: E402
    AuditMeasurement,
    fingerprints_match,
    measure_generation,
    token_choice,
)
from maxwell_poi.verifier.thresholds import Thresholds, Tolerance  # noqa: E402

LENGTHS = (16, 32, 48)
# temperature alternates 0 / 0.8; at 0.8 the candidate set alternates top-40 / the whole vocabulary
SAMPLING = ((0.0, 0), (0.8, 40), (0.0, 0), (0.8, 0))
CHUNK = 16
SETS = ("cross_class", "same_class")
VERIFIER_THREADS = 2
GOAL_FALSE_REJECT = 0.001  # honest false-reject rate, one-sided 95 % upper bound
GOAL_CATCH = 0.999  # per attack class
COLUMNS = [
    "honest",
    "variant",
    "precision",
    "prompt",
    "tokens",
    "temperature",
    "top_k",
    "max_gap",
    "worst_close",
    "worst_median_rel",
    "cross_class",  # None = accepted, else the first failing check ("token_choice" / "fingerprints")
    "same_class",
    "max_gap_same_class",  # None when both sets share the logit allowance (one re-execution)
    "generate_s",
    "audit_s",
]


def tolerances(thresholds: Thresholds, precision: str) -> dict[str, Tolerance]:
    return {s: thresholds.for_precision(precision, same_class=s == "same_class") for s in SETS}


def first_failure(m: AuditMeasurement, tol: Tolerance) -> str | None:
    """AuditLayer's decision on a measurement: None (accept) or the first check that fails."""
    if token_choice(m, tol):
        return "token_choice"
    if fingerprints_match(m.chunks, tol):
        return "fingerprints"
    return None


def checks(m: AuditMeasurement, tol: Tolerance) -> dict[str, bool]:
    """Each check on its own (True = rejects) and both as AuditLayer runs them (`l4`)."""
    tok = token_choice(m, tol) is not None
    fp = fingerprints_match(m.chunks, tol) is not None
    return {"token_choice": tok, "fingerprints": fp, "l4": tok or fp}


def measure_sets(
    lease: Lease, claims, reference: LoadedModel, tols: dict[str, Tolerance]
) -> dict[str, AuditMeasurement]:
    """One re-execution per distinct logit allowance among the tolerance sets."""
    torch.set_num_threads(VERIFIER_THREADS)
    by_edge: dict[float, AuditMeasurement] = {}
    for tol in tols.values():
        if tol.logit_tol not in by_edge:
            by_edge[tol.logit_tol] = measure_generation(lease, claims, reference, tol.logit_tol)
    return {s: by_edge[t.logit_tol] for s, t in tols.items()}


def plan(
    counts: dict[str, int], rng: random.Random, lengths: tuple[int, ...]
) -> list[tuple[str, int, int, float, int]]:
    """(variant, prompt, tokens, T, top_k) for each trial: every variant walks its own shuffled
    cycle through prompts x sampling settings x lengths, so small runs are balanced too."""
    combos = list(product(range(len(PROMPTS)), range(len(SAMPLING)), lengths))
    out = []
    for name, count in counts.items():
        order = combos[:]
        rng.shuffle(order)
        for i in range(count):
            p, s, n = order[i % len(order)]
            out.append((name, p, n, *SAMPLING[s]))
    return out


def write_atomic(path: Path, data: dict) -> None:
    """Merge into reliability.json (bench/common/results.py); `trials` rows one per line (compact)."""
    write_results("reliability.json", data, writes=WRITES, path=path, rows=("trials",))


def machine() -> dict:
    return {
        "numerics_class": numerics_class(this_device()),
        "device_class": this_device(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verifier_threads": VERIFIER_THREADS,
    }


def tolerance_record(thresholds: Thresholds) -> dict:
    out = {}
    for precision in sorted(thresholds.by_precision):
        out[precision] = {s: vars(t) for s, t in tolerances(thresholds, precision).items()}
        out[precision]["same_class_is_fallback"] = precision not in thresholds.same_class
    return out


def extremes(rows: list[list], attacker: bool) -> dict:
    """The scores nearest the thresholds: for honest runs the worst (largest gap, lowest close
    fraction, largest median error), for an attack the best it managed (the other way round)."""
    if not rows:
        return {}
    col = {c: i for i, c in enumerate(COLUMNS)}
    pick_low, pick_high = (max, min) if attacker else (min, max)
    return {
        "max_gap": pick_high(r[col["max_gap"]] for r in rows),
        "worst_close": pick_low(r[col["worst_close"]] for r in rows),
        "worst_median_rel": pick_high(r[col["worst_median_rel"]] for r in rows),
    }


def summarize(rows: list[list], honest_names: list[str], attack_names: list[str]) -> dict:
    """The issue's blocks from the trial rows, per tolerance set (cross_class also at top level)."""
    col = {c: i for i, c in enumerate(COLUMNS)}
    honest = [r for r in rows if r[col["honest"]]]
    attacks = [r for r in rows if not r[col["honest"]]]
    by_set = {}
    for s in SETS:
        rejected = [r for r in honest if r[col[s]] is not None]
        per_variant = {}
        for name in honest_names:
            mine = [r for r in honest if r[col["variant"]] == name]
            rej = [r for r in mine if r[col[s]] is not None]
            per_variant[name] = {
                "trials": len(mine),
                "rejects": len(rej),
                "upper95": _stats.upper95(len(rej), len(mine)),
                "by_check": dict(Counter(r[col[s]] for r in rej)),
                "scores": extremes(mine, attacker=False),
            }
        per_attack = {}
        for name in attack_names:
            mine = [r for r in attacks if r[col["variant"]] == name]
            caught = [r for r in mine if r[col[s]] is not None]
            block = _stats.rate_block(len(caught), len(mine))
            block["by_check"] = dict(Counter(r[col[s]] for r in caught))
            block["scores"] = extremes(mine, attacker=True)
            per_attack[name] = block
        by_set[s] = {
            "honest_trials": len(honest),
            "honest_rejects": len(rejected),
            "honest_false_reject": len(rejected) / len(honest) if honest else None,
            "honest_false_reject_upper95": _stats.upper95(len(rejected), len(honest)),
            "honest_false_reject_ci95": _stats.ci95(len(rejected), len(honest)),
            "honest_rejects_by_check": dict(Counter(r[col[s]] for r in rejected)),
            "honest_variants": per_variant,
            "min_trials_per_attack": min((b["trials"] for b in per_attack.values()), default=0),
            "attacks": per_attack,
            "honest_rejected_trials": [dict(zip(COLUMNS, r, strict=True)) for r in rejected[:50]],
        }
    return by_set


def scores(rows: list[list]) -> dict[str, list[float]]:
    col = {c: i for i, c in enumerate(COLUMNS)}
    return {
        "max_gap": [r[col["max_gap"]] for r in rows],
        "1-worst_close": [1 - r[col["worst_close"]] for r in rows],
        "worst_median_rel": [r[col["worst_median_rel"]] for r in rows],
    }


def roc_block(rows: list[list], attack_names: list[str]) -> tuple[dict, dict]:
    """AUC per score per attack (negatives: honest fp32-claim trials, since every attack claims
    fp32) and the curves for the plot."""
    col = {c: i for i, c in enumerate(COLUMNS)}
    neg = scores([r for r in rows if r[col["honest"]] and r[col["precision"]] == "fp32"])
    summary: dict = {}
    curves: dict = {}
    for name in attack_names:
        pos = scores([r for r in rows if not r[col["honest"]] and r[col["variant"]] == name])
        for score in neg:
            res = _stats.roc(neg[score], pos[score])
            summary.setdefault(score, {})[name] = {
                "auc": res["auc"],
                "tpr_at_zero_fpr": res.get("tpr_at_zero_fpr"),
                "positives": res["positives"],
            }
            curves.setdefault(score, {})[name] = res
    return summary, curves


def plot(curves: dict, negatives: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 0.5 / max(negatives, 1)  # where FPR = 0 is drawn on the log axis
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 5), squeeze=False)
    for ax, (score, per_attack) in zip(axes[0], curves.items(), strict=True):
        for name, res in per_attack.items():
            if not res["fpr"]:
                continue
            fpr = [max(f, floor) for f in res["fpr"]]
            ax.step(fpr, res["tpr"], where="post", label=f"{name} (AUC {res['auc']:.3f})")
        ax.set_xscale("log")
        ax.set_xlim(floor * 0.8, 1.05)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"score: {score}")
        ax.set_xlabel(f"honest false-positive rate (log; FPR 0 drawn at {floor:.1g})")
        ax.set_ylabel("attack true-positive rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"L4 scores, honest fp32 trials (n={negatives}) vs each attack class")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def goal_block(top: dict) -> dict:
    need = _stats.trials_for_zero_failures(1 - GOAL_CATCH)
    n_min = top["min_trials_per_attack"]
    attacks = top["attacks"]
    all_caught = all(b["caught"] == b["trials"] for b in attacks.values()) and bool(attacks)
    lows = {a: b["lower95"] for a, b in attacks.items()}
    honest_ok = top["honest_false_reject_upper95"] <= GOAL_FALSE_REJECT
    catch_ok = bool(lows) and min(lows.values()) >= GOAL_CATCH
    return {
        "met": honest_ok and catch_ok,
        "honest_false_reject_upper95": top["honest_false_reject_upper95"],
        "honest_goal": f"upper95 <= {GOAL_FALSE_REJECT}",
        "honest_met": honest_ok,
        "honest_trials_needed_with_zero_rejects": _stats.trials_for_zero_failures(GOAL_FALSE_REJECT),
        "catch_goal": f"every attack class lower95 >= {GOAL_CATCH}",
        "catch_met": catch_ok,
        "every_attack_trial_caught": all_caught,
        "lowest_attack_lower95": min(lows.values()) if lows else None,
        "attack_trials_needed_per_class_for_lower95": need,
        "note": f"n/n caught gives a one-sided 95 % lower bound of 0.05^(1/n); reaching {GOAL_CATCH} needs "
        f"n >= {need} trials per class, all caught. At {n_min} trials the best possible lower bound "
        f"is {_stats.lower95(n_min, n_min):.4f}.",
    }


def build_result(args, rows, honest_names, attack_names, thresholds, started, done: bool) -> dict:
    by_set = summarize(rows, honest_names, attack_names)
    top = by_set["cross_class"]
    roc_summary, curves = roc_block(rows, attack_names)
    col = {c: i for i, c in enumerate(COLUMNS)}
    greedy = {
        (r[col["variant"]], r[col["prompt"]], r[col["tokens"]])
        for r in rows
        if r[col["honest"]] and r[col["temperature"]] == 0
    }
    result = {
        "what": "L4 audit error rates: honest false rejects and attack catch rates, Clopper-Pearson bounds",
        "complete": done,
        "method": (
            "In-process: each trial runs the prover variant's real forward pass and Maxwell's fp32 "
            "re-execution (measure_generation) in this process, judged as AuditLayer judges "
            "(token_choice, then fingerprints_match). No Observer/runner: L4 reads only the receipt's "
            "claims and re-executes, so the runner adds nothing to what is measured here; signatures "
            "and L0-L2 are not exercised. Top level = cross_class tolerances (the production default "
            "when no node measured the prover's device, as in-process); same_class under by_tolerance. "
            "Each trial is a fresh Lease.issue (fresh nonce and sampler seed). Greedy (T=0) trials of "
            "one variant, prompt and length are deterministic and repeat the same computation; "
            f"the honest greedy trials cover {len(greedy)} distinct (variant, prompt, length) settings."
        ),
        "model": args.model,
        "draft": args.draft,
        "other": args.other,
        "chunk": CHUNK,
        "lengths": list(args.lengths),
        "sampling": [{"temperature": t, "top_k": k} for t, k in SAMPLING],
        "prompts": len(PROMPTS),
        "machine": machine(),
        "tolerances": tolerance_record(thresholds),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": round(time.perf_counter() - started, 1),
        "honest_trials": top["honest_trials"],
        "honest_rejects": top["honest_rejects"],
        "honest_false_reject": top["honest_false_reject"],
        "honest_false_reject_upper95": top["honest_false_reject_upper95"],
        "honest_variants": top["honest_variants"],
        "min_trials_per_attack": top["min_trials_per_attack"],
        "attacks": top["attacks"],
        "by_tolerance": by_set,
        "roc": {
            "negatives": "honest fp32-claim trials (every attack claims fp32); higher = more suspicious",
            **roc_summary,
        },
        "goal": goal_block(top),
        "goal_same_class": goal_block(by_set["same_class"]),
        "trial_columns": COLUMNS,
        "trials": rows,
    }
    return result, curves


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--honest", type=int, default=3000, help="honest trials in all (split over the variants)")
    ap.add_argument("--attack-trials", type=int, default=50, help="trials per attack class")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--draft", default=DRAFT)
    ap.add_argument("--other", default=OTHER)
    ap.add_argument(
        "--lengths", default=",".join(map(str, LENGTHS)), help="new-token counts, comma-separated"
    )
    ap.add_argument("--seed", type=int, default=0, help="trial order and prompt cycles (not the nonces)")
    ap.add_argument("--quick", action="store_true", help="smoke run: seeded tiny models, a few trials, /tmp")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.model, args.draft, args.other = "gpt2-mini", "gpt2-micro", "gpt2-micro"
        args.honest = min(args.honest, 5)
        args.attack_trials = min(args.attack_trials, 1)
        args.lengths = "16"
    args.lengths = tuple(int(x) for x in str(args.lengths).split(","))
    out = args.out or (
        Path("/tmp/reliability-quick.json") if args.quick else ROOT / "bench/results/reliability.json"
    )
    png = out.with_name(out.stem + "_roc.png")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    registry = Registry()
    key = AgentKey.generate()
    thresholds = Thresholds.load()
    reference = registry.load(args.model)
    honest: dict[str, Variant] = honest_variants(registry, key, draft=args.draft)
    attacks: dict[str, Variant] = attack_variants(registry, key, draft=args.draft, other=args.other)
    variants = {**honest, **attacks}
    rng = random.Random(args.seed)
    names = list(honest)
    counts = {n: args.honest // len(names) + (i < args.honest % len(names)) for i, n in enumerate(names)}
    trials = plan(counts, rng, args.lengths)
    honest_plan = [(True, *t) for t in trials]
    attack_plan = [(False, *t) for t in plan(dict.fromkeys(attacks, args.attack_trials), rng, args.lengths)]
    schedule = honest_plan + attack_plan
    rng.shuffle(schedule)  # interleaved: a partial file holds every kind of trial
    log(
        f"reliability: {len(honest_plan)} honest + {len(attack_plan)} attack trials on {args.model} "
        f"({numerics_class(this_device())}), writing {out}"
    )
    rows: list[list] = []
    errors: list[dict] = []
    last_write = time.perf_counter()
    for i, (is_honest, name, p, tokens, temperature, top_k) in enumerate(schedule, 1):
        variant = variants[name]
        job = GenerateJob(
            prompt=PROMPTS[p], max_new_tokens=tokens, temperature=temperature, top_k=top_k, chunk=CHUNK
        )
        lease = Lease.issue("reliability", args.model, job, precision=variant.precision)
        t0 = time.perf_counter()
        try:
            claims = variant.claims(lease)
        except Exception as exc:  # an honest variant that cannot answer is a finding, not a crash
            errors.append({"variant": name, "prompt": p, "tokens": tokens, "error": repr(exc)[:300]})
            log(f"  {name}: prover failed: {exc!r}")
            continue
        t1 = time.perf_counter()
        tols = tolerances(thresholds, variant.precision)
        ms = measure_sets(lease, claims, reference, tols)
        t2 = time.perf_counter()
        m = ms["cross_class"]
        rows.append(
            [
                is_honest,
                name,
                variant.precision,
                p,
                tokens,
                temperature,
                top_k,
                m.max_gap,
                m.worst_close,
                m.worst_median_rel,
                first_failure(ms["cross_class"], tols["cross_class"]),
                first_failure(ms["same_class"], tols["same_class"]),
                None if ms["same_class"] is m else ms["same_class"].max_gap,
                round(t1 - t0, 4),
                round(t2 - t1, 4),
            ]
        )
        if i % 100 == 0 or i == len(schedule) or time.perf_counter() - last_write > 60:
            elapsed = time.perf_counter() - started
            eta = elapsed / i * (len(schedule) - i)
            h = [r for r in rows if r[0]]
            a = [r for r in rows if not r[0]]
            log(
                f"  {i}/{len(schedule)} trials, {elapsed:.0f} s, ETA {eta:.0f} s: honest rejects "
                f"{sum(r[10] is not None for r in h)}/{len(h)} cross, {sum(r[11] is not None for r in h)}"
                f"/{len(h)} same; attacks caught {sum(r[10] is not None for r in a)}/{len(a)}"
            )
            result, _ = build_result(args, rows, list(honest), list(attacks), thresholds, started, False)
            result["prover_errors"] = errors
            write_atomic(out, result)
            last_write = time.perf_counter()
    result, curves = build_result(args, rows, list(honest), list(attacks), thresholds, started, True)
    result["prover_errors"] = errors
    result["roc_plot"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
    negatives = sum(1 for r in rows if r[0] and r[2] == "fp32")
    plot(curves, negatives, png)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(out, result)
    g = result["goal"]
    print(
        json.dumps(
            {
                "out": str(out),
                "seconds": result["seconds"],
                "honest_trials": result["honest_trials"],
                "honest_rejects": result["honest_rejects"],
                "honest_false_reject_upper95": result["honest_false_reject_upper95"],
                "same_class": {
                    k: result["by_tolerance"]["same_class"][k]
                    for k in ("honest_rejects", "honest_false_reject_upper95")
                },
                "attacks": {a: f"{b['caught']}/{b['trials']}" for a, b in result["attacks"].items()},
                "attacks_same_class": {
                    a: f"{b['caught']}/{b['trials']}"
                    for a, b in result["by_tolerance"]["same_class"]["attacks"].items()
                },
                "goal_met": g["met"],
                "prover_errors": len(errors),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
