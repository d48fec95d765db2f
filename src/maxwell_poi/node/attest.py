"""Evidence Maxwell can stand behind: a node's measurements of one lease, signed by the node.

A control plane elsewhere accepts evidence only from enrolled nodes (a `Keyring` of node ids),
just as it accepts receipts only from enrolled agents. The document is an in-toto Statement in a
DSSE envelope, signed with the node's Ed25519 key:

    subject    lease/<lease_id>/receipt, sha256 of the receipt bytes the node read (binds the
               measurements to the one receipt they were taken beside)
    predicate  {node, hardware, sandbox, lease_id, evidence}   (predicateType EVIDENCE_PREDICATE)

`hardware` is the node's hardware class (CPU model, GPU model and driver, torch build): later
layers choose their tolerances by it. `sandbox` says what measured the agent and how far it can be
trusted (observer.sandbox: cgroup v2/v1 kernel accounting, or the /proc fallback).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from typing import Any

from securesystemslib.dsse import Envelope

from ..observer.evidence import LeaseEvidence
from ..observer.host import this_device
from ..protocol.errors import EvidenceFormatError, EvidenceSignatureError, UnknownAgentError
from ..protocol.keys import AgentKey, Keyring

EVIDENCE_PAYLOAD_TYPE = "application/vnd.in-toto+json"
EVIDENCE_PREDICATE = "https://maxwell-poi.dev/evidence/v1"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
MAX_EVIDENCE_BYTES = 8 << 20


class NodeKey(AgentKey):
    """A Maxwell node's Ed25519 signing key (same format as an agent's; a different role)."""


@functools.cache
def hardware_class() -> dict[str, str]:
    """What this node is: CPU, GPU and driver (NVML when readable), torch build, kernel."""
    out = {"device_class": this_device(), "cpu": platform.processor() or platform.machine()}
    out["cores"] = str(os.cpu_count())
    out["kernel"] = platform.release()
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = str(torch.version.cuda or "cpu build")
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            out["gpu"] = str(pynvml.nvmlDeviceGetName(handle))
            out["gpu_driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML here: the absence is the answer (no GPU, or no driver)
        out["gpu"] = "none readable (NVML unavailable)"
    return out


def sign_evidence(
    evidence: LeaseEvidence,
    lease_id: str,
    receipt: bytes,
    *,
    node_id: str,
    sandbox: dict[str, Any],
    key: NodeKey,
) -> bytes:
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": f"lease/{lease_id}/receipt", "digest": {"sha256": hashlib.sha256(receipt).hexdigest()}}
        ],
        "predicateType": EVIDENCE_PREDICATE,
        "predicate": {
            "node": node_id,
            "hardware": hardware_class(),
            "sandbox": sandbox,
            "lease_id": lease_id,
            "evidence": evidence.as_dict(),
        },
    }
    payload = json.dumps(statement, separators=(",", ":"), default=_plain).encode()
    envelope = Envelope(payload=payload, payload_type=EVIDENCE_PAYLOAD_TYPE, signatures={})
    envelope.sign(key.signer)
    return json.dumps(envelope.to_dict(), separators=(",", ":")).encode()


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in telemetry, as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass(frozen=True)
class SignedEvidence:
    node_id: str
    lease_id: str
    receipt_sha256: str
    hardware: dict[str, str]
    sandbox: dict[str, Any]
    evidence: LeaseEvidence


def open_evidence(raw: bytes, nodes: Keyring) -> SignedEvidence:
    """Parse and verify a node's evidence document; accepted only when signed by the enrolled
    node it names. Every refusal is an EvidenceFormatError (or UnknownAgentError for a node that
    is not enrolled) saying what was expected and what came."""
    if len(raw) > MAX_EVIDENCE_BYTES:
        raise EvidenceFormatError(f"at most {MAX_EVIDENCE_BYTES} bytes", f"{len(raw)} bytes")
    try:
        envelope = Envelope.from_dict(json.loads(raw))
        statement = json.loads(envelope.payload)
    except Exception as exc:  # JSON, base64 and shape errors all mean "not a DSSE envelope"
        raise EvidenceFormatError(
            "a DSSE envelope of an in-toto Statement", f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(statement, dict) or statement.get("predicateType") != EVIDENCE_PREDICATE:
        got = statement.get("predicateType") if isinstance(statement, dict) else type(statement).__name__
        raise EvidenceFormatError(f"predicateType {EVIDENCE_PREDICATE!r}", repr(got)[:80])
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise EvidenceFormatError("a predicate object", type(predicate).__name__)
    node_id = str(predicate.get("node", ""))
    key = nodes.key_for(node_id)  # UnknownAgentError names the enrolled nodes
    try:
        envelope.verify([key], 1)
    except Exception:
        raise EvidenceSignatureError(
            f"a signature by enrolled node {node_id!r}", "one that does not verify"
        ) from None
    try:
        subject = statement["subject"][0]
        lease_id = str(predicate["lease_id"])
        if subject["name"] != f"lease/{lease_id}/receipt":
            raise ValueError(f"subject {subject['name']!r} is not lease/{lease_id}/receipt")
        evidence = LeaseEvidence.from_dict(predicate["evidence"], "evidence.predicate.evidence")
        return SignedEvidence(
            node_id,
            lease_id,
            str(subject["digest"]["sha256"]),
            dict(predicate.get("hardware") or {}),
            dict(predicate.get("sandbox") or {}),
            evidence,
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise EvidenceFormatError("a complete evidence predicate", str(exc)[:200]) from None


__all__ = [
    "NodeKey",
    "SignedEvidence",
    "UnknownAgentError",
    "hardware_class",
    "open_evidence",
    "sign_evidence",
]
