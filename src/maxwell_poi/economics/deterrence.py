"""The audit probability that makes cheating a losing bet.

An agent that cheats on a lease saves `cost_saved` (the work it did not do). If the lease is
audited (probability p) the cheat is caught: it forfeits the lease's reward R and its stake S. With
a share r of verifiers colluding (an audit that does not count), honesty is the unique equilibrium
when  p · (1 − r) · (R + S) > C_saved  (Proof of Sampling, arXiv 2405.00295, as anchors.md gives it).
Maxwell asks for a margin on top: p = (1 + margin) · C_saved / ((1 − r)(R + S)), capped at 1. When
even p = 1 cannot deter (the stake and reward are too small for what the cheat saves) the lease
needs more stake, not more luck, and the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_MARGIN = 0.5  # audit 50% more often than the bare equilibrium asks


@dataclass(frozen=True)
class Deterrence:
    probability: float  # the audit probability to use, in [0, 1]
    bare: float  # the equilibrium's lower bound without the margin (may exceed 1)
    deterred: bool  # False when even auditing every lease cannot make cheating lose money
    expected_loss_if_cheating: float  # p·(1 − r)·(R + S) − C_saved, in the caller's money units
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {
            "audit_probability": round(self.probability, 6),
            "bare_equilibrium": round(self.bare, 6),
            "deterred": self.deterred,
            "expected_loss_if_cheating": round(self.expected_loss_if_cheating, 6),
            "reason": self.reason,
        }


def audit_probability(
    *, reward: float, stake: float, cost_saved: float, margin: float = DEFAULT_MARGIN, colluding: float = 0.0
) -> Deterrence:
    """The audit probability for a lease (amounts in one money unit). Raises ValueError on inputs
    that make no sense, saying what was expected and what came."""
    for name, value in (("reward", reward), ("stake", stake), ("cost_saved", cost_saved), ("margin", margin)):
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
    if not 0 <= colluding < 1:
        raise ValueError(f"colluding: expected a share in [0, 1), got {colluding!r}")
    at_stake = (1 - colluding) * (reward + stake)
    if cost_saved == 0:
        return Deterrence(0.0, 0.0, True, 0.0, "nothing to save by cheating: no audit needed to deter")
    if at_stake == 0:
        return Deterrence(
            1.0, float("inf"), False, -cost_saved, "no reward or stake to lose: audit all, ask for stake"
        )
    bare = cost_saved / at_stake
    p = min(1.0, (1 + margin) * bare)
    # a saving near float resolution must not round p below the inequality it has to satisfy
    while p < 1.0 and not p * (1 - colluding) * (reward + stake) > cost_saved:
        p = math.nextafter(p, 2.0)
    loss = p * at_stake - cost_saved
    if bare >= 1:
        why = (
            f"even auditing every lease deters nothing: cheating saves {cost_saved:g} but risks only "
            f"{at_stake:g}; expected a stake of at least {cost_saved / (1 - colluding) - reward:g}"
        )
        return Deterrence(1.0, bare, False, loss, why)
    why = (
        f"p = (1 + {margin:g}) x {cost_saved:g} / {at_stake:g} = {p:.4f}: "
        f"cheating loses {loss:g} per lease on average"
    )
    return Deterrence(p, bare, True, loss, why)
