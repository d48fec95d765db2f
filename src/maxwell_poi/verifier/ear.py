"""Attestation results as EAR (EAT Attestation Results), signed by Maxwell as a JWT (EdDSA over
Ed25519, PyJWT).

Which revision: the claim names and the profile are those of the Veraison EAR profile
`tag:github.com,2023:veraison/ear` — the JSON serialisation of draft-fv-rats-ear (the individual draft,
-00 to -05, since replaced by draft-ietf-rats-ear) as the reference implementations veraison/ear (Go)
and rust-ear write it: `eat_profile`, `iat`, `eat_nonce`, `ear.verifier-id` {developer, build},
`submods`, and per submodule `ear.status`, `ear.trustworthiness-vector`, `ear.appraisal-policy-id`.
They have not been checked claim by claim against draft-ietf-rats-ear-04, so do not read this as
conforming to that revision; `maxwell-poi.*` claims are this project's own (unregistered) extensions.

There is no maintained Python EAR library, so the claims are written here and signed with a JOSE
library. One submodule per lease, named `lease/<lease_id>`; its
trustworthiness vector maps Maxwell's layers onto AR4SI claims (0 no claim, 2 affirming,
32 warning, 96 contraindicated):

    instance-identity  L0  the receipt is signed by the leased agent's enrolled key, bound to the lease
    hardware           L1  the work was physically done in the measured sandbox (energy, memory)
    sourced-data       L2  the lease went in and the output came out over Maxwell's channel
    executables        L4  the claimed model at the claimed precision produced this output

`eat_nonce` is the lease's nonce, so a relying party can tie the result to the lease it issued.
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerName, Status, Verdict

EAR_PROFILE = "tag:github.com,2023:veraison/ear"
POLICY_ID = "https://maxwell-poi.dev/policy/v1"
# a required layer that could not measure is a warning claim: the verdict's own rule (fail closed)
AR4SI = {Status.PASS: 2, Status.SKIPPED: 0, Status.WARN: 32, Status.NOT_MEASURED: 32, Status.FAIL: 96}
VECTOR_OF_LAYER = {
    LayerName.INTEGRITY: "instance-identity",
    LayerName.THERMODYNAMIC: "hardware",
    LayerName.BOUNDARY: "sourced-data",
    LayerName.EXACT: "executables",  # L3 and L4 both speak of the code that ran: the worse one counts
    LayerName.ZK: "executables",
    LayerName.AUDIT: "executables",
}
EAR_STATUS = {
    Verdict.AFFIRMING: "affirming",
    Verdict.WARNING: "warning",
    Verdict.CONTRAINDICATED: "contraindicated",
}


@functools.cache
def _version() -> str:
    """This distribution's version: read once (importlib.metadata scans the path, ~2 ms a call)."""
    return importlib.metadata.version("maxwell-poi")


def ear_claims(result: AttestationResult, lease: Lease, *, issued_at: float | None = None) -> dict[str, Any]:
    """The EAR claims set for one appraised lease."""
    if result.lease_id != lease.lease_id:
        raise ValueError(f"ear_claims: expected the result of lease {lease.lease_id}, got {result.lease_id}")
    vector: dict[str, int] = {}
    for r in result.layers:  # AR4SI: a higher value is a worse appraisal
        claim = VECTOR_OF_LAYER[LayerName(r.layer)]
        vector[claim] = max(vector.get(claim, AR4SI[r.status]), AR4SI[r.status])
    return {
        "eat_profile": EAR_PROFILE,
        "iat": int(issued_at if issued_at is not None else time.time()),
        "ear.verifier-id": {
            "developer": "maxwell-poi",
            "build": f"maxwell-poi {_version()}",
        },
        "eat_nonce": lease.nonce,
        "submods": {
            f"lease/{lease.lease_id}": {
                "ear.status": EAR_STATUS[result.verdict],
                "ear.trustworthiness-vector": vector,
                "ear.appraisal-policy-id": POLICY_ID,
                "maxwell-poi.agent": result.agent_id,
                "maxwell-poi.model": result.model_id,
                "maxwell-poi.reason": result.reason[:1000],
            }
        },
    }


def sign_ear(claims: dict[str, Any], key: Ed25519PrivateKey, key_id: str | None = None) -> str:
    """The claims as a compact JWS (JWT), signed with Maxwell's Ed25519 key."""
    headers = {"typ": "JWT", **({"kid": key_id} if key_id else {})}
    return jwt.encode(claims, key, algorithm="EdDSA", headers=headers)


def verify_ear(token: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The claims of an EAR JWT signed by `public_key`; raises ValueError saying why not."""
    try:
        claims = jwt.decode(token, public_key, algorithms=["EdDSA"], options={"require": ["iat"]})
    except jwt.PyJWTError as exc:
        raise ValueError(f"EAR: expected a JWT signed by Maxwell's key, got one that fails: {exc}") from None
    if claims.get("eat_profile") != EAR_PROFILE:
        raise ValueError(f"EAR: expected eat_profile {EAR_PROFILE!r}, got {claims.get('eat_profile')!r}")
    return claims
