"""Verification tiers: what a lease's bid value buys, and what the node's thermal budget can pay for.

    low     L0 + L1 + L2 on every receipt (cheap: Maxwell's own measurements)
    medium  + the L4 audit lottery, at the deterrence probability (deterrence.py)
    high    + every lease audited (L4, p = 1)
    exact   optimistic: accepted at once, its stake held for a challenge window; every lease's
            activation trace is opened at blocks Maxwell draws after the receipt and checked exactly
            (L3, Freivalds), the L4 lottery runs at the deterrence probability, and an L4 that
            disagrees starts a dispute that bisects the trace to one block (service.exact_audits).
            Off unless the policy sets `exact_from_value`; only for models L3 can check, and the
            agent must keep its traces (`poi agent --trace-dir`).

The bid's value picks the least tier it must have. Verification costs energy on the node (an
audit is one prefill: `audit_cost_fraction` of the lease's own work, 1/16.6 on this CPU,
bench/results/core.json), so the tier must also fit the node's thermal headroom. Spare headroom
(at least `upgrade_headroom_factor` times what a medium lease needs) lifts a low lease to medium:
auditing is cheap insurance when the energy would go unused. A lease whose required tier does not
fit is deferred — sent to a cooler node or held — never silently verified less.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from .deterrence import DEFAULT_MARGIN, Deterrence, audit_probability


class Tier(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    EXACT = "exact"


TIERS: dict[Tier, tuple[str, ...]] = {
    Tier.LOW: ("L0-integrity", "L1-thermodynamic", "L2-boundary"),
    Tier.MEDIUM: ("L0-integrity", "L1-thermodynamic", "L2-boundary", "L4-audit (lottery)"),
    Tier.HIGH: ("L0-integrity", "L1-thermodynamic", "L2-boundary", "L4-audit (every lease)"),
    Tier.EXACT: (
        "L0-integrity",
        "L1-thermodynamic",
        "L2-boundary",
        "L3-exact (every lease, in a challenge window)",
        "L4-audit (lottery; a disagreement is bisected to one block)",
    ),
}


@dataclass(frozen=True)
class TierChoice:
    tier: Tier
    audit_probability: float
    lease_energy_j: float
    verification_energy_j: float  # expected audit energy for this lease at this tier
    deferred: bool
    reason: str
    deterrence: Deterrence | None = None
    layers: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, object]:
        return {
            "tier": self.tier.value,
            "layers": list(self.layers),
            "audit_probability": round(self.audit_probability, 6),
            "lease_energy_j": round(self.lease_energy_j, 3),
            "verification_energy_j": round(self.verification_energy_j, 3),
            "deferred": self.deferred,
            "reason": self.reason,
            "deterrence": self.deterrence.as_dict() if self.deterrence else None,
        }


@dataclass(frozen=True)
class TierPolicy:
    medium_from_value: float = 0.01  # money units per lease at which the audit lottery is required
    high_from_value: float = 1.0  # ... at which every lease is audited
    audit_cost_fraction: float = 1 / 16.6  # an audit's energy / the lease's (core.json audit_speedup)
    upgrade_headroom_factor: float = 2.0
    margin: float = DEFAULT_MARGIN
    # value at which a lease goes to the optimistic exact tier; None = never (agents must keep traces)
    exact_from_value: float | None = None
    # L3's energy / the lease's. A round allowance, not a measured figure: bench/results/exact.json's
    # `exact_audit_vs_generation` (Maxwell's exact check of the opened blocks over the lease's own
    # generation time, this CPU) is 0.0037-0.0119 over the four models measured now, and was 0.0148 for
    # gpt2-small when this default was set (c788891); 0.02 rounds that up. That ratio is Maxwell's check;
    # the node's own cost of the tier, recording the trace (`trace_overhead_ratio`, +5 %), is not in it.
    exact_cost_fraction: float = 0.02

    def at_tier(
        self, tier: Tier, *, value: float, stake: float, lease_energy_j: float, price_per_j: float
    ) -> TierChoice:
        """The numbers of one tier for this lease (not yet checked against any headroom)."""
        deterrence = None
        if tier is Tier.LOW:
            p = 0.0
        elif tier is Tier.HIGH:
            p = 1.0
        else:  # medium, and exact's L4 lottery
            # a cheat saves at most all the lease's work; priced at what Maxwell charges for it
            deterrence = audit_probability(
                reward=value, stake=stake, cost_saved=lease_energy_j * price_per_j, margin=self.margin
            )
            p = deterrence.probability
        verify_j = p * self.audit_cost_fraction * lease_energy_j
        if tier is Tier.EXACT:
            verify_j += self.exact_cost_fraction * lease_energy_j
        return TierChoice(tier, p, lease_energy_j, verify_j, False, "", deterrence, TIERS[tier])

    def required(self, value: float, exact_ok: bool = True) -> Tier:
        """`exact_ok`: L3 can check the lease's model (else the exact tier's value buys high)."""
        if exact_ok and self.exact_from_value is not None and value >= self.exact_from_value:
            return Tier.EXACT
        if value >= self.high_from_value:
            return Tier.HIGH
        return Tier.MEDIUM if value >= self.medium_from_value else Tier.LOW

    def choose(
        self,
        *,
        value: float,
        stake: float,
        lease_energy_j: float,
        headroom_j: float,
        price_per_j: float,
        exact_ok: bool = True,
    ) -> TierChoice:
        for name, v in (
            ("value", value),
            ("stake", stake),
            ("lease_energy_j", lease_energy_j),
            ("headroom_j", headroom_j),
            ("price_per_j", price_per_j),
        ):
            if not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        kw = dict(value=value, stake=stake, lease_energy_j=lease_energy_j, price_per_j=price_per_j)
        need = self.required(value, exact_ok)
        chosen = self.at_tier(need, **kw)
        why = f"value {value:g} requires tier {need.value}"
        if need is Tier.LOW:
            medium = self.at_tier(Tier.MEDIUM, **kw)
            if headroom_j >= self.upgrade_headroom_factor * (lease_energy_j + medium.verification_energy_j):
                chosen, why = medium, f"{why}; spare thermal headroom ({headroom_j:g} J) lifts it to medium"
        total = chosen.lease_energy_j + chosen.verification_energy_j
        if headroom_j < total:
            return TierChoice(
                chosen.tier,
                chosen.audit_probability,
                lease_energy_j,
                chosen.verification_energy_j,
                True,
                f"{why}; deferred: expected headroom >= {total:.3f} J (lease + verification), the node has "
                f"{headroom_j:.3f} J",
                chosen.deterrence,
                chosen.layers,
            )
        return TierChoice(
            chosen.tier,
            chosen.audit_probability,
            lease_energy_j,
            chosen.verification_energy_j,
            False,
            f"{why}; fits the node's headroom ({total:.3f} of {headroom_j:g} J)",
            chosen.deterrence,
            chosen.layers,
        )
