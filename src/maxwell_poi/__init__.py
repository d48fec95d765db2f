"""Maxwell Proof of Inference: verify that an untrusted agent really ran neural-network inference.

The public API is small on purpose:

- `Lease` (what Maxwell asks for), `GenerateJob`, `EmbedJob`
- `AgentKey`, `Keyring` (Ed25519 keys of agents)
- `Prover` (agent SDK: run a lease, get signed receipt bytes)
- `Verifier` (`Verifier.default(registry, keyring)`: appraise receipt bytes against a lease,
  get an `AttestationResult`)
- `Registry` (models and their reference values)
- `run_lease` (Maxwell's runner with the Observer: agent as a separate process, evidence of the
  channel and telemetry); `run_agent` underneath it
"""

from .observer.channel import run_agent
from .observer.evidence import ChannelEvidence
from .observer.runs import run_lease
from .protocol.keys import AgentKey, Keyring
from .protocol.lease import EmbedJob, GenerateJob, Lease
from .protocol.receipt import ReceiptClaims, open_receipt, sign_receipt
from .protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
from .prover.sdk import Prover
from .registry.models import Registry
from .verifier.policy import Verifier

__all__ = [
    "AgentKey",
    "AttestationResult",
    "ChannelEvidence",
    "EmbedJob",
    "GenerateJob",
    "Keyring",
    "LayerName",
    "LayerResult",
    "Lease",
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
