"""`poi verify --evidence`: the node's signed evidence for a receipt, checked before it is used.

A receipt alone says nothing Maxwell measured, so its audit applies the cross-class tolerance and
says the prover's class was not measured. Given the evidence document a node signed for that lease
(`poi node` keeps it as out/<lease>/evidence.dsse.json) and the node's public key (node.pub), the
audit chooses its tolerance from the class the node measured, by the same rule as every other path
(verifier.thresholds.choose_tolerance). The evidence is refused unless that node's key signed it,
for this lease, over this receipt's bytes: an agent must not pick its own tolerance set.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from ..node.attest import open_evidence
from ..observer.evidence import LeaseEvidence
from ..protocol.errors import PoiError
from ..protocol.keys import Keyring
from ..protocol.lease import Lease


class EvidenceRefused(ValueError):
    """Why the evidence given to `poi verify` cannot be used (bad input: exit 2)."""


def node_evidence(raw: bytes, node_key: Path, lease: Lease, receipt: bytes) -> LeaseEvidence:
    """The evidence in `raw`, once it is shown to be the key's node's, for `lease` and `receipt`."""
    try:
        public_hex = node_key.read_text().strip()
    except OSError as exc:
        raise EvidenceRefused(f"cannot read the node key {node_key}: {exc.strerror}") from None
    try:  # the key stands for the node the document names; open_evidence checks its signature
        signed = open_evidence(raw, Keyring({_named_node(raw): public_hex}))
    except (PoiError, ValueError) as exc:
        raise EvidenceRefused(f"evidence: {exc}") from None
    if signed.lease_id != lease.lease_id:
        raise EvidenceRefused(f"evidence: expected lease {lease.lease_id}, got lease {signed.lease_id}")
    digest = hashlib.sha256(receipt).hexdigest()
    if signed.receipt_sha256 != digest:
        got = signed.receipt_sha256[:16]
        raise EvidenceRefused(f"evidence: expected it over this receipt (sha256 {digest[:16]}…), got {got}…")
    return signed.evidence


def _named_node(raw: bytes) -> str:
    """The node id the evidence's statement names (unverified: only to file the key under)."""
    try:
        envelope = json.loads(raw)
        statement = json.loads(base64.b64decode(envelope["payload"]))
        return str(statement["predicate"]["node"])
    except (ValueError, KeyError, TypeError):
        return ""


__all__ = ["EvidenceRefused", "node_evidence"]
