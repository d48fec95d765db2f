"""Verified before delivered (issue 24, item 5): how many tokens reach a requester before the
streaming audit verified them, under the gateway's two delivery modes, and what waiting costs.

One run, one GatewayStack (real server on loopback, a node long-polling it, resident agents on
poi-lm, every lease audited while it streams), the official `openai` client streaming chats:

- honest completions, `immediate` and `verified` delivery interleaved: the `maxwell` object's
  `unverified_tokens` and `delivered_tokens` per completion, the verdict, and the client's time to
  the first content chunk and to the end of the stream;
- cut completions: cheaters (a mid-stream switch to a small model at the middle, and a token forged
  at the middle and streamed), a fresh one per trial with the lowest ask so it wins the request,
  under both modes: the cut's `unverified_tokens`, `delivered_tokens`, and the tokens delivered at
  or past the first cheating position;
- `latency_verified_over_immediate`: median time to first token and median total time of verified
  over immediate delivery, honest completions of the same run.

    python -m bench.service.gateway_delivery [--honest 12] [--cut 4]   # merges into integrity.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common.results import write_results
from maxwell_poi.demo.gateway import GatewayStack, ensure_profile, maxwell_of
from maxwell_poi.gateway.gateway import AUDIT_BLOCK
from maxwell_poi.registry.prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[2]
WRITES = {"integrity.json": ["unverified_tokens_delivered"]}  # bench/common/results.py
MODEL, DRAFT, TOKENS = "poi-lm", "poi-lm-draft", 32
MODES = ("immediate", "verified")
# attack: (adversary module, its arguments, first cheating position)
ATTACKS: dict[str, tuple[str, list[str], int]] = {
    "mid-stream-switch": ("mid_switch", ["--draft", DRAFT], TOKENS // 2),
    "output-tampering": ("output_tampering", ["--positions", "middle", "--stream-forged"], TOKENS // 2),
}


def stream_once(gw: GatewayStack, mode: str, prompt: str) -> dict[str, Any]:
    """One streamed chat: client-side times, the maxwell object (from the last chunk or the cut)."""
    t0 = time.perf_counter()
    first, maxwell, error = None, {}, ""
    try:
        stream = gw.client().chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=TOKENS,
            stream=True,
            extra_body={"delivery": mode},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t0
            maxwell = maxwell_of(chunk) or maxwell
    except Exception as exc:  # the cut arrives as openai.APIError with the maxwell object attached
        body = getattr(exc, "body", None) or {}
        maxwell, error = body.get("maxwell", {}), str(exc)[:200]
    return {
        "mode": mode,
        "ttft_s": first,
        "total_s": time.perf_counter() - t0,
        "verdict": maxwell.get("verdict"),
        "delivery": maxwell.get("delivery"),
        "delivered_tokens": maxwell.get("delivered_tokens"),
        "unverified_tokens": maxwell.get("unverified_tokens"),
        "cut_after_tokens": maxwell.get("cut_after_tokens"),
        "error": error,
    }


def counts(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """mean / max with the count of completions it is over (rows lacking the figure are counted apart)."""
    values = [r[key] for r in rows if isinstance(r.get(key), int)]
    return {
        "mean": round(statistics.fmean(values), 3) if values else None,
        "max": max(values) if values else None,
        "n": len(values),
        "missing": len(rows) - len(values),
    }


def honest_block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "completions": len(rows),
        "affirmed": sum(r["verdict"] == "affirming" for r in rows),
        "completed": sum(r["delivered_tokens"] == TOKENS for r in rows),
        "unverified_tokens": counts(rows, "unverified_tokens"),
        "delivered_tokens": counts(rows, "delivered_tokens"),
        "delivery_reported": sorted({str(r["delivery"]) for r in rows}),
    }


def cut_block(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "completions": len(rows),
        "cut": sum(r["cut_after_tokens"] is not None for r in rows),
        "unverified_tokens": counts(rows, "unverified_tokens"),
        "delivered_tokens": counts(rows, "delivered_tokens"),
        "delivered_at_or_past_first_cheating_token": counts(rows, "past_first_bad"),
        "by_attack": {
            name: {
                "cut": sum(r["cut_after_tokens"] is not None for r in rows if r["attack"] == name),
                "of": sum(r["attack"] == name for r in rows),
                "unverified_max": max(
                    (r["unverified_tokens"] or 0 for r in rows if r["attack"] == name), default=None
                ),
            }
            for name in ATTACKS
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--honest", type=int, default=12, help="honest completions per mode")
    p.add_argument("--cut", type=int, default=4, help="cheater trials per attack and mode")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "integrity.json")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    honest: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    cut: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")
        ensure_profile(MODEL, TOKENS)
        with GatewayStack(Path(tmp) / "work") as gw:  # every lease high tier: audited while it streams
            gw.honest_agent("alice", MODEL, ask=10)
            for mode in MODES:  # starts the agent and loads the audit model: not timed
                stream_once(gw, mode, PROMPTS[0])
            for i in range(args.honest):
                for mode in MODES if i % 2 == 0 else MODES[::-1]:  # interleaved, order alternating
                    honest[mode].append(stream_once(gw, mode, PROMPTS[i % len(PROMPTS)]))
                print(f"honest {i + 1}/{args.honest}", {m: honest[m][-1]["unverified_tokens"] for m in MODES})
            for name, (module, argv, first_bad) in ATTACKS.items():
                for i in range(args.cut):
                    for mode in MODES:
                        gw.cheater(f"{name}-{mode}-{i}", module, argv, MODEL, ask=1)  # the lowest ask wins
                        row = stream_once(gw, mode, PROMPTS[i % len(PROMPTS)])
                        row["attack"] = name
                        delivered = row["delivered_tokens"]
                        row["past_first_bad"] = None if delivered is None else max(0, delivered - first_bad)
                        cut[mode].append(row)
                        print(f"  {name} {mode} {i + 1}/{args.cut}: {row['error'][:100]}", flush=True)
    med = statistics.median

    def median_of(mode: str, key: str) -> float:
        return med(r[key] for r in honest[mode] if r[key] is not None)

    latency = {
        "ttft_ratio": round(median_of("verified", "ttft_s") / median_of("immediate", "ttft_s"), 3),
        "total_ratio": round(median_of("verified", "total_s") / median_of("immediate", "total_s"), 3),
        "median_s": {m: {k: round(median_of(m, k), 4) for k in ("ttft_s", "total_s")} for m in MODES},
        "n": {m: len(honest[m]) for m in MODES},
    }
    result = {
        "unverified_tokens_delivered": {
            "honest": {m: honest_block(honest[m]) for m in MODES},
            "cut": {m: cut_block(cut[m]) for m in MODES},
            "latency_verified_over_immediate": latency,
            "model": MODEL,
            "tokens": TOKENS,
            "audit_block": AUDIT_BLOCK,
            "how": "openai client, streamed chats through the gateway (every lease audited while it "
            "streams); extra_body delivery per request, modes interleaved in one run; unverified and "
            "delivered tokens as the completion's maxwell object reports them; times on the client; "
            "CPU host: ratios only",
            "host_cores": os.cpu_count(),
            "per_completion": {
                "honest": honest,
                "cut": cut,
            },
        }
    }
    write_results("integrity.json", result, writes=WRITES, path=args.out)
    print(
        json.dumps(
            {k: v for k, v in result["unverified_tokens_delivered"].items() if k != "per_completion"},
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
