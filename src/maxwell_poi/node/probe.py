"""Maxwell's side of the work probe (protocol.probe): draw one per generation lease, send it while
the lease streams, and judge the answer against the node's own reference copy of the model.

Why: L1 bounds work from below by the CPU and memory the sandbox used, and an agent can pad both
(a relay that burns CPU beside its forwarding, a cache of earlier answers that holds memory).
Padding cannot compute a fresh sequence through the leased weights: the probe's ids come from the
OS CSPRNG when the lease starts and were never seen before, so only weights in the sandbox answer.

The judgement is Maxwell's own recomputation, never the agent's word: the reference pass runs here
after the lease window closed (so it is not charged to the agent, and cannot slow it), with the
tolerance the one rule picks for the measured class pair (verifier.thresholds.choose_tolerance).
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from ..observer.evidence import WorkProbe
from ..observer.host import this_device
from ..protocol.lease import GenerateJob, Lease
from ..protocol.probe import FIRST_JUDGED, ProbeAnswer, ProbeRequest
from ..registry.fingerprint import compare_chunk
from ..registry.forward import final_hidden
from ..registry.models import Registry
from ..verifier.thresholds import Thresholds, choose_tolerance

PROBE_IDS = 8  # fresh ids per probe: 7 judged positions, about one decode step of work
LATEST_TOKEN = 4  # the probe goes out when one of the lease's first tokens arrives (drawn)
ANSWER_WAIT_S = 5.0  # after sending, how long the node waits for an answer past the receipt


@dataclass
class PendingProbe:
    """One lease's probe, from the draw to the answer (filled by the agent's reader thread)."""

    request: ProbeRequest
    send_at_token: int
    sent_at_token: int = -2  # -2: not sent; -1: sent when the receipt came (no token reached it)
    sent_t: float | None = None  # perf_counter as the line was written (None: it never went out)
    answer: ProbeAnswer | None = None
    answered_t: float | None = None
    arrived: threading.Event = field(default_factory=threading.Event)
    went_out: threading.Event = field(default_factory=threading.Event)  # the write was tried

    @property
    def sent(self) -> bool:
        return self.sent_t is not None

    def take(self, answer: ProbeAnswer, at: float) -> bool:
        """Record the first answer to this probe; False for any other line."""
        if answer.number != self.request.number or self.answer is not None:
            return False
        self.answer, self.answered_t = answer, at
        self.arrived.set()
        return True


class WorkProbes:
    """Draws and judges the probes of one node's leases (one per generation lease)."""

    def __init__(self, registry: Registry, thresholds: Thresholds | None = None) -> None:
        self.registry = registry
        self.thresholds = thresholds or Thresholds.load()
        self._count = 0
        self._lock = threading.Lock()

    def draw(self, lease: Lease) -> PendingProbe | None:
        """A fresh probe for a generation lease (None for other jobs: no decode to probe)."""
        if not isinstance(lease.job, GenerateJob):
            return None
        vocab = self.registry.reference(lease.model_id).vocab
        with self._lock:
            self._count += 1
            number = self._count
        request = ProbeRequest(
            lease_id=lease.lease_id,
            number=number,
            model_id=lease.model_id,
            precision=lease.precision,
            ids=tuple(secrets.randbelow(vocab) for _ in range(PROBE_IDS)),
            fingerprint_k=lease.job.fingerprint_k,
        )
        last = max(0, min(LATEST_TOKEN, lease.job.max_new_tokens - 1))
        return PendingProbe(request, send_at_token=secrets.randbelow(last + 1))

    def wait(self, probe: PendingProbe) -> None:
        """Give a queued probe its write, then its answer until ANSWER_WAIT_S after it went out."""
        if probe.sent_at_token != -2:
            probe.went_out.wait(ANSWER_WAIT_S)
        if probe.sent_t is not None and probe.answer is None:
            probe.arrived.wait(max(0.0, probe.sent_t + ANSWER_WAIT_S - time.perf_counter()))

    def judge(self, lease: Lease, probe: PendingProbe, device_class: str) -> WorkProbe:
        """What the probe showed, by Maxwell's recomputation of the fresh sequence."""
        sent_at = probe.sent_at_token
        latency = (
            probe.answered_t - probe.sent_t
            if probe.answered_t is not None and probe.sent_t is not None
            else -1.0
        )
        base = {"sent_at_token": sent_at, "latency_s": round(latency, 6), "ids": len(probe.request.ids)}
        if not probe.sent:
            return WorkProbe("not_sent", "the lease ended before the probe could be sent", **base)
        if probe.answer is None:
            return WorkProbe(
                "unanswered", f"no answer to the work probe within {ANSWER_WAIT_S:.0f} s", **base
            )
        if probe.answer.error:
            return WorkProbe(
                "refused", f"the agent did not answer the work probe: {probe.answer.error}", **base
            )
        choice = choose_tolerance(
            self.thresholds, lease.precision, device_class, this_device(), lease.model_id
        )
        kind = choice.label()
        misses, tracks = [], choice.tracks()
        for precision, tol in tracks:  # a native choice: the claimed precision's, then fp32
            hidden = final_hidden(self.registry.load_in(lease.model_id, precision), list(probe.request.ids))
            try:
                c = compare_chunk(
                    probe.answer.fingerprint,
                    hidden[FIRST_JUDGED:],
                    probe.request.fingerprint_k,
                    (FIRST_JUDGED, len(probe.request.ids)),
                )
            except ValueError as exc:
                return WorkProbe("mismatched", f"the probe's fingerprint does not read back: {exc}", **base)
            measured = {
                "close_fraction": round(c.close_fraction, 4),
                "median_rel_error": float(c.median_rel_error),
            }
            if c.close_fraction >= tol.min_close and c.median_rel_error <= tol.max_median_rel:
                break
            misses.append(
                f"{'' if len(tracks) == 1 else f'in {precision}: '}(>= {tol.min_close:.0%} close, "
                f"median error <= {tol.max_median_rel:g}), got {c.close_fraction:.0%} close, median error "
                f"{c.median_rel_error:.3g}"
            )
        else:
            return WorkProbe(
                "mismatched",
                f"work probe: expected the leased model's fingerprint of {len(probe.request.ids)} fresh ids "
                f"{'; '.join(misses)} {kind}",
                tolerance=kind,
                **base,
                **measured,
            )
        return WorkProbe(
            "matched",
            f"work probe answered by the leased model in {latency * 1000:.0f} ms {kind}",
            tolerance=kind,
            **base,
            **measured,
        )
