"""Floors that follow the threads (issue 24, item 7): honest resident agents at 1, 2 and N torch
threads (N = this host's CPUs), each judged against one profile measured at those thread counts,
and the cheats L1 is responsible for run at the same thread counts.

The profile is measured on the host as it is (`poi profile MODEL --resident --threads 1,2,N`); then,
per thread count, one honest agent serves lease after lease and each cheat serves its trials, a
CPU-hogging neighbour beside every third lease. Every lease is appraised by the control plane's
inline stack (L0 gating L1 and L2), and again with the floor as it was before (the default thread
count's runs only), on the same evidence. No work probes are sent: this measures L1's floor alone.

    python -m bench.node.threads [--leases 21] [--trials 10]      # make bench-threads

Writes bench/results/integrity.json: honest_affirmed_by_threads (per thread count: honest leases
affirmed / total, with and without the neighbour, and under the old floor; each cheat caught /
trials and by which layer; the floor used: which runs, its CPU-ms, the cores busy measured).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest.mock import patch

from bench.node.contention import neighbours
from maxwell_poi.node.resident import ResidentAgent
from maxwell_poi.node.resident_runs import generate_leases, honest_resident, serve_wave, start_resident
from maxwell_poi.node.thread_profiles import measure_threaded_profile, thread_counts
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.result import LayerName, Status, Verdict
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats
from maxwell_poi.verifier import thermodynamic
from maxwell_poi.verifier.policy import Verifier
from maxwell_poi.verifier.work_basis import DEFAULT_THREADS, WorkBasis, measured_cores

from ..common.results import write_result
from ..common.stats import rate_block

WRITES = {"integrity.json": ["honest_affirmed_by_threads"]}


def cheats(substitute: str) -> dict[str, tuple[str, ...]]:
    """The L1 adversaries run at each thread count (module, extra arguments)."""
    return {
        "sleeper": ("sleeper", "--sleep", "1"),
        "fast_fabricator": ("fast_fabricator",),
        f"substitute_{substitute}": ("substitute_model", "--substitute", substitute),
    }


def default_runs_basis(profile: Profile, ev: LeaseEvidence) -> WorkBasis | None:
    """The floor before issue 24: the default thread count's runs whatever the sandbox did."""
    batch = 1 + ev.co_leases
    stats = profile.decode_cpu_s_per_token if batch == 1 else (profile.batch_stats(batch) or (0, None))[1]
    if stats is None:
        return None
    return WorkBasis(stats, DEFAULT_THREADS, profile.decode_cores_busy, measured_cores(ev), batch)


def judge(verifier: Verifier, lease: Lease, run, hog: bool) -> dict[str, Any]:
    now = verifier.appraise(lease, run.receipt, run.evidence)
    with patch.object(thermodynamic, "basis_of", default_runs_basis):
        before = verifier.appraise(lease, run.receipt, run.evidence)
    l1 = now.layer(LayerName.THERMODYNAMIC)
    return {
        "verdict": now.verdict.value,
        "before": before.verdict.value,
        "l1": l1.status.value,
        "caught_by": [str(n) for n in now.caught_by],
        "hog": hog,
        "floor_from": l1.details.get("floor_from"),
        "floor_threads": l1.details.get("floor_threads"),
        "floor_per_core": l1.details.get("floor_per_core"),
        "lower_bound_cpu_ms": l1.details.get("lower_bound_cpu_ms"),
        "cpu_ms_per_token": l1.details.get("cpu_ms_per_token"),
        "cores_busy": l1.details.get("cores_busy"),
        "reason": now.reason[:400],
    }


def serve(agent: ResidentAgent, verifier: Verifier, leases: list[Lease], registry: Registry) -> list[dict]:
    rows = []
    for i, lease in enumerate(leases):
        hog = i % 3 == 2  # a neighbour beside every third lease
        with neighbours(int(hog)):
            (run,) = serve_wave(agent, [lease], registry)
        rows.append(judge(verifier, lease, run, hog))
    return rows


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def floors(rows: list[dict]) -> dict[str, Any]:
    """Which runs the floor came from, and the floor and the sandbox's cores busy measured."""
    sources = Counter(
        f"{r['floor_threads']}-thread runs" + (" per core" if r["floor_per_core"] else "")
        for r in rows
        if r["floor_threads"] is not None
    )
    return {
        "from": dict(sources),
        "lower_bound_cpu_ms": spread([r["lower_bound_cpu_ms"] for r in rows]),
        "cpu_ms_per_token": spread([r["cpu_ms_per_token"] for r in rows]),
        "cores_busy": spread([r["cores_busy"] for r in rows]),
        "example": next((r["floor_from"] for r in rows if r["floor_from"]), None),
    }


def honest_block(rows: list[dict]) -> dict[str, Any]:
    affirmed = sum(r["verdict"] == Verdict.AFFIRMING.value for r in rows)
    hogged = [r for r in rows if r["hog"]]
    return {
        "affirmed": affirmed,
        "total": len(rows),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "l1_passed": sum(r["l1"] == Status.PASS.value for r in rows),
        "with_neighbour": {
            "affirmed": sum(r["verdict"] == Verdict.AFFIRMING.value for r in hogged),
            "total": len(hogged),
        },
        "affirmed_by_default_thread_floor": sum(r["before"] == Verdict.AFFIRMING.value for r in rows),
        "not_affirmed_reasons": sorted({r["reason"] for r in rows if r["verdict"] != "affirming"})[:5],
        "rejected": rate_block(sum(r["verdict"] == "contraindicated" for r in rows), len(rows), "rejected"),
        "floor": floors(rows),
    }


def cheat_block(rows: list[dict]) -> dict[str, Any]:
    caught = sum(r["verdict"] == Verdict.CONTRAINDICATED.value for r in rows)
    return {
        "caught": caught,
        "trials": len(rows),
        "caught_by_l1": sum(r["l1"] == Status.FAIL.value for r in rows),
        "caught_by_default_thread_floor": sum(r["before"] == "contraindicated" for r in rows),
        "caught_by": dict(Counter(",".join(r["caught_by"]) or "-" for r in rows)),
        "floor": floors(rows),
        "missed_reasons": sorted({r["reason"] for r in rows if r["verdict"] != "contraindicated"})[:3],
    }


def profile_block(profile: Profile) -> dict[str, Any]:
    def ms(s: Stats) -> dict[str, float]:
        return {k: round(getattr(s, k) * 1000, 3) for k in ("min", "median", "max")}

    return {
        t: {
            "cpu_ms_per_token": ms(r.cpu_s_per_token),
            "cores_busy": {"min": round(r.cores_busy.min, 3), "max": round(r.cores_busy.max, 3)},
        }
        for t, r in profile.threads_runs.items()
    }


def run_threads(
    threads: int, home: Path, model: str, args: argparse.Namespace, registry: Registry
) -> dict[str, Any]:
    key = AgentKey.ensure(home / "honest.pem")
    keyring = {"profiler": key.public_hex}
    programs = cheats(args.substitute)
    for name in programs:
        keyring[name] = AgentKey.ensure(home / f"{name}.pem").public_hex
    verifier = Verifier.inline(registry, Keyring(keyring), ProfileStore())
    with honest_resident(home, 1, threads) as agent:
        serve_wave(agent, generate_leases(model, 1, 2), registry)  # loads the model
        honest = serve(
            agent, verifier, generate_leases(model, args.leases, args.tokens, start=threads), registry
        )
    print(f"{threads} threads: honest {honest_block(honest)['affirmed']}/{len(honest)} affirmed", flush=True)
    caught: dict[str, Any] = {}
    for name, (module, *extra) in programs.items():
        argv = [sys.executable, "-m", f"maxwell_poi.adversaries.{module}", "--key", str(home / f"{name}.pem")]
        argv += ["--resident", "--threads", str(threads), *extra]
        with start_resident(argv, name) as cheat:
            serve_wave(cheat, generate_leases(model, 1, 2, agent_id=name), registry)  # its start-up
            leases = generate_leases(model, args.trials, args.tokens, start=threads, agent_id=name)
            caught[name] = cheat_block(serve(cheat, verifier, leases, registry))
        print(f"  {name}: {caught[name]['caught']}/{caught[name]['trials']} caught", flush=True)
    return {"threads": threads, "honest": honest_block(honest), "cheats": caught}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--substitute", default="gpt2-mini", help="the smaller model a substitution cheat runs")
    ap.add_argument("--threads", default="1,2,N", help="thread counts; N = this host's CPUs")
    ap.add_argument("--leases", type=int, default=21, help="honest leases per thread count")
    ap.add_argument("--trials", type=int, default=10, help="leases per cheat per thread count")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3, help="profile runs per thread count")
    args = ap.parse_args()
    counts = thread_counts(args.threads)
    registry = Registry()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["POI_HOME"] = str(home)
        profile = measure_threaded_profile(
            args.model, threads=counts, runs=args.runs, tokens=args.tokens, batches=(1,), registry=registry
        )
        ProfileStore().put(profile)
        profiled_s = time.monotonic() - t0
        by_threads = {str(t): run_threads(t, home, args.model, args, registry) for t in counts}
    n = os.cpu_count() or 1
    out = {
        "what": (
            "honest resident agents at 1, 2 and N torch threads affirmed by the inline stack (L0 gating "
            "L1 and L2) against one profile measured at those thread counts, a CPU hog beside every "
            "third lease; the L1 cheats run at the same thread counts; 'default_thread_floor': the "
            "same evidence judged by the floor before issue 24 (the default thread count's runs)"
        ),
        "model": args.model,
        "tokens": args.tokens,
        "n_threads": n,
        "thread_counts": list(counts),
        "note_n": f"N is this host's CPU count, {n}" + (": the 2 and N rows are one" if n == 2 else ""),
        "profile": profile_block(profile),
        "by_threads": by_threads,
        "profile_s": round(profiled_s, 1),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    write_result("integrity.json", "honest_affirmed_by_threads", out, writes=WRITES)
    for t, block in by_threads.items():
        h = block["honest"]
        print(
            t,
            f"honest {h['affirmed']}/{h['total']}",
            {k: f"{c['caught']}/{c['trials']}" for k, c in block["cheats"].items()},
        )


if __name__ == "__main__":
    main()
