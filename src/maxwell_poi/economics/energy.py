"""Joules: what Maxwell measured for a lease (the Energy Wallet's debit), and what it expects one to cost.

Only Maxwell's own measurements count (design.md §1): the node's NVML energy counter for the GPU,
and for the CPU the sandbox's kernel CPU-seconds times a stated watts-per-core figure — an
*estimate* (no per-cgroup power meter exists on this host; RAPL is package-wide), labelled as such
in every debit's memo. A resident agent's lease window also contains the work of the batch peers
decoding beside it (or queued ahead of it), so the window's energy is shared by tokens: the lease
pays its own tokens' share of what the sandbox burnt in the window. Its CPU is attributed more
finely where the node could (node.stream_log, `own_cpu_s`): each CPU-second of a busy span is billed
once, to the lease whose token or receipt came next, so overlapping windows never bill a second
twice. The GPU's joules are still shared by tokens; evidence without `own_cpu_s` (one-shot runs)
pays its window's CPU times that share too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..observer.evidence import LeaseEvidence
from ..protocol.lease import EmbedJob, GenerateJob
from ..registry.profiles import Profile

WATTS_PER_CORE_ESTIMATE = 12.0  # a server core under a dense-math load; an estimate, not a reading
FALLBACK_CPU_S_PER_TOKEN = 0.05  # no profile for the model yet: a generous guess for the hold
CHARS_PER_TOKEN = 4.0  # WordPiece/BPE on English text, for embedding jobs' expected size


@dataclass(frozen=True)
class EnergyMeasurement:
    joules: float
    source: str  # which of Maxwell's readings it came from
    estimate: bool  # True when part of it is CPU-seconds × an assumed wattage
    share: float  # the lease's share of the window (1.0 alone; tokens / batch tokens in a batch)

    def memo(self) -> str:
        kind = "estimate" if self.estimate else "measured"
        return f"{self.source} share={self.share:.4f} ({kind})"


def lease_share(ev: LeaseEvidence) -> float:
    """The lease's own share of its window's work: its tokens over every token the sandbox streamed
    from the moment the lease was handed over to its receipt (a lease queued behind others in the
    same sandbox has their work in its window too)."""
    own = max(1, len(ev.stream_t))
    return min(1.0, own / ev.window_tokens) if ev.window_tokens > own else 1.0


def gpu_joules(ev: LeaseEvidence) -> float | None:
    """The NVML energy counter's joules over the window, when the node's telemetry read one."""
    for measurement in ev.telemetry.values():
        joules = measurement.totals.get("energy_j")
        if measurement.source.startswith("nvml") and joules is not None and math.isfinite(joules):
            return joules
    return None


def measured_energy(ev: LeaseEvidence, watts_per_core: float = WATTS_PER_CORE_ESTIMATE) -> EnergyMeasurement:
    """The lease's energy from the node's evidence (never from the receipt)."""
    if not watts_per_core > 0:
        raise ValueError(f"watts_per_core: expected a positive number, got {watts_per_core!r}")
    share = lease_share(ev)
    if ev.own_cpu_s is not None:  # the node attributed each CPU-second of the span to one lease
        cpu_j = max(0.0, ev.own_cpu_s) * watts_per_core
        cpu = f"sandbox own_cpu_s={ev.own_cpu_s:.6f} (window {ev.cpu_s:.6f}) x {watts_per_core:g} W/core"
    else:
        cpu_j = max(0.0, ev.cpu_s) * watts_per_core * share
        cpu = f"sandbox cpu_s={ev.cpu_s:.6f} x {watts_per_core:g} W/core x share"
    gpu_j = gpu_joules(ev)
    if gpu_j is None:
        return EnergyMeasurement(cpu_j, cpu, True, share)
    return EnergyMeasurement(gpu_j * share + cpu_j, f"nvml energy_j={gpu_j:.3f} x share + {cpu}", True, share)


def expected_energy_j(
    job: GenerateJob | EmbedJob, profile: Profile | None, watts_per_core: float = WATTS_PER_CORE_ESTIMATE
) -> float:
    """What an honest run of the job should cost, from the model's profile on the device (or a
    generous fallback when the model has none yet): the basis of the bid's value and of the hold."""
    if isinstance(job, GenerateJob):
        tokens = job.max_new_tokens + len(job.prompt) / CHARS_PER_TOKEN
        per_token = profile.decode_cpu_s_per_token.mean if profile else FALLBACK_CPU_S_PER_TOKEN
    else:
        tokens = sum(len(t) for t in job.texts) / CHARS_PER_TOKEN
        per_token = (
            profile.embed_cpu_s_per_token.mean
            if profile and profile.embed_cpu_s_per_token
            else FALLBACK_CPU_S_PER_TOKEN
        )
    return max(tokens, 1.0) * per_token * watts_per_core
