"""The `maxwell` object of one completion, from the control plane's rows: the verdict, each layer
and its reason, joules, what was charged, the EAR, and the tolerance set and class pair its audit
used. The routes add what only the response knows (how the tokens were delivered, how many unverified).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ..protocol.result import LayerName
from ..service.control import ControlPlane, verdict_view
from ..service.schema import CompletionRow, LeaseRow, VerdictRow
from ..service.states import CompletionState

TOLERANCE_KEYS = {"tolerance": "set", "class_pair": "class_pair", "tolerance_reason": "reason"}


def attestation(control: ControlPlane, lease_id: str) -> dict[str, Any]:
    """The `maxwell` object (responses.MaxwellView) of lease `lease_id`."""
    with Session(control.ledger.engine) as session:
        verdict = session.get(VerdictRow, lease_id)
        completion = session.get(CompletionRow, lease_id)
        lease_row = session.get(LeaseRow, lease_id)
    out: dict[str, Any] = {"lease_id": lease_id}
    if completion is not None:
        out.update(
            completion_status=completion.status,
            price_micro_per_token=completion.price_micro_per_token,
            charged_micro=completion.charge_micro,
            auction=completion.reason
            if completion.status in (CompletionState.STREAMING, CompletionState.PAID)
            else "",
        )
    if verdict is None:
        out.update(verdict="pending", reason="the node has not handed in the lease's evidence yet")
        return out
    view = verdict_view(verdict)
    details = [r.get("details") or {} for r in view["layers"]]
    audit = next(
        (d for r, d in zip(view["layers"], details, strict=True) if r["layer"] == LayerName.AUDIT), {}
    )
    out.update(
        verdict=view["verdict"],
        final=view["final"],
        reason=view["reason"],
        layers=[{k: r[k] for k in ("layer", "status", "reason")} for r in view["layers"]],
        cut_after_tokens=next((d["cut_after_tokens"] for d in details if "cut_after_tokens" in d), None),
        energy_j=view["energy_j"],
        stake=view["stake_outcome"],
    )
    if "tolerance" in audit:  # the set and class pair the audit chose (verifier.thresholds.choose_tolerance)
        out["tolerance"] = {name: audit.get(key, "") for key, name in TOLERANCE_KEYS.items()}
    if view["final"] and lease_row is not None:
        out["ear"] = control.ear(lease_row.agent_id, lease_id)  # a JWT; key at /v1/ear-key
    return out


__all__ = ["attestation"]
