"""Attestation results as EAR JWTs (draft-ietf-rats-ear-04) signed by Maxwell's Ed25519 key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.result import AttestationResult, LayerName, LayerResult, Status
from maxwell_poi.verifier.ear import ear_claims, sign_ear, verify_ear


def result_for(lease: Lease, **statuses: Status) -> AttestationResult:
    layers = [LayerResult(name, statuses.get(name.name, Status.PASS), "why") for name in LayerName]
    return AttestationResult(lease.lease_id, lease.agent_id, lease.model_id, tuple(layers))


LEASE = Lease.issue("alice", "gpt2-small", GenerateJob(prompt="x"))


def test_an_affirmed_lease_round_trips_as_a_signed_ear():
    key = Ed25519PrivateKey.generate()
    token = sign_ear(ear_claims(result_for(LEASE), LEASE), key, key_id="maxwell-1")
    claims = verify_ear(token, key.public_key())
    sub = claims["submods"][f"lease/{LEASE.lease_id}"]
    assert claims["eat_nonce"] == LEASE.nonce and claims["eat_profile"].endswith("veraison/ear")
    assert sub["ear.status"] == "affirming"
    assert sub["ear.trustworthiness-vector"] == {
        "instance-identity": 2,
        "hardware": 2,
        "sourced-data": 2,
        "executables": 2,
    }


def test_a_caught_cheat_is_contraindicated_in_the_layer_that_caught_it():
    result = result_for(
        LEASE, THERMODYNAMIC=Status.FAIL, AUDIT=Status.SKIPPED, EXACT=Status.SKIPPED, ZK=Status.SKIPPED
    )
    sub = ear_claims(result, LEASE)["submods"][f"lease/{LEASE.lease_id}"]
    assert sub["ear.status"] == "contraindicated"
    assert sub["ear.trustworthiness-vector"]["hardware"] == 96
    assert sub["ear.trustworthiness-vector"]["executables"] == 0  # not audited: no claim


def test_a_token_from_another_key_or_tampered_is_refused_with_a_reason():
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    token = sign_ear(ear_claims(result_for(LEASE), LEASE), key)
    with pytest.raises(ValueError, match="signed by Maxwell's key"):
        verify_ear(token, other.public_key())
    head, body, sig = token.split(".")
    with pytest.raises(ValueError, match="signed by Maxwell's key"):
        verify_ear(f"{head}.{body[:-4]}AAAA.{sig}", key.public_key())


def test_the_result_must_be_of_the_lease_named():
    other = Lease.issue("alice", "gpt2-small", GenerateJob(prompt="y"))
    with pytest.raises(ValueError, match="expected the result of lease"):
        ear_claims(result_for(other), LEASE)


def test_claim_names_are_exactly_the_veraison_ear_profile_ones():
    """ear.py says which revision its names follow (the Veraison EAR profile of draft-fv-rats-ear);
    a renamed, dropped or added claim must change that statement too, so the names are pinned here."""
    claims = ear_claims(result_for(LEASE), LEASE, issued_at=1.0)
    assert claims["eat_profile"] == "tag:github.com,2023:veraison/ear"
    assert set(claims) == {"eat_profile", "iat", "ear.verifier-id", "eat_nonce", "submods"}
    assert set(claims["ear.verifier-id"]) == {"developer", "build"}
    (sub,) = claims["submods"].values()
    standard = {k for k in sub if not k.startswith("maxwell-poi.")}
    assert standard == {"ear.status", "ear.trustworthiness-vector", "ear.appraisal-policy-id"}
    assert set(sub["ear.trustworthiness-vector"]) <= {
        "instance-identity",
        "configuration",
        "executables",
        "file-system",
        "hardware",
        "runtime-opaque",
        "storage-opaque",
        "sourced-data",
    }  # fmt: skip  (AR4SI's eight trustworthiness claims)
