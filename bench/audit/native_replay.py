"""Decode replay for native bf16 audits: fit the near-exact `replay` set and judge honest and
cheating bf16 claims by the audit's final rule (verifier.audit.AuditLayer.replayed).

bench/audit/native_bf16.py found that a native bf16 *prefill* leaves honest bf16 runs only 56-91 %
of their top-k values close (a prefill rounds differently from the prover's token-by-token decode),
so int8-rounded weights computing in bf16 hid in that room (29 / 40 caught on poi-lm). Here each
answer is re-executed the way its prover decoded it (protocol.schedule: one token per pass, or the
passes a speculative decoder declares in its receipt) in bf16 on this class, and at fp32 as a
prefill (an answer served at fp32). The replay set is fitted per model on every other honest bf16-computed
run and judged on the rest and on every cheat run; the rule: pass if the replay is within the replay set
or the fp32 prefill within the same-class fp32 set. Each run also keeps its native-prefill numbers,
so the old rule is judged on the same answers.

    python -m bench.audit.native_replay                   # poi-lm and gpt2-small; writes the set
    python -m bench.audit.native_replay --quick           # gpt2-micro, a few runs, writes under /tmp
    python -m bench.audit.native_replay --refit           # re-fit and re-judge the stored runs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.audit.native_bf16 import BF16, DRAFTS, NATIVE_FILE, ROOT, cheats, honest  # noqa: E402
from bench.audit.reliability import machine  # noqa: E402
from bench.common.results import commit, write_results  # noqa: E402
from bench.common.stats import rate_block  # noqa: E402
from bench.common.variants import PROMPTS, Variant  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.protocol.receipt import ReceiptClaims  # noqa: E402
from maxwell_poi.protocol.schedule import schedule_of  # noqa: E402
from maxwell_poi.prover.batched import BatchedProver  # noqa: E402
from maxwell_poi.prover.sdk import with_dtype  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.audit import AuditMeasurement, measure_generation  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds, Tolerance  # noqa: E402

WRITES = {"bf16_int8.json": ["native_replay"]}  # the keys this script writes (bench/common/results.py)
NOT_BF16_COMPUTE = ("served-at-fp32", "bf16-weights-fp32-compute")  # judged, never fitted on


def measure(model_id: str, v: Variant, n: int, refs: dict, edges: dict, tokens: int, offset: int) -> list:
    """n bf16-claim leases answered by `v`: each re-executed as a bf16 decode replay (the declared
    schedule), a bf16 prefill (the native rule before) and an fp32 prefill (served at fp32)."""
    rows = []
    for i in range(n):
        job = GenerateJob(
            prompt=f"{PROMPTS[(i + offset) % len(PROMPTS)]} ({i + offset})",  # numbered: no repeated trial
            max_new_tokens=tokens,
            temperature=0.8 if i % 2 else 0.0,
            chunk=16,
        )
        lease = Lease.issue("agent-1", model_id, job, precision="bf16")
        claims = v.claims(lease)
        prompt_len = len(refs["bf16"].encode_prompt(job.prompt))
        schedule = schedule_of(claims.runtime, len(claims.tokens()), prompt_len)
        rows.append(
            {
                "replay": brief(measure_generation(lease, claims, refs["bf16"], edges["bf16"], schedule)),
                "bf16": brief(measure_generation(lease, claims, refs["bf16"], edges["bf16"])),
                "fp32": brief(measure_generation(lease, claims, refs["fp32"], edges["fp32"])),
                "declared": schedule.declared,
            }
        )
    return rows


class ResidentBatch:
    """A resident agent's batch (prover.batched, `poi agent --resident --max-batch 4`): the lease is
    decoded beside three other leases with prompts of other lengths, left-padded to the longest, and
    declares the batch's shape in its receipt (protocol.schedule)."""

    def __init__(self, key: AgentKey, registry: Registry) -> None:
        self.batched = BatchedProver(key, registry)

    def claims(self, lease: Lease) -> ReceiptClaims:
        job = lease.job
        assert isinstance(job, GenerateJob)
        others = [
            Lease.issue(
                "agent-1",
                lease.model_id,
                job.model_copy(update={"prompt": PROMPTS[(i * 5) % len(PROMPTS)][: 12 + 9 * i]}),
                precision="bf16",
            )
            for i in range(3)
        ]
        return self.batched.claims_many([lease, *others])[0]


def resident(registry: Registry, key: AgentKey) -> dict[str, Variant]:
    return {
        "bf16-resident-batch4": Variant(
            "bf16-resident-batch4", ResidentBatch(key, registry), precision="bf16"
        )
    }  # type: ignore[arg-type]


def brief(m: AuditMeasurement) -> list[float]:
    """What the rule reads of one re-execution: [worst chunk's close fraction, worst chunk's median
    error, largest token score gap] (a chunk check passes for every chunk iff it passes for these)."""
    return [round(m.worst_close, 6), float(m.worst_median_rel), float(m.max_gap)]


def passes(row: list[float], tol: Tolerance) -> bool:
    """token_choice and fingerprints_match (verifier.audit) on a run's brief."""
    close, median, gap = row
    return gap <= tol.token_gap and close >= tol.min_close and median <= tol.max_median_rel


def fit(calibration: list[dict], native: Tolerance) -> Tolerance:
    """The replay set from honest bf16-computed runs: a 5-point margin under the worst chunk's close
    fraction seen, and twice the largest median error seen (at least 2^-12); token bounds copied
    from the native set (the replay's logits are the prover's, so its token checks are not looser)."""
    closes = [r["replay"][0] for r in calibration]
    medians = [r["replay"][1] for r in calibration]
    return Tolerance(
        min_close=round(min(closes) - 0.05, 4),
        max_median_rel=float(max(2 * max(medians), 2.0**-12)),
        token_gap=native.token_gap,
        embed_max_abs=native.embed_max_abs,
        logit_tol=native.logit_tol,
    )


def verdict(row: dict, replay: Tolerance, same_fp32: Tolerance) -> dict:
    """The final rule (AuditLayer.replayed) on one run: the decode replay, then fp32."""
    return {"replay": passes(row["replay"], replay), "fp32": passes(row["fp32"], same_fp32)}


def spread(ms: list[list[float]]) -> dict:
    closes = [m[0] for m in ms]
    return {"worst_close_min": min(closes), "worst_close_max": max(closes)}


def judge(rows: list[dict], replay: Tolerance, same_fp32: Tolerance, old: Tolerance, what: str) -> dict:
    verdicts = [verdict(r, replay, same_fp32) for r in rows]
    bad = sum(not (v["replay"] or v["fp32"]) for v in verdicts)
    old_bad = sum(not (passes(r["bf16"], old) or passes(r["fp32"], same_fp32)) for r in rows)
    return {
        **rate_block(bad, len(rows), what),
        f"{what}_by_native_prefill_rule": old_bad,
        "passed_replay": sum(v["replay"] for v in verdicts),
        "passed_fp32_only": sum(v["fp32"] and not v["replay"] for v in verdicts),
        "declared_schedule": sum(r["declared"] for r in rows),
        "replay": spread([r["replay"] for r in rows]),
        "native_prefill": spread([r["bf16"] for r in rows]),
    }


def write_set(path: Path, sets: dict[str, Tolerance], provenance: dict) -> None:
    """Add (or replace) the `replay` section of native_audit.json, keeping the native sets."""
    data = json.loads(path.read_text()) if path.exists() else {"precisions": {}}
    data["replay"] = {"bf16": {"models": {m: vars(t) for m, t in sets.items()}, "provenance": provenance}}
    data["_note"] = (
        "precisions: python -m bench.audit.native_bf16; replay: python -m bench.audit.native_replay "
        "(see verifier/thresholds.py)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="poi-lm,gpt2-small")
    ap.add_argument("--honest", default="20,12", help="runs per honest variant, per model")
    ap.add_argument("--cheats", default="40,12", help="runs per cheat, per model")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="gpt2-micro, a few runs, writes under /tmp")
    ap.add_argument(
        "--refit", action="store_true", help="re-fit and re-judge the runs stored in bf16_int8.json"
    )
    args = ap.parse_args()
    if args.quick:
        args.models, args.honest, args.cheats = "gpt2-micro", "4", "2"
    out_dir = Path("/tmp/native_replay") if args.quick else None
    models = args.models.split(",")
    n_honest = dict(zip(models, map(int, args.honest.split(",")), strict=False))
    n_cheats = dict(zip(models, map(int, args.cheats.split(",")), strict=False))
    t0 = time.time()
    shipped = Thresholds.load()
    same_fp32, old = shipped.same_class["fp32"], shipped.native.get("bf16", shipped.same_class["bf16"])
    edges = {"bf16": shipped.same_class["bf16"].logit_tol, "fp32": same_fp32.logit_tol}
    if args.refit:
        stored = (out_dir or ROOT / "bench/results") / "bf16_int8.json"
        saved = json.loads(stored.read_text())["native_replay"]
        runs = saved["runs"]  # the stored measurements, re-judged by this script's current rule
    else:
        runs = measure_all(models, n_honest, n_cheats, edges, args.tokens, t0)
    sets, per_model, fitted_on = {}, {}, {}
    for model_id, m in runs.items():
        # fitted per model: how far an honest prover's batching moves its rounding is the model's own
        calibration = [
            r for name, rows in m["honest"].items() if name not in NOT_BF16_COMPUTE for r in rows[::2]
        ]
        sets[model_id], fitted_on[model_id] = fit(calibration, old), len(calibration)
        per_model[model_id] = judge_model(m, sets[model_id], same_fp32, old)
    provenance = {
        "source": "bench/results/bf16_int8.json (native_replay), python -m bench.audit.native_replay",
        "fitted_on": {m: f"{n} honest bf16-computed runs, every other one" for m, n in fitted_on.items()},
        "class": machine()["numerics_class"],
        "commit": commit(),
        "token_bounds": "copied from the native set (not fitted here)",
    }
    result = {
        "what": "bf16 claims re-executed on this class as a bf16 decode replay (the prover's declared "
        "passes, or one token per pass) and as an fp32 prefill",
        "rule": "pass if the decode replay is within the model's replay set, or the fp32 prefill within the "
        "same-class fp32 set; the native-prefill rule before it is judged on the same runs",
        "replay_sets": {m: vars(t) for m, t in sets.items()},
        "fitted_on_runs": fitted_on,
        "tokens_per_lease": args.tokens,
        "per_model": per_model,
        "runs": runs,
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
    }
    # shipped only where every held-out honest run passed: a set that rejects honest provers in the
    # bench would reject them in operation (gpt2-small in a batch of 4 is not bit-exact under a one-row
    # replay); such a model keeps the rule without a replay
    shipped = {m: t for m, t in sets.items() if per_model[m]["honest_held_out"]["rejects"] == 0}
    provenance["not_shipped"] = {
        m: f"{v['honest_held_out']['rejects']}/{v['honest_held_out']['trials']} held-out honest runs rejected"
        for m, v in per_model.items()
        if m not in shipped
    }
    result["shipped"] = sorted(shipped)
    write_set(out_dir / "native_audit.json" if out_dir else NATIVE_FILE, shipped, provenance)
    write_results(
        "bf16_int8.json",
        {"native_replay": result},
        writes=WRITES,
        path=out_dir / "bf16_int8.json" if out_dir else None,
    )
    brief = {
        m: {
            "honest": f"{v['honest_held_out']['rejects']}/{v['honest_held_out']['trials']} rejected",
            "cheats": {c: f"{x['caught']}/{x['trials']}" for c, x in v["cheats"].items()},
        }
        for m, v in per_model.items()
    }
    print(json.dumps(brief, indent=1))


def measure_all(
    models: list[str], n_honest: dict, n_cheats: dict, edges: dict, tokens: int, t0: float
) -> dict:
    registry, key = Registry(), AgentKey.generate()
    runs: dict[str, dict[str, dict[str, list]]] = {}
    for model_id in models:
        ref32 = registry.load(model_id)
        refs = {"fp32": ref32, "bf16": with_dtype(ref32, BF16)}
        runs[model_id] = {"honest": {}, "cheats": {}}
        for kind, variants, n in (
            (
                "honest",
                {**honest(registry, key, DRAFTS[model_id]), **resident(registry, key)},
                n_honest.get(model_id, 4),
            ),
            ("cheats", cheats(registry, key, DRAFTS[model_id]), n_cheats.get(model_id, 2)),
        ):
            for name, v in variants.items():
                runs[model_id][kind][name] = measure(model_id, v, n, refs, edges, tokens, len(name))
                print(f"[{time.time() - t0:7.1f} s] {model_id} {name}: {n} runs", flush=True)
    return runs


def judge_model(m: dict, replay: Tolerance, same_fp32: Tolerance, old: Tolerance) -> dict:
    """One model's held-out honest runs (every other one) and all its cheat runs, judged."""
    held = {name: rows[1::2] for name, rows in m["honest"].items()}
    all_held = [r for rows in held.values() for r in rows]
    bf16_held = [r for name, rows in held.items() if name not in NOT_BF16_COMPUTE for r in rows]
    return {
        "replay_set": vars(replay),
        "honest_held_out": judge(all_held, replay, same_fp32, old, "rejects"),
        "honest_bf16_compute_held_out": judge(bf16_held, replay, same_fp32, old, "rejects"),
        "honest_by_variant": {
            name: judge(rows, replay, same_fp32, old, "rejects") for name, rows in held.items()
        },
        "cheats": {name: judge(rows, replay, same_fp32, old, "caught") for name, rows in m["cheats"].items()},
    }


if __name__ == "__main__":
    main()
