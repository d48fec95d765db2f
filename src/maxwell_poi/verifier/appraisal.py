"""What every verification layer shares: the appraisal it reads, the outcome it returns, and the
opening steps (timing; for evidence layers: no evidence, the profile) that would otherwise open
each `appraise`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..observer.evidence import LeaseEvidence
from ..protocol.lease import Lease
from ..protocol.receipt import OpenedReceipt
from ..protocol.result import LayerName, LayerResult, Status
from ..registry.profiles import Profile, ProfileStore

NO_EVIDENCE = "no Maxwell-side evidence (receipt appraised offline)"


@dataclass
class Appraisal:
    """Everything the layers look at for one receipt. L0 fills in `receipt` once it parses."""

    lease: Lease
    raw: bytes
    evidence: LeaseEvidence | None = None
    received_at: float = field(default_factory=time.time)
    receipt: OpenedReceipt | None = None


class Layer(Protocol):
    name: LayerName

    def appraise(self, ctx: Appraisal) -> LayerResult: ...


@dataclass(frozen=True)
class Outcome:
    """A layer's decision before it is timed: status, a reason naming expected vs got, a score
    (1.0 = fully consistent with honest work) and the measurements behind it."""

    status: Status
    reason: str
    score: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def passed(reason: str, score: float | None = 1.0, **details: Any) -> Outcome:
    return Outcome(Status.PASS, reason, score, details)


def failed(reason: str, score: float | None = 0.0, **details: Any) -> Outcome:
    return Outcome(Status.FAIL, reason, score, details)


def warned(reason: str, score: float | None = None, **details: Any) -> Outcome:
    """Measured, and neither a pass nor evidence of cheating (the verdict is at most a warning)."""
    return Outcome(Status.WARN, reason, score, details)


def skipped(reason: str) -> Outcome:
    """Not run by policy (a failed gate, a lottery not drawn): no claim either way."""
    return Outcome(Status.SKIPPED, reason)


def not_measured(reason: str, **details: Any) -> Outcome:
    """Could not measure (no evidence, no profile, no decode window): never a pass. The verifier
    keeps it NOT_MEASURED when the tier requires the layer (verdict at most warning), else SKIPPED."""
    return Outcome(Status.NOT_MEASURED, reason, None, details)


def no_profile(model_id: str, ev: LeaseEvidence) -> str:
    """Why a layer had no profile, and how to make one."""
    resident = " --resident" if ev.regime != "oneshot" else ""
    if ev.engine:  # an engine agent is judged by its own engine's profile, never the SDK agent's
        how = (
            f"run `poi profile {model_id} --resident --engine-cmd CMD` there, with the agent's engine command"
            if ev.engine.startswith("cmd:")
            else "none can be measured: its engine runs outside the agent's sandbox (--engine URL)"
        )
        return f"no profile for {model_id} on {ev.profile_key} (an engine agent's own): {how}"
    return f"no profile for {model_id} on {ev.profile_key}: run `poi profile {model_id}{resident}` there"


@dataclass(frozen=True)
class Finding:
    """What one failed check found: the reason and the layer score it implies."""

    reason: str
    score: float | None = 0.0


class TimedLayer:
    """Base of every layer: `decide` returns an Outcome, `appraise` times it into a LayerResult."""

    name: LayerName

    def decide(self, ctx: Appraisal) -> Outcome:
        raise NotImplementedError

    def appraise(self, ctx: Appraisal) -> LayerResult:
        start = time.perf_counter()
        o = self.decide(ctx)
        return LayerResult(self.name, o.status, o.reason, o.score, time.perf_counter() - start, o.details)


class EvidenceLayer(TimedLayer):
    """Base of the layers built on Maxwell's own evidence (L1, L2): not measured without it, and
    with the reference profile of the leased model on the device Maxwell ran the agent on at hand."""

    def __init__(self, profiles: ProfileStore) -> None:
        self.profiles = profiles

    def decide(self, ctx: Appraisal) -> Outcome:
        return not_measured(NO_EVIDENCE) if ctx.evidence is None else self.decide_on(ctx, ctx.evidence)

    def decide_on(self, ctx: Appraisal, ev: LeaseEvidence) -> Outcome:
        raise NotImplementedError

    def profile(self, ctx: Appraisal, ev: LeaseEvidence) -> Profile | None:
        return self.profiles.get(ctx.lease.model_id, ev.profile_key)
