"""Maxwell's GPU-time auction: sealed bids, one uniform price per round, capacity in joules.

The rule (one round per node pull; capacity = the node's reported thermal headroom):

1. Bids below the reserve price never win.
2. The rest are ranked by price per joule, highest first; ties go to the earlier bid, then by key.
3. Winners are the longest prefix of that ranking whose energy (expected lease energy plus the
   verification it may need) fits the capacity. The first bid that does not fit ends the round:
   it and everything after it stay open for the next round.
4. Every winner pays the same price per measured joule: the first losing bid's price (the highest
   price that did not win), or the reserve when nothing lost on capacity. No winner pays more than
   it bid, and a bidder cannot lower its own price by shading its bid — the price is set by others.

Pure: it ranks and prices; the control plane turns the winners into leases in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class SealedBid:
    key: int  # the control plane's bid row
    price_micro_per_j: int
    energy_j: float
    submitted_at: float


@dataclass(frozen=True)
class Clearing:
    winners: tuple[int, ...]
    losers: tuple[int, ...]  # stay open (capacity) — below-reserve bids are in `below_reserve`
    below_reserve: tuple[int, ...]
    price_micro_per_j: int
    capacity_j: float
    used_j: float

    def as_dict(self) -> dict[str, object]:
        return {
            "winners": list(self.winners),
            "losers": list(self.losers),
            "below_reserve": list(self.below_reserve),
            "price_micro_per_j": self.price_micro_per_j,
            "capacity_j": round(self.capacity_j, 3),
            "used_j": round(self.used_j, 3),
        }


def clear(bids: Sequence[SealedBid], capacity_j: float, reserve_micro_per_j: int) -> Clearing:
    if not capacity_j >= 0:
        raise ValueError(f"capacity_j: expected a number >= 0, got {capacity_j!r}")
    if reserve_micro_per_j < 1:
        raise ValueError(f"reserve_micro_per_j: expected >= 1, got {reserve_micro_per_j!r}")
    eligible = [b for b in bids if b.price_micro_per_j >= reserve_micro_per_j]
    below = tuple(b.key for b in bids if b.price_micro_per_j < reserve_micro_per_j)
    ranked = sorted(eligible, key=lambda b: (-b.price_micro_per_j, b.submitted_at, b.key))
    winners: list[SealedBid] = []
    used = 0.0
    for bid in ranked:
        if used + bid.energy_j > capacity_j:
            break
        winners.append(bid)
        used += bid.energy_j
    losers = ranked[len(winners) :]
    price = (
        max(reserve_micro_per_j, losers[0].price_micro_per_j) if losers and winners else reserve_micro_per_j
    )
    return Clearing(
        tuple(b.key for b in winners), tuple(b.key for b in losers), below, price, capacity_j, used
    )
