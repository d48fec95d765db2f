from __future__ import annotations

import base64
import json
import secrets

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maxwell_poi.protocol.encoding import b64, pack_tokens, sha256_hex, unpack_tokens
from maxwell_poi.protocol.errors import (
    KeyFormatError,
    LeaseFormatError,
    ReceiptFormatError,
    UnknownAgentError,
)
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease
from maxwell_poi.protocol.receipt import Fingerprints, ReceiptClaims, open_receipt, sign_receipt
from maxwell_poi.registry.sampling import SeededSampler


def make_lease(**job) -> Lease:
    return Lease.issue("agent-1", "gpt2-mini", GenerateJob(prompt="hello there", **job))


def synthetic_claims(lease: Lease, tokens: int = 8) -> ReceiptClaims:
    """Claims with the right shape but invented content: for wire-format tests only."""
    from maxwell_poi.protocol.receipt import token_output

    return ReceiptClaims(
        lease=lease.lease_id,
        nonce=lease.nonce,
        agent=lease.agent_id,
        model=lease.model_id,
        weights="ab" * 32,
        precision="fp32",
        input=sha256_hex(lease.input_bytes()),
        output=token_output(list(range(100, 100 + tokens)), 30522),
        fp=Fingerprints(k=32, chunk=32, data=b64(secrets.token_bytes(66))),
        layers="cd" * 32,
    )


def test_lease_has_fresh_nonce_and_derived_seed():
    a, b = make_lease(), make_lease()
    assert a.nonce != b.nonce and len(a.nonce_bytes) == 32
    assert Lease.from_json(a.to_json()) == a


def test_lease_with_tampered_seed_is_refused_with_reason():
    data = json.loads(make_lease().to_json())
    data["seed"] = "00" * 32
    with pytest.raises(LeaseFormatError, match="seed must equal"):
        Lease.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.update(nonce="xyz"), "nonce"),
        (lambda d: d["job"].update(max_new_tokens=0), "max_new_tokens"),
        (lambda d: d.update(deadline=0), "deadline"),
    ],
)
def test_malformed_leases_name_the_field(mutate, fragment):
    data = json.loads(make_lease().to_json())
    mutate(data)
    with pytest.raises(LeaseFormatError, match=fragment):
        Lease.from_json(json.dumps(data))


def test_oversized_and_non_json_leases_are_refused():
    with pytest.raises(LeaseFormatError, match="at most"):
        Lease.from_json(b"{" * (2 << 20))
    with pytest.raises(LeaseFormatError, match="expected a valid lease"):
        Lease.from_json(b"not json")


def test_embed_job_input_bytes_are_canonical():
    job = EmbedJob(texts=["a", "é"])
    assert job.input_bytes() == '["a","é"]'.encode()


def test_keys_round_trip_and_refuse_overwrite(tmp_path):
    key = AgentKey.generate()
    key.save(tmp_path / "a.pem")
    assert AgentKey.load(tmp_path / "a.pem").public_hex == key.public_hex
    with pytest.raises(FileExistsError):
        key.save(tmp_path / "a.pem")
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(KeyFormatError, match="PEM"):
        AgentKey.load(tmp_path / "bad.pem")
    with pytest.raises(KeyFormatError, match="readable"):
        AgentKey.load(tmp_path / "missing.pem")


def test_keyring_round_trip_and_errors(tmp_path):
    ring = Keyring({"a": AgentKey.generate().public_hex})
    ring.save(tmp_path / "ring.json")
    assert Keyring.load(tmp_path / "ring.json").agents() == ["a"]
    with pytest.raises(UnknownAgentError, match="not in the keyring"):
        ring.key_for("b")
    with pytest.raises(KeyFormatError, match="64 hex"):
        ring.enroll("c", "zz")
    (tmp_path / "broken.json").write_text("[]")
    with pytest.raises(KeyFormatError, match="keyring"):
        Keyring.load(tmp_path / "broken.json")


@given(st.lists(st.integers(0, 65535), max_size=50))
def test_tokens_pack_round_trip(tokens):
    assert unpack_tokens(pack_tokens(tokens, 2), 2) == tokens


def test_receipt_round_trip():
    lease = make_lease()
    claims = synthetic_claims(lease)
    raw = sign_receipt(claims, AgentKey.generate())
    opened = open_receipt(raw, 1 << 20)
    assert opened.claims == claims
    assert opened.claims.tokens() == list(range(100, 108))


def _envelope(raw: bytes) -> dict:
    return json.loads(raw)


def _with_payload(raw: bytes, statement: dict) -> bytes:
    env = _envelope(raw)
    env["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    return json.dumps(env).encode()


@pytest.mark.parametrize(
    ("corrupt", "fragment"),
    [
        (lambda raw: b"", "empty message"),
        (lambda raw: b"[1, 2]", "JSON object"),
        (lambda raw: raw[:-10], r"DSSE envelope \(JSON\)"),
        (
            lambda raw: json.dumps({k: v for k, v in _envelope(raw).items() if k != "payload"}).encode(),
            "payload",
        ),
        (lambda raw: json.dumps({**_envelope(raw), "payloadType": "text/plain"}).encode(), "payloadType"),
        (lambda raw: json.dumps({**_envelope(raw), "signatures": []}).encode(), "exactly one signature"),
        (lambda raw: json.dumps({**_envelope(raw), "payload": b64(b"hello")}).encode(), "Statement"),
    ],
)
def test_malformed_receipts_say_what_was_expected(corrupt, fragment):
    raw = sign_receipt(synthetic_claims(make_lease()), AgentKey.generate())
    with pytest.raises(ReceiptFormatError, match=fragment):
        open_receipt(corrupt(raw), 1 << 20)


def test_statement_level_corruption_is_refused():
    raw = sign_receipt(synthetic_claims(make_lease()), AgentKey.generate())
    statement = json.loads(base64.b64decode(_envelope(raw)["payload"]))
    wrong_type = {**statement, "predicateType": "https://example.com/other"}
    with pytest.raises(ReceiptFormatError, match="predicateType"):
        open_receipt(_with_payload(raw, wrong_type), 1 << 20)
    wrong_subject = json.loads(json.dumps(statement))
    wrong_subject["subject"][0]["digest"]["sha256"] = "00" * 32
    with pytest.raises(ReceiptFormatError, match="subject sha256"):
        open_receipt(_with_payload(raw, wrong_subject), 1 << 20)
    bad_claims = json.loads(json.dumps(statement))
    bad_claims["predicate"]["nonce"] = "short"
    with pytest.raises(ReceiptFormatError, match="nonce"):
        open_receipt(_with_payload(raw, bad_claims), 1 << 20)


def test_oversized_receipt_is_refused_before_parsing():
    with pytest.raises(ReceiptFormatError, match="at most 100 bytes"):
        open_receipt(b" " * 101, 100)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_only_ever_raise_a_format_error(data):
    with pytest.raises(ReceiptFormatError):
        open_receipt(data, 1 << 20)


_RAW = sign_receipt(synthetic_claims(make_lease()), AgentKey.generate())


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(_RAW) - 1))
def test_every_truncation_of_a_receipt_is_a_format_error(cut):
    with pytest.raises(ReceiptFormatError):
        open_receipt(_RAW[:cut], 1 << 20)


def test_sampler_is_deterministic_and_greedy_at_temperature_zero():
    import torch

    t = torch.from_numpy(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    assert SeededSampler(b"s", 0.0).choose(t, 3) == int(torch.argmax(t))
    a, b, c = SeededSampler(b"s", 1.0), SeededSampler(b"s", 1.0), SeededSampler(b"t", 1.0)
    ids = np.arange(1000)
    assert torch.equal(a.noise(5, ids), b.noise(5, ids))
    assert not torch.equal(a.noise(5, ids), a.noise(6, ids))
    assert not torch.equal(a.noise(5, ids), c.noise(5, ids))
    picks = [a.choose(t, pos) for pos in range(200)]
    assert len(set(picks)) > 20  # sampling, not greedy
    gaps = a.score_gaps(t.repeat(3, 1), [picks[0], picks[1], int(torch.argmin(t))])
    assert gaps[0] == 0 and gaps[1] == 0 and gaps[2] > 0


def test_gumbel_noise_has_the_gumbel_distribution():
    g = SeededSampler(b"seed", 1.0).noise(np.arange(200)[:, None], np.arange(1000)[None, :]).numpy().ravel()
    assert abs(g.mean() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(g.std() - np.pi / np.sqrt(6)) < 0.01


def test_top_k_sampling_only_picks_candidates_and_flags_outsiders():
    import torch

    t = torch.from_numpy(np.random.default_rng(1).standard_normal(500).astype(np.float32))
    top = set(torch.topk(t, 5).indices.tolist())
    s = SeededSampler(b"s", 2.0, top_k=5)
    picks = [s.choose(t, pos) for pos in range(100)]
    assert set(picks) <= top and len(set(picks)) > 1
    outsider = int(torch.argmin(t))
    edge = int(torch.topk(t, 6).indices[-1])  # the best token just outside the top 5
    gaps = s.score_gaps(t.repeat(3, 1), [picks[0], outsider, edge])
    kth = float(torch.topk(t, 5).values[-1])
    assert gaps[0] == 0
    assert gaps[1] >= (kth - float(t[outsider])) / 2.0 > 1.0  # far outside: a large gap
    assert gaps[2] >= (kth - float(t[edge])) / 2.0  # just outside: at least its shortfall
