"""Detection floor of the L4 audit: the smallest deliberate change each check catches, per
(prover hardware class -> verifier hardware class) pair, with honest false rejects at the same
tolerance.

Honest fp32 reruns on the verifier's own kind of CPU are bit-identical, yet the cross-class
tolerance allows for cross-hardware noise, so small deliberate weight changes can pass it. This
sweeps multiplicative weight noise (1 %, 0.3 %, 0.1 %, 0.03 % relative; one perturbed model per
level, built once) and precision downgrades (compute autocast `bf16`; weight-only rounding
`weights-bf16`, `weights-fp16`, `int8`; KV-cache quantisation `kv-int8`), all claiming fp32, and
judges each trial with the fp32 tolerances of both pairs:

- same_class:  "<this CPU> -> <this CPU>", for_precision("fp32", same_class=True) (near-exact);
- cross_class: "other -> <this CPU>",      for_precision("fp32") (calibrated cross-hardware).

Checks: `token_choice` alone, `fingerprints` alone and `l4` (both, as AuditLayer runs them).
A level counts as caught by a check at >= 95 % of its trials. Honest false rejects come from
honest fp32 runs (1 and 2 threads, batch of 4, speculative) judged with the same tolerance.

Writes bench/results/detection_floor.json.

    python -m bench.audit.detection_floor [--trials 30 --honest 200]
    python -m bench.audit.detection_floor --quick     # seeded tiny models, writes under /tmp
    python -m bench.audit.detection_floor --gpu-pairs # only `gpu_pairs`, from committed files

`gpu_pairs`: each measured GPU -> CPU class pair (src/maxwell_poi/data/class_pairs.json, from the
H200 run) gets the same-class set, so its floor is the same-class floor above *if* cheat receipts
computed on that GPU match CPU-computed ones as honest ones did; that is derived, not measured (no
perturbation sweep ran on a GPU). Its honest false rejects are the pair's own measured runs, and the
cheats that did run on the GPU are listed with their counts (bench/results/gpu_core.json).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "detection_floor.json": [
        "what",
        "method",
        "pairs",
        "gpu_note",
        "gpu_pairs",
        "model",
        "levels",
        "downgrades_swept",
        "trials_per_change",
        "honest_runs",
        "floor",
        "measured",
        "machine",
        "command",
        "seconds",
    ]
}  # the keys of bench/results/detection_floor.json this script writes (bench/common/results.py)

from bench.audit.reliability import (  # noqa: E402  (quiets the libraries on import)
    CHUNK,
    checks,
    machine,
    measure_sets,
)
from bench.common import stats as _stats  # noqa: E402
from bench.common.variants import DRAFT, MODEL, PROMPTS, Variant, honest_variants  # noqa: E402
from maxwell_poi.adversaries._agent import SwappedProver  # noqa: E402
from maxwell_poi.adversaries.perturbed_weights import perturbed  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import downgraded  # noqa: E402
from maxwell_poi.observer.host import numerics_class, this_device  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.registry.models import LoadedModel, Registry  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds  # noqa: E402

LEVELS = (0.01, 0.003, 0.001, 0.0003)
DOWNGRADES = ("bf16", "weights-bf16", "weights-fp16", "int8", "kv-int8")
CHECKS = ("token_choice", "fingerprints", "l4")
SAMPLING = ((0.0, 0), (0.8, 40))
TOKENS = 32
PROVER_THREADS = 2


def fixed_prover(key: AgentKey, registry: Registry, model: LoadedModel) -> SwappedProver:
    """Answers every lease with `model` (built once) while claiming the leased model."""
    return SwappedProver(key, lambda _lease, _reg: model, registry=registry)


def leases(n: int, model_id: str, rng: random.Random) -> list[Lease]:
    """n fresh fp32 leases: prompts cycled in a shuffled order, T alternating 0 / 0.8."""
    order = list(range(len(PROMPTS)))
    rng.shuffle(order)
    out = []
    for i in range(n):
        t, k = SAMPLING[i % len(SAMPLING)]
        job = GenerateJob(
            prompt=PROMPTS[order[i % len(order)]], max_new_tokens=TOKENS, temperature=t, top_k=k, chunk=CHUNK
        )
        out.append(Lease.issue("floor", model_id, job, precision="fp32"))
    return out


def spread(values: list[float]) -> list[float]:
    """[min, median, max]."""
    return [min(values), statistics.median(values), max(values)] if values else []


def gpu_pairs(floor: dict, thresholds: Thresholds) -> dict:
    """`gpu_pairs` and `gpu_note` from the measured class pairs, gpu_core.json and the same-class
    floor just measured (see the module docstring: the floor is derived, the honest runs measured)."""
    core = json.loads((ROOT / "bench/results/gpu_core.json").read_text())
    same = next(
        v for pair, v in floor.items() if pair.startswith("cpu:") and "->" in pair and "other" not in pair
    )
    out = {}
    for p in thresholds.class_pairs:
        prov = p.provenance
        runs, within = int(prov.get("runs", 0)), int(prov.get("within_same_class", 0))
        cheats = {
            name: {"caught": c["caught"], "trials": c["trials"]}
            for name, c in core.get("cheats_on_gpu", {}).items()
            if f"claims {p.precision})" in name
        }
        out[f"{p.prover} -> {p.verifier}"] = {
            "tolerance_set": "same_class (measured pair)",
            "precision": p.precision,
            "honest_false_reject": {
                **_stats.rate_block(runs - within, runs, what="rejects"),
                "source": prov.get("source", ""),
                "card": prov.get("card", ""),
                "driver": prov.get("driver", ""),
            },
            "floor_derived_from_same_class": {
                check: {
                    "smallest_perturbation_caught": v["smallest_perturbation_caught"],
                    "downgrades_caught": sorted(d for d, x in v["downgrades"].items() if x["caught"]),
                }
                for check, v in same.items()
            },
            "floor_measured_on_gpu": False,
            "cheats_run_on_gpu": cheats,
        }
    note = (
        f"{len(out)} measured GPU -> CPU pair(s) in gpu_pairs: honest runs measured on the card, the floor "
        "derived from the same-class sweep (no sweep ran on a GPU); GPU -> GPU pairs not measured."
        if out
        else "No GPU pair measured (src/maxwell_poi/data/class_pairs.json has none)."
    )
    return {"gpu_pairs": out, "gpu_note": note}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=30, help="leases per perturbation level / downgrade")
    ap.add_argument("--honest", type=int, default=200, help="honest fp32 runs across the honest variants")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--draft", default=DRAFT, help="draft of the honest speculative variant")
    ap.add_argument("--seed", type=int, default=0, help="prompt order (not the nonces, not the noise)")
    ap.add_argument("--noise-seed", type=int, default=1234, help="seed of the weight perturbations")
    ap.add_argument("--quick", action="store_true", help="smoke run: seeded tiny models, a few trials, /tmp")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--gpu-pairs", action="store_true", help="only gpu_pairs, from the committed floor")
    args = ap.parse_args()
    if args.gpu_pairs:
        committed = json.loads((ROOT / "bench/results/detection_floor.json").read_text())
        values = gpu_pairs(committed["floor"], Thresholds.load())
        print(json.dumps(values, indent=1))
        write_results("detection_floor.json", values, writes=WRITES, path=args.out)
        return
    if args.quick:
        args.model, args.draft = "gpt2-mini", "gpt2-micro"
        args.trials, args.honest = min(args.trials, 2), min(args.honest, 4)
    out = args.out or (
        Path("/tmp/detection_floor-quick.json") if args.quick else ROOT / "bench/results/detection_floor.json"
    )

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    registry = Registry()
    key = AgentKey.generate()
    thresholds = Thresholds.load()
    reference = registry.load(args.model)
    ours = numerics_class(this_device())
    pairs = {"same_class": f"{ours} -> {ours}", "cross_class": f"other -> {ours}"}
    tols = {s: thresholds.for_precision("fp32", same_class=s == "same_class") for s in pairs}
    rng = random.Random(args.seed)

    attacks: dict[str, tuple[str, float | None, SwappedProver]] = {}
    for level in LEVELS:
        attacks[f"noise-{level:g}"] = (
            "perturbation",
            level,
            fixed_prover(key, registry, perturbed(reference, level, args.noise_seed)),
        )
    not_applicable: dict[str, str] = {}
    for name in DOWNGRADES:
        try:
            attacks[name] = ("downgrade", None, fixed_prover(key, registry, downgraded(reference, name)))
        except ValueError as exc:  # e.g. kv-int8 on GPT-2, whose attention has no k_proj/v_proj
            not_applicable[name] = str(exc)
    honest = {
        n: v for n, v in honest_variants(registry, key, draft=args.draft).items() if v.precision == "fp32"
    }

    # rows: [kind, name, T, max_gap, worst_close, worst_median_rel, {pair: {check: rejected}}]
    rows: list[list] = []

    def run(kind: str, name: str, lease: Lease, answer) -> None:
        claims = answer(lease)
        ms = measure_sets(lease, claims, reference, tols)
        m = ms["cross_class"]
        verdicts = {p: checks(ms[p], tols[p]) for p in pairs}
        rows.append(
            [kind, name, lease.job.temperature, m.max_gap, m.worst_close, m.worst_median_rel, verdicts]
        )

    def threaded(prover) -> Callable[[Lease], object]:
        def answer(lease: Lease):
            torch.set_num_threads(PROVER_THREADS)
            return prover.claims(lease)

        return answer

    total = len(attacks) * args.trials + args.honest
    log(
        f"detection floor: {len(attacks)} changes x {args.trials} + {args.honest} honest "
        f"on {args.model} ({ours})"
    )
    for name, (kind, _level, prover) in attacks.items():
        for lease in leases(args.trials, args.model, rng):
            run(kind, name, lease, threaded(prover))
        log(f"  {name}: {len(rows)}/{total} runs, {time.perf_counter() - started:.0f} s")
    names = list(honest)
    for i, lease in enumerate(leases(args.honest, args.model, rng)):
        variant: Variant = honest[names[i % len(names)]]
        run("honest", variant.name, lease, variant.claims)
    log(f"  honest: {len(rows)}/{total} runs, {time.perf_counter() - started:.0f} s")

    def rate(name: str, pair: str, check: str) -> float:
        mine = [r for r in rows if r[1] == name]
        return sum(r[6][pair][check] for r in mine) / len(mine)

    honest_rows = [r for r in rows if r[0] == "honest"]
    floor: dict = {}
    for pair, pair_name in pairs.items():
        floor[pair_name] = {}
        for check in CHECKS:
            rates = {lvl: rate(f"noise-{lvl:g}", pair, check) for lvl in LEVELS}
            rejects = sum(r[6][pair][check] for r in honest_rows)
            floor[pair_name][check] = {
                "smallest_perturbation_caught": _stats.smallest_caught(rates),
                "perturbation_rates": {f"{lvl:g}": r for lvl, r in rates.items()},
                "downgrades": {
                    d: (
                        {"caught": rate(d, pair, check) >= _stats.CATCH_BAR, "rate": rate(d, pair, check)}
                        if d in attacks
                        else {"caught": None, "rate": None, "not_applicable": not_applicable[d]}
                    )
                    for d in DOWNGRADES
                },
                "honest_false_reject": {
                    **_stats.rate_block(rejects, len(honest_rows), what="rejects"),
                    "by_variant": {
                        n: sum(r[6][pair][check] for r in honest_rows if r[1] == n) for n in names
                    },
                },
            }
    measured = {}
    for name in [*attacks, *names]:
        mine = [r for r in rows if r[1] == name]
        measured[name] = {
            "runs": len(mine),
            "max_gap": spread([r[3] for r in mine]),
            "worst_close": spread([r[4] for r in mine]),
            "worst_median_rel": spread([r[5] for r in mine]),
        }
    result = {
        "what": "L4 detection floor: smallest weight perturbation / downgrade each check catches, per "
        "hardware-class pair, with honest false rejects at the same tolerance",
        "method": "In-process (no Observer/runner; L4 reads only the receipt's claims and re-executes). "
        f"Each change: {args.trials} fresh fp32 leases, {TOKENS} new tokens, chunk {CHUNK}, T alternating "
        "0 / 0.8 (top-k 40), prompts from bench/_variants.PROMPTS. Perturbation = deterministic "
        f"multiplicative noise perturbed(model, rel, seed={args.noise_seed}), one model per level. "
        f"'caught' = rate >= {_stats.CATCH_BAR}. Honest: {args.honest} fp32 runs over {', '.join(names)} "
        "(the bf16-claim variant is left out: these are fp32 claims).",
        "pairs": {
            pairs[p]: {
                "tolerance_set": p,
                "tolerance": vars(tols[p]),
                "same_class_is_fallback": p == "same_class" and "fp32" not in thresholds.same_class,
            }
            for p in pairs
        },
        "model": args.model,
        "levels": list(LEVELS),
        "downgrades_swept": list(DOWNGRADES),
        "trials_per_change": args.trials,
        "honest_runs": len(honest_rows),
        "floor": floor,
        "measured": measured,
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results("detection_floor.json", result, writes=WRITES, path=out)
    write_results("detection_floor.json", gpu_pairs(floor, Thresholds.load()), writes=WRITES, path=out)
    summary = {
        pn: {
            c: {
                "smallest": v["smallest_perturbation_caught"],
                "rates": v["perturbation_rates"],
                "downgrades": {d: x["rate"] for d, x in v["downgrades"].items()},
                "honest": f"{v['honest_false_reject']['rejects']}/{v['honest_false_reject']['trials']}",
            }
            for c, v in checks_.items()
        }
        for pn, checks_ in floor.items()
    }
    print(f"wrote {out} in {result['seconds']} s")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
