"""Attestation results: one verdict, with each layer's status, reason and cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Status(StrEnum):
    """A layer's outcome. NOT_MEASURED: a layer the policy requires could not measure (no profile,
    no evidence, no telemetry): never a pass. SKIPPED: a layer the policy did not ask for (not drawn
    by the audit lottery, not required at this tier, not run after a failed gate)."""

    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIPPED = "skipped"
    NOT_MEASURED = "not_measured"


class LayerName(StrEnum):
    """The verification layers, by the names results carry (design.md section 3)."""

    INTEGRITY = "L0-integrity"
    THERMODYNAMIC = "L1-thermodynamic"
    BOUNDARY = "L2-boundary"
    EXACT = "L3-exact"
    ZK = "L3-zk"  # L3 by a zk-SNARK of one block half (verifier.zk)
    AUDIT = "L4-audit"


class Verdict(StrEnum):
    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"


@dataclass(frozen=True)
class LayerResult:
    layer: LayerName
    status: Status
    reason: str
    score: float | None = None  # layer-specific: 1.0 = fully consistent with honest work
    cost_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer"] = str(self.layer)
        out["status"] = self.status.value
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerResult:
        """Back from `as_dict` (a stored result); raises KeyError/ValueError on another shape."""
        return cls(
            LayerName(d["layer"]),
            Status(d["status"]),
            str(d["reason"]),
            d.get("score"),
            float(d.get("cost_s", 0.0)),
            dict(d.get("details") or {}),
        )


@dataclass(frozen=True)
class AttestationResult:
    """The verdict is derived from the layers, never stored beside them: one source of truth, so a
    result read back from its dict (or with a layer added) cannot disagree with itself."""

    lease_id: str
    agent_id: str
    model_id: str
    layers: tuple[LayerResult, ...]

    @property
    def verdict(self) -> Verdict:
        return verdict_of(self.layers)

    def layer(self, name: LayerName | str) -> LayerResult:
        for r in self.layers:
            if r.layer == name:
                return r
        raise KeyError(f"no layer {name!r} in this result ({', '.join(r.layer for r in self.layers)})")

    @property
    def caught_by(self) -> list[LayerName]:
        return [r.layer for r in self.layers if r.status is Status.FAIL]

    @property
    def reason(self) -> str:
        failing = [r for r in self.layers if r.status in (Status.FAIL, Status.WARN, Status.NOT_MEASURED)]
        if not failing:
            return "; ".join(r.reason for r in self.layers if r.status is Status.PASS)
        unmeasured = Status.NOT_MEASURED
        return "; ".join(
            f"{r.layer} not measured: {r.reason}" if r.status is unmeasured else f"{r.layer}: {r.reason}"
            for r in failing
        )

    @property
    def cost_s(self) -> float:
        return sum(r.cost_s for r in self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "agent_id": self.agent_id,
            "model_id": self.model_id,
            "verdict": self.verdict.value,
            "caught_by": [str(name) for name in self.caught_by],
            "reason": self.reason,
            "cost_s": round(self.cost_s, 6),
            "layers": [r.as_dict() for r in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttestationResult:
        layers = tuple(LayerResult.from_dict(r) for r in d["layers"])
        return cls(d["lease_id"], d["agent_id"], d["model_id"], layers)  # "verdict" is derived again


def verdict_of(layers: Sequence[LayerResult]) -> Verdict:
    """Fail closed: any failure contraindicates; a warning, or a required layer that could not
    measure, leaves at most a warning; only measured passes (beside layers skipped because the
    policy did not ask for them) affirm."""
    statuses = {r.status for r in layers}
    if Status.FAIL in statuses:
        return Verdict.CONTRAINDICATED
    if statuses & {Status.WARN, Status.NOT_MEASURED}:
        return Verdict.WARNING
    if Status.PASS not in statuses:  # nothing measured at all affirms nothing
        return Verdict.WARNING
    return Verdict.AFFIRMING
