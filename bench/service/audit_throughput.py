"""Audit throughput (issue 11, part 4): leases audited per second by the process pool and by Ray
actors (service.audit_backends), with 1 and 2 workers, on N real honest receipts.

The N receipts are made once with the prover SDK (real forward passes; the node's evidence is a
record naming this host's device class, as the control plane would send it). For each backend and
worker count: the workers start, load the model (`warm`) and audit one lease each (warm-up, not
timed); then all N jobs are submitted at once and timed until the last answer, `--rounds` times.
Each worker gets an equal share of the cores as torch threads (1 worker: all, 2 workers: half each),
so a rate ratio 2/1 above 1 is what parallel workers add on the same cores. Every answer must be
affirming with an L4 pass, or the run stops: a rate of failed audits means nothing.

CPU, shared host: ratios only. Absolute rates are this host's (absolute times only from a GPU).

    python -m bench.service.audit_throughput    # merges `audit_throughput` into bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_result  # noqa: E402
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import AttestationResult, LayerName, Status, Verdict
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.audit_backends import (
    AuditBackend,
    AuditJob,
    BackendUnavailable,
    import_ray,
    open_backend,
    threads_per_worker,
    usable_cores,
)

ROOT = Path(__file__).resolve().parents[2]
WRITES = {"gateway.json": ["audit_throughput"]}  # bench/common/results.py
BACKENDS = ("process", "ray")
WORKERS = (1, 2)
NOTE = "CPU, 2 cores: ratios only; absolute rates are this host's"


def honest_jobs(n: int, model: str, tokens: int) -> list[AuditJob]:
    """n honestly generated, signed receipts as audit jobs (each with its node-side record)."""
    key = AgentKey.generate()
    prover = Prover(key)
    jobs = []
    for i in range(n):
        lease = Lease.issue(
            "alice", model, GenerateJob(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens)
        )
        started = time.time()
        receipt = prover.run(lease)
        now = time.time()
        evidence = LeaseEvidence(
            started_at=started,
            finished_at=now,
            wall_s=now - started,
            cpu_s=now - started,
            max_rss_kb=0,
            bytes_in=0,
            bytes_out=len(receipt),
            sha256_in="",
            sha256_out="",
            exit_code=0,
            receipt_bytes=len(receipt),
            device_class=this_device(),
        )
        jobs.append(AuditJob.of(lease, receipt, evidence, now, key.public_hex))
    return jobs


def audit_all(backend: AuditBackend, jobs: list[AuditJob]) -> float:
    """Seconds from submitting every job at once to the last answer; every answer checked."""
    t0 = time.perf_counter()
    futures = [backend.submit(job) for job in jobs]
    answers = [f.result(timeout=600) for f in futures]
    elapsed = time.perf_counter() - t0
    for answer in answers:
        result = AttestationResult.from_dict(answer)
        if result.verdict is not Verdict.AFFIRMING or result.layer(LayerName.AUDIT).status is not Status.PASS:
            raise SystemExit(f"an honest lease was not affirmed by L4 on {backend.name}: {result.reason}")
    return elapsed


def measure(kind: str, workers: int, jobs: list[AuditJob], model: str, rounds: int) -> list[float]:
    """Leases per second of each timed round, after start, model load and one audit per worker."""
    backend = open_backend(kind, workers, preload=(model,))
    try:
        backend.warm()
        audit_all(backend, jobs[:workers])
        return [len(jobs) / audit_all(backend, jobs) for _ in range(rounds)]
    finally:
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="receipts audited per timed round")
    ap.add_argument("--model", default="gpt2-mini")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per receipt")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per backend and worker count")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gateway.json")
    args = ap.parse_args()
    cores = usable_cores()
    jobs = honest_jobs(args.n, args.model, args.tokens)
    print(f"{len(jobs)} honest {args.model} receipts of {args.tokens} tokens; {cores} cores", flush=True)
    rates: dict[str, dict[str, Any]] = {}
    rounds: dict[str, dict[str, list[float]]] = {}
    ratios: dict[str, float | None] = {}
    for kind in BACKENDS:
        ray = None
        if kind == "ray":
            try:
                ray = import_ray()
                ray.init(num_cpus=cores, include_dashboard=False, ignore_reinit_error=True)
            except (BackendUnavailable, RuntimeError) as exc:  # reported, not faked
                rates[kind], ratios[kind] = {"skipped": str(exc)}, None
                print(f"ray: skipped: {exc}", flush=True)
                continue
        try:
            rounds[kind] = {str(w): measure(kind, w, jobs, args.model, args.rounds) for w in WORKERS}
        finally:
            if ray is not None:
                ray.shutdown()
        rates[kind] = {w: round(statistics.median(r), 2) for w, r in rounds[kind].items()}
        ratios[kind] = round(rates[kind]["2"] / rates[kind]["1"], 3)
        print(f"{kind}: leases/s {rates[kind]}, 2/1 = {ratios[kind]}", flush=True)
    block = {
        **rates,
        "ratio_2_over_1": ratios,
        "n": args.n,
        "model": args.model,
        "tokens": args.tokens,
        "host_cores": cores,
        "torch_threads_per_worker": {str(w): threads_per_worker(w, cores) for w in WORKERS},
        "rounds": args.rounds,
        "leases_per_s_by_round": {
            k: {w: [round(x, 2) for x in r] for w, r in v.items()} for k, v in rounds.items()
        },
        "what": "median leases/s of L0 + L4 audits (AuditRunner) on service.audit_backends, all N "
        "submitted at once, after worker start, model load and one warm-up audit per worker",
        "note": NOTE,
        "command": f"python -m bench.service.audit_throughput --n {args.n} --model {args.model} "
        f"--tokens {args.tokens} --rounds {args.rounds}",
    }
    write_result("gateway.json", "audit_throughput", block, writes=WRITES, path=args.out)
    print(json.dumps(block["ratio_2_over_1"]))


if __name__ == "__main__":
    main()
