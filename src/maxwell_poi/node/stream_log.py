"""Who streamed what, when, and whose CPU it was: the resident sandbox's token log.

A resident sandbox serves several leases at once (batched, or queued one behind another), while the
kernel counts CPU for the sandbox as a whole. Sharing a lease window's CPU by token counts bills
twice what two overlapping windows hold in common (a lease queued behind another has the other's
whole run inside its window). Here every CPU-nanosecond the sandbox burns while leases are in flight
goes to exactly one lease: the one whose token (or receipt) Maxwell read next. Tokens of one read
(a batch step) split that step's CPU evenly. What the sandbox burns with no lease in flight is no
lease's (it is the idle gap's evidence instead).
"""

from __future__ import annotations

import bisect
from collections import defaultdict, deque


class StreamLog:
    """Arrival times of every token the sandbox streamed, and each lease's own CPU-seconds.

    Not thread-safe by itself: the resident agent calls it under its lock. CPU readings are the
    sandbox's cumulative counter in nanoseconds; a reading older than one already used (taken by
    another thread just before) adds nothing rather than a negative amount.
    """

    def __init__(self) -> None:
        self._arrivals: deque[tuple[float, str]] = deque()  # (arrival stamp, lease id)
        self._last_ns: int | None = None  # the reading CPU was attributed up to; None when idle
        self._own_ns: dict[str, float] = defaultdict(float)
        self._step: tuple[float, list[str], float] | None = None  # (stamp, lease per token, ns)

    def begin(self, cpu_ns: int) -> None:
        """A lease went in; the first of a busy span starts the attribution at this reading."""
        if self._last_ns is None:
            self._last_ns = cpu_ns

    def token(self, lease_id: str, arrived: float, cpu_ns: int) -> None:
        self._arrivals.append((arrived, lease_id))
        spent = self._advance(cpu_ns)
        step = self._step
        if step is None or step[0] != arrived:
            self._step = (arrived, [lease_id], spent)
            self._own_ns[lease_id] += spent
            return
        # same read as the tokens before it: one batch step, so its CPU is split across all of them
        _, owners, total = step
        before = total / len(owners)
        owners.append(lease_id)
        total += spent
        after = total / len(owners)
        for owner in owners[:-1]:
            self._own_ns[owner] += after - before
        self._own_ns[lease_id] += after
        self._step = (arrived, owners, total)

    def finish(self, lease_id: str, cpu_ns: int, *, last: bool) -> float:
        """The lease's receipt (or its end): the CPU since the last reading is its own (writing the
        receipt). Returns its own CPU-seconds; `last` ends the busy span."""
        self._own_ns[lease_id] += self._advance(cpu_ns)
        self._step = None
        own = self._own_ns.pop(lease_id, 0.0) / 1e9
        if last:
            self._last_ns = None
            self._own_ns.clear()
        return own

    def _advance(self, cpu_ns: int) -> float:
        if self._last_ns is None:  # a token with no lease in flight is never routed here
            self._last_ns = cpu_ns
        spent = max(0, cpu_ns - self._last_ns)
        self._last_ns = max(self._last_ns, cpu_ns)
        return float(spent)

    def between(self, t0: float, t1: float) -> list[str]:
        """The lease id of every token the sandbox streamed in [t0, t1]."""
        arrivals = list(self._arrivals)
        lo = bisect.bisect_left(arrivals, (t0,))
        hi = bisect.bisect_right(arrivals, (t1, "\uffff"))
        return [lid for _, lid in arrivals[lo:hi]]

    def forget_before(self, t: float) -> None:
        while self._arrivals and self._arrivals[0][0] < t:
            self._arrivals.popleft()
