"""L3's exact integer mode on the REGISTERED W8A8 variant (gpt2-mini-w8a8, its own id and digest):
the honest prover keeps an integer trace, every block passes at zero tolerance; a changed int8 weight
is caught by L3 (naming block and operation) and by a dispute, which recomputes the culprit block's
int8 products in full; an honest integer trace wins its dispute."""

from __future__ import annotations

import pytest
import torch

from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt
from maxwell_poi.protocol.result import Status
from maxwell_poi.protocol.trace import INT_OPS, Opening, Trace
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.blocks import linears
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.w8a8 import is_w8a8
from maxwell_poi.verifier.dispute import bisect, reference_inputs
from maxwell_poi.verifier.exact import IntFreivaldsKey, appraise_opening, key_for, traced_ops

MODEL = "gpt2-mini-w8a8"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


def serve(registry: Registry, tmp, bad_block: int | None = None):
    prover = Prover(AgentKey.generate(), registry, trace_dir=tmp)
    if bad_block is not None:  # one int8 weight of one block changed: a patched block
        model = registry.load(MODEL).copied_to(torch.float32)
        with torch.no_grad():
            w = linears(model.layers[bad_block])["fc"].weight_q
            w[3, 5] = -w[3, 5] if w[3, 5] != 0 else 7
        prover._converted[(MODEL, "fp32")] = model
    # greedy, one fixed trial: at T 0.8 the nonce drew the answer, and once in a fresh-clone suite the
    # cheat won its dispute (not reproduced in 5 runs here)
    job = GenerateJob(prompt="The old mill by the river", max_new_tokens=10, temperature=0.0)
    lease = Lease.issue("carol", MODEL, job)
    claims = open_receipt(
        prover.run(lease), max_receipt_bytes(lease, registry.reference(MODEL).hidden)
    ).claims
    return lease, claims, Trace.load(tmp / f"{lease.lease_id}.npz")


def test_the_registered_variant_keeps_an_integer_trace_and_passes_l3_at_zero_tolerance(registry, tmp_path):
    model = registry.load(MODEL)
    assert is_w8a8(model) and traced_ops(model) == INT_OPS
    assert model.reference.weights_digest != registry.reference("gpt2-mini").weights_digest
    lease, claims, trace = serve(registry, tmp_path)
    assert trace.ops == INT_OPS and trace.tensors[(0, "qkv.acc")].dtype.str == "<i4"
    key = key_for(model)
    assert isinstance(key, IntFreivaldsKey) and key.soundness_error <= 2.0**-40
    blocks = list(range(len(model.layers)))
    result = appraise_opening(
        claims, lease.nonce_bytes, model, key, blocks, Opening.of(trace, lease.nonce_bytes, blocks)
    )
    assert result.status is Status.PASS, result.reason
    assert "checked exactly" in result.reason


def test_one_changed_int8_weight_is_caught_by_l3_in_its_block(registry, tmp_path):
    model = registry.load(MODEL)
    lease, claims, trace = serve(registry, tmp_path, bad_block=2)
    key = key_for(model)
    honest = appraise_opening(
        claims, lease.nonce_bytes, model, key, [1], Opening.of(trace, lease.nonce_bytes, [1])
    )
    assert honest.status is Status.PASS, honest.reason  # the other blocks are honest
    caught = appraise_opening(
        claims, lease.nonce_bytes, model, key, [2], Opening.of(trace, lease.nonce_bytes, [2])
    )
    assert caught.status is Status.FAIL
    assert caught.reason.startswith("block 2 fc") and "int32 accumulator" in caught.reason


def _dispute(registry, lease, claims, trace):
    model = registry.load(MODEL)
    reference = reference_inputs(model, model.encode_prompt(lease.job.prompt), claims.tokens())
    leaves = trace.leaves(lease.nonce_bytes)
    return bisect(
        model,
        reference,
        claims.trace,
        lease.nonce_bytes,
        lambda keys: Opening({k: trace.tensors[k] for k in keys}, leaves),
    )


def test_an_honest_integer_trace_wins_its_dispute(registry, tmp_path):
    lease, claims, trace = serve(registry, tmp_path)
    result = _dispute(registry, lease, claims, trace)
    assert result.agent_wins, result.reason


def test_a_dispute_recomputes_the_int8_products_of_the_culprit_block(registry, tmp_path):
    lease, claims, trace = serve(registry, tmp_path, bad_block=2)
    result = _dispute(registry, lease, claims, trace)
    assert not result.agent_wins
    assert (result.block, result.op) == (2, "fc"), result.reason
    assert "int32 accumulator" in result.reason
