"""The economic adversaries really do their cheat, as Maxwell's sandbox sees it: probabilistic
substitution serves the seeded fraction of its leases with the cheap model (tokens unlike the
leased model's greedy answer, less sandbox CPU per token), the audit-aware agent does the same
only where its observables look safe (never on its first lease, a gateway-shaped lease, or after
an L3 challenge), and hidden batch rows answer with the honest tokens while the sandbox burns more
CPU per streamed token than an honest agent (private rows nobody streamed)."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

import pytest

from maxwell_poi.node.channel import AgentRun
from maxwell_poi.node.resident_runs import (
    honest_resident,
    serve_wave,
    start_resident,
    window_cpu_per_token,
)
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.prompts import PROMPTS

MODEL, SUBSTITUTE = "gpt2-mini", "gpt2-micro"  # the leased model, and the cheap one run instead
TOKENS = 12
LEASES = 16


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see test_service_flow: idle OpenMP threads inflate CPU-s


def adversary(name: str, key: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"maxwell_poi.adversaries.{name}", "--key", str(key), "--resident", *extra]


def greedy_leases(count: int, start: int = 0, chunk: int = 32) -> list[Lease]:
    return [
        Lease.issue(
            "cheat",
            MODEL,
            GenerateJob(
                prompt=PROMPTS[(start + i) % len(PROMPTS)],
                max_new_tokens=TOKENS,
                temperature=0.0,
                chunk=chunk,
            ),
        )
        for i in range(count)
    ]


def tokens_of(run: AgentRun) -> list[int]:
    assert run.receipt and not run.timed_out, run.evidence.stderr_tail[-1000:]
    claims = open_receipt(run.receipt, 1 << 22).claims
    assert claims.model == MODEL  # every receipt claims the leased model
    assert list(run.evidence.stream_tokens) == claims.tokens()  # streamed what it signed
    return claims.tokens()


@pytest.fixture(scope="module")
def honest_greedy(registry) -> dict[str, list[int]]:
    """What the leased model answers: the honest prover, in this process, per prompt (greedy)."""
    prover = Prover(AgentKey.generate(), registry)
    return {
        lease.job.prompt: open_receipt(prover.run(lease), 1 << 22).claims.tokens()  # type: ignore[union-attr]
        for lease in greedy_leases(len(PROMPTS))
    }


def substituted(leases: list[Lease], runs: list[AgentRun], honest: dict[str, list[int]]) -> list[bool]:
    return [tokens_of(run) != honest[lease.job.prompt] for lease, run in zip(leases, runs, strict=True)]  # type: ignore[union-attr]


def serve_one_by_one(agent, leases: list[Lease], registry) -> list[AgentRun]:
    return [serve_wave(agent, [lease], registry)[0] for lease in leases]


def test_probabilistic_substitution_serves_the_seeded_fraction_with_the_cheap_model(
    tmp_path, registry, honest_greedy
):
    AgentKey.ensure(tmp_path / "cheat.pem")
    p, seed = 0.5, 3
    warm, *leases = greedy_leases(LEASES + 1)
    argv = adversary(
        "probabilistic_substitution", tmp_path / "cheat.pem", "--p", str(p), "--substitute", SUBSTITUTE
    )
    with start_resident([*argv, "--seed", str(seed)], "prob-sub") as agent:
        serve_wave(agent, [warm], registry)  # loads the models; one draw of the coin
        runs = serve_one_by_one(agent, leases, registry)
    got = substituted(leases, runs, honest_greedy)
    coin = random.Random(seed)
    coin.random()  # the warm-up lease's draw
    assert got == [coin.random() < p for _ in leases]  # exactly the seeded leases, and only them
    assert 0.2 <= sum(got) / len(got) <= 0.8, got  # near p = 0.5 (16 draws)
    cheap = [window_cpu_per_token(r) for r, s in zip(runs, got, strict=True) if s]
    full = [window_cpu_per_token(r) for r, s in zip(runs, got, strict=True) if not s]
    assert statistics.median(cheap) < 0.6 * statistics.median(full), (cheap, full)  # Maxwell saw less work


def test_audit_aware_cheats_only_where_its_observables_look_safe(tmp_path, registry, honest_greedy):
    AgentKey.ensure(tmp_path / "cheat.pem")
    rate, seed = 0.6, 5
    first, *plain = greedy_leases(9)
    gateway_shaped = greedy_leases(3, start=9, chunk=16)
    after_l3 = greedy_leases(4, start=12)
    argv = adversary("audit_aware", tmp_path / "cheat.pem", "--substitute", SUBSTITUTE, "--rate", str(rate))
    with start_resident([*argv, "--seed", str(seed)], "audit-aware") as agent:
        runs = serve_one_by_one(agent, [first, *plain, *gateway_shaped], registry)
        refused = agent.open(plain[0].lease_id, [(0, "attn")], timeout_s=30)  # an L3 challenge
        runs += serve_one_by_one(agent, after_l3, registry)
    assert isinstance(refused, str) and "keeps no trace" in refused, refused
    got = substituted([first, *plain, *gateway_shaped, *after_l3], runs, honest_greedy)
    coin = random.Random(seed)  # drawn only for the plain leases after the first
    expected = (
        [False] + [coin.random() < rate for _ in plain] + [False] * (len(gateway_shaped) + len(after_l3))
    )
    assert got == expected
    assert any(got), "the coin never came up: nothing was tested"


def test_hidden_rows_answer_honestly_and_burn_more_sandbox_cpu_per_streamed_token(tmp_path, registry):
    AgentKey.ensure(tmp_path / "cheat.pem")
    warm, *leases = [
        Lease.issue("cheat", MODEL, GenerateJob(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=TOKENS))
        for i in range(7)
    ]  # sampled, seeded by each lease's nonce: the same lease gives the same honest answer
    with start_resident(
        adversary("hidden_batch_rows", tmp_path / "cheat.pem", "--rows", "4"), "hidden"
    ) as agent:
        serve_wave(agent, [warm], registry)
        hidden = serve_one_by_one(agent, leases, registry)
    with honest_resident(tmp_path, 1) as honest:
        serve_wave(honest, [warm], registry)
        plain = serve_one_by_one(honest, leases, registry)
    for h, p in zip(hidden, plain, strict=True):
        assert tokens_of(h) == tokens_of(p)  # the lease's answer is the honest one
        assert h.evidence.co_leases == 0 and h.evidence.co_tokens == 0  # nothing else streamed
        assert open_receipt(h.receipt, 1 << 22).claims.runtime["batch"] == 1  # the claim hides the rows
    ratio = statistics.median(map(window_cpu_per_token, hidden)) / statistics.median(
        map(window_cpu_per_token, plain)
    )
    assert ratio > 1.3, ratio  # 4 private rows beside each lease: Maxwell measured the extra work
