"""One gateway lease while it runs: what the node relays of it, the appraisal of each piece as it
arrives, and the queue the requester's response reads.

The node (trusted: it is Maxwell's) relays each token with its own arrival time and the sandbox's
CPU-seconds at that moment, and each fingerprint chunk the agent streamed. Two appraisals run on
what has arrived so far:

- `RunningChecks` — L1's physics floor and L2's pace check on the running window (the
  same bounds the layers apply to the whole lease, from the same profile);
- `verifier.streaming.StreamingAudit` — when the lease was drawn for audit: the claimed model fed
  block by block on a KV cache (the total stays one prefill), each token's seeded choice and each
  chunk's fingerprint checked as soon as the model has seen their positions, within the tolerance
  set the one rule chose for the class pair the node measured (reported in the L4 result).

Tokens go to the requester's queue as they pass the running checks (`Delivery.IMMEDIATE`), or only
once the streaming audit has verified the block holding them (`Delivery.VERIFIED`; gateway.delivery).

The first failure cuts the lease: the node is told to stop the agent, the requester's stream ends
with an error event saying why, and intake (which the node still hands the evidence to) records
the failure as the lease's audit result, slashes the stake and charges the requester nothing.

A requester that leaves (`leave`: it disconnected, or the gateway gave up waiting for a token) stops
the lease the same way — the node's next relay is answered with the reason, so the node cuts the
agent off — but it is not a finding: nothing more is appraised, the audit result is `skipped`, not
a failure, and the tokens sent to the requester before it left are what it can be charged for.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..protocol.fingerprint import chunk_size_bytes
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import OpenedReceipt, ReceiptClaims
from ..protocol.result import LayerName, LayerResult, Status
from ..registry.models import ReferenceValues
from ..registry.profiles import Profile
from ..verifier.audit import Judged
from ..verifier.boundary import interval_lower_bound
from ..verifier.engine_stream import EngineStream
from ..verifier.streaming import EitherStream, StreamingAudit
from .delivery import Delivery
from .timeline import Mark, Timeline

MIN_WINDOW = 8  # tokens before the running pace and work checks judge anything


@dataclass(frozen=True)
class Arrival:
    """One token as the node saw it: value, seconds since the lease was handed over, sandbox CPU-s."""

    position: int
    token: int
    t: float
    cpu_s: float


class RunningChecks:
    """L1's physics floor and L2's pace bound on the tokens seen so far. L2's burst rule is not run
    here: under load the node's channel reader bunches honest tokens and the relay carries no
    contention to tell that from a dumped answer, so a burst is judged at intake (where the fail-safe
    for unseen contention applies), never cut on."""

    def __init__(self, profile: Profile, reference: ReferenceValues) -> None:
        self.profile = profile
        self.flops_per_token = reference.flops_per_token
        self.lower_gap = interval_lower_bound(profile)

    def judge(self, arrivals: list[Arrival]) -> str | None:
        """Called after every token: O(1), on the relay's path."""
        if len(arrivals) < MIN_WINDOW:
            return None
        mean = (arrivals[-1].t - arrivals[0].t) / (len(arrivals) - 1)  # the mean of the gaps
        if mean < self.lower_gap:
            return (
                f"running pace: expected tokens >= {self.lower_gap * 1000:.1f} ms apart on average, "
                f"measured {mean * 1000:.2f} ms over {len(arrivals)} tokens"
            )
        cpu = arrivals[-1].cpu_s - arrivals[0].cpu_s
        floor = self.profile.physics_floor_cpu_s(len(arrivals) - 1, self.flops_per_token)
        if cpu + 2 * 0.004 < floor:  # two accounting ticks of benefit of the doubt, as L1 gives
            return (
                f"running work: {len(arrivals) - 1} tokens need at least {floor:.4f} CPU-s on this "
                f"device, the sandbox used {cpu:.4f}"
            )
        return None


class EventKind(StrEnum):
    """What the requester's response reads next (equal to its string: routes compare either)."""

    TOKENS = "tokens"
    CUT = "cut"
    VERDICT = "verdict"
    GONE = "gone"  # the requester disconnected (a non-streamed answer's poll saw it)


@dataclass
class ClientEvent:
    kind: EventKind
    tokens: list[int] = field(default_factory=list)
    reason: str = ""
    verdict: dict[str, Any] | None = None


class LiveLease:
    """The gateway's view of one running lease; see the module docstring."""

    def __init__(
        self,
        lease: Lease,
        audit: StreamingAudit | EitherStream | EngineStream | None,
        checks: RunningChecks | None,
        node_id: str = "",
        delivery: Delivery = Delivery.IMMEDIATE,
        timeline: Timeline | None = None,
        replay: Callable[[ReceiptClaims], Judged] | None = None,
        judge: Callable[[OpenedReceipt], LayerResult] | None = None,
    ) -> None:
        assert isinstance(lease.job, GenerateJob)
        if delivery is Delivery.VERIFIED and audit is None:
            raise ValueError("a verified delivery needs the streaming audit: nothing else verifies a token")
        self.lease = lease
        self.delivery = delivery
        self.job: GenerateJob = lease.job
        self.audit = audit  # None: not drawn for audit (the running checks still apply)
        self.checks = checks
        # the final verdict's decode replay (AuditLayer.replayed) where the tolerance choice has one:
        # the stream is judged before the receipt declares how it was decoded
        self.replay = replay
        # the whole receipt's L4 (AuditLayer.appraise, the judge of every path) at intake: for an
        # engine receipt (v4), and for every receipt of an engine agent (EngineStream)
        self.judge = judge
        self.expected: int | None = None  # the answer's length once the receipt is in (an engine may stop)
        self.final = False  # the whole answer passed L4 at intake: every token is verified now
        self.node_id = node_id  # the only node whose relays this lease takes
        self.chunk_bytes = chunk_size_bytes(self.job.fingerprint_k)
        self.arrivals: list[Arrival] = []
        self.released = 0  # tokens put on the requester's queue
        self.chunks = 0
        self.cut_reason = ""
        self.cut_after = 0  # tokens received when the cut came
        self.first_bad: int | None = None
        self.left = ""  # why the requester's side ended before the lease did ("" while it reads on)
        self.delivered = 0  # tokens sent to the requester when it left
        self.stopped = False  # the lease was unfinished when the requester left: the node is told to stop it
        self.no_receipt = False  # the node handed in no receipt (intake settles it as a failed lease)
        self.last_relay = 0.0  # time.time() of the node's last relay: a node relaying is alive, not gone
        self.events: queue.Queue[ClientEvent] = queue.Queue()
        self.timeline = timeline or Timeline()  # where the completion's time went (maxwell.timing_ms)
        self._lock = threading.Lock()  # relays of one lease are appraised one at a time, in order

    @property
    def cut(self) -> bool:
        return bool(self.cut_reason)

    @property
    def verified(self) -> int:
        """Tokens (from the first) whose choice the streaming audit has verified (all of them once
        the whole answer passed at intake); 0 when not audited."""
        if self.final:
            return len(self.arrivals)
        return self.audit.checked if self.audit is not None else 0

    @property
    def engine(self) -> bool:
        """The lease's agent is enrolled as an engine adapter (its tokens checked by EngineStream)."""
        return isinstance(self.audit, EngineStream)

    @property
    def want(self) -> int:
        """Tokens the requester's response waits for: the lease's, or fewer once the receipt says
        the answer ended early (an engine stopped at end-of-sequence)."""
        return self.job.max_new_tokens if self.expected is None else self.expected

    def receive(self, tokens: list[Arrival], chunks: list[tuple[int, bytes]]) -> str | None:
        """A relay from the node; the reason to cut the lease, or None to let it go on."""
        with self._lock:
            self.last_relay = time.time()
            if self.cut:
                return self.cut_reason
            if self.stopped:  # the requester left: nothing more to appraise, the agent is cut off
                return self.left
            if tokens:
                self.timeline.mark(Mark.FIRST_TOKEN)
            if [a.position for a in tokens] != list(
                range(len(self.arrivals), len(self.arrivals) + len(tokens))
            ):
                return self._cut(
                    f"relay: expected positions from {len(self.arrivals)} in order, got "
                    f"{[a.position for a in tokens[:5]]}",
                    None,
                )
            for index, data in chunks:
                if index != self.chunks:
                    return self._cut(f"relay: expected fingerprint chunk {self.chunks}, got {index}", None)
                self.chunks += 1
                if self.audit and (finding := self.audit.receive_chunk(index, data)):
                    return self._cut(
                        f"streaming audit: {finding.reason}{self._label()}", finding.first_bad_token
                    )
            for a in tokens:  # one at a time: each token is forwarded only once the checks it triggers pass
                self.arrivals.append(a)
                if self.audit and (finding := self.audit.receive(a.token)):
                    return self._cut(
                        f"streaming audit: {finding.reason}{self._label()}", finding.first_bad_token
                    )
                if self.checks and (problem := self.checks.judge(self.arrivals)):
                    return self._cut(problem, None)
                self._release()
            if len(self.arrivals) >= self.job.max_new_tokens:
                self.timeline.mark(Mark.LAST_TOKEN)
            return None

    def _release(self) -> None:
        """Hand the requester's queue every token it may have now: all that passed the running
        checks, or (verified delivery) only those the streaming audit has verified."""
        upto = len(self.arrivals)
        if self.delivery is Delivery.VERIFIED:
            upto = min(upto, self.verified)
        if upto > self.released:
            self.events.put(
                ClientEvent(EventKind.TOKENS, [a.token for a in self.arrivals[self.released : upto]])
            )
            self.released = upto

    def leave(self, delivered: int, why: str) -> None:
        """The requester's side ended after `delivered` tokens were sent to it. An unfinished lease is
        stopped at the node's next relay (the agent's work is no longer wanted); not a finding."""
        with self._lock:
            if self.left:
                return
            self.left, self.delivered = why, delivered
            self.stopped = not self.cut and len(self.arrivals) < self.job.max_new_tokens

    def _cut(self, reason: str, first_bad: int | None) -> str:
        self.cut_reason, self.cut_after, self.first_bad = reason, len(self.arrivals), first_bad
        self.events.put(ClientEvent(EventKind.CUT, reason=reason))
        return reason

    def audit_result(self, receipt: OpenedReceipt | None) -> LayerResult:
        """The lease's L4 result at intake: the cut, or the streaming audit finished on the receipt's
        fingerprint chunks the agent did not stream (the receipt binds them all); for an engine
        receipt or agent, the whole receipt's L4 (`judge`). Nothing more streams after this: the
        requester's response is told how many tokens the answer has."""
        with self._lock:
            result = self._result(receipt)
            # the node relayed every token before it handed in; held tokens nothing verified stay held
            self.expected = len(self.arrivals) if result.status is not Status.SKIPPED else self.released
            self.events.put(ClientEvent(EventKind.TOKENS))  # wakes a response waiting for more tokens
            return result

    def _result(self, receipt: OpenedReceipt | None) -> LayerResult:
        if self.cut:
            return LayerResult(
                LayerName.AUDIT,
                Status.FAIL,
                f"cut off mid-stream after {self.cut_after} tokens: {self.cut_reason}",
                details={
                    "cut_after_tokens": self.cut_after,
                    "first_bad_token": self.first_bad,
                    **self._details(),
                },
            )
        if self.stopped:  # unfinished on purpose: a pass would claim too much, a failure would slash
            return LayerResult(
                LayerName.AUDIT,
                Status.SKIPPED,
                f"not finished: {self.left}; the lease was stopped after {len(self.arrivals)} tokens"
                + (", each checked as it arrived" if self.audit else ""),
                details={"requester_left": True, "sent_tokens": self.delivered},
            )
        if self.audit is None:
            return LayerResult(
                LayerName.AUDIT, Status.SKIPPED, "not drawn by the audit lottery (drawn at issue)"
            )
        return self._finish(receipt)

    def _label(self) -> str:
        return f" {self.audit.choice.label()}" if self.audit is not None else ""

    def _details(self) -> dict[str, Any]:
        """The tolerance choice (when audited) and how tokens were delivered, for the L4 result."""
        out: dict[str, Any] = {"delivery": self.delivery.value, "released_tokens": self.released}
        return {**self.audit.choice.details(), **out} if self.audit is not None else out

    def _finish(self, receipt: OpenedReceipt | None) -> LayerResult:
        assert self.audit is not None
        if receipt is None:
            return LayerResult(LayerName.AUDIT, Status.SKIPPED, "not run: no readable receipt")
        if self.judge is not None and (self.engine or receipt.claims.engine is not None):
            return self._judged(receipt)
        data = receipt.claims.fingerprint_bytes()
        size = self.chunk_bytes
        details = self._details()
        for index in range(self.chunks, len(data) // size):
            if finding := self.audit.receive_chunk(index, data[index * size : (index + 1) * size]):
                why = f"streaming audit: {finding.reason}{self._label()}"
                return LayerResult(LayerName.AUDIT, Status.FAIL, why, details=details)
        unchecked = len(self.audit.spans) - self.audit.next_chunk
        if self.audit.checked < self.job.max_new_tokens or unchecked:
            return LayerResult(
                LayerName.AUDIT,
                Status.FAIL,
                f"streaming audit: expected all {self.job.max_new_tokens} tokens and "
                f"{len(self.audit.spans)} fingerprint chunks checked, got {self.audit.checked} and "
                f"{self.audit.next_chunk}{self._label()}",
                details=details,
            )
        streamed = (
            f"streaming audit: {self.audit.checked} token choices and {self.audit.next_chunk} "
            f"fingerprint chunks checked as they arrived ({self.chunks} streamed)"
        )
        if self.replay is not None:
            judged = self.replay(receipt.claims)
            if judged.problem:
                why = f"{streamed}; at intake, {judged.problem}{self._label()}"
                return LayerResult(LayerName.AUDIT, Status.FAIL, why, details=details)
            streamed = f"{streamed}; at intake, {judged.ok}"
        return LayerResult(LayerName.AUDIT, Status.PASS, f"{streamed}{self._label()}", details=details)

    def _judged(self, receipt: OpenedReceipt) -> LayerResult:
        """An engine receipt or agent at intake: the tokens' running check, then the whole receipt's
        L4 by the judge every path uses. Tokens a verified delivery still holds (an engine's sampled
        tokens, a short last block) go out only if it passes; if it fails they never do, and the
        lease is cut as a mid-stream failure would be."""
        assert self.audit is not None and self.judge is not None
        streamed = (
            f"streamed: {self.audit.checked} of {len(self.arrivals)} tokens verified as they arrived"
            f"{self._label()}"
        )
        final = self.judge(receipt)
        details = {**final.details, **self._details()}
        why = f"at intake, {final.reason} ({streamed})"
        if final.status is Status.FAIL and self.released < len(self.arrivals):
            self._cut(why, None)
            why = f"cut off at intake: {why}"
            return LayerResult(LayerName.AUDIT, Status.FAIL, why, final.score, details=details)
        if final.status in (Status.PASS, Status.WARN):
            self.final = True
            self._release()
        elif final.status is not Status.FAIL:  # not measured: nothing verified what is still held
            return LayerResult(LayerName.AUDIT, Status.SKIPPED, why, final.score, final.cost_s, details)
        return LayerResult(LayerName.AUDIT, final.status, why, final.score, final.cost_s, details)
