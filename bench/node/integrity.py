"""Padding cannot pass (issue 24): the work probe against a padded relay and a padded cache, and its
honest false rejects.

One resident honest agent (profiled on the host as it is) is served lease after lease through
Maxwell's resident runner with work probes on (node.probe), a CPU-hogging neighbour beside every
third lease; then the cheats that pad, each lease judged by the control plane's inline stack (L0
gating L1 and L2; the probe is an L2 check):
- padded relay: forwards each lease to an honest worker outside its sandbox, burns the sandbox's
  cores while a lease is in flight and holds the honest agent's memory; refuses probes (it has no
  weights), and in a second variant forwards them to its worker too;
- padded cache: answers greedy jobs from a store of earlier honest answers (no weights), paces its
  stream, burns and holds like the relay, forges probe answers from its store.
Each row records the verdict, L1's and L2's status and the probe's outcome, so the table shows
both what padding buys against L1 and what the probe catches.

    python -m bench.node.integrity [--honest 300] [--trials 50]     # make bench-integrity

Writes bench/results/integrity.json: work_probe_honest, padded_relay, padded_relay_forwarding,
padded_cache, work_probe_setup.
"""

from __future__ import annotations

import argparse
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

from bench.node.contention import neighbours
from maxwell_poi.adversaries.padded_cache import store_answer
from maxwell_poi.node.probe import WorkProbes
from maxwell_poi.node.resident_runs import measure_resident_profile, serve_wave, start_resident
from maxwell_poi.node.runs import honest_agent_argv
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import LayerName
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.verifier.policy import Verifier

from ..common.results import write_results
from ..common.stats import rate_block, upper95

WRITES = {
    "integrity.json": [
        "work_probe_honest",
        "padded_relay",
        "padded_relay_forwarding",
        "padded_cache",
        "work_probe_setup",
    ]
}
TOKENS = 16


@contextmanager
def relay_worker(home: Path) -> Iterator[Path]:
    """An honest prover outside any sandbox, on a Unix socket (what a relay forwards to)."""
    sock = home / "worker.sock"
    AgentKey.ensure(home / "worker.pem")
    argv = [sys.executable, "-m", "maxwell_poi.adversaries.relay_worker", "--key", str(home / "worker.pem")]
    proc = subprocess.Popen([*argv, "--listen", str(sock)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the relay worker never listened")
            time.sleep(0.05)
        # reachable by the sandbox's own user too: this bench measures the probe, not the isolation
        # that keeps a relay from its worker (bench.node.escape measures that)
        home.chmod(0o755)
        sock.chmod(0o777)
        yield sock
    finally:
        proc.kill()
        proc.wait()


def greedy_lease(agent: str, model: str, i: int) -> Lease:
    job = GenerateJob(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=TOKENS, temperature=0.0)
    return Lease.issue(agent, model, job)


def row(verifier: Verifier, lease: Lease, run) -> dict[str, Any]:
    result = verifier.appraise(lease, run.receipt, run.evidence)
    status = {r.layer: r.status.value for r in result.layers}
    probe = run.evidence.probe
    return {
        "verdict": result.verdict.value,
        "l1": status.get(LayerName.THERMODYNAMIC, "absent"),
        "l2": status.get(LayerName.BOUNDARY, "absent"),
        "probe": probe.outcome if probe else "not probed",
        "probe_latency_ms": round(probe.latency_s * 1000, 2) if probe and probe.latency_s >= 0 else None,
        "cpu_s": run.evidence.cpu_s,
        "wall_s": run.evidence.wall_s,
        "rss_mb": round(run.evidence.peak_rss_mb(), 1),
        "reason": result.reason[:300],
    }


def summary(rows: list[dict[str, Any]], *, honest: bool = False) -> dict[str, Any]:
    n = len(rows)
    probe_caught = sum(r["probe"] not in ("matched", "not_sent") for r in rows)
    contraindicated = sum(r["verdict"] == "contraindicated" for r in rows)
    latencies = [r["probe_latency_ms"] for r in rows if r["probe_latency_ms"] is not None]
    out: dict[str, Any] = {
        "leases": n,
        "probe_outcomes": dict(Counter(r["probe"] for r in rows)),
        "verdicts": dict(Counter(r["verdict"] for r in rows)),
        "l1_passed": sum(r["l1"] == "pass" for r in rows),
        "l1_statuses": dict(Counter(r["l1"] for r in rows)),
        "probe_latency_ms": (
            {"min": min(latencies), "median": statistics.median(latencies), "max": max(latencies)}
            if latencies
            else None
        ),
        "median_cpu_s": statistics.median(r["cpu_s"] for r in rows) if rows else None,
        "median_rss_mb": statistics.median(r["rss_mb"] for r in rows) if rows else None,
    }
    if honest:
        out["probe_false_rejects"] = probe_caught
        out["probe_false_reject_upper95"] = upper95(probe_caught, n)
        out["contraindicated"] = contraindicated
        out["rejections"] = sorted({r["reason"] for r in rows if r["verdict"] == "contraindicated"})[:8]
    else:
        out["caught_by_probe"] = rate_block(probe_caught, n)
        out["contraindicated"] = rate_block(contraindicated, n)
        out["passed"] = sorted({r["reason"] for r in rows if r["verdict"] != "contraindicated"})[:5]
    return out


def cheat_argv(module: str, key: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        f"maxwell_poi.adversaries.{module}",
        "--key",
        str(key),
        "--resident",
        *extra,
    ]


def serve_cheat(argv, name, model, trials, registry, verifier, probes, offset=0) -> list[dict[str, Any]]:
    rows = []
    with start_resident(argv, name, probes=probes) as agent:
        for i in range(trials):
            lease = greedy_lease(name, model, offset + i)
            (run,) = serve_wave(agent, [lease], registry)
            rows.append(row(verifier, lease, run))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--honest", type=int, default=300, help="honest leases")
    ap.add_argument("--trials", type=int, default=50, help="leases per padded cheat")
    ap.add_argument("--forwarding", type=int, default=10, help="leases of the probe-forwarding relay")
    args = ap.parse_args()
    registry = Registry()
    probes = WorkProbes(registry)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        os.environ["POI_HOME"] = str(home)
        profile = measure_resident_profile(args.model, runs=4, tokens=TOKENS, batches=(1,))
        ProfileStore().put(profile)
        keys = {n: AgentKey.ensure(home / f"{n}.pem") for n in ("honest", "relay", "cache")}
        verifier = Verifier.inline(
            registry, Keyring({n: k.public_hex for n, k in keys.items()}), ProfileStore()
        )
        # what padding must show: the honest agent's CPU per token and memory, with room to spare
        pad_cores = os.cpu_count() or 2
        hold_mb = int(profile.peak_rss_mb.max * 1.1)
        pace_ms = profile.interval_s.median * 1000

        honest: list[dict[str, Any]] = []
        unprobed: list[dict[str, Any]] = []  # every fourth lease: the probe's cost, same agent, same run
        with start_resident(
            honest_agent_argv(home / "honest.pem", "--resident"), "honest", probes=probes
        ) as a:
            serve_wave(a, [greedy_lease("honest", args.model, 0)], registry)  # loads the model
            i = 0
            while len(honest) < args.honest:
                a.probes = None if i % 4 == 3 else probes
                with neighbours(int(i % 3 == 2)):
                    lease = greedy_lease("honest", args.model, i)
                    (run,) = serve_wave(a, [lease], registry)
                (unprobed if a.probes is None else honest).append(row(verifier, lease, run))
                i += 1
                if i % 50 == 0:
                    print(f"honest {len(honest)}/{args.honest}", flush=True)
            a.probes = probes

        pad = ("--pad-cores", str(pad_cores), "--hold-mb", str(hold_mb))
        with relay_worker(home) as sock:
            relay = cheat_argv("relay", home / "relay.pem", "--upstream", str(sock), *pad)
            relayed = serve_cheat(relay, "relay", args.model, args.trials, registry, verifier, probes)
            print("padded relay done", flush=True)
            forwarding = serve_cheat(
                [*relay, "--probes", "forward"],
                "relay",
                args.model,
                args.forwarding,
                registry,
                verifier,
                probes,
            )
        store = home / "cache"
        owner = Prover(keys["cache"])  # whoever ran the model before and kept the answers
        for i in range(len(PROMPTS)):
            lease = greedy_lease("cache", args.model, i)
            store_answer(store, lease, owner.claims(lease))
        cache = cheat_argv(
            "padded_cache", home / "cache.pem", "--store", str(store), "--pace-ms", f"{pace_ms:.1f}", *pad
        )
        cached = serve_cheat(cache, "cache", args.model, args.trials, registry, verifier, probes)
        elapsed = time.monotonic() - t0

    def per_token(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows) / TOKENS

    values = {
        "work_probe_honest": {
            **summary(honest, honest=True),
            "neighbour_on_every_third_lease": True,
            "cost": {
                "unprobed_leases": len(unprobed),
                "agent_cpu_ratio_probed_to_unprobed": per_token(honest, "cpu_s")
                / per_token(unprobed, "cpu_s"),
                "lease_wall_ratio_probed_to_unprobed": per_token(honest, "wall_s")
                / per_token(unprobed, "wall_s"),
            },
        },
        "padded_relay": summary(relayed),
        "padded_relay_forwarding": summary(forwarding),
        "padded_cache": summary(cached),
        "work_probe_setup": {
            "model": args.model,
            "tokens_per_lease": TOKENS,
            "probe_ids": 8,
            "pad_cores": pad_cores,
            "hold_mb": hold_mb,
            "cache_pace_ms": round(pace_ms, 2),
            "profile_cpu_ms_per_token": round(profile.decode_cpu_s_per_token.median * 1000, 3),
            "profile_memory_mb": round(profile.peak_rss_mb.median, 1),
            "layers": [LayerName.INTEGRITY.value, LayerName.THERMODYNAMIC.value, LayerName.BOUNDARY.value],
            "elapsed_s": round(elapsed, 1),
        },
    }
    path = write_results("integrity.json", values, writes=WRITES)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
