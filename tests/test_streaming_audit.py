"""Streaming appraisal (issue 11, in process): an honest answer replayed token by token passes;
a cheap-draft answer and one with a changed token are cut within one feed block of the first bad
token; a substituted model is cut at its first fingerprint chunk."""

from __future__ import annotations

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.cheap_draft import DraftProver
from maxwell_poi.adversaries.output_tampering import TamperingProver
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.verifier.audit import _split
from maxwell_poi.verifier.streaming import StreamingAudit
from maxwell_poi.verifier.thresholds import Thresholds, choose_tolerance

TOKENS, CHUNK = 40, 8


def replay(lease, claims, model):
    # the cross-class set, as for a prover no node measured (the rule's fail-closed case)
    choice = choose_tolerance(Thresholds.load(), "fp32", None, this_device())
    assert choice.tolerance_set == "cross-class" and not choice.prover_measured
    audit = StreamingAudit(lease, model, choice)
    tokens, p = claims.tokens(), len(audit.prompt)
    chunks = _split(claims.fingerprint_bytes(), len(audit.spans))
    for i, token in enumerate(tokens):
        found = audit.receive(token)
        for k, (_s, e) in enumerate(audit.spans):
            if min(max(e - p, 0), len(tokens) - 1) == i:
                found = found or audit.receive_chunk(k, chunks[k])
        if found:
            return found
    return None


def lease_for(i: int) -> Lease:
    job = GenerateJob(
        prompt="Return the number of items", max_new_tokens=TOKENS, temperature=0.8, chunk=CHUNK
    )
    return Lease.issue("agent-1", "gpt2-mini", job)


def test_honest_stream_passes_and_cheats_are_cut_early(registry, agent_key):
    model = registry.load("gpt2-mini")
    honest = Prover(agent_key, registry)
    for i in range(2):
        lease = lease_for(i)
        assert replay(lease, honest.claims(lease), model) is None

    lease = lease_for(2)
    draft = DraftProver(agent_key, "gpt2-micro", registry=registry).claims(lease)
    cut = replay(lease, draft, model)
    assert cut is not None and "token choice" in cut.reason
    assert cut.tokens_received - 1 - cut.first_bad_token < CHUNK + 1  # within one feed block

    lease = lease_for(3)
    tampered = open_receipt(TamperingProver(agent_key, "20", registry=registry).run(lease), 1 << 24).claims
    cut = replay(lease, tampered, model)
    assert cut is not None and cut.first_bad_token == 20 and cut.tokens_received <= 20 + CHUNK + 1

    lease = lease_for(4)
    other = SwappedProver(agent_key, lambda _l, reg: reg.load("gpt2-micro"), registry=registry).claims(lease)
    cut = replay(lease, other, model)
    assert cut is not None and cut.tokens_received <= CHUNK + 1


def test_a_fingerprint_chunk_that_cannot_be_read_back_cuts_the_stream_not_the_server(registry, agent_key):
    """Fuzzing found a zeroed chunk (modulus 0) raising out of the audit as a 500; it is a cut."""
    model = registry.load("gpt2-mini")
    lease = lease_for(5)
    claims = Prover(agent_key, registry).claims(lease)
    choice = choose_tolerance(Thresholds.load(), "fp32", None, this_device())
    audit = StreamingAudit(lease, model, choice)
    for token in claims.tokens():
        assert audit.receive(token) is None
    zeroed = bytes(len(_split(claims.fingerprint_bytes(), len(audit.spans))[0]))
    cut = audit.receive_chunk(0, zeroed)
    assert cut is not None and "unreadable" in cut.reason, cut


def test_evidence_whose_cpu_readings_do_not_pair_with_its_arrivals_has_no_decode_window():
    """Fuzzing found signed evidence with fewer CPU readings than arrivals raising IndexError (a
    500); there is no window to measure, so L1 fails the lease (thermodynamic.decide_on)."""
    from maxwell_poi.observer.evidence import LeaseEvidence

    ev = LeaseEvidence(
        started_at=0.0, finished_at=1.0, wall_s=1.0, cpu_s=0.5, max_rss_kb=1, bytes_in=1, bytes_out=1,
        sha256_in="0" * 64, sha256_out="1" * 64, exit_code=0, stream_tokens=(1, 2, 3),
        stream_t=(0.1, 0.2, 0.3), stream_cpu_s=(),
    )  # fmt: skip
    assert ev.decode_window is None
