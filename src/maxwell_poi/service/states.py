"""The states a bid, a lease, its stake, an L3 challenge and a gateway completion can be in, and the
moves between them that are allowed — declared here as data, in the manner of Prefect's
orchestration rules. `service.settlement` is the one place that applies the lease, bid, stake and
completion moves (they move money); `service.challenges` applies the challenge ones.

The values are the strings the database stores (and its CHECK constraints list, generated from
these enums in `service.schema`): renaming one, or adding one, needs a migration (0005 added
the lease's `failed`, 0006 the bid's `cached`).

A *failed* lease (`LeaseState.FAILED`, issue 23): the node handed in no receipt at all — its agent
never started (a bad `--key`, a missing program) or crashed before writing one — with Maxwell's
signed evidence of how it ended (exit code, stderr). That is a failure, not evidence of cheating,
so it is its own terminal state rather than a settled lease with a verdict: nothing charged, the
stake released, nothing paid (service.settlement.fail_lease). Its verdict row is stored as
`warning` (the enum the verdict column allows: neither an affirmation to pay for nor a
contraindication to slash for) with stake outcome `released` and a reason naming the exit code and
the last lines of stderr; the lease's `failed` status is what tells it apart from an appraised
warning. Three in a row suspend the agent's bidding (service.market) until it is re-enrolled.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from ..protocol.errors import PoiError


class BidState(StrEnum):
    OPEN = "open"
    WON = "won"
    REFUSED = "refused"
    EXPIRED = "expired"
    # answered by an identical greedy job's lease issued in the same round (its `lease_id`): a
    # cached answer — no lease of its own, nothing held, charged or staked (service.market)
    CACHED = "cached"


class LeaseState(StrEnum):
    ISSUED = "issued"  # declared for the schema; leases are issued straight to a pulling node
    PULLED = "pulled"
    AUDIT_PENDING = "audit_pending"  # taken in, verdict not final (a queued L4, the exact tier)
    SETTLED = "settled"
    EXPIRED = "expired"
    FAILED = "failed"  # no receipt: the agent never started or crashed (not cheating: nothing moves)


class StakeOutcome(StrEnum):
    """What a verdict did to the lease's stake (`cp_verdicts.stake_outcome`)."""

    RELEASED = "released"
    SLASHED = "slashed"
    HELD = "held"  # a warning: kept in escrow for Maxwell to resolve
    PENDING = "pending"  # the verdict is not final yet
    NONE = "none"  # nothing was staked


class ChallengeState(StrEnum):
    OPEN = "open"
    ANSWERED = "answered"
    # closed without an answer in time; `cp_challenges.delivered_at` tells the agent's silence (set)
    # from a question no pull of its node took before the deadline (NULL: Maxwell's failure)
    LATE = "late"


class ChallengeKind(StrEnum):
    L3 = "l3"  # a part of the lease's blocks (a challenge opens every block, in parts)
    BISECT = "bisect"  # a dispute's round
    SETTLE = "settle"  # a dispute's last opening: the culprit block whole


class CompletionState(StrEnum):
    STREAMING = "streaming"
    PAID = "paid"
    REFUNDED = "refunded"
    CUT = "cut"


Transitions = Mapping[StrEnum, frozenset[StrEnum]]

# Every move allowed, by the state it leaves; a state absent from a table is terminal.
BID_MOVES: Transitions = {
    BidState.OPEN: frozenset({BidState.WON, BidState.CACHED, BidState.REFUSED, BidState.EXPIRED}),
}
LEASE_MOVES: Transitions = {
    LeaseState.ISSUED: frozenset({LeaseState.PULLED, LeaseState.EXPIRED}),
    LeaseState.PULLED: frozenset(
        {LeaseState.AUDIT_PENDING, LeaseState.SETTLED, LeaseState.EXPIRED, LeaseState.FAILED}
    ),
    LeaseState.AUDIT_PENDING: frozenset({LeaseState.SETTLED}),
}
STAKE_MOVES: Transitions = {
    StakeOutcome.PENDING: frozenset(
        {StakeOutcome.RELEASED, StakeOutcome.SLASHED, StakeOutcome.HELD, StakeOutcome.NONE}
    ),
}
CHALLENGE_MOVES: Transitions = {
    ChallengeState.OPEN: frozenset({ChallengeState.ANSWERED, ChallengeState.LATE}),
}
COMPLETION_MOVES: Transitions = {
    CompletionState.STREAMING: frozenset(
        {CompletionState.PAID, CompletionState.REFUNDED, CompletionState.CUT}
    ),
}


class TransitionError(PoiError):
    """A move the tables above do not declare (or a row no longer in the state the move leaves)."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        self.what = what
        self.expected = expected
        self.got = got
        super().__init__(f"{what}: expected {expected}, got {got}")


def sources(moves: Transitions, target: StrEnum) -> frozenset[StrEnum]:
    """The states from which `target` may be reached."""
    return frozenset(s for s, targets in moves.items() if target in targets)


def check_move(what: str, moves: Transitions, current: str, target: StrEnum) -> None:
    """Refuse a move that is not declared, naming the moves that are."""
    allowed = next((t for s, t in moves.items() if s == current), frozenset())
    if target not in allowed:
        froms = sorted(str(s) for s in sources(moves, target)) or ["nowhere (an initial state)"]
        raise TransitionError(what, f"a move to {target} from {' or '.join(froms)}", f"one from {current}")


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The stored strings, in declaration order (CHECK constraints)."""
    return tuple(m.value for m in enum)
