"""The batched prover: several leases in one left-padded forward pass, each with its own receipt,
fingerprints and token stream, every receipt affirmed by the full verifier's L4 audit."""

from __future__ import annotations

import io
import math
import threading

import pytest

from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease
from maxwell_poi.protocol.receipt import ReceiptClaims, open_receipt
from maxwell_poi.protocol.result import Status, Verdict
from maxwell_poi.protocol.stream import TaggedChunk, TaggedToken, parse_resident_line
from maxwell_poi.prover.batched import BatchedProver
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.prover.stream import streaming_leases_to
from maxwell_poi.registry.forward import generate_batch
from maxwell_poi.registry.sampling import SeededSampler

PROMPTS = [
    "The history of the steam engine begins with",
    "Heat",
    "A much longer prompt about thermodynamics, engines, heat and the work a machine does",
]


def gen_lease(model: str, prompt: str, max_new_tokens: int, **job: object) -> Lease:
    job.setdefault("chunk", 4)  # small chunks: several full ones and a partial one per lease
    return Lease.issue("agent-1", model, GenerateJob(prompt=prompt, max_new_tokens=max_new_tokens, **job))


@pytest.fixture(scope="module")
def batched(agent_key, registry) -> BatchedProver:
    return BatchedProver(agent_key, registry)


def claims_of(raw: bytes) -> ReceiptClaims:
    return open_receipt(raw, 1 << 20).claims


def audited(verifier, lease: Lease, raw: bytes) -> None:
    result = verifier.appraise(lease, raw)
    assert result.verdict is Verdict.AFFIRMING, result.reason
    statuses = {r.layer: r.status for r in result.layers}
    assert statuses["L0-integrity"] is Status.PASS
    assert statuses["L4-audit"] is Status.PASS  # re-executed alone, not skipped


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_batch_of_one_is_byte_identical_to_the_one_lease_prover(registry, agent_key, batched, temperature):
    lease = gen_lease("gpt2-micro", PROMPTS[0], 11, temperature=temperature)
    alone = Prover(agent_key, registry).claims(lease)
    (claims,) = batched.claims_many([lease])
    assert claims.tokens() == alone.tokens()
    assert claims.fingerprint_bytes() == alone.fingerprint_bytes()
    assert claims.layers == alone.layers
    assert claims.runtime["batch"] == 1


def test_three_leases_in_one_batch_are_each_affirmed_and_streamed(batched, verifier):
    lengths = [13, 1, 6]
    leases = [
        gen_lease("gpt2-micro", PROMPTS[0], lengths[0]),
        gen_lease("gpt2-micro", PROMPTS[1], lengths[1], temperature=0.0),
        gen_lease("gpt2-micro", PROMPTS[2], lengths[2], top_k=0, chunk=2),
    ]
    out = io.BytesIO()
    with streaming_leases_to(out, threading.Lock()):
        receipts = batched.run_many(leases)
    parsed = [parse_resident_line(line) for line in out.getvalue().splitlines()]
    lines = [t for t in parsed if isinstance(t, TaggedToken)]
    streamed_chunks = [c for c in parsed if isinstance(c, TaggedChunk)]
    assert len(lines) + len(streamed_chunks) == len(parsed)  # tokens and fingerprint chunks only
    for lease, raw, n in zip(leases, receipts, lengths, strict=True):
        claims = claims_of(raw)
        assert claims.lease == lease.lease_id  # receipts come back in the leases' order
        assert len(claims.tokens()) == n
        assert claims.runtime["batch"] == 3
        chunks = 1 + math.ceil((n - 1) / lease.job.chunk)
        assert len(claims.fingerprint_bytes()) == chunks * (2 + 2 * lease.job.fingerprint_k)
        mine = [t for t in lines if t.lease_id == lease.lease_id]
        assert [t.position for t in mine] == list(range(n))
        assert [t.token for t in mine] == claims.tokens()
        # each fingerprint chunk streamed as it was committed: in order, exactly the receipt's
        its_chunks = [c for c in streamed_chunks if c.lease_id == lease.lease_id]
        assert [c.index for c in its_chunks] == list(range(chunks))
        assert b"".join(c.data for c in its_chunks) == claims.fingerprint_bytes()
        audited(verifier, lease, raw)
    # at each step the rows still generating stream in row order
    order = {lease.lease_id: i for i, lease in enumerate(leases)}
    steps = [(t.position, order[t.lease_id]) for t in lines]
    assert steps == sorted(steps)


def test_llama_rows_of_different_lengths_are_affirmed(batched, verifier):
    """Left padding and a mask on a rotary-position model: each row audits alone as PASS."""
    leases = [gen_lease("llama-small", PROMPTS[2], 6), gen_lease("llama-small", PROMPTS[1], 3)]
    for lease, raw in zip(leases, batched.run_many(leases), strict=True):
        assert claims_of(raw).runtime["batch"] == 2
        audited(verifier, lease, raw)


def test_mixed_leases_are_grouped_and_answered_in_order(batched, verifier):
    leases = [
        gen_lease("gpt2-micro", PROMPTS[1], 3),
        Lease.issue("agent-1", "minilm-l6-v2", EmbedJob(texts=["one text", "and another"])),
        gen_lease("gpt2-micro", PROMPTS[0], 5, temperature=0.0),
        gen_lease("llama-small", "x", 2),
    ]
    receipts = batched.run_many(leases)
    batches = [claims_of(raw).runtime["batch"] for raw in receipts]
    assert batches == [2, 1, 2, 1]
    for lease, raw in zip(leases, receipts, strict=True):
        assert claims_of(raw).lease == lease.lease_id
        audited(verifier, lease, raw)


def test_generate_batch_rejects_mismatched_rows(registry):
    model = registry.load("gpt2-micro")
    sampler = SeededSampler(b"\0" * 32, 0.0)
    with pytest.raises(ValueError, match="one length and one sampler"):
        generate_batch(model, [[101, 7]], [2, 3], [sampler])
    with pytest.raises(ValueError, match="at least one new token"):
        generate_batch(model, [[101, 7]], [0], [sampler])
