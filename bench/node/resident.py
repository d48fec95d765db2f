"""Node benchmarks for issue 8: resident agents in measured sandboxes, side by side in one run.

    make bench-node          # writes bench/results/node.json
    python -m bench.node.resident --quick

Every figure comes from real agent programs (honest and cheating) running as resident agents in
this machine's sandboxes (cgroup where writable), real forward passes, and Maxwell's verifier.
Absolute times are this 2-core CPU VM's and are given for orientation; the findings are counts
and ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from maxwell_poi.node.channel import AgentRun  # noqa: E402
from maxwell_poi.node.resident_runs import (  # noqa: E402
    embed_leases,
    generate_leases,
    measure_resident_profile,
    serve_wave,
    start_resident,
)
from maxwell_poi.node.runs import OFFLINE_ENV, honest_agent_argv, run_lease  # noqa: E402
from maxwell_poi.node.sandbox import AccountingSource, available_sources, measure_resolution, open_sandbox  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey, Keyring  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.protocol.result import LayerName, Status  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.registry.profiles import ProfileStore  # noqa: E402
from maxwell_poi.registry.prompts import PROMPTS  # noqa: E402
from maxwell_poi.verifier.policy import Verifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "node.json": [
        "what",
        "device",
        "command",
        "model",
        "tokens",
        "cpu_accounting_resolution_s",
        "relay_caught",
        "batching_cheat_caught",
        "l1_embed",
        "batched_honest_false_reject",
        "work_between_leases",
        "resident_vs_oneshot_cost",
        "profile",
        "sandbox_default",
        "wall_s",
    ]
}  # the keys of bench/results/node.json this script writes (bench/common/results.py)
AGENT = "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, model: str, embed_model: str, tokens: int, workdir: Path) -> None:
        self.model, self.embed_model, self.tokens = model, embed_model, tokens
        self.dir = workdir
        self.registry = Registry()
        self.key_path = workdir / "agent.pem"
        AgentKey.generate().save(self.key_path)
        self.keyring = Keyring({AGENT: AgentKey.load(self.key_path).public_hex})
        self.verifier = Verifier.default(self.registry, self.keyring, audit_rate=1.0)

    def module_argv(self, module: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            f"maxwell_poi.adversaries.{module}",
            "--key",
            str(self.key_path),
            *extra,
        ]

    def honest_argv(self, *extra: str) -> list[str]:
        return honest_agent_argv(self.key_path, "--resident", *extra)

    def gen(self, count: int, start: int = 0, same_prompt: bool = False) -> list[Lease]:
        if same_prompt:
            job = GenerateJob(
                prompt=PROMPTS[start % len(PROMPTS)], max_new_tokens=self.tokens, temperature=0.0
            )
            return [Lease.issue(AGENT, self.model, job) for _ in range(count)]
        return generate_leases(self.model, count, self.tokens, start=start, agent_id=AGENT)

    def appraise(self, lease: Lease, run: AgentRun) -> dict:
        r = self.verifier.appraise(lease, run.receipt, run.evidence)
        l1 = r.layer(LayerName.THERMODYNAMIC)
        return {
            "verdict": r.verdict.value,
            "l1": l1.status.value,
            "l1_reason": l1.reason,
            "caught_by": [str(n) for n in r.caught_by],
        }

    def waves(
        self,
        argv: list[str],
        name: str,
        make: Callable[[int], list[Lease]],
        trials: int,
        pause_s: float = 0.0,
        warm: list[Lease] | None = None,
    ) -> list[dict]:
        """`trials` waves of leases handed to one resident agent; each lease appraised."""
        out = []
        with start_resident(argv, name) as agent:
            if warm:
                serve_wave(agent, warm, self.registry)  # loads the model; not judged
            for t in range(trials):
                time.sleep(pause_s)
                leases = make(t)
                for lease, run in zip(leases, serve_wave(agent, leases, self.registry), strict=True):
                    out.append(
                        {
                            **self.appraise(lease, run),
                            "batch": 1 + run.evidence.co_leases,
                            "source": run.evidence.accounting.get("source"),
                        }
                    )
        return out


def resolution() -> dict:
    out = {}
    for source, why in available_sources().items():
        if why is not None:
            out[source.value] = {"available": False, "why": why}
            continue
        with open_sandbox("resolution", prefer=source) as sb:
            if sb.source is not source:
                out[source.value] = {"available": False, "why": sb.fallback_reason}
                continue
            steps = [measure_resolution(sb, 0.5)]
        with open_sandbox("resolution", prefer=source) as sb:
            steps.append(measure_resolution(sb, 0.5))
        out[source.value] = {
            "available": True,
            "smallest_step_s": min(steps),
            "declared_ns": sb.resolution_ns,
        }
        log(f"resolution {source.value}: {min(steps) * 1000:.3f} ms")
    return out


def counts(rows: list[dict], caught: Callable[[dict], bool]) -> dict:
    return {
        "trials": len(rows),
        "caught": sum(caught(r) for r in rows),
        "reasons": sorted({r["l1_reason"][:160] for r in rows})[:3],
    }


def l1_failed(r: dict) -> bool:
    return r["l1"] == Status.FAIL.value


def relay(b: Bench, trials: int) -> dict:
    sock = b.dir / "worker.sock"
    worker_key = b.dir / "worker.pem"
    AgentKey.generate().save(worker_key)
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maxwell_poi.adversaries.relay_worker",
            "--key",
            str(worker_key),
            "--listen",
            str(sock),
        ],
        env={**os.environ, **OFFLINE_ENV},
        stderr=subprocess.DEVNULL,
    )
    try:
        while not sock.exists():
            time.sleep(0.05)
        rows = b.waves(
            b.module_argv("relay", "--resident", "--upstream", str(sock)),
            "relay",
            lambda t: b.gen(1, start=t),
            trials,
        )
    finally:
        worker.kill()
        worker.wait()
    log(f"relay: L1 caught {sum(map(l1_failed, rows))}/{len(rows)}")
    return {
        **counts(rows, l1_failed),
        "verdict_contraindicated": sum(r["verdict"] == "contraindicated" for r in rows),
    }


def batching_cheat(b: Bench, sizes: tuple[int, ...], trials: int) -> dict:
    out = {}
    for n in sizes:
        rows = b.waves(
            b.module_argv("batch_copier", "--resident", "--max-batch", str(n)),
            f"copier{n}",
            lambda t, n=n: b.gen(n, start=t, same_prompt=True),
            trials,
            warm=b.gen(1),
        )
        out[f"batch_{n}"] = {
            **counts(rows, l1_failed),
            "leases_per_trial": n,
            "l4_caught": sum("audit" in r["caught_by"] for r in rows),
        }
        log(f"batch copier x{n}: L1 caught {out[f'batch_{n}']['caught']}/{len(rows)} leases")
    return out


def honest_batched(b: Bench, sizes: tuple[int, ...], trials: int) -> dict:
    out = {}
    for n in sizes:
        rows = b.waves(
            b.honest_argv("--max-batch", str(n)),
            f"honest{n}",
            lambda t, n=n: b.gen(n, start=t * n),
            trials,
            warm=b.gen(1),
        )
        rejected = [r for r in rows if r["verdict"] != "affirming"]
        out[f"batch_{n}"] = {
            "runs": len(rows),
            "rejected": len(rejected),
            "l1_rejected": sum(map(l1_failed, rows)),
            "reasons": [r["l1_reason"][:160] for r in rejected][:3],
            "observed_batch": sorted({r["batch"] for r in rows}),
        }
        log(f"honest batch {n}: {len(rejected)}/{len(rows)} rejected")
    return out


def l1_embed(b: Bench, trials: int) -> dict:
    def leases(t: int) -> list[Lease]:
        lease = embed_leases(b.embed_model, 1, start=t)[0]
        return [lease.model_copy(update={"agent_id": AGENT})]

    cheats = {
        "fast-fabricator": ("fast_fabricator",),
        "sleeper": ("sleeper", "--sleep", "0.05"),
        "skipped-layers": ("skipped_layers",),
        "cpu-miner": ("cpu_miner",),
    }
    out: dict = {"cheats": {}}
    warm = leases(99)
    for name, (module, *extra) in cheats.items():
        rows = b.waves(b.module_argv(module, "--resident", *extra), name, leases, trials, warm=warm)
        out["cheats"][name] = counts(rows, l1_failed)
        log(f"embed {name}: L1 caught {out['cheats'][name]['caught']}/{len(rows)}")
    honest = b.waves(b.honest_argv(), "honest-embed", leases, trials * 2, warm=warm)
    out["honest"] = {
        "runs": len(honest),
        "l1_rejected": sum(map(l1_failed, honest)),
        "rejected": sum(r["verdict"] != "affirming" for r in honest),
        "l1_passed": sum(r["l1"] == "pass" for r in honest),
    }
    log(f"embed honest: {out['honest']}")
    return out


def between_leases(b: Bench, trials: int, pause_s: float = 1.0) -> dict:
    """L1's idle-work check: the moonlighter (escaped miners between leases) against the honest
    agent served the same way, a `pause_s` gap before every judged lease."""
    out = {}
    for name, argv in (
        ("moonlighter", b.module_argv("moonlighter", "--resident")),
        ("honest", b.honest_argv()),
    ):
        rows = b.waves(
            argv, f"{name}-gaps", lambda t: b.gen(1, start=t), trials, pause_s=pause_s, warm=b.gen(1)
        )
        idle = [r for r in rows if "between leases" in r["l1_reason"]]
        out[name] = {
            "trials": len(rows),
            "rejected_for_work_between_leases": len(idle),
            "source": rows[0]["source"],
        }
        log(f"between leases, {name}: {len(idle)}/{len(rows)} rejected for idle work")
    return {"pause_s": pause_s, **out}


def resident_vs_oneshot(b: Bench, leases: int) -> dict:
    """Wall and sandbox/process CPU per lease: one resident agent for all, or one process each."""
    oneshot = []
    for lease in b.gen(leases, start=0):
        t0 = time.perf_counter()
        run = run_lease(honest_agent_argv(b.key_path), lease, b.registry)
        oneshot.append((time.perf_counter() - t0, run.evidence.cpu_s))
    resident = []
    t_start = time.perf_counter()
    with start_resident(b.honest_argv(), "honest-cost") as agent:
        start_up = None
        for lease in b.gen(leases, start=0):
            t0 = time.perf_counter()
            (run,) = serve_wave(agent, [lease], b.registry)
            if start_up is None:
                start_up = time.perf_counter() - t_start
            resident.append((time.perf_counter() - t0, run.evidence.cpu_s))
        total_cpu = agent.sandbox.usage().cpu_s

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    warm = resident[1:]
    res = {
        "leases": leases,
        "oneshot_wall_s_per_lease": round(mean([w for w, _ in oneshot]), 3),
        "oneshot_cpu_s_per_lease": round(mean([c for _, c in oneshot]), 3),
        "resident_wall_s_per_lease_after_first": round(mean([w for w, _ in warm]), 3),
        "resident_cpu_s_per_lease_after_first": round(mean([c for _, c in warm]), 3),
        "resident_first_lease_wall_s": round(resident[0][0], 3),
        "resident_sandbox_cpu_s_total": round(total_cpu, 3),
    }
    res["wall_ratio_oneshot_over_resident"] = round(
        res["oneshot_wall_s_per_lease"] / res["resident_wall_s_per_lease_after_first"], 2
    )
    res["cpu_ratio_oneshot_over_resident"] = round(
        res["oneshot_cpu_s_per_lease"] / res["resident_cpu_s_per_lease_after_first"], 2
    )
    log(f"cost: {res}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--embed-model", default="minilm-l6-v2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="gpt2-mini, 3 trials: a smoke run")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/node.json")
    args = ap.parse_args()
    if args.quick:
        args.model, args.trials, args.profile_runs, args.tokens = "gpt2-mini", 3, 3, 24
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")  # profiles measured here, for this run only
        b = Bench(args.model, args.embed_model, args.tokens, Path(tmp))
        store = ProfileStore()
        for model in (args.model, args.embed_model):
            log(f"profiling {model} as a resident agent")
            store.put(
                measure_resident_profile(
                    model, runs=args.profile_runs, tokens=args.tokens, registry=b.registry
                )
            )
        result = {
            "what": "node benchmarks (issue 8): resident agents in measured sandboxes",
            "device": f"CPU {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; no GPU",
            "command": "make bench-node  (python -m bench.node.resident)",
            "model": args.model,
            "tokens": args.tokens,
            "cpu_accounting_resolution_s": resolution(),
            "relay_caught": relay(b, args.trials),
            "batching_cheat_caught": batching_cheat(b, (2, 4), args.trials),
            "l1_embed": l1_embed(b, max(3, args.trials // 2)),
            "batched_honest_false_reject": honest_batched(b, (1, 2, 4), args.trials),
            "work_between_leases": between_leases(b, args.trials),
            "resident_vs_oneshot_cost": resident_vs_oneshot(b, max(3, args.trials // 2)),
            "profile": json.loads(store.path.read_text()),
        }
    result["sandbox_default"] = str(
        next((s.value for s, why in available_sources().items() if why is None), AccountingSource.PROC.value)
    )
    result["wall_s"] = round(time.time() - started, 1)
    write_results("node.json", result, writes=WRITES, path=args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=2, default=str))


if __name__ == "__main__":
    main()
