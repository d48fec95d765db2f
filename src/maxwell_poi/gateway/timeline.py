"""Where one gateway completion's time went, stage by stage, as the gateway saw it (issue 25: the
gateway's fixed cost is measured before it is cut).

The gateway marks each moment once, on its own monotonic clock; nothing here is the agent's claim.
A completion's `maxwell.timing_ms` holds the stages between consecutive marks that were reached:

    issue        the request's checks, the auction and the issue-and-hold transaction
    to_node      until the node's (long-polling) pull took the lease
    first_token  until the node relayed the first token: agent hand-over, prefill, the relay's POST
    tokens       the first relayed token to the last (the agent decoding, relays appraised)
    receipt      the last token to intake opening the receipt: the agent's receipt, the node's
                 signed evidence, the intake POST, the signature check and the lease read
    settle       that to the verdict committed: the streaming audit's end, L0-L2, the settlement
                 transaction with the requester's payment
    answer       the verdict committed to the answer ready (waking the response, the attestation, EAR)

`total` is the request to the answer ready; a stage that was never reached (a cut, a requester that
left) is absent, not zero.
"""

from __future__ import annotations

import time
from enum import StrEnum


class Mark(StrEnum):
    REQUEST = "request"
    ISSUED = "issued"
    PULLED = "pulled"
    FIRST_TOKEN = "first_token"
    LAST_TOKEN = "last_token"
    RECEIPT = "receipt"
    SETTLED = "settled"
    ANSWERED = "answered"


# (stage, from mark, to mark): each stage ends at the mark it is named after, except the first
STAGES: tuple[tuple[str, Mark, Mark], ...] = (
    ("issue", Mark.REQUEST, Mark.ISSUED),
    ("to_node", Mark.ISSUED, Mark.PULLED),
    ("first_token", Mark.PULLED, Mark.FIRST_TOKEN),
    ("tokens", Mark.FIRST_TOKEN, Mark.LAST_TOKEN),
    ("receipt", Mark.LAST_TOKEN, Mark.RECEIPT),
    ("settle", Mark.RECEIPT, Mark.SETTLED),
    ("answer", Mark.SETTLED, Mark.ANSWERED),
)


class Timeline:
    """The moments one completion reached (the first time each was reached)."""

    def __init__(self, started: float | None = None) -> None:
        self.at: dict[Mark, float] = {Mark.REQUEST: time.perf_counter() if started is None else started}

    def mark(self, mark: Mark) -> None:
        self.at.setdefault(mark, time.perf_counter())

    def stages_ms(self) -> dict[str, float]:
        """Milliseconds per stage reached (both ends marked), and `total` to the last mark reached."""
        out = {
            name: round((self.at[end] - self.at[begin]) * 1000, 2)
            for name, begin, end in STAGES
            if begin in self.at and end in self.at
        }
        out["total"] = round((max(self.at.values()) - self.at[Mark.REQUEST]) * 1000, 2)
        return out


__all__ = ["STAGES", "Mark", "Timeline"]
