"""The gateway's fixed cost (issue 25, item 3) and the gateway under concurrent streams (item 4), in
one run, with the official `openai` client against a real server on loopback and real resident
agents on poi-lm.

- `gateway_overhead_ratio`: median wall time of a completion through the gateway over the median time
  of the same agent program answering a lease handed to it directly by a node (no control plane:
  hand-over to receipt and evidence), same model, tokens and host, trials interleaved. Streamed
  (the time to the last chunk, which carries the verdict) with the default tiers at 32 and 128
  tokens — the issue's goals — and, beside them, non-streamed at 32 and streamed with every lease
  audited while it streams. `first_token_ratio`: the first chunk with text at the client over the
  first token the node read off the agent's sandbox, direct. `stages_ms`: the median of each
  completion's own `maxwell.timing_ms` (gateway.timeline) per mode, and `client`: the client's wall
  time less the gateway's `total` (HTTP, the request's parsing and auth before the gateway's clock
  starts, the response's writing).
- `gateway_load`: C threads (8 and 32) each streaming completions through one node and agent until
  4×C were answered: completions/s, p50/p99 at the client, refusals by status. Then exactly once: as
  many verdicts as completions answered, each completion charged once (the requester's wallet moved
  by the sum of the `charged_micro` the answers reported) and the ledger's own check.

    python -m bench.service.gateway_cost [--n 30]        # merges into bench/results/gateway.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bench.common.results import write_results
from maxwell_poi.demo.gateway import GatewayStack, ensure_profile, maxwell_of
from maxwell_poi.gateway.openai_wire import ChatRequest, CompletionRequest, job_of
from maxwell_poi.node.resident import ResidentAgent
from maxwell_poi.node.resident_runs import honest_resident, serve_wave
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.stream import TaggedChunk, TaggedToken
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.schema import CompletionRow, VerdictRow

ROOT = Path(__file__).resolve().parents[2]
WRITES = {"gateway.json": ["gateway_overhead_ratio", "gateway_load"]}  # bench/common/results.py
MODEL, TOKENS, LONG = "poi-lm", 32, 128
GOALS = {"streamed_32": 1.2, "streamed_128": 1.05}  # the issue's goals, default tiers
CONCURRENCY = (8, 32)
REQUESTER = "requester:alice-app"


def chat(i: int, tokens: int) -> ChatRequest:
    return ChatRequest(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], max_tokens=tokens
    )


def prompt_request(i: int, tokens: int) -> CompletionRequest:
    return CompletionRequest(model=MODEL, prompt=PROMPTS[i % len(PROMPTS)], max_tokens=tokens)


class Direct:
    """A resident honest agent handed leases by this process (a node with no control plane): the
    same job the gateway issues for the same request (gateway.job_of: prompt, sampling, chunks)."""

    def __init__(self, agent: ResidentAgent, registry: Registry) -> None:
        self.agent = agent
        self.registry = registry
        serve_wave(self.agent, [self._lease(prompt_request(0, 2))], registry)  # loads the model

    @staticmethod
    def _lease(request: ChatRequest | CompletionRequest) -> Lease:
        return Lease.issue("direct", MODEL, job_of(request, request.text()))

    def time(self, request: ChatRequest | CompletionRequest) -> tuple[float, float]:
        """(seconds to the receipt and evidence, seconds to the first token read off the sandbox)."""
        lease = self._lease(request)
        first: list[float] = []

        def watch(item: TaggedToken | TaggedChunk, _t: float, _cpu: float) -> None:
            if isinstance(item, TaggedToken) and not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        (run,) = serve_wave(self.agent, [lease], self.registry, watch=lambda _lease: watch)
        took = time.perf_counter() - t0
        if not run.receipt or not first:
            raise RuntimeError(f"the direct run failed: {run.evidence.stderr_tail[-300:]}")
        return took, first[0] - t0


def streamed(client: openai.OpenAI, request: ChatRequest) -> tuple[float, dict[str, Any]]:
    """Seconds to the last chunk of a streamed chat completion (which carries the verdict), and its
    `maxwell` object with `first_content_s`: seconds to the first chunk with text."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL, messages=request.model_dump()["messages"], max_tokens=request.max_tokens, stream=True
    )
    first, chunks = None, []
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        chunks.append(chunk)
    return time.perf_counter() - t0, {**maxwell_of(chunks[-1]), "first_content_s": first}


def whole(client: openai.OpenAI, request: CompletionRequest) -> tuple[float, dict[str, Any]]:
    t0 = time.perf_counter()
    r = client.completions.create(model=MODEL, prompt=request.prompt, max_tokens=request.max_tokens)
    return time.perf_counter() - t0, maxwell_of(r)


class Mode:
    """One way of asking the gateway, with its trials' wall times and stage timings."""

    def __init__(self, name: str, ask: Any, tokens: int, chat: bool = True) -> None:
        self.name, self.ask, self.tokens, self.chat = name, ask, tokens, chat
        self.times: list[float] = []
        self.first: list[float] = []  # seconds to the first chunk with text (streamed)
        self.stages: list[dict[str, float]] = []
        self.verdicts: Counter[str] = Counter()

    def request(self, i: int) -> ChatRequest | CompletionRequest:
        return chat(i, self.tokens) if self.chat else prompt_request(i, self.tokens)

    def run(self, client: openai.OpenAI, i: int) -> None:
        took, maxwell = self.ask(client, self.request(i))
        self.times.append(took)
        if maxwell.get("first_content_s") is not None:
            self.first.append(maxwell["first_content_s"])
        self.verdicts[str(maxwell.get("verdict"))] += 1
        timing = dict(maxwell.get("timing_ms") or {})
        if "total" in timing:
            timing["client"] = round(took * 1000 - timing["total"], 2)
        self.stages.append(timing)

    def stage_medians(self) -> dict[str, float]:
        names = dict.fromkeys(k for row in self.stages for k in row)
        return {k: round(statistics.median(r[k] for r in self.stages if k in r), 2) for k in names}


def overhead(gw: GatewayStack, direct: Direct, n: int) -> dict[str, Any]:
    """Each trial: the direct run of a mode's request, then the same request through the gateway."""
    client = gw.client()
    med = statistics.median
    base: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}
    modes = [
        Mode("streamed_32", streamed, TOKENS),
        Mode("whole_32", whole, TOKENS, chat=False),
        Mode("streamed_128", streamed, LONG),
    ]

    def trial(mode: Mode, i: int) -> None:
        took, to_first = direct.time(mode.request(i))
        base.setdefault(mode.name, []).append(took)
        first.setdefault(mode.name, []).append(to_first)
        mode.run(client, i)

    trials = {"streamed_32": n, "whole_32": n, "streamed_128": max(3, n // 3)}
    for i in range(n):  # interleaved: the same host conditions for each
        for mode in modes:
            if i < trials[mode.name]:
                trial(mode, i)
    default = _policy(gw)
    gw.admin.set_policy(**{**default, "medium_from_value": 0.0, "high_from_value": 0.0})
    audited = Mode("streamed_32_audited", streamed, TOKENS)
    for i in range(max(3, n // 2)):
        trial(audited, i)
    modes.append(audited)
    gw.admin.set_policy(**default)
    ratios = {m.name: round(med(m.times) / med(base[m.name]), 3) for m in modes}
    # time to first token: the first chunk with text at the client over the first token off the sandbox
    ttft = {m.name: round(med(m.first) / med(first[m.name]), 3) for m in modes if m.first}
    return {
        **ratios,
        "goals": {name: {"goal": goal, "met": ratios[name] <= goal} for name, goal in GOALS.items()},
        "median_s": {
            **{f"direct_{m.name}": round(med(base[m.name]), 4) for m in modes},
            **{m.name: round(med(m.times), 4) for m in modes},
        },
        "first_token_ratio": ttft,
        "first_token_median_s": {
            **{f"direct_{m.name}": round(med(first[m.name]), 4) for m in modes if m.first},
            **{m.name: round(med(m.first), 4) for m in modes if m.first},
        },
        "stages_ms": {m.name: m.stage_medians() for m in modes},
        "verdicts": {m.name: dict(m.verdicts) for m in modes},
        "n": {m.name: len(m.times) for m in modes},
        "model": MODEL,
        "host_cores": os.cpu_count(),
        "how": "openai client on loopback; the direct run is the same agent program handed the same job "
        "(gateway.job_of) by this process, hand-over to receipt and evidence; trials interleaved; "
        "default tiers unless named audited; CPU host: ratios only",
    }


def _policy(gw: GatewayStack) -> dict[str, Any]:
    return gw.admin.request("GET", "/v1/admin/policy", auth="admin")


def load(gw: GatewayStack, concurrency: int) -> dict[str, Any]:
    """`concurrency` threads streaming completions until 4×concurrency were asked; exactly-once after."""
    client = gw.client()
    total = 4 * concurrency
    wallet_before = gw.balances()[REQUESTER]
    with Session(gw.control.ledger.engine) as session:
        verdicts_before = session.scalar(select(func.count()).select_from(VerdictRow))
        rows_before = session.scalar(select(func.count()).select_from(CompletionRow))
    refused: Counter[str] = Counter()
    lock = threading.Lock()

    def one(i: int) -> tuple[float, dict[str, Any]] | None:
        try:
            return streamed(client, chat(i, TOKENS))
        except openai.APIStatusError as exc:
            code = (exc.body or {}).get("code") if isinstance(exc.body, dict) else None
            with lock:
                refused[f"{exc.status_code} {code or ''}".strip()] += 1
        except openai.APIError as exc:  # an error event in the stream (a cut, an unaffirmed answer)
            with lock:
                refused[f"stream: {(exc.body or {}).get('code', exc.message)}"] += 1
        return None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = [r for r in pool.map(one, range(total)) if r is not None]
    wall = time.perf_counter() - t0
    report = gw.admin.ledger()
    balances = report.balances
    with Session(gw.control.ledger.engine) as session:
        verdicts = session.scalar(select(func.count()).select_from(VerdictRow)) - verdicts_before
        completions = session.scalar(select(func.count()).select_from(CompletionRow)) - rows_before
    charged = sum(int(m.get("charged_micro") or 0) for _, m in rows)
    moved = wallet_before - balances[REQUESTER]
    latencies = sorted(t for t, _ in rows)
    return {
        "concurrency": concurrency,
        "asked": total,
        "answered": len(rows),
        "refused": dict(refused),
        "completions_per_s": round(len(rows) / wall, 2),
        "p50_s": round(_quantile(latencies, 0.5), 3),
        "p99_s": round(_quantile(latencies, 0.99), 3),
        "verdicts": dict(Counter(str(m.get("verdict")) for _, m in rows)),
        "exactly_once": {
            "completion_rows": completions,
            "verdict_rows": verdicts,
            "charged_reported_micro": charged,
            "requester_wallet_moved_micro": moved,
            "ledger_check_ok": report.check.ok,
            # every lease issued got one verdict; the requester paid what the answers said, once
            "ok": verdicts == completions and charged == moved and report.check.ok,
        },
    }


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=30, help="interleaved trials per mode at 32 tokens")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gateway.json")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")
        ensure_profile(MODEL, TOKENS)
        registry = Registry()
        with GatewayStack(Path(tmp) / "work", audit_all=False) as gw:
            gw.honest_agent("alice", MODEL, ask=10)
            for i in range(2):  # starts the agent (its warm-up lease)
                whole(gw.client(), prompt_request(i, TOKENS))
            with honest_resident(Path(tmp), 1) as agent:
                cost = overhead(gw, Direct(agent, registry), args.n)
            print({k: v for k, v in cost.items() if not isinstance(v, dict)}, flush=True)
            print(cost["stages_ms"], flush=True)
            under = [load(gw, c) for c in CONCURRENCY]
            for row in under:
                print(row, flush=True)
    write_results(
        "gateway.json",
        {"gateway_overhead_ratio": cost, "gateway_load": {f"streams_{r['concurrency']}": r for r in under}},
        writes=WRITES,
        path=args.out,
    )


if __name__ == "__main__":
    main()
