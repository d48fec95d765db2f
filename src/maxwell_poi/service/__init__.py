"""Maxwell's control plane (issue 9): a FastAPI service over the ledger's database.

- `config.py`   settings from flags and POI_SERVE_* variables, printed at start
- `schema.py`   the control plane's tables (migrations in `migrations/`, beside the ledger's)
- `auth.py`     admin bearer token; signed, timestamped agent and node requests
- `market.py`   bids, auction rounds on node pulls, leases issued with their money held
- `intake.py`   the hot path: receipt + signed evidence → L0-L2 → verdict and money in one transaction
- `audits.py`   queued L4 audits that finalise verdicts and stakes
- `control.py`  all of the above without HTTP; `api.py` the routes; `metrics.py` Prometheus
- `client.py`   the httpx client nodes, agents, the CLI and the benchmarks use


Names load on first use (PEP 562): `from maxwell_poi.service import ServiceClient` (the CLI's
`poi client`) must not import the control plane, and through it torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol.lazy import lazy_names

_HOMES = {
    "ServiceClient": "client",
    "ServiceRefused": "client",
    "ServiceConfig": "config",
    "ControlPlane": "control",
}
__all__ = ["ControlPlane", "ServiceClient", "ServiceConfig", "ServiceRefused"]

if TYPE_CHECKING:
    from .client import ServiceClient, ServiceRefused
    from .config import ServiceConfig
    from .control import ControlPlane


__getattr__ = lazy_names(__name__, _HOMES, globals())
