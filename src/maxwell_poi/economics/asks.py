"""The gateway's auction: agents serving a model post sealed asks (micro-units per generated token);
a request goes to the lowest ask and is priced at the second-lowest (a reverse Vickrey auction).

Why second price: an agent's best ask is then its true cost — asking lower cannot raise what it is
paid, asking higher only loses requests — and the requester never pays more than the runner-up
would have charged. With one ask, the price is that ask. Ties go to a random one of the lowest
(drawn from the OS CSPRNG), so no agent can win ties by posting first.

Pure: it ranks and prices; the gateway issues the lease and holds the requester's payment.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Ask:
    agent_id: str
    micro_per_token: int


@dataclass(frozen=True)
class Award:
    agent_id: str
    price_micro_per_token: int
    asks: int  # how many competed
    reason: str


def award(asks: Sequence[Ask]) -> Award | None:
    """The winner and its price, or None when nobody asked."""
    if not asks:
        return None
    ordered = sorted(asks, key=lambda a: a.micro_per_token)
    lowest = [a for a in ordered if a.micro_per_token == ordered[0].micro_per_token]
    winner = lowest[secrets.randbelow(len(lowest))]
    price = ordered[1].micro_per_token if len(ordered) > 1 else winner.micro_per_token
    reason = (
        f"lowest of {len(ordered)} asks ({winner.micro_per_token} micro/token), paid the runner-up's {price}"
        if len(ordered) > 1
        else f"the only ask ({price} micro/token)"
    )
    return Award(winner.agent_id, price, len(ordered), reason)
