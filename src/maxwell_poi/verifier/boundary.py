"""L2 boundary: what crossed the channel must be what the receipt claims, at a plausible pace.

Reads only the runner's evidence (observer.channel), never a number the agent reports.

Checks, in order:
1. `channel_input`   the lease bytes the agent was handed are the lease being appraised;
2. `stream_order`    stream lines came with positions 0, 1, 2, ... in order;
3. `stream_present`  the agent streamed its tokens as they were chosen;
4. `stream_matches`  the tokens Maxwell saw stream by are exactly the receipt's output, and the
                     fingerprint chunks it saw streamed (resident mode) are the receipt's first ones;
5. `pace`            the mean gap between tokens over the stream (first to last) is not shorter
                     than this model allows on this device (PACE_FRACTION of the profile's fastest
                     gap on a free core); tokens that only *arrived* bunched while the lease's window
                     holds the pace give a warning (`bunched`: the node's stamps are late, never early);
6. `steady`          no long burst: at most MAX_BURST_RUN tokens in a row arrive closer together
                     than a tenth of the profile's gap;
and, right after the stream checks (it needs no profile), `work_probe`: the node's work probe of
the lease (node.probe) was answered by the leased model. A probe answered wrongly, refused or left
unanswered fails: padding (CPU burnt, memory held) cannot compute a fresh sequence through the
leased weights. A lease the node did not probe passes this check saying so in its details. An
engine agent answers with its engine's log-probs (node.probe); one whose engine returns none
(token-only) or is not calibrated gets a warning, never a pass.

Why mean and runs rather than median and burst fraction: honest speculative decoding emits every
token a verification pass accepted at once (about half the gaps are bursts at acceptance ~50 %),
yet its rate over the stream is a real model's. A whole answer dumped at once still fails both.
"""

from __future__ import annotations

import hashlib
import statistics

import numpy as np

from ..observer.evidence import LeaseEvidence
from ..protocol.encoding import pack_tokens
from ..protocol.fingerprint import chunk_size_bytes
from ..protocol.lease import GenerateJob
from ..protocol.result import LayerName
from ..registry.profiles import Profile
from .appraisal import (
    Appraisal,
    EvidenceLayer,
    Finding,
    Outcome,
    failed,
    no_profile,
    not_measured,
    passed,
    warned,
)
from .conditions import contention_details, excused, unjudged
from .thermodynamic import accounting_slack_s, lease_window_fair, per_token_stats, stats_lower_bound

BURST_GAP = 0.1  # a gap under this fraction of the profile's median counts as a burst
MAX_BURST_RUN = 8  # burst gaps in a row allowed: one speculative pass's accepted tokens (block <= 8)


PACE_FRACTION = 0.35


def interval_lower_bound(profile: Profile) -> float:
    """Shortest mean gap between tokens an honest run can show: PACE_FRACTION of the profile's
    fastest run on a free core (its gap less the run-queue delay Maxwell measured). Half the fastest
    gap refused honest agents whose profile was taken on a busier host (a new user's poi-lm at 12.5
    ms against a 24.1 ms floor); one honest agent's mean gap ranged 1.08-4.04 ms on this VM (issue 23)."""
    return PACE_FRACTION * profile.fastest_free_interval_s


def channel_input(ev: LeaseEvidence, ctx: Appraisal) -> Finding | None:
    sent = hashlib.sha256(ctx.lease.to_json().encode() + b"\n").hexdigest()
    if ev.sha256_in == sent:
        return None
    return Finding(
        f"channel input: expected sha256 {sent[:16]}… of this lease, "
        f"the agent was handed {ev.sha256_in[:16]}…"
    )


def stream_order(ev: LeaseEvidence) -> Finding | None:
    if not ev.stream_errors:
        return None
    return Finding(
        f"token stream: expected positions 0, 1, 2, … in order, got {ev.stream_errors} lines out of order"
    )


def stream_present(ev: LeaseEvidence, claimed: list[int]) -> Finding | None:
    if ev.stream_tokens or not claimed:  # none claimed: an engine that ended at once (engine receipt)
        return None
    return Finding(f"token stream: expected {len(claimed)} tokens streamed as they were chosen, got none")


def stream_matches(ev: LeaseEvidence, claimed: list[int]) -> Finding | None:
    streamed = list(ev.stream_tokens)
    if streamed == claimed:
        return None
    diff = [
        i
        for i in range(max(len(streamed), len(claimed)))
        if i >= len(streamed) or i >= len(claimed) or streamed[i] != claimed[i]
    ]
    return Finding(
        f"output: the receipt's {len(claimed)} tokens differ from the {len(streamed)} Maxwell saw "
        f"streamed, at positions {diff[:5]} (streamed sha256 "
        f"{hashlib.sha256(pack_tokens(streamed, 4)).hexdigest()[:16]}…)"
    )


def chunks_match(ev: LeaseEvidence, fingerprints: bytes, k: int) -> Finding | None:
    """What a streaming audit judged must be what the receipt commits to: no chunk swapped after."""
    if not ev.stream_chunks:
        return None
    size = chunk_size_bytes(k)
    streamed = fingerprints[: ev.stream_chunks * size]
    if (
        len(streamed) == ev.stream_chunks * size
        and hashlib.sha256(streamed).hexdigest() == ev.stream_chunks_sha256
    ):
        return None
    return Finding(
        f"fingerprints: expected the {ev.stream_chunks} chunks streamed to be the receipt's first ones, "
        f"the receipt's differ (or it has {len(fingerprints) // size})"
    )


def work_probe(ev: LeaseEvidence) -> Finding | None:
    """The node's work probe (node.probe), judged there by Maxwell's recomputation."""
    probe = ev.probe
    if probe is None or probe.outcome in ("matched", "not_sent"):
        return None
    return Finding(probe.reason)


ENGINE_UNJUDGED = ("refused", "uncalibrated")  # an engine agent's probe outcomes that warn, not fail


def engine_probe_unjudged(ev: LeaseEvidence) -> str:
    """Why an engine agent's work probe could not be judged ("" when it was, or for an SDK agent): its
    engine returns no log-probs (token-only: the adapter refuses the probe) or has no calibrated
    tolerance. The agent is an engine agent by the command the node enrolled (`ev.engine`), never by
    its receipt; a mismatched or unanswered probe fails like an SDK agent's."""
    if not ev.engine or ev.probe is None or ev.probe.outcome not in ENGINE_UNJUDGED:
        return ""
    return ev.probe.reason


def probe_details(ev: LeaseEvidence) -> dict[str, object]:
    if ev.probe is None:
        return {"work_probe": "not probed"}
    p = ev.probe
    return {"work_probe": p.outcome, "work_probe_latency_ms": round(p.latency_s * 1000, 2)}


def pace(mean: float, profile: Profile, model_id: str) -> Finding | None:
    lo = interval_lower_bound(profile)
    if mean >= lo:
        return None
    return Finding(
        f"timing: expected tokens >= {lo * 1000:.1f} ms apart on average ({model_id} here: "
        f"{profile.interval_s.median * 1000:.1f} ms), measured {mean * 1000:.2f} ms",
        _pace_score(mean, profile),
    )


def bunched(
    problem: Finding, lo: float, profile: Profile, ev: LeaseEvidence, **details: object
) -> Outcome | None:
    """A WARN in place of a pace failure when the tokens only *arrived* fast: the node stamps each
    token when its reader gets to it, which can be late (a reader waiting for a CPU or for the
    interpreter of a busy `poi serve --local-node` stamped a whole 8-token gpt2-micro decode as one
    instant: 7 of 3,000 honest leases in bench.service.system) but never early. So a resident lease
    whose window — from the lease handed over to its last token's arrival — holds the pace floor
    could have been decoded at an honest pace, and the gaps cannot say it was not. Not a pass: a
    cheap draft decoding after the real model's prefill can hold the window too (L4 and L1 judge
    it). And only where the sandbox's CPU over that window (cgroup, from hand-over to receipt) holds
    the honest work for the tokens: otherwise a dump that merely waited on a busy host — a fabricator
    woken late on CI's 2 cores held a 24-token window — would be excused. Never for a sandbox's first
    lease (no idle gap before it, nothing beside it): its window and CPU hold the agent's start-up (a
    fabricator's imports held 81 ms a token). Resident evidence only: a one-shot run's stamps count
    from the process start."""
    if not lease_window_fair(ev):
        return None
    window = ev.stream_t[-1] / len(ev.stream_t)  # stamps count from the lease's hand-over
    if window < lo:
        return None
    per_token = per_token_stats(profile, ev) or profile.decode_cpu_s_per_token
    work = stats_lower_bound(per_token, ev.regime) * len(ev.stream_t) - accounting_slack_s(ev)
    if ev.cpu_s < work:
        return None
    return warned(
        f"{problem.reason}; not judged: the tokens arrived bunched, and the lease's window holds the "
        f"pace ({window * 1000:.2f} ms a token from the lease to its last token)",
        problem.score,
        window_interval_ms=round(window * 1000, 3),
        **details,
    )


def longest_burst(gaps: np.ndarray, profile: Profile) -> int:
    """The most consecutive gaps under BURST_GAP of the profile's median gap."""
    longest = run = 0
    for short in gaps < BURST_GAP * profile.interval_s.median:
        run = run + 1 if short else 0
        longest = max(longest, run)
    return longest


def steady(run: int, mean: float, profile: Profile) -> Finding | None:
    if run <= MAX_BURST_RUN:
        return None
    return Finding(
        f"timing: expected a steady stream (at most {MAX_BURST_RUN} tokens in a row in a burst), "
        f"got {run} in a row",
        _pace_score(mean, profile),
    )


def _pace_score(median: float, profile: Profile) -> float:
    return float(min(1.0, median / profile.interval_s.median))


class BoundaryLayer(EvidenceLayer):
    """L2; see the module docstring for the checks."""

    name = LayerName.BOUNDARY

    def decide_on(self, ctx: Appraisal, ev: LeaseEvidence) -> Outcome:
        problem = channel_input(ev, ctx)
        if problem:
            return failed(problem.reason)
        if not isinstance(ctx.lease.job, GenerateJob) or ctx.receipt is None:
            return passed("lease bytes on the channel match")
        claimed = ctx.receipt.claims.tokens()
        fingerprints = ctx.receipt.claims.fingerprint_bytes()
        unjudged_probe = engine_probe_unjudged(ev)
        for problem in (
            stream_order(ev),
            stream_present(ev, claimed),
            stream_matches(ev, claimed),
            chunks_match(ev, fingerprints, ctx.lease.job.fingerprint_k),
            None if unjudged_probe else work_probe(ev),
        ):
            if problem:
                return failed(problem.reason, **probe_details(ev))
        profile = self.profile(ctx, ev)
        if profile is None:  # the stream matched, but its pace cannot be judged: not a pass
            why = no_profile(ctx.lease.model_id, ev)
            return not_measured(f"timing: {why} (streamed tokens match the receipt)")
        if len(ev.stream_t) < 3:
            return not_measured(
                f"timing: expected at least 3 streamed tokens to judge the pace, got {len(ev.stream_t)} "
                "(streamed tokens match the receipt)"
            )
        gaps = np.diff(np.asarray(ev.stream_t))
        mean = float(gaps.mean())
        run = longest_burst(gaps, profile)
        lo = interval_lower_bound(profile)
        details = {
            "mean_interval_ms": round(mean * 1000, 3),
            "median_interval_ms": round(float(statistics.median(gaps)) * 1000, 3),
            "lower_bound_ms": round(lo * 1000, 3),
            "profile_interval_ms": round(profile.interval_s.median * 1000, 3),
            "burst_fraction": round(float(np.mean(gaps < BURST_GAP * profile.interval_s.median)), 3),
            "longest_burst": run,
            **probe_details(ev),
        }
        details.update(contention_details(ev))
        problem = pace(mean, profile, ctx.lease.model_id)
        if problem:
            excuse = excused(problem, mean, lo, profile, ev, **details) or bunched(
                problem, lo, profile, ev, **details
            )
            return excuse or failed(problem.reason, problem.score, **details)
        problem = steady(run, mean, profile)
        if problem:
            excuse = unjudged(problem, profile, ev, **details)
            return excuse or failed(problem.reason, problem.score, **details)
        answered = "; work probe answered by the leased model" if details["work_probe"] == "matched" else ""
        if unjudged_probe:  # never a silent pass
            return warned(
                "streamed tokens match the receipt at an honest pace; work probe not judged: "
                + unjudged_probe,
                _pace_score(mean, profile),
                **details,
            )
        return passed(
            f"streamed tokens match the receipt; {mean * 1000:.1f} ms/token on average "
            f"(profile {profile.interval_s.median * 1000:.1f}){answered}",
            _pace_score(mean, profile),
            **details,
        )
