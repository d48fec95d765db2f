"""The peer methods bench/peers/compare.py compares (bench/peers/checks.py), on gpt2-micro: each passes an
honest generation and catches another model's, at temperature 0 and 0.8.

Seeded random weights give near-uniform next-token distributions (every logprob near -log 30,522
= -10.3), which Targon's absolute limits (any logprob <= -13, five <= -8) reject even for honest
output. A trained LM's distributions are peaked; the models here get that by a scaled final norm
(`sharpened`), the claimed one and the cheater's alike.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bench.peers.checks import (
    DifrCheck,
    Generation,
    LogprobRankCheck,
    MaxwellL4Check,
    ProverView,
    ToplocCheck,
    load_toploc,
)
from maxwell_poi.adversaries._agent import SwappedProver  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.registry.forward import prefill  # noqa: E402
from maxwell_poi.registry.models import LoadedModel  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds  # noqa: E402

PROMPT = "The history of the steam engine begins with"
TOKENS = 40  # one prompt chunk and decode chunks of 32 and 7 positions


def sharpened(model: LoadedModel, scale: float = 60.0) -> LoadedModel:
    module = copy.deepcopy(model.module)
    sharp = model.with_module(module)
    with torch.no_grad():
        sharp.final_norm.weight.mul_(scale)
    return sharp


@pytest.fixture(scope="module")
def claimed(registry) -> LoadedModel:
    return sharpened(registry.load("gpt2-micro"))


@pytest.fixture(scope="module")
def other(registry) -> LoadedModel:
    return sharpened(registry.load("gpt2-mini"))  # another model with the same vocabulary


def answer(agent_key, registry, runs: LoadedModel, temperature: float) -> tuple[Generation, ProverView]:
    """A lease for gpt2-micro answered by running `runs`; the prover's evidence from `runs`."""
    lease = Lease.issue(
        "agent-1", "gpt2-micro", GenerateJob(prompt=PROMPT, max_new_tokens=TOKENS, temperature=temperature)
    )
    claims = SwappedProver(agent_key, lambda _lease, _reg: runs, registry=registry).claims(lease)
    gen = Generation(lease, runs.encode_prompt(PROMPT), claims.tokens())
    hidden, logits = prefill(runs, gen.prompt_ids, gen.tokens)
    return gen, ProverView(hidden=hidden, logits=logits, claims=claims)


def l4() -> MaxwellL4Check:
    return MaxwellL4Check(Thresholds.load().for_precision("fp32"))


def toploc_check():
    toploc, why = load_toploc()
    if toploc is None:
        pytest.skip(f"TOPLOC not installed (optional extra): {why}")
    return ToplocCheck(toploc)


CHECKS = {"difr": DifrCheck, "logprob_rank": LogprobRankCheck, "maxwell_l4": l4, "toploc": toploc_check}


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("method", sorted(CHECKS))
def test_passes_honest_and_catches_another_model(
    method, temperature, agent_key, registry, claimed, other
) -> None:
    check = CHECKS[method]()
    gen, view = answer(agent_key, registry, claimed, temperature)
    honest = check.verify(claimed, gen, check.prove(gen, view))
    assert not honest.caught, f"{method} rejected an honest generation: {honest.reason}"

    gen, view = answer(agent_key, registry, other, temperature)
    cheat = check.verify(claimed, gen, check.prove(gen, view))
    assert cheat.caught, f"{method} accepted another model's generation: {cheat.reason}"


def test_logprob_distance_rule_catches_misreported_logprobs(agent_key, registry, claimed) -> None:
    """Honest tokens, but the prover reports each as all but impossible (logprob -30): only the
    distance rule sees it (the sharpened model gives its own picks most of the probability)."""
    check = LogprobRankCheck()
    gen, view = answer(agent_key, registry, claimed, 0.8)
    honest = check.prove(gen, view)
    verdict = check.verify(claimed, gen, np.full_like(honest, -30.0))
    assert verdict.caught and verdict.rules["nineteen_distance"]
    assert not verdict.rules["nineteen_rank"] and not verdict.rules["targon_v5"]
    assert verdict.stats["mean_distance"] > LogprobRankCheck.NINETEEN_ZERO


def test_rank_limit_follows_nineteen() -> None:
    assert LogprobRankCheck.rank_limit(0.0) == pytest.approx(10 / 1.03)
    assert LogprobRankCheck.rank_limit(0.8) == pytest.approx(10 / 0.23)
    assert LogprobRankCheck.rank_limit(1.5) == float("inf")
