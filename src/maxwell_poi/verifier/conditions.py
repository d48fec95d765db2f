"""Leases measured under conditions their profile never saw (issue 23, "fail safe").

Two of the checks judge quantities that the host's load moves: L1's CPU-seconds per token (on the
2-core VM this project runs on, one honest agent ranged 0.87-2.26 CPU-ms per token of gpt2-micro
within minutes) and L2's pace. Their floors are fractions of the profile's honest runs, so they hold
for the conditions those runs were measured under. When the evidence shows the host in a state the
profile never saw — other processes keeping more or fewer cores busy, more CPU pressure — a moderate
miss of those floors is not evidence of cheating: the layer answers WARN with what it measured (no
pay beyond the energy, the stake held for Maxwell to resolve), never a false FAIL. A gross miss — less
than GROSS_FRACTION of the floor, what a sleeper, a replay or a relay shows — fails under any load:
waiting for a CPU stretches wall time and never shrinks the work a token needs. L2's burst rule has
no gross bound: under load the node's own channel reader waits for a CPU and reads the tokens that
queued meanwhile at once (an honest poi-lm stream under a CPU hog showed 12 and 18 in a row where
the rule allows 8), so under unseen contention a burst is a WARN too. So is a rejection by L1's trace
classifier (its features are pace, cores busy and bursts; an honest poi-lm lease beside a fuzzing
server was called a miner, p_inference < 0.2), which runs only after every check with a gross
bound has passed.

The contention is Maxwell's own reading (observer.contention), signed into the node's evidence; the
profile records the range its honest runs saw (`Profile.conditions`). A profile that recorded none
(made before this) is taken to have seen a quiet host.
"""

from __future__ import annotations

from ..observer.evidence import LeaseEvidence
from ..registry.profiles import Profile
from .appraisal import Finding, Outcome, warned

GROSS_FRACTION = 0.5  # under this fraction of a floor, no contention explains the miss
# how far beyond the profile's range a reading must lie to count as unseen
MARGINS = {"others_cores": 0.5, "cpu_pressure": 0.2, "steal_cores": 0.25}


def contention_details(ev: LeaseEvidence) -> dict[str, float]:
    """The lease's contention as layer details (`contention_<field>`), beside what the layer measured."""
    return {f"contention_{k}": v for k, v in ev.contention.items()}


def unseen(profile: Profile, ev: LeaseEvidence) -> str | None:
    """What in the lease's contention lies outside the range the profile's runs saw, or None."""
    notes = []
    for name, margin in MARGINS.items():
        got = ev.contention.get(name)
        if got is None:
            continue
        stats = profile.conditions.get(name)
        lo, hi = (stats.min, stats.max) if stats is not None else (0.0, 0.0)
        if got > hi + margin or got < lo - margin:
            notes.append(f"{name} {got:.2f} (profile runs saw {lo:.2f}-{hi:.2f})")
    return "; ".join(notes) or None


def excused(
    problem: Finding, measured: float, floor: float, profile: Profile, ev: LeaseEvidence, **details: object
) -> Outcome | None:
    """A WARN in place of `problem` when the miss is moderate (measured >= GROSS_FRACTION of the
    floor) and the lease ran under contention the profile never saw; None when it stays a failure."""
    if measured < GROSS_FRACTION * floor:
        return None
    return unjudged(problem, profile, ev, **details)


def unjudged(problem: Finding, profile: Profile, ev: LeaseEvidence, **details: object) -> Outcome | None:
    """A WARN in place of `problem` when the lease ran under contention the profile never saw (for a
    check with no gross bound: L2's burst rule, whose tokens bunch when Maxwell's own reader of the
    channel waits for a CPU); None when it stays a failure."""
    why = unseen(profile, ev)
    if why is None:
        return None
    return warned(
        f"{problem.reason}; not judged: measured under contention the profile never saw ({why})",
        problem.score,
        unseen_contention=why,
        **details,
    )
