"""Maxwell's economics: how often to audit so that cheating loses money in expectation, and which
verification tier a lease gets, who wins GPU time, and what a lease's energy costs (issue 9).

- `deterrence.py`  p·(R + S)·(1 − r) > C_saved with a margin (Proof of Sampling, anchors.md).
- `tiers.py`       low / medium / high by the bid's value, capped by what the node's thermal
                   headroom can pay for, each with its layers and audit probability.
- `auction.py`     sealed bids, uniform price per round, capacity in joules of thermal budget.
- `energy.py`      the joules Maxwell measured for a lease (the Energy Wallet's debit) and expects.
"""

from .auction import Clearing, SealedBid, clear
from .deterrence import Deterrence, audit_probability
from .energy import EnergyMeasurement, expected_energy_j, measured_energy
from .tiers import TIERS, Tier, TierChoice, TierPolicy

__all__ = [
    "TIERS",
    "Clearing",
    "EnergyMeasurement",
    "SealedBid",
    "clear",
    "expected_energy_j",
    "measured_energy",
    "Deterrence",
    "Tier",
    "TierChoice",
    "TierPolicy",
    "audit_probability",
]
