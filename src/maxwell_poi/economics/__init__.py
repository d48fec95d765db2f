"""Maxwell's economics: how often to audit so that cheating loses money in expectation, and which
verification tier a lease gets (issue 9; the auction and the Energy Wallet wiring come next).

- `deterrence.py`  p·(R + S)·(1 − r) > C_saved with a margin (Proof of Sampling, anchors.md).
- `tiers.py`       low / medium / high by the bid's value, capped by what the node's thermal
                   headroom can pay for, each with its layers and audit probability.
"""

from .deterrence import Deterrence, audit_probability
from .tiers import TIERS, Tier, TierChoice, TierPolicy

__all__ = ["TIERS", "Deterrence", "Tier", "TierChoice", "TierPolicy", "audit_probability"]
