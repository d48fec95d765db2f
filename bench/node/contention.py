"""Verdicts under load (issue 23): one resident honest agent, profiled on the host as it is, then
served lease after lease while 0, 1 and 2 CPU-hogging neighbours run, in rounds (so the host's drift
over time falls on every condition); cheats that do no real work served under the same rounds.
Each lease is appraised by the control plane's inline stack (L0 gating L1 and L2), with today's
floors and, for comparison, the floors before issue 23 (0.8 of the smallest run for work, half the
fastest free-core gap for pace, the profile's least memory less half the weights, no on-CPU check),
both on the same evidence.

    python -m bench.node.contention [--rounds 6] [--per 5]      # make bench-contention

Writes bench/results/operation.json: contention_* keys (honest leases, rejected and warned under
each rule set, by condition; cheats caught; the min/median/max of each contention field seen). The
whole-system figures issue 23 asks for (>= 3,000 honest leases through `poi serve`) are not these.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest.mock import patch

from maxwell_poi.node.resident_runs import (
    generate_leases,
    honest_resident,
    measure_resident_profile,
    serve_wave,
    start_resident,
)
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.result import LayerName, Verdict
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.profiles import ProfileStore, Stats
from maxwell_poi.verifier import boundary, thermodynamic
from maxwell_poi.verifier.policy import Verifier

from ..common.results import write_results

WRITES = {"operation.json": ["contention_*"]}
MODEL = "gpt2-micro"
TOKENS = 64  # long enough (~0.1-0.3 s) that /proc/stat's ticks give others_cores on most leases
CONDITIONS = {"quiet": 0, "one_neighbour": 1, "two_neighbours": 2}
CHEATS = {"sleeper": ("--sleep", "1"), "fast_fabricator": ()}


@contextmanager
def neighbours(n: int) -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.3 if n else 0.0)
        yield
    finally:
        for h in hogs:
            h.kill()
            h.wait()


def floors_before_issue_23() -> contextlib.AbstractContextManager[None]:
    """The floors as they were: work 0.8 of the smallest resident run, pace half the fastest gap,
    memory the least RSS less half the weights, no on-CPU check and no contention rule (the same
    evidence re-judged)."""
    stack = contextlib.ExitStack()
    stack.enter_context(
        patch.multiple(
            thermodynamic,
            ON_CPU_FRACTION=0.0,
            WORK_MIN_FRACTION=0.8,
            RUNTIME_MEMORY_SLACK=0.0,
            excused=lambda *a, **k: None,
        )
    )
    stack.enter_context(patch.multiple(boundary, PACE_FRACTION=0.5, excused=lambda *a, **k: None))
    return stack


def judge(verifier: Verifier, lease, run) -> dict[str, str]:
    now = verifier.appraise(lease, run.receipt, run.evidence)
    with floors_before_issue_23():
        before = verifier.appraise(lease, run.receipt, run.evidence)
    return {"now": now.verdict.value, "before": before.verdict.value, "reason": now.reason[:300]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="rounds over the three conditions")
    ap.add_argument("--per", type=int, default=5, help="honest leases per condition per round")
    ap.add_argument("--cheat-per", type=int, default=2, help="leases per cheat per condition per round")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    registry = Registry()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["POI_HOME"] = str(home)
        t0 = time.monotonic()
        profile = measure_resident_profile(MODEL, runs=4, tokens=TOKENS, batches=(1,))
        ProfileStore().put(profile)
        honest_key = AgentKey.ensure(home / "honest.pem")
        keys = {"profiler": honest_key.public_hex}
        cheat_keys = {}
        for name in CHEATS:
            cheat_keys[name] = AgentKey.generate()
            cheat_keys[name].save(home / f"{name}.pem")
        verifiers = {
            "profiler": Verifier.inline(registry, Keyring(keys), ProfileStore()),
            **{
                n: Verifier.inline(registry, Keyring({n: k.public_hex}), ProfileStore())
                for n, k in cheat_keys.items()
            },
        }
        honest: dict[str, list[dict[str, Any]]] = {c: [] for c in CONDITIONS}
        cheats: dict[str, list[dict[str, str]]] = {n: [] for n in CHEATS}
        seen: dict[str, list[float]] = {}
        with honest_resident(home, 1) as agent:
            serve_wave(agent, generate_leases(MODEL, 1, 2), registry)
            agents = {
                n: start_resident(
                    [
                        sys.executable,
                        "-m",
                        f"maxwell_poi.adversaries.{n}",
                        "--key",
                        str(home / f"{n}.pem"),
                        "--resident",
                        *extra,
                    ],
                    n,
                )
                for n, extra in CHEATS.items()
            }
            try:
                for r in range(args.rounds):
                    for cond, n in CONDITIONS.items():
                        with neighbours(n):
                            for i in range(args.per):
                                (lease,) = generate_leases(MODEL, 1, TOKENS, start=r * 7 + i)
                                (run,) = serve_wave(agent, [lease], registry)
                                honest[cond].append(judge(verifiers["profiler"], lease, run))
                                for k, v in run.evidence.contention.items():
                                    seen.setdefault(k, []).append(v)
                            for name, cheat in agents.items():
                                for i in range(args.cheat_per):
                                    (lease,) = generate_leases(MODEL, 1, TOKENS, start=i, agent_id=name)
                                    (run,) = serve_wave(cheat, [lease], registry)
                                    cheats[name].append(judge(verifiers[name], lease, run))
                    print(
                        f"round {r + 1}/{args.rounds}: {sum(map(len, honest.values()))} honest leases",
                        flush=True,
                    )
            finally:
                for cheat in agents.values():
                    cheat.close()
        elapsed = time.monotonic() - t0

    def tally(rows: list[dict[str, Any]], rule: str) -> dict[str, int]:
        c = Counter(row[rule] for row in rows)
        return {v.value: c.get(v.value, 0) for v in Verdict}

    every = [row for rows in honest.values() for row in rows]
    out: dict[str, Any] = {
        "contention_honest_leases": len(every),
        "contention_honest_by_condition": {
            cond: {"leases": len(rows), "now": tally(rows, "now"), "before_issue_23": tally(rows, "before")}
            for cond, rows in honest.items()
        },
        "contention_honest_rejected": tally(every, "now")["contraindicated"],
        "contention_honest_warned": tally(every, "now")["warning"],
        "contention_honest_rejected_before_issue_23": tally(every, "before")["contraindicated"],
        "contention_honest_rejections": sorted(
            {row["reason"] for row in every if row["now"] == Verdict.CONTRAINDICATED.value}
        )[:10],
        "contention_cheats": {
            name: {
                "trials": len(rows),
                "caught": tally(rows, "now")["contraindicated"],
                "caught_before_issue_23": tally(rows, "before")["contraindicated"],
            }
            for name, rows in cheats.items()
        },
        "contention_seen": {
            k: {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}
            for k, v in sorted(seen.items())
        },
        "contention_profile": {
            "cpu_ms_per_token": _ms(profile.decode_cpu_s_per_token),
            "interval_ms": _ms(profile.interval_s),
            "interval_free_ms": _ms(profile.interval_free_s) if profile.interval_free_s else None,
            "layers": [LayerName.INTEGRITY.value, LayerName.THERMODYNAMIC.value, LayerName.BOUNDARY.value],
        },
        "contention_elapsed_s": round(elapsed, 1),
    }
    write_results("operation.json", out, writes=WRITES)
    print({k: v for k, v in out.items() if not isinstance(v, dict | list)})


def _ms(s: Stats) -> dict[str, float]:
    return {k: round(getattr(s, k) * 1000, 3) for k in ("min", "median", "max")}


if __name__ == "__main__":
    main()
