"""When a gateway completion's tokens may reach the requester, and how many reached it unverified.

    immediate  each token as soon as it passed the running checks (L1's floor, L2's pace); the
               streaming audit checks it when its block of AUDIT_BLOCK tokens is fed, so up to a
               block of tokens can reach the requester before it is verified (today's behaviour)
    verified   a token is released only once the streaming audit has verified the block that holds
               it (its seeded choice checked under the claimed model, every fingerprint chunk that
               had arrived matching): a cut ends the stream before any unverified token was sent.
               It costs latency: the first token waits for the first block's check.

Which applies to a request: the request's own `delivery` field (`extra_body={"delivery":
"verified"}`), else the server's default (`POI_SERVE_GATEWAY_DELIVERY`): `by-tier` (the default:
`verified` for the high tier, where every lease is audited, `immediate` for the others), `verified`
or `immediate`. A verified delivery needs the streaming audit, so a lease delivered verified is
always audited, whatever its tier's lottery drew.

A token counts as unverified when its text reached the requester before the streaming audit had
checked it; every token of a lease that was not audited counts (nothing re-executed it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum

from ..economics.tiers import Tier

DELIVERY_ENV = "POI_SERVE_GATEWAY_DELIVERY"
BY_TIER = "by-tier"
VERIFIED_TIERS = frozenset({Tier.HIGH.value})  # where `by-tier` delivers verified


class Delivery(StrEnum):
    IMMEDIATE = "immediate"
    VERIFIED = "verified"


@dataclass(frozen=True)
class DeliveryPolicy:
    """The server's default: BY_TIER, or one Delivery for every request that names none."""

    default: str = BY_TIER

    def __post_init__(self) -> None:
        allowed = (BY_TIER, *Delivery)
        if self.default not in allowed:
            raise ValueError(f"{DELIVERY_ENV}: expected one of {', '.join(allowed)}, got {self.default!r}")

    @classmethod
    def from_env(cls) -> DeliveryPolicy:
        return cls(os.environ.get(DELIVERY_ENV, BY_TIER).strip() or BY_TIER)

    def for_lease(self, requested: Delivery | None, tier: str) -> Delivery:
        """The request's choice, else the default (BY_TIER: by the tier the lease was issued at)."""
        if requested is not None:
            return requested
        if self.default == BY_TIER:
            return Delivery.VERIFIED if tier in VERIFIED_TIERS else Delivery.IMMEDIATE
        return Delivery(self.default)


@dataclass
class SentCount:
    """What one response has sent: tokens whose text went out, and of those, the unverified."""

    delivered: int = 0
    unverified: int = 0

    def sent(self, upto: int, verified: int) -> None:
        """The text of the first `upto` tokens has now gone out, `verified` of the lease's tokens
        having been verified when it left (a snapshot taken before the write)."""
        if upto <= self.delivered:
            return
        self.unverified += max(0, upto - max(self.delivered, verified))
        self.delivered = upto


__all__ = ["BY_TIER", "DELIVERY_ENV", "Delivery", "DeliveryPolicy", "SentCount"]
