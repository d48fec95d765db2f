"""Disputes by bisection over a committed activation trace (verifier.dispute), on real GPT-2 models
(gpt2-mini, 4 blocks): an honest trace wins, a trace with one wrong block loses with that block and
operation named after log2(blocks + 1) openings, and an agent that does not open, or opens
something else, loses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt
from maxwell_poi.protocol.trace import Opening, Trace
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier.dispute import bisect, recompute_block, reference_inputs

MODEL = "gpt2-mini"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


def serve(registry: Registry, tmp, change=None):
    """(lease, receipt claims, the agent's trace, its tokens) from an agent whose model copy is
    changed by `change` (None: honest)."""
    prover = Prover(AgentKey.generate(), registry, trace_dir=tmp)
    if change:
        model = registry.load(MODEL).copied_to(torch.float32)
        change(model)
        prover._converted[(MODEL, "fp32")] = model
    lease = Lease.issue("alice", MODEL, GenerateJob(prompt="The old mill by the river", max_new_tokens=10))
    raw = prover.run(lease)
    claims = open_receipt(raw, max_receipt_bytes(lease, registry.reference(MODEL).hidden)).claims
    return lease, claims, Trace.load(tmp / f"{lease.lease_id}.npz"), claims.tokens()


def opener(trace: Trace, nonce: bytes, asked: list | None = None, forge: bool = False):
    def open_tensors(keys):
        if asked is not None:
            asked.append(keys)
        tensors = {k: trace.tensors[k] * (1.001 if forge else 1.0) for k in keys}
        return Opening(tensors, trace.leaves(nonce))

    return open_tensors


def dispute(registry, lease, claims, trace, tokens, open_tensors):
    model = registry.load(MODEL)
    reference = reference_inputs(model, model.encode_prompt(lease.job.prompt), tokens)
    return bisect(model, reference, claims.trace, lease.nonce_bytes, open_tensors)


def test_an_honest_trace_wins_its_dispute(registry, tmp_path) -> None:
    lease, claims, trace, tokens = serve(registry, tmp_path)
    result = dispute(registry, lease, claims, trace, tokens, opener(trace, lease.nonce_bytes))
    assert result.agent_wins and result.block is None, result.reason


def test_maxwells_block_recomputation_matches_an_honest_commitment(registry, tmp_path) -> None:
    _lease, _claims, trace, _tokens = serve(registry, tmp_path)
    mine = recompute_block(registry.load(MODEL), 1, trace.tensors[(1, "x")])
    assert np.allclose(mine["fc"], trace.tensors[(1, "fc")], rtol=0, atol=1e-4)
    assert np.allclose(mine["out"], trace.tensors[(2, "x")], rtol=0, atol=1e-4)  # causal, as in serving


@pytest.mark.parametrize("bad", [0, 2, 3])
def test_one_wrong_block_is_found_by_bisection_and_named(registry, tmp_path, bad) -> None:
    def change(model) -> None:
        with torch.no_grad():
            w = model.layers[bad].mlp.c_proj.weight
            w.mul_(1 + 0.01 * torch.randn(w.shape, generator=torch.Generator().manual_seed(5)))

    lease, claims, trace, tokens = serve(registry, tmp_path, change)
    asked: list = []
    result = dispute(registry, lease, claims, trace, tokens, opener(trace, lease.nonce_bytes, asked))
    assert not result.agent_wins and (result.block, result.op) == (bad, "mlp"), result.reason
    assert len(result.probes) <= 2 + 2  # both ends, then log2(4) probes at most
    assert all(len(keys) == 1 for keys in asked[:-1]) and len(asked[-1]) == 6  # then one whole block


def test_an_agent_that_does_not_open_or_opens_another_tensor_loses(registry, tmp_path) -> None:
    lease, claims, trace, tokens = serve(registry, tmp_path)
    silent = dispute(registry, lease, claims, trace, tokens, lambda keys: None)
    assert not silent.agent_wins and "did not open" in silent.reason
    forged = dispute(registry, lease, claims, trace, tokens, opener(trace, lease.nonce_bytes, forge=True))
    assert not forged.agent_wins and "differs from the committed tensor" in forged.reason
