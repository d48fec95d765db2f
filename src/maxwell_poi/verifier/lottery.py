"""The audit lottery: one draw, from the OS CSPRNG, for every place that decides whether a lease is
re-executed (the verifier's own policy, intake's queued L4, the gateway's streaming audit).

Drawn after the receipt (or, for a streamed lease, at issue, out of the agent's sight): the agent
cannot know which of its leases will be audited."""

from __future__ import annotations

import secrets

RESOLUTION = 1_000_000  # probabilities are honoured to one part in a million


def draw_audit(probability: float) -> bool:
    """True with `probability` (0 never, 1 always)."""
    return secrets.randbelow(RESOLUTION) < probability * RESOLUTION
