"""The gateway end to end (issue 11): overhead against driving the agent directly, detection latency
of a live cut per attack class, and how often an honest completion is cut — all in one run, with the
official `openai` client against a real server on loopback and real resident agents on poi-lm.

- (the gateway's overhead against driving the agent directly is bench/service/gateway_cost.py's)
- `detection_latency_tokens`: per attack class, tokens the node relayed after the first cheating
  token before Maxwell cut the lease (first cheating token: 0 for a model that is wrong from the
  start, the switch or tampered position otherwise); also the tokens the requester received.
- `honest_cut`: honest completions cut off, of how many (the false-cut rate with its 95 % bound).

    python -m bench.service.gateway [--trials 8] [--honest 30]     # merges into bench/results/gateway.json
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

from bench.common.results import write_results  # noqa: E402
from bench.common.stats import upper95
from maxwell_poi.demo.gateway import GatewayStack, ensure_profile, maxwell_of
from maxwell_poi.registry.prompts import PROMPTS

ROOT = Path(__file__).resolve().parents[2]
# one writer per key: the in-process streaming figures are bench/service/streaming.py's, audit throughput
# bench/service/audit_throughput.py's
# the gateway's fixed cost (gateway_overhead_ratio) is bench/service/gateway_cost.py's
WRITES = {"gateway.json": ["detection_latency_tokens", "honest_cut", "gateway_run"]}
MODEL, DRAFT = "poi-lm", "poi-lm-draft"
TOKENS = 32
LONG = 128  # the overhead is mostly per request: it shrinks as answers grow
# attack class: (adversary module, its arguments, first cheating token)
ATTACKS: dict[str, tuple[str, list[str], int]] = {
    "cheap-draft": ("cheap_draft", ["--draft", DRAFT], 0),
    "substituted-model": ("substitute_model", ["--substitute", DRAFT], 0),
    "substituted-weights-same-pace": ("substitute_model", ["--substitute", "poi-lm-init"], 0),
    "output-tampering": ("output_tampering", ["--positions", "middle", "--stream-forged"], TOKENS // 2),
    "mid-stream-switch": ("mid_switch", ["--draft", DRAFT], TOKENS // 2),
}


def gateway_times(gw: GatewayStack, n: int, tokens: int = TOKENS) -> tuple[list[float], list[dict[str, Any]]]:
    client, times, answers = gw.client(), [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = client.completions.create(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens)
        times.append(time.perf_counter() - t0)
        answers.append(maxwell_of(r))
    return times, answers


def attack_trials(gw: GatewayStack, name: str, trials: int) -> dict[str, Any]:
    module, args, first_bad = ATTACKS[name]
    rows = []
    for i in range(trials):
        gw.cheater(f"{name}-{i}", module, args, MODEL, ask=1)  # the lowest ask: it wins the request
        received, error = 0, None
        try:
            stream = gw.client().chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                max_tokens=TOKENS,
                stream=True,
            )
            for chunk in stream:
                received += 1 if chunk.choices and chunk.choices[0].delta.content else 0
        except Exception as exc:  # the cut arrives as openai.APIError; anything else is recorded too
            error = getattr(exc, "body", None) or {"message": str(exc)}
        maxwell = (error or {}).get("maxwell", {})
        cut_after = maxwell.get("cut_after_tokens")
        rows.append(
            {
                "cut": cut_after is not None,
                "verdict": maxwell.get("verdict"),
                "caught_at_intake": cut_after is None and maxwell.get("verdict") == "contraindicated",
                "cut_after_tokens": cut_after,
                "latency_tokens": None if cut_after is None else max(0, cut_after - first_bad),
                "tokens_to_requester": received,
                "message": (error or {}).get("message", "")[:200],
            }
        )
        print(f"  {name} {i + 1}/{trials}: {rows[-1]['message'][:110]}", flush=True)
    latencies = [r["latency_tokens"] for r in rows if r["latency_tokens"] is not None]
    return {
        "trials": trials,
        "cut_mid_stream": sum(r["cut"] for r in rows),
        "caught_at_intake": sum(r["caught_at_intake"] for r in rows),
        "first_cheating_token": first_bad,
        "median": statistics.median(latencies) if latencies else None,
        "max": max(latencies) if latencies else None,
        "per_trial": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="cut trials per attack class")
    p.add_argument("--honest", type=int, default=30, help="honest completions per tier setting")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")
        ensure_profile(MODEL, TOKENS)
        with GatewayStack(Path(tmp) / "work") as gw:
            gw.honest_agent("alice", MODEL, ask=10)
            gateway_times(gw, 2)  # starts the agent (its warm-up lease) and loads the audit model
            _, answers = gateway_times(gw, args.honest)
            _, more = gateway_times(gw, args.honest // 3, LONG)
            answers += more
            gw.admin.set_policy(
                **{
                    **gw.admin.request("GET", "/v1/admin/policy", auth="admin"),
                    "medium_from_value": 1e6,
                    "high_from_value": 1e9,
                }
            )
            _, more = gateway_times(gw, args.honest)
            answers += more
            honest_cut = sum(a.get("verdict") != "affirming" for a in answers)
            gw.admin.set_policy(
                **{
                    **gw.admin.request("GET", "/v1/admin/policy", auth="admin"),
                    "medium_from_value": 0.0,
                    "high_from_value": 0.0,
                }
            )
            latency = {name: attack_trials(gw, name, args.trials) for name in ATTACKS}
    result = {
        "detection_latency_tokens": latency,
        "honest_cut": {
            "cut_or_not_affirmed": honest_cut,
            "of": len(answers),
            "upper95": round(upper95(honest_cut, len(answers)), 4),
        },
        "gateway_run": {"host_cores": os.cpu_count(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
    }
    write_results("gateway.json", result, writes=WRITES, path=args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "detection_latency_tokens"}, indent=1))
    for name, row in latency.items():
        print(name, {k: row[k] for k in ("trials", "cut_mid_stream", "caught_at_intake", "median", "max")})


if __name__ == "__main__":
    main()
