"""Compose the layers into one verdict (sigstore-python's AllOf style)."""

from __future__ import annotations

import secrets
import time

from ..observer.evidence import ChannelEvidence
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerResult, Status, verdict_of
from ..registry.models import Registry
from ..registry.profiles import ProfileStore
from .classify import WorkloadClassifier
from .layers import Appraisal, AuditLayer, IntegrityLayer, Layer
from .physics import BoundaryLayer, ThermodynamicLayer
from .thresholds import Thresholds


class AllOf:
    """Runs the gate layer first; if it fails, the other layers are not run (and say so).
    Layers outside `run` (the costly ones, by lottery) are skipped with that reason."""

    def __init__(self, gate: Layer, layers: list[Layer]) -> None:
        self.gate = gate
        self.layers = layers

    def appraise(self, ctx: Appraisal, run: set[str]) -> list[LayerResult]:
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
    """Maxwell's appraisal engine. `audit_rate` is the lottery probability for L4 (1.0 = always);
    the draw happens after the receipt arrives, from the OS CSPRNG, so an agent cannot know it."""

    def __init__(
        self,
        registry: Registry,
        keyring: Keyring,
        *,
        audit_rate: float = 1.0,
        thresholds: Thresholds | None = None,
        device: str = "cpu",
        profiles: ProfileStore | None = None,
    ) -> None:
        if not 0.0 <= audit_rate <= 1.0:
            raise ValueError(f"audit_rate must be in [0, 1], got {audit_rate}")
        self.audit_rate = audit_rate
        profiles = profiles or ProfileStore()
        self.integrity = IntegrityLayer(registry, keyring)
        self.thermo = ThermodynamicLayer(registry, profiles, WorkloadClassifier.load())
        self.boundary = BoundaryLayer(profiles)
        self.audit = AuditLayer(registry, thresholds, device)
        self.policy = AllOf(self.integrity, [self.thermo, self.boundary, self.audit])

    def _draw_audit(self) -> bool:
        return secrets.randbelow(1_000_000) < self.audit_rate * 1_000_000

    def appraise(
        self, lease: Lease, raw_receipt: bytes, evidence: ChannelEvidence | None = None
    ) -> AttestationResult:
        ctx = Appraisal(lease=lease, raw=raw_receipt, evidence=evidence, received_at=time.time())
        run = {self.thermo.name, self.boundary.name}  # cheap: always
        if self._draw_audit():
            run.add(self.audit.name)
        layers = self.policy.appraise(ctx, run)
        return AttestationResult(
            lease_id=lease.lease_id,
            agent_id=lease.agent_id,
            model_id=lease.model_id,
            verdict=verdict_of(layers),
            layers=tuple(layers),
        )
