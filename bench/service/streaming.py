"""Streaming appraisal (issue 11, item 2), in process: detection latency and cost.

Each lease's answer is replayed to `verifier.streaming.StreamingAudit` token by token, with each
fingerprint chunk delivered when the prover would have committed it. Per attack class: tokens that
arrived after the first cheating token before the cut (the first cheating token: the first whose
seeded choice differs, or 0 for a substituted model whose every activation differs). Cost: the
streaming audit's time against one `measure_generation` (one prefill) on the same answer, honest
leases, same run. The same appraisal through the real gateway, live: bench/service/gateway.py.

    python -m bench.service.streaming     # merges its keys into bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from bench.common.variants import PROMPTS, attack_variants, honest_variants  # noqa: E402
from maxwell_poi.observer.host import this_device  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.audit import _split, measure_generation  # noqa: E402
from maxwell_poi.verifier.streaming import StreamingAudit  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds, choose_tolerance  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "gateway.json": [
        "streaming_appraisal",
        "detection_latency_tokens_in_process",
        "streaming_appraisal_cost_ratio",
        "streaming_appraisal_cost_ratio_by_block",
    ]
}  # bench/common/results.py; the live gateway's keys are bench/service/gateway.py's
BY_BLOCK = ("streaming_appraisal_cost_ratio_by_block",)  # one entry per (block, tokens) run, merged
ATTACKS = ["cheap-draft", "smaller-model", "one-token-changed", "mid-stream-switch"]


def replay(lease, claims, model, choice):
    """(finding or None, seconds) of a streaming audit fed this answer as it would arrive."""
    t0 = time.perf_counter()
    audit = StreamingAudit(lease, model, choice)
    tokens, prompt_len = claims.tokens(), len(audit.prompt)
    chunks = _split(claims.fingerprint_bytes(), len(audit.spans))
    due: dict[int, list[int]] = {}
    for k, (_s, e) in enumerate(audit.spans):  # the prover commits a chunk once its rows exist
        due.setdefault(min(max(e - prompt_len, 0), len(tokens) - 1), []).append(k)
    for i, token in enumerate(tokens):
        found = audit.receive(token)
        for k in due.get(i, []):
            found = found or audit.receive_chunk(k, chunks[k])
        if found:
            return found, time.perf_counter() - t0
    return None, time.perf_counter() - t0


def first_cheating_token(claims, lease, model, tol, attack: str) -> int:
    if attack == "smaller-model":
        return 0
    gaps = measure_generation(lease, claims, model, tol.logit_tol).gaps
    bad = np.flatnonzero(gaps > tol.token_gap)
    return int(bad[0]) if len(bad) else len(gaps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gateway.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    registry, key = Registry(), AgentKey.generate()
    model = registry.load("poi-lm")
    # the prover runs on this host, as a node here would measure it: the one rule gives same-class
    choice = choose_tolerance(Thresholds.load(), "fp32", this_device(), this_device())
    tol = choice.tolerance
    variants = {**honest_variants(registry, key), **attack_variants(registry, key)}

    def lease(i: int) -> Lease:
        job = GenerateJob(
            prompt=PROMPTS[i % len(PROMPTS)],
            max_new_tokens=args.tokens,
            temperature=0.8 if i % 2 else 0.0,
            chunk=args.chunk,
        )
        return Lease.issue("agent-1", "poi-lm", job)

    ratios, honest_cut = [], 0
    for i in range(args.trials):
        le = lease(i)
        claims = variants["fp32-2threads" if i % 2 else "fp32-speculative"].claims(le)
        found, streamed = replay(le, claims, model, choice)
        t0 = time.perf_counter()
        measure_generation(le, claims, model, tol.logit_tol)
        ratios.append(streamed / (time.perf_counter() - t0))
        honest_cut += found is not None
    latency = {}
    for attack in ATTACKS:
        rows = []
        for i in range(args.trials):
            le = lease(i)
            claims = variants[attack].claims(le)
            found, _ = replay(le, claims, model, choice)
            first = first_cheating_token(claims, le, model, tol, attack)
            rows.append(None if found is None else found.tokens_received - 1 - first)
        cut = [r for r in rows if r is not None]
        latency[attack] = {
            "trials": args.trials,
            "cut": len(cut),
            "median": statistics.median(cut) if cut else None,
            "max": max(cut) if cut else None,
            "per_trial": rows,
        }
        print(attack, latency[attack], flush=True)
    cost = {
        "median": round(statistics.median(ratios), 3),
        "max": round(max(ratios), 3),
        "trials": len(ratios),
    }
    by_block = {
        "streaming_appraisal_cost_ratio_by_block": {f"block {args.chunk}, {args.tokens} tokens": cost}
    }
    if (args.chunk, args.tokens) != (16, 64):  # the headline keys stay the default run's
        write_results("gateway.json", by_block, writes=WRITES, path=args.out, deep=BY_BLOCK)
        print(json.dumps(by_block))
        return
    out = {
        **by_block,
        **{
            "streaming_appraisal": {
                "what": "in-process streaming L4 (verifier/streaming.py): chunks of the answer fed on a KV "
                "cache as they arrive; poi-lm, same-class tolerance, chunk/feed block = " + str(args.chunk),
                "tokens": args.tokens,
                "honest_trials": args.trials,
                "honest_cut": honest_cut,
            },
            # the live figures through the gateway are bench/service/gateway.py's `detection_latency_tokens`
            "detection_latency_tokens_in_process": latency,
            "streaming_appraisal_cost_ratio": {
                "median": round(statistics.median(ratios), 3),
                "max": round(max(ratios), 3),
                "trials": len(ratios),
            },
        },
    }
    write_results("gateway.json", out, writes=WRITES, path=args.out, deep=BY_BLOCK)
    print(json.dumps({k: out[k] for k in ("streaming_appraisal", "streaming_appraisal_cost_ratio")}))


if __name__ == "__main__":
    main()
