"""Maxwell's side of the work probe (protocol.probe): draw one per generation lease, send it while
the lease streams, and judge the answer against the node's own reference copy of the model.

Why: L1 bounds work from below by the CPU and memory the sandbox used, and an agent can pad both
(a relay that burns CPU beside its forwarding, a cache of earlier answers that holds memory).
Padding cannot compute a fresh sequence through the leased weights: the probe's ids come from the
OS CSPRNG when the lease starts and were never seen before, so only weights in the sandbox answer.

The judgement is Maxwell's own recomputation, never the agent's word: the reference pass runs here
after the lease window closed (so it is not charged to the agent, and cannot slow it), with the
tolerance the one rule picks for the measured class pair (verifier.thresholds.choose_tolerance).

Engine agents (issue 27: `poi agent --engine-cmd CMD`, an unmodified serving engine) have no hidden
states: the node knows one by the command it enrolled (protocol.engine.engine_of_command), never by
what the agent says, and expects the `e` answer instead, the engine's top log-probs at the position
after the probe's ids. Their ids are drawn so that their text re-encodes to the same ids (engines
take text prompts), and Maxwell judges the answer by its float32 reference prefill with the engine's
calibrated `logprob_abs` (verifier.engine_audit's tolerances). The wrong form for the agent is
`mismatched`; an engine with no calibrated tolerance is `uncalibrated` (L2: at best a warning).
"""

from __future__ import annotations

import secrets
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..observer.evidence import WorkProbe
from ..observer.host import this_device
from ..protocol.engine import engine_of_command
from ..protocol.lease import GenerateJob, Lease
from ..protocol.probe import FIRST_JUDGED, ProbeAnswer, ProbeLogprobs, ProbeRequest
from ..prover.engine_process import engine_identity
from ..registry.fingerprint import compare_chunk
from ..registry.forward import final_hidden, prefill
from ..registry.models import Registry
from ..verifier.engine_audit import EngineTolerances
from ..verifier.thresholds import Thresholds, choose_tolerance

PROBE_IDS = 8  # fresh ids per probe: 7 judged positions, about one decode step of work
LATEST_TOKEN = 4  # the probe goes out when one of the lease's first tokens arrives (drawn)
ANSWER_WAIT_S = 5.0  # after sending, how long the node waits for an answer past the receipt
ROUND_TRIP_TRIES = 64  # engine probes: draws until the ids' text re-encodes to them (~55 % a draw)


def enrolled_engine(command: Sequence[str]) -> tuple[str, str]:
    """(engine key, engine name) of an enrolled agent command: ("", "") for an SDK agent; the name
    from the `--engine-cmd` program (prover.engine_process.engine_identity), "openai-compatible"
    for `--engine URL` (an engine elsewhere: Maxwell cannot tell which)."""
    key = engine_of_command(command)
    if not key:
        return "", ""
    args = list(command)
    for i, arg in enumerate(args):
        value = arg.removeprefix("--engine-cmd=") if arg.startswith("--engine-cmd=") else None
        if arg == "--engine-cmd" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            return key, engine_identity(shlex.split(value))[0]
    return key, "openai-compatible"


@dataclass
class PendingProbe:
    """One lease's probe, from the draw to the answer (filled by the agent's reader thread)."""

    request: ProbeRequest
    send_at_token: int
    engine: str = ""  # the enrolled command's engine (protocol.engine.engine_of_command); "" SDK agent
    engine_name: str = ""  # which engine that command runs: selects the calibrated tolerance
    sent_at_token: int = -2  # -2: not sent; -1: sent when the receipt came (no token reached it)
    sent_t: float | None = None  # perf_counter as the line was written (None: it never went out)
    answer: ProbeAnswer | None = None
    answered_t: float | None = None
    lease_done_t: float | None = None  # perf_counter as the lease's receipt (or refusal) arrived
    arrived: threading.Event = field(default_factory=threading.Event)
    went_out: threading.Event = field(default_factory=threading.Event)  # the write was tried

    @property
    def sent(self) -> bool:
        return self.sent_t is not None

    def clock_start(self) -> float | None:
        """When the answer's ANSWER_WAIT_S starts: as the probe went out; for an engine agent not
        before its lease's receipt, since a serving engine with one slot (llama-cpp-python's server)
        answers the probe only after the lease it is decoding: an honest long lease must not fail
        for that. An answer that came earlier is timed from sending."""
        if self.sent_t is None:
            return None
        if self.engine and self.lease_done_t is not None:
            start = max(self.sent_t, self.lease_done_t)
            return start if self.answered_t is None or self.answered_t >= start else self.sent_t
        return self.sent_t

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
        self.engine_tolerances = EngineTolerances.load()
        self._count = 0
        self._lock = threading.Lock()

    def draw(self, lease: Lease, command: Sequence[str] = ()) -> PendingProbe | None:
        """A fresh probe for a generation lease (None for other jobs: no decode to probe), for the
        agent the node runs with `command` (its enrolled command: an engine agent's ids are drawn
        so that their text re-encodes to them)."""
        if not isinstance(lease.job, GenerateJob):
            return None
        engine, engine_name = enrolled_engine(command)
        vocab = self.registry.reference(lease.model_id).vocab
        with self._lock:
            self._count += 1
            number = self._count
        ids = tuple(secrets.randbelow(vocab) for _ in range(PROBE_IDS))
        for _ in range(ROUND_TRIP_TRIES if engine else 0):
            if self._engine_sequence(lease.model_id, ids)[-len(ids) :] == list(ids):
                break
            ids = tuple(secrets.randbelow(vocab) for _ in range(PROBE_IDS))
        request = ProbeRequest(
            lease_id=lease.lease_id,
            number=number,
            model_id=lease.model_id,
            precision=lease.precision,
            ids=ids,
            fingerprint_k=lease.job.fingerprint_k,
        )
        last = max(0, min(LATEST_TOKEN, lease.job.max_new_tokens - 1))
        return PendingProbe(request, send_at_token=secrets.randbelow(last + 1), engine=engine,
                            engine_name=engine_name)  # fmt: skip

    def _engine_sequence(self, model_id: str, ids: Sequence[int]) -> list[int]:
        """What an engine runs for probe `ids`: their text (the model's tokenizer) encoded as a prompt."""
        return self.registry.encode_prompt(model_id, self.registry.decode(model_id, list(ids)))

    def wait(self, probe: PendingProbe) -> None:
        """Give a queued probe its write, then its answer until ANSWER_WAIT_S after it went out."""
        if probe.sent_at_token != -2:
            probe.went_out.wait(ANSWER_WAIT_S)
        start = probe.clock_start()
        if start is not None and probe.answer is None:
            probe.arrived.wait(max(0.0, start + ANSWER_WAIT_S - time.perf_counter()))

    def judge(self, lease: Lease, probe: PendingProbe, device_class: str) -> WorkProbe:
        """What the probe showed, by Maxwell's recomputation of the fresh sequence."""
        sent_at = probe.sent_at_token
        start = probe.clock_start()
        latency = probe.answered_t - start if probe.answered_t is not None and start is not None else -1.0
        base = {"sent_at_token": sent_at, "latency_s": round(latency, 6), "ids": len(probe.request.ids)}
        if not probe.sent:
            return WorkProbe("not_sent", "the lease ended before the probe could be sent", **base)
        if probe.answer is None:
            return WorkProbe(
                "unanswered",
                f"no answer to the work probe within {ANSWER_WAIT_S:.0f} s"
                + (" of its lease's receipt" if probe.engine else ""),
                **base,
            )
        if probe.answer.error:
            return WorkProbe(
                "refused", f"the agent did not answer the work probe: {probe.answer.error}", **base
            )
        if probe.engine and probe.answer.logprobs is None:
            why = f"expected an engine's log-probs (the agent is enrolled with an engine, {probe.engine})"
            return WorkProbe("mismatched", f"work probe: {why}, got a fingerprint", **base)
        if probe.answer.logprobs is not None:
            if not probe.engine:
                return WorkProbe("mismatched", "work probe: expected a fingerprint (the agent is enrolled "
                                 "without an engine), got an engine's log-probs", **base)  # fmt: skip
            return self._judge_engine(lease, probe, probe.answer.logprobs, latency, base)
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

    def _judge_engine(
        self, lease: Lease, probe: PendingProbe, answer: ProbeLogprobs, latency: float, base: dict
    ) -> WorkProbe:
        """An engine agent's `e` answer against the float32 reference prefill of the same sequence:
        every returned log-prob within the engine's calibrated `logprob_abs`, every returned id
        among the model's top-`top` there (within that tolerance)."""
        tol = self.engine_tolerances.for_claim(probe.engine_name, lease.precision)
        kind = f"[engine answer, fp32 reference; {tol.label}]"
        sequence = self._engine_sequence(lease.model_id, probe.request.ids)
        _, logits = prefill(self.registry.load_in(lease.model_id, "fp32"), sequence, [0])
        ref = torch.log_softmax(logits[0].double(), dim=-1)
        if max(answer.ids) >= ref.shape[0]:
            return WorkProbe("mismatched", f"work probe: expected top ids < {ref.shape[0]}, got "
                             f"{max(answer.ids)} {kind}", tolerance=tol.label, **base)  # fmt: skip
        at = ref[list(answer.ids)]
        errs = (torch.tensor(answer.lp, dtype=torch.float64) - at).abs()
        lp_err = float(errs.max())
        kth = float(torch.topk(ref, min(answer.top, ref.shape[0])).values[-1])
        rank_err = max(0.0, float((kth - at).max()))
        measured = {"close_fraction": round(float((errs <= tol.logprob_abs).double().mean()), 4),
                    "median_rel_error": -1.0, "tolerance": tol.label}  # fmt: skip
        where, top = f"after {len(probe.request.ids)} fresh ids", answer.top
        if lp_err > tol.logprob_abs:
            off = f"{int((errs > tol.logprob_abs).sum())}/{len(errs)} off (largest difference {lp_err:.3g})"
            expected = f"the leased model's top-{top} log-probs {where} within {tol.logprob_abs:g}"
            reason = f"expected {expected}, got {off}"
            return WorkProbe("mismatched", f"work probe: {reason} {kind}", **base, **measured)
        if rank_err > tol.logprob_abs:
            below = f"got one {rank_err:.3g} below its {top}-th best"
            reason = f"expected the returned ids among the leased model's top-{top} {where}, {below}"
            return WorkProbe("mismatched", f"work probe: {reason} {kind}", **base, **measured)
        got = f"{len(errs)} top log-probs within {lp_err:.2g}"
        ms = f"{latency * 1000:.0f} ms"
        if not tol.calibrated:
            reason = f"work probe answered by the leased model's log-probs ({got}) in {ms}, but not affirmed"
            return WorkProbe("uncalibrated", f"{reason}: {tol.label}", **base, **measured)
        return WorkProbe("matched", f"work probe answered by the leased model in {ms} ({got}) {kind}", **base,
                         **measured)  # fmt: skip
