"""Engine receipts without an engine (issue 27): receipt v4's shape rules, L0's per-kind size bound,
and L4's engine checks on receipts built from Maxwell's own reference numbers (an honest engine's
answer) and from changed ones (a cheat's). tests/test_engine_adapter.py runs the real engines."""

from __future__ import annotations

import json

import pytest
import torch

from maxwell_poi.protocol.engine import ENGINE_MAX_TOP, encode_engine_claim
from maxwell_poi.protocol.errors import ReceiptFormatError
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import (
    PREDICATE_V4,
    ReceiptClaims,
    max_receipt_bytes,
    open_receipt,
    sign_receipt,
    token_output,
)
from maxwell_poi.protocol.result import LayerName, Status
from maxwell_poi.registry.forward import generate, prefill
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.verifier.audit import AuditLayer
from maxwell_poi.verifier.integrity import IntegrityLayer
from maxwell_poi.verifier.policy import Verifier

MODEL, TOKENS = "poi-lm", 12


@pytest.fixture(scope="module")
def world():
    registry = Registry()
    key = AgentKey.generate()
    keyring = Keyring({"eng": key.public_hex})
    verifier = Verifier(
        IntegrityLayer(registry, keyring, remember_settled=False), drawn=[AuditLayer(registry)]
    )
    return registry, key, verifier


def _lease(temperature: float = 0.0, prompt: str = "Return the number of items in a container.") -> Lease:
    job = GenerateJob(prompt=prompt, max_new_tokens=TOKENS, temperature=temperature)
    return Lease.issue("eng", MODEL, job)


def engine_receipt(registry, key, lease, *, model=None, tokens=None, shift=0.0, top=5, finish="length", **kw):
    """What an honest engine returns (the reference model's own tokens and log-probs), optionally
    from another model, other tokens, or log-probs shifted by `shift`."""
    ref = registry.load(MODEL)
    model = model or ref
    job = lease.job
    prompt = ref.encode_prompt(job.prompt)
    if tokens is None:
        sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
        tokens = generate(model, prompt, job.max_new_tokens, sampler)
    _, logits = prefill(model, prompt, tokens)
    logp = torch.log_softmax(logits.double(), -1)
    best = torch.topk(logp, top, dim=-1)
    claim = encode_engine_claim(
        name="llama.cpp",
        version="test",
        decoding="greedy" if job.temperature == 0 else "sampled",
        finish=finish,
        width=2,
        seed=None if job.temperature == 0 else 7,
        chosen_lp=[float(logp[i, t]) + shift for i, t in enumerate(tokens)],
        top=[
            list(zip(best.indices[i].tolist(), (best.values[i] + shift).tolist(), strict=True))
            for i in range(len(tokens))
        ],  # fmt: skip
        top_n=top,
        **kw,
    )
    ref_values = registry.reference(MODEL)
    claims = ReceiptClaims(
        lease=lease.lease_id, nonce=lease.nonce, agent=lease.agent_id, model=MODEL,
        weights=ref_values.weights_digest, precision="fp32",
        input=__import__("hashlib").sha256(lease.input_bytes()).hexdigest(),
        output=token_output(tokens, ref_values.vocab), engine=claim,
    )  # fmt: skip
    return sign_receipt(claims, key)


def l4(result):
    return result.layer(LayerName.AUDIT)


def test_an_honest_engine_receipt_is_v4_and_affirmed(world):
    registry, key, verifier = world
    for temperature in (0.0, 0.8):
        lease = _lease(temperature)
        raw = engine_receipt(registry, key, lease)
        statement = json.loads(__import__("base64").b64decode(json.loads(raw)["payload"]))
        assert statement["predicateType"] == PREDICATE_V4
        assert (
            "fp" not in statement["predicate"] and statement["predicate"]["engine"]["fp_kind"] == "logprobs"
        )
        result = verifier.appraise(lease, raw)
        assert result.verdict == "affirming", result.reason
        assert "engine receipt (llama.cpp)" in l4(result).reason
        assert l4(result).details["not_checked"].startswith("no hidden-state fingerprints")


def test_other_weights_shifted_logprobs_and_a_changed_token_are_caught(world):
    registry, key, verifier = world
    lease = _lease()
    other = registry.load("poi-lm-draft")
    cases = {
        "token choice": engine_receipt(registry, key, lease, model=other),  # substitution
        "log-probs": engine_receipt(registry, key, lease, shift=0.01),  # a cheaper engine's numbers
    }
    honest = engine_receipt(registry, key, lease)
    tokens = open_receipt(honest, 1 << 20).claims.tokens()
    changed = list(tokens)
    changed[TOKENS // 2] = (changed[TOKENS // 2] + 7) % 4096
    cases["token choice "] = engine_receipt(registry, key, lease, tokens=changed)
    for want, raw in cases.items():
        result = verifier.appraise(lease, raw)
        assert result.verdict == "contraindicated" and l4(result).status is Status.FAIL
        assert l4(result).reason.startswith(want.strip()), l4(result).reason
        assert "expected" in l4(result).reason and "got" in l4(result).reason


def test_an_early_stop_must_be_where_the_model_ends(world):
    registry, key, verifier = world
    lease = _lease()
    honest = open_receipt(engine_receipt(registry, key, lease), 1 << 20).claims.tokens()
    # the model does not choose eos after 5 tokens of this answer: an engine claiming it stopped lies
    raw = engine_receipt(registry, key, lease, tokens=honest[:5], finish="stop")
    result = verifier.appraise(lease, raw)
    assert result.verdict == "contraindicated" and "the end (eos)" in l4(result).reason


def test_v4_needs_the_engine_object_and_v3_may_not_carry_one(world):
    registry, key, _ = world
    lease = _lease()
    raw = engine_receipt(registry, key, lease)
    env = json.loads(raw)
    import base64

    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicateType"] = "https://maxwell-poi.dev/receipt/v3"
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(ReceiptFormatError, match="engine object exactly in a v4"):
        open_receipt(json.dumps(env).encode(), 1 << 20)
    claims = open_receipt(raw, 1 << 20).claims
    with pytest.raises(ValueError, match="carries no fp, layers or trace"):
        ReceiptClaims.model_validate({**claims.model_dump(exclude_none=True), "layers": "0" * 64})
    bare = claims.model_dump(exclude_none=True)
    del bare["engine"]
    with pytest.raises(ValueError, match="fp and layers: required"):
        ReceiptClaims.model_validate(bare)


def test_the_receipt_limit_bounds_each_kind(world):
    registry, key, verifier = world
    lease = _lease()
    hidden = registry.reference(MODEL).hidden
    sdk, eng, either = (max_receipt_bytes(lease, hidden, kind) for kind in (False, True, None))
    assert either == max(sdk, eng) and eng > sdk
    honest = engine_receipt(registry, key, lease, top=ENGINE_MAX_TOP)
    assert len(honest) < eng  # the largest honest engine receipt fits its own bound
    # L0 shape: a logprobs claim whose arrays do not match the tokens is refused with what was expected
    bad = engine_receipt(registry, key, lease, tokens=[5] * TOKENS)
    env = open_receipt(bad, 1 << 20)
    short = env.claims.model_copy(update={"output": token_output([5] * (TOKENS - 1), 4096)})
    result = verifier.appraise(lease, sign_receipt(short, key))
    assert result.verdict == "contraindicated"
    assert "expected 12 (finish 'length'), got 11" in result.layer(LayerName.INTEGRITY).reason
