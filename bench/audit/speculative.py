"""Honest speculative decoding against plain decoding, and cheap-draft decoding, on the same leases.

For each block size: the same leases run by the plain prover and by the speculative prover
(draft proposes, claimed model verifies); wall-clock ratio (one run, this CPU: ratios only),
the draft's acceptance rate, how many speculative receipts L0 + L4 affirm, how many outputs are
token-for-token those of plain decoding; then cheap-draft decoding (the draft decides, the claimed
model only prefills) on as many leases, which must be contraindicated.

    python -m bench.audit.speculative                     # poi-lm with poi-lm-draft, writes speculative.json
    python -m bench.audit.speculative --trials 4 --out /tmp/spec.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results  # noqa: E402
from bench.common.variants import PROMPTS  # noqa: E402
from maxwell_poi.adversaries.cheap_draft import DraftProver  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey, Keyring  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.protocol.receipt import sign_receipt  # noqa: E402
from maxwell_poi.protocol.result import Verdict  # noqa: E402
from maxwell_poi.prover.sdk import Prover  # noqa: E402
from maxwell_poi.prover.speculative import SpeculativeProver  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.policy import Verifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "speculative.json": [
        "what",
        "machine",
        "model",
        "draft",
        "tokens",
        "trials_per_block",
        "blocks",
        "cheap_draft",
        "best_block",
    ]
}  # the keys of bench/results/speculative.json this script writes (bench/common/results.py)


def leases(model: str, n: int, tokens: int) -> list[Lease]:
    return [
        Lease.issue(
            "agent-1",
            model,
            GenerateJob(
                prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens, temperature=0.8 if i % 2 else 0.0
            ),
        )
        for i in range(n)
    ]


def timed_claims(prover: Prover, batch: list[Lease]) -> tuple[list, float]:
    t0 = time.perf_counter()
    claims = [prover.claims(lease) for lease in batch]
    return claims, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="poi-lm")
    ap.add_argument("--draft", default="poi-lm-draft")
    ap.add_argument("--trials", type=int, default=40, help="leases per block size")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--blocks", default="2,4,6")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/speculative.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    registry, key = Registry(), AgentKey.generate()
    verifier = Verifier.offline(registry, Keyring({"agent-1": key.public_hex}))  # receipts alone
    plain = Prover(key, registry)
    registry.load(args.model), registry.load(args.draft)
    plain.claims(leases(args.model, 1, 8)[0])  # warm-up: first-call allocations are not decoding

    def affirmed(batch: list[Lease], claims: list) -> int:
        return sum(
            verifier.appraise(lease, sign_receipt(c, key)).verdict is Verdict.AFFIRMING
            for lease, c in zip(batch, claims, strict=True)
        )

    result = {
        "what": "honest speculative decoding vs plain decoding, and cheap-draft decoding, same leases",
        "machine": f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}",
        "model": args.model,
        "draft": args.draft,
        "tokens": args.tokens,
        "trials_per_block": args.trials,
        "blocks": {},
    }
    for block in [int(b) for b in args.blocks.split(",")]:
        batch = leases(args.model, args.trials, args.tokens)
        spec = SpeculativeProver(key, args.draft, registry=registry, block=block)
        spec.claims(leases(args.model, 1, 8)[0])
        spec.stats.__init__()
        plain_claims, plain_s = timed_claims(plain, batch)
        spec_claims, spec_s = timed_claims(spec, batch)
        same = sum(a.tokens() == b.tokens() for a, b in zip(plain_claims, spec_claims, strict=True))
        row = {
            "speedup": round(plain_s / spec_s, 3),
            "plain_s": round(plain_s, 2),
            "speculative_s": round(spec_s, 2),
            "acceptance": round(spec.stats.acceptance, 4),
            "tokens_per_verification_pass": round(args.trials * args.tokens / spec.stats.rounds, 2),
            "affirmed": affirmed(batch, spec_claims),
            "identical_to_plain": same,
            "trials": args.trials,
        }
        result["blocks"][str(block)] = row
        print(f"block {block}: {json.dumps(row)}", flush=True)
    batch = leases(args.model, args.trials, args.tokens)
    cheat = [DraftProver(key, args.draft, registry=registry).claims(lease) for lease in batch]
    caught = args.trials - affirmed(batch, cheat)
    result["cheap_draft"] = {"trials": args.trials, "contraindicated": caught}
    best = max(result["blocks"].items(), key=lambda kv: kv[1]["speedup"])
    result["best_block"] = {"block": int(best[0]), **best[1]}
    print(f"cheap draft: {caught}/{args.trials} contraindicated", flush=True)
    write_results("speculative.json", result, writes=WRITES, path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
