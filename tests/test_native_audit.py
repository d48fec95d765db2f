"""Native audits of bf16 claims (issue 26 item 3): when a Maxwell node measured the prover on the
verifier's own class, a bf16 claim is re-executed in bf16 on that class (the native set, fitted by
bench/audit/native_bf16.py), and passes only if it matches that, or the fp32 reference near-exactly
(an answer served at fp32). Int8-rounded weights computed in bf16 hid inside the bf16-vs-fp32 set
(the H200 run caught them 1/2); here every audit path catches them on a measured class, while an
honest bf16 prover and one that serves at fp32 pass.

Since the decode replay (tests/test_decode_replay.py) the native set judges only what is judged
before a receipt declares how it was decoded: the gateway's streaming cut and the work probe; the
final verdict on every audit path is the replay's, tested there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from audit_paths import Case, swapped_once

from maxwell_poi.adversaries.precision_downgrade import int8_rounded
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.prover.sdk import Prover, with_dtype
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier.streaming import EitherStream, StreamingAudit
from maxwell_poi.verifier.thresholds import CROSS, NATIVE, SAME, Thresholds, choose_tolerance

MODEL, TOKENS = "poi-lm", 32  # the model the shipped native set was fitted on


def _lease() -> Lease:
    # greedy, so every run is the same trial: int8 passed the native set on 11 of 40 of the bench's
    # leases (bench/results/bf16_int8.json), on this one it fails
    job = GenerateJob(prompt="The history of the river", max_new_tokens=TOKENS, temperature=0.0, chunk=16)
    return Lease.issue("agent-1", MODEL, job, precision="bf16")


@pytest.fixture(scope="module")
def provers(registry: Registry) -> dict[str, Any]:
    return {
        "honest-bf16": Prover(AgentKey.generate(), registry),
        "served-at-fp32": swapped_once(registry, lambda m: m),
        "int8-weights-bf16": swapped_once(registry, lambda m: with_dtype(int8_rounded(m), torch.bfloat16)),
    }


def _case(prover: Any) -> Case:
    lease = _lease()
    return Case(lease, prover.run(lease), prover)


def test_the_rule_gives_bf16_claims_on_a_measured_class_the_native_set() -> None:
    t = Thresholds.load()
    assert "bf16" in t.native, "src/maxwell_poi/data/native_audit.json: expected a bf16 native set"
    here = this_device()
    c = choose_tolerance(t, "bf16", here, here, MODEL)
    assert c.tolerance_set == NATIVE and c.native == t.native["bf16"] and c.native_precision == "bf16"
    assert c.tolerance == t.for_precision("fp32", same_class=True)  # for an answer served at fp32
    assert c.provenance.get("fitted_on") and MODEL in c.provenance["models"], c.provenance
    assert choose_tolerance(t, "fp32", here, here, MODEL).tolerance_set == SAME
    assert choose_tolerance(t, "bf16", "", here, MODEL).tolerance_set == CROSS  # fail closed, as before
    assert choose_tolerance(t, "bf16", "cuda:NVIDIA H100", here, MODEL).tolerance_set == CROSS


def test_a_model_the_native_set_was_not_fitted_on_keeps_the_same_class_set() -> None:
    """Honest bf16 drifts from a bf16 prefill by a model's own amount: poi-lm's set rejected 49 of
    60 honest gpt2-small runs (bf16_int8.json native_audit_held_out_model), so it is not applied."""
    t = Thresholds.load()
    for other in ("gpt2-small", "gpt2-micro", ""):
        c = choose_tolerance(t, "bf16", this_device(), this_device(), other)
        assert c.tolerance_set == SAME and c.native is None, other


def test_without_a_native_set_bf16_keeps_the_same_class_set(tmp_path: Path) -> None:
    t = Thresholds.load(native_path=tmp_path / "absent.json")
    c = choose_tolerance(t, "bf16", this_device(), this_device(), MODEL)
    assert c.tolerance_set == SAME and c.native is None


def test_the_stream_releases_tokens_as_far_as_a_standing_track_checked(
    provers: dict[str, Any], registry: Registry
) -> None:
    """EitherStream cuts only when both tracks failed, and `checked` follows the track still standing."""
    case = _case(provers["served-at-fp32"])
    choice = choose_tolerance(Thresholds.load(), "bf16", this_device(), this_device(), MODEL)
    model = registry.load(MODEL)
    native = StreamingAudit(case.lease, with_dtype(model, torch.bfloat16), choice, 4, choice.native)
    stream = EitherStream(native, StreamingAudit(case.lease, model, choice, 4))
    answer = case.prover.claims(case.lease)  # what its receipt signed (the prover is deterministic)
    data, spans = answer.fingerprint_bytes(), stream.spans
    size = len(data) // len(spans)
    for i in range(len(spans)):
        stream.receive_chunk(i, data[i * size : (i + 1) * size])
    for token in answer.tokens():
        assert stream.receive(token) is None
    assert stream.tracks[0].finding is not None, "an fp32 answer should fail the native bf16 track"
    assert stream.checked == TOKENS, stream.checked
    assert stream.next_chunk == len(spans)
