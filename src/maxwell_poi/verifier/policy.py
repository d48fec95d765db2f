"""Compose the layers into one verdict (sigstore-python's AllOf style, with an audit lottery)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ..observer.evidence import LeaseEvidence
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerName, LayerResult, Status
from ..registry.models import Registry
from ..registry.profiles import ProfileStore
from .appraisal import Appraisal, Layer
from .audit import AuditLayer
from .boundary import BoundaryLayer
from .classify import WorkloadClassifier
from .integrity import IntegrityLayer
from .lottery import draw_audit
from .thermodynamic import ThermodynamicLayer
from .thresholds import Thresholds


class GateThenDrawn:
    """Runs the gate layer first; if it fails, no other layer runs (each says so). Of the others,
    those not in `run` (the costly ones the lottery did not draw) are skipped with that reason."""

    def __init__(self, gate: Layer, layers: Sequence[Layer]) -> None:
        self.gate = gate
        self.layers = list(layers)

    def appraise(self, ctx: Appraisal, run: set[LayerName]) -> list[LayerResult]:
        results = [self.gate.appraise(ctx)]
        for layer in self.layers:
            if results[0].status is Status.FAIL:
                results.append(LayerResult(layer.name, Status.SKIPPED, "not run: integrity failed"))
            elif layer.name not in run:
                results.append(LayerResult(layer.name, Status.SKIPPED, "not drawn by the audit lottery"))
            else:
                results.append(layer.appraise(ctx))
        return results


class Verifier:
    """Maxwell's appraisal engine over ready layers: the `gate` (L0) always first, the `always`
    layers (cheap: L1, L2) on every receipt, the `drawn` layers (costly: L4) with probability
    `audit_rate`, drawn after the receipt arrives from the OS CSPRNG so an agent cannot know it.
    `Verifier.default(registry, keyring)` builds the standard stack.

    Fail closed: `required` names the layers the tier requires (every layer given, by default). A
    required layer that could not measure stays NOT_MEASURED, so the verdict is at most a warning
    naming what was missing; a layer that is not required and could not measure is SKIPPED and
    does not lower the verdict."""

    def __init__(
        self,
        gate: Layer,
        always: Sequence[Layer] = (),
        drawn: Sequence[Layer] = (),
        *,
        audit_rate: float = 1.0,
        required: Iterable[LayerName] | None = None,
    ) -> None:
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError(f"audit_rate must be in [0, 1], got {audit_rate}")
        self.audit_rate = audit_rate
        self.always = [layer.name for layer in always]
        self.drawn = [layer.name for layer in drawn]
        stack = [gate.name, *self.always, *self.drawn]
        self.required = frozenset(stack if required is None else required)
        if unknown := self.required - set(stack):
            raise ValueError(f"required: expected layers of this stack {stack}, got {sorted(unknown)}")
        self.policy = GateThenDrawn(gate, [*always, *drawn])

    @classmethod
    def default(
        cls,
        registry: Registry,
        keyring: Keyring,
        *,
        audit_rate: float = 1.0,
        thresholds: Thresholds | None = None,
        device: str = "cpu",
        profiles: ProfileStore | None = None,
        required: Iterable[LayerName] | None = None,
    ) -> Verifier:
        """L0 gate; L1 and L2 on the device profiles in `profiles` ($POI_HOME by default) with the
        shipped workload classifier; L4 on `device` with the shipped (or given) thresholds. Every
        layer required unless `required` says otherwise: L1 and L2 need Maxwell's evidence and the
        model's profile on the agent's device class (`poi profile`), or the verdict is a warning."""
        profiles = profiles or ProfileStore()
        return cls(
            IntegrityLayer(registry, keyring),
            [ThermodynamicLayer(registry, profiles, WorkloadClassifier.load()), BoundaryLayer(profiles)],
            [AuditLayer(registry, thresholds, device)],
            audit_rate=audit_rate,
            required=required,
        )

    @classmethod
    def inline(cls, registry: Registry, keyring: Keyring, profiles: ProfileStore) -> Verifier:
        """The control plane's intake stack: L0 (replays are the database's to refuse) gating L1 and
        L2 on Maxwell's evidence; L4 runs later, queued, in `audit_only` stacks."""
        return cls(
            IntegrityLayer(registry, keyring, remember_settled=False),
            [ThermodynamicLayer(registry, profiles, WorkloadClassifier.load()), BoundaryLayer(profiles)],
        )

    @classmethod
    def audit_only(cls, registry: Registry, keyring: Keyring, layer: AuditLayer | None = None) -> Verifier:
        """A queued audit's stack: L0 (replays are the database's to refuse) gating L4, drawn at rate 1."""
        return cls(
            IntegrityLayer(registry, keyring, remember_settled=False),
            drawn=[layer or AuditLayer(registry)],
            audit_rate=1.0,
        )

    @classmethod
    def offline(
        cls, registry: Registry, keyring: Keyring, *, audit_rate: float = 1.0, device: str = "cpu"
    ) -> Verifier:
        """A receipt alone, with no Maxwell-side evidence (`poi verify`): L0 and L4 required; L1 and
        L2 still run and say they could not measure, as SKIPPED (not required offline) — the result
        shows what was not checked instead of leaving it out."""
        return cls.default(
            registry,
            keyring,
            audit_rate=audit_rate,
            device=device,
            required=(LayerName.INTEGRITY, LayerName.AUDIT),
        )

    def settle_required(self, layers: list[LayerResult]) -> list[LayerResult]:
        """A layer that could not measure and is not required here is SKIPPED, saying why."""
        return [
            replace(r, status=Status.SKIPPED, reason=f"not required here; could not measure: {r.reason}")
            if r.status is Status.NOT_MEASURED and r.layer not in self.required
            else r
            for r in layers
        ]

    def _draw_audit(self) -> bool:
        return draw_audit(self.audit_rate)

    def appraise(
        self,
        lease: Lease,
        raw_receipt: bytes,
        evidence: LeaseEvidence | None = None,
        *,
        received_at: float | None = None,
    ) -> AttestationResult:
        """`received_at`: when Maxwell took the receipt in (a queued audit appraises it later; the
        deadline is judged at intake), now by default."""
        at = time.time() if received_at is None else received_at
        ctx = Appraisal(lease=lease, raw=raw_receipt, evidence=evidence, received_at=at)
        run = set(self.always)
        if self._draw_audit():
            run.update(self.drawn)
        layers = self.settle_required(self.policy.appraise(ctx, run))
        return AttestationResult(
            lease_id=lease.lease_id,
            agent_id=lease.agent_id,
            model_id=lease.model_id,
            layers=tuple(layers),
        )
