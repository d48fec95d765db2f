"""Maxwell Proof of Inference: verify that an untrusted agent really ran neural-network inference.

The public API is small on purpose:

- `Lease` (what Maxwell asks for), `GenerateJob`, `EmbedJob`
- `AgentKey`, `Keyring` (Ed25519 keys of agents)
- `Prover` (agent SDK: run a lease, get signed receipt bytes)
- `Verifier` (`Verifier.default(registry, keyring)`: appraise receipt bytes against a lease,
  get an `AttestationResult`)
- `Registry` (models and their reference values)
- `run_lease` (Maxwell's node runner with the Observer: agent as a separate process, evidence of the
  channel and telemetry); `run_agent` underneath it

Names load on first use (PEP 562), so `import maxwell_poi` and the CLI's entry pay no torch import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol.lazy import lazy_names

_HOMES = {
    "AgentKey": "protocol.keys",
    "Keyring": "protocol.keys",
    "EmbedJob": "protocol.lease",
    "GenerateJob": "protocol.lease",
    "Lease": "protocol.lease",
    "ReceiptClaims": "protocol.receipt",
    "open_receipt": "protocol.receipt",
    "sign_receipt": "protocol.receipt",
    "AttestationResult": "protocol.result",
    "LayerName": "protocol.result",
    "LayerResult": "protocol.result",
    "Status": "protocol.result",
    "Verdict": "protocol.result",
    "LeaseEvidence": "observer.evidence",
    "Prover": "prover.sdk",
    "Registry": "registry.models",
    "Verifier": "verifier.policy",
    "run_agent": "node.channel",
    "run_lease": "node.runs",
}
__all__ = [
    "AgentKey",
    "AttestationResult",
    "EmbedJob",
    "GenerateJob",
    "Keyring",
    "LayerName",
    "LayerResult",
    "Lease",
    "LeaseEvidence",
    "Prover",
    "ReceiptClaims",
    "Registry",
    "Status",
    "Verdict",
    "Verifier",
    "open_receipt",
    "run_agent",
    "run_lease",
    "sign_receipt",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .node.channel import run_agent
    from .node.runs import run_lease
    from .observer.evidence import LeaseEvidence
    from .protocol.keys import AgentKey, Keyring
    from .protocol.lease import EmbedJob, GenerateJob, Lease
    from .protocol.receipt import ReceiptClaims, open_receipt, sign_receipt
    from .protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
    from .prover.sdk import Prover
    from .registry.models import Registry
    from .verifier.policy import Verifier


__getattr__ = lazy_names(__name__, _HOMES, globals())
