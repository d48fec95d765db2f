"""Core benchmarks for issue 2, each a ratio measured side by side in one run, goal beside it.

    make bench        # writes bench/results/core.json
    python -m bench.audit.core --quick   # smaller trial counts, for a smoke run

All figures come from real forward passes on this machine's CPU (no simulator). Absolute times
are printed for orientation only; the reported figures are ratios, sizes and counts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from maxwell_poi.adversaries import CATALOGUE  # noqa: E402
from maxwell_poi.demo.generation import Demo, DemoConfig  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey, Keyring  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.protocol.receipt import open_receipt  # noqa: E402
from maxwell_poi.prover.sdk import Prover  # noqa: E402
from maxwell_poi.registry.forward import generate  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.registry.sampling import SeededSampler  # noqa: E402
from maxwell_poi.verifier.appraisal import Appraisal  # noqa: E402
from maxwell_poi.verifier.audit import AuditLayer  # noqa: E402
from maxwell_poi.verifier.integrity import IntegrityLayer  # noqa: E402
from maxwell_poi.verifier.policy import Verifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "core.json": [
        "what",
        "device",
        "command",
        "generation",
        "receipt",
        "l0",
        "detection",
        "detection_summary",
        "honest_false_reject",
        "honest_false_reject_summary",
        "wall_s",
    ]
}  # the keys of bench/results/core.json this script writes (bench/common/results.py)
PROMPT = (
    "The history of the steam engine begins with the aeolipile described by Hero of Alexandria in the "
    "first century, a hollow sphere that spun when steam escaped from bent nozzles; centuries later"
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prover_and_audit(reg: Registry, key: AgentKey, ring: Keyring, model: str, tokens: int, reps: int) -> dict:
    """Plain generation vs the instrumented prover (hooks, fingerprints, layer digests, signing),
    interleaved; then the L4 audit of the same receipts."""
    loaded = reg.load(model)
    prover = Prover(key, reg)
    prompt_ids = loaded.encode_prompt(PROMPT)
    plain, instrumented, audits, receipts = [], [], [], []
    audit = AuditLayer(reg)
    for rep in range(reps):
        lease = Lease.issue(
            "bench", model, GenerateJob(prompt=PROMPT, max_new_tokens=tokens, temperature=0.8)
        )
        t0 = time.perf_counter()
        generate(loaded, prompt_ids, tokens, SeededSampler(lease.seed_bytes, 0.8, 50))
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        raw = prover.run(lease)
        instrumented.append(time.perf_counter() - t0)
        receipts.append((lease, raw))
        ctx = Appraisal(lease=lease, raw=raw, receipt=open_receipt(raw, 1 << 24))
        t0 = time.perf_counter()
        result = audit.appraise(ctx)
        audits.append(time.perf_counter() - t0)
        assert result.status.value == "pass", result.reason
        log(f"rep {rep}: plain {plain[-1]:.2f}s instrumented {instrumented[-1]:.2f}s audit {audits[-1]:.3f}s")
    attributed = attributed_overhead(prover, tokens, model)
    overhead_min = min(instrumented) / min(plain) - 1
    overhead_med = statistics.median(instrumented) / statistics.median(plain) - 1
    return {
        "model": model,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": tokens,
        "reps": reps,
        "prover_overhead_ratio": round(overhead_min, 4),
        "prover_overhead_ratio_median": round(overhead_med, 4),
        "prover_overhead_goal": 0.01,
        "prover_overhead_attributed": attributed,
        "audit_speedup": round(statistics.median(instrumented) / statistics.median(audits), 2),
        "audit_speedup_goal_cpu": 20,
        "seconds_for_orientation_only": {
            "plain_generation": [round(x, 3) for x in plain],
            "instrumented_generation": [round(x, 3) for x in instrumented],
            "audit": [round(x, 4) for x in audits],
        },
        "_receipts": receipts,
    }


def attributed_overhead(prover: Prover, tokens: int, model: str) -> dict:
    """Time spent inside the instrumentation itself (hooks, chunk commitments, fingerprints, claims,
    signing), timed by cProfile within one instrumented generation: end-to-end differences of a
    few percent between separate runs are within this machine's run-to-run noise."""
    import cProfile
    import pstats

    lease = Lease.issue("bench", model, GenerateJob(prompt=PROMPT, max_new_tokens=tokens, temperature=0.8))
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    prover.run(lease)
    total = time.perf_counter() - t0
    prof.disable()
    entry = {
        ("recorder.py", "hook"),
        ("recorder.py", "_keep_final"),
        ("recorder.py", "drain"),
        ("receipt.py", "sign_receipt"),
        ("sdk.py", "claims_for"),
    }
    spent = sum(v[3] for (f, _, name), v in pstats.Stats(prof).stats.items() if (Path(f).name, name) in entry)
    return {
        "instrumentation_s": round(spent, 4),
        "instrumented_generation_s": round(total, 3),
        "ratio": round(spent / (total - spent), 5),
        "note": "cumulative time of the instrumentation entry points under cProfile (which slows "
        "Python code, so this over-states it)",
    }


def receipt_sizes(
    reg: Registry, key: AgentKey, model: str, lengths: list[int], known: dict[int, bytes]
) -> dict:
    prover = Prover(key, reg)
    sizes, proof = {}, {}
    for n in lengths:
        raw = known.get(n)
        if raw is None:
            lease = Lease.issue("bench", model, GenerateJob(prompt=PROMPT, max_new_tokens=n, temperature=0.8))
            raw = prover.run(lease)
        sizes[n] = len(raw)
        proof[n] = len(open_receipt(raw, 1 << 24).claims.fingerprint_bytes())
    xs = np.array(lengths, dtype=float)
    slope, intercept = np.polyfit(xs, np.array([sizes[n] for n in lengths], dtype=float), 1)
    p_slope, p_int = np.polyfit(xs, np.array([proof[n] for n in lengths], dtype=float), 1)
    return {
        "receipt_bytes": sizes,
        "fingerprint_bytes": proof,
        "receipt_bytes_per_token": round(float(slope), 3),
        "receipt_bytes_per_token_goal": 8,
        "receipt_fixed_bytes": round(float(intercept), 1),
        "receipt_fixed_bytes_goal": 1024,
        "fingerprint_bytes_per_token": round(float(p_slope), 3),
        "fingerprint_fixed_bytes": round(float(p_int), 1),
        "toploc_bytes_per_token": round(258 / 32, 3),
        "note": "receipt = DSSE JSON envelope (payload base64) of an in-toto Statement carrying the output "
        "token ids (uint16), the fingerprints (k=32 per 32 tokens) and the bindings; fingerprint bytes "
        "are the raw commitment, comparable to TOPLOC's 258 B per 32 tokens (k=128)",
    }


def l0_throughput(reg: Registry, ring: Keyring, lease: Lease, raw: bytes, n: int) -> dict:
    torch.set_num_threads(1)
    layer = IntegrityLayer(reg, ring)
    times = []
    for _ in range(n):
        layer._settled.clear()  # the same receipt again: measure the checks, not the replay guard
        t0 = time.perf_counter()
        result = layer.appraise(Appraisal(lease=lease, raw=raw))
        times.append(time.perf_counter() - t0)
        assert result.status.value == "pass", result.reason
    arr = np.array(times) * 1000
    torch.set_num_threads(2)
    return {
        "appraisals": n,
        "receipt_bytes": len(raw),
        "appraisal_p50_ms": round(float(np.percentile(arr, 50)), 4),
        "appraisal_p99_ms": round(float(np.percentile(arr, 99)), 4),
        "appraisal_p99_goal_ms": 1.0,
        "appraisal_per_s": round(float(n / (arr.sum() / 1000)), 1),
        "appraisal_per_s_goal": 2000,
        "cores": 1,
    }


def honest_false_reject(
    reg: Registry, key: AgentKey, ring: Keyring, model: str, tokens: int, trials: int
) -> dict:
    variants = {
        "fp32-1thread": dict(threads=1, batch=1, precision="fp32"),
        "fp32-2threads": dict(threads=2, batch=1, precision="fp32"),
        "fp32-batch4": dict(threads=2, batch=4, precision="fp32"),
        "bf16-prover-fp32-verifier": dict(threads=2, batch=1, precision="bf16"),
    }
    out = {}
    for name, v in variants.items():
        prover = Prover(key, reg, threads=v["threads"], batch=v["batch"])
        verifier = Verifier.offline(reg, ring)  # receipts alone: L0 and L4
        rejected, reasons = 0, []
        for t in range(trials):
            job = GenerateJob(
                prompt=f"{PROMPT} (trial {t})", max_new_tokens=tokens, temperature=(0.8 if t % 2 else 0.0)
            )
            lease = Lease.issue("bench", model, job, precision=v["precision"])
            result = verifier.appraise(lease, prover.run(lease))
            if result.verdict.value != "affirming":
                rejected += 1
                reasons.append(result.reason)
        torch.set_num_threads(2)
        out[name] = {"trials": trials, "rejected": rejected, "reasons": reasons[:5]}
        log(f"honest {name}: {rejected}/{trials} rejected")
    return out


def detection(model: str, small: str, alt: str, tokens: int, trials: int, out_dir: Path) -> dict:
    """Every adversary program, run as its own process through the runner, `trials` times."""
    per: dict[str, dict] = {a.name: {"trials": 0, "caught": 0, "caught_by": {}} for a in CATALOGUE}
    honest = {"trials": 0, "rejected": 0}
    for t in range(trials):
        cfg = DemoConfig(model=model, small=small, alt=alt, tokens=tokens, out=out_dir / f"trial{t}")
        rows = Demo(cfg).run(lambda label, i, n, t=t: log(f"detection trial {t}: {i}/{n} {label}"))
        for r in rows:
            if r.attack is None:
                honest["trials"] += 1
                honest["rejected"] += r.verdict != "affirming"
                continue
            d = per[r.attack]
            d["trials"] += 1
            d["caught"] += r.verdict == "contraindicated"
            for layer in r.caught_by:
                d["caught_by"][layer] = d["caught_by"].get(layer, 0) + 1
    return {"model": model, "tokens": tokens, "attacks": per, "honest_runs_in_demo": honest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--l0-appraisals", type=int, default=3000)
    ap.add_argument("--honest-trials", type=int, default=10)
    ap.add_argument("--detection-trials", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="gpt2-mini, fewer trials: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/core.json")
    args = ap.parse_args()
    if args.quick:
        args.model, args.tokens, args.reps, args.honest_trials, args.detection_trials = (
            "gpt2-mini",
            64,
            2,
            2,
            1,
        )
        args.l0_appraisals = 300
    small, alt = ("gpt2-micro", "gpt2-micro") if args.quick else ("gpt2-mini", "gpt2-small-alt")
    torch.set_num_threads(2)
    reg = Registry()
    key = AgentKey.generate()
    ring = Keyring({"bench": key.public_hex})
    started = time.time()
    speed = prover_and_audit(reg, key, ring, args.model, args.tokens, args.reps)
    receipts = speed.pop("_receipts")
    lengths = sorted({32, 64, 128, args.tokens})
    sizes = receipt_sizes(reg, key, args.model, lengths, {args.tokens: receipts[0][1]})
    l0 = l0_throughput(reg, ring, *receipts[0], args.l0_appraisals)
    honest = honest_false_reject(reg, key, ring, args.model, 48, args.honest_trials)
    det = detection(args.model, small, alt, 32, args.detection_trials, Path("/tmp/poi-bench-detection"))
    attacks = det["attacks"]
    result = {
        "what": "core slice benchmarks (issue 2)",
        "device": f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); no GPU",
        "command": "make bench  (python -m bench.audit.core)",
        "generation": speed,
        "receipt": sizes,
        "l0": l0,
        "detection": det,
        "detection_summary": {
            "classes": len(attacks),
            "trials": sum(a["trials"] for a in attacks.values()),
            "caught": sum(a["caught"] for a in attacks.values()),
            "goal": "every audited cheat caught",
        },
        "honest_false_reject": honest,
        "honest_false_reject_summary": {
            "trials": sum(v["trials"] for v in honest.values()) + det["honest_runs_in_demo"]["trials"],
            "rejected": sum(v["rejected"] for v in honest.values()) + det["honest_runs_in_demo"]["rejected"],
            "goal": "<= 0.1% (needs >= 3000 trials to show at 95%; see README for what these trials bound)",
        },
        "wall_s": round(time.time() - started, 1),
    }
    write_results("core.json", result, writes=WRITES, path=args.out)
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("generation", "receipt", "l0", "detection_summary", "honest_false_reject_summary")
            },
            indent=2,
            default=str,
        )
    )


if __name__ == "__main__":
    main()
