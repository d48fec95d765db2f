"""L1 thermodynamic: the work Maxwell measured must fit the work claimed.

Never trusts a number the agent reports: it compares the runner's evidence with the model's
reference profile on this class of device (registry.profiles). On this CPU prototype "energy" is
the agent process's CPU seconds as the kernel accounts them, read by Maxwell the moment each
streamed token arrives; with NVML (or RAPL) the same checks read joules. In production the
Observer's readings come from a GPU driver shim in the VMM or a mediated device for the bus, and
the BMC for power (design.md section 1).

Checks, in order, over the decode window (first to last streamed token):
1. `physics_floor`   the claimed FLOPs cannot be done in fewer CPU seconds than the device's
                     measured peak rate allows;
2. `work_per_token`  CPU seconds per decoded token at least the profile's honest lower bound;
3. `memory_floor`    peak resident memory reaches what holding the weights takes (necessary, not
                     sufficient: an agent can pad memory; the audit and, on GPUs, the DRAM
                     bandwidth NVML GPM sees catch what this misses);
4. `trace_shape`     a classifier of the trace (work, pace, memory, load steadiness, burstiness)
                     must not be confident that this is something other than inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..observer.evidence import ChannelEvidence, DecodeWindow
from ..protocol.lease import GenerateJob, Lease
from ..protocol.result import LayerName
from ..registry.models import ReferenceValues, Registry
from ..registry.profiles import Profile, ProfileStore
from .appraisal import Appraisal, EvidenceLayer, Finding, Outcome, failed, passed, skipped
from .classify import WorkloadClassifier, trace_features

CLASSIFIER_REJECT_BELOW = 0.2  # P(inference) under which the trace shape alone rejects
# The kernel accounts CPU time in 10 ms ticks: a short decode window is given two ticks of benefit
# of the doubt before the floor and the work check may reject it.
ACCOUNTING_SLACK_S = 0.02


def work_lower_bound(profile: Profile) -> float:
    """Least CPU seconds per token an honest run can show: 5 standard deviations under the
    profile's mean, but never above 60% of its fastest run nor below 25% of its mean."""
    s = profile.decode_cpu_s_per_token
    return max(0.25 * s.mean, min(0.6 * s.min, s.mean - 5 * s.std))


def memory_floor_mb(profile: Profile, param_count: int, precision: str) -> float:
    """Least peak RSS an agent holding the weights can show: the honest minimum less half the
    weights' size (the runtime's own memory varies by far less than that for models that matter;
    for tiny models this check is weak, and says so by a floor close to the runtime's size)."""
    weights_mb = param_count * (4 if precision == "fp32" else 2) / 2**20
    return profile.peak_rss_mb.min - 0.5 * weights_mb


@dataclass(frozen=True)
class DecodeWork:
    """What L1 compares: the measured decode window against the profile and the claimed model."""

    window: DecodeWindow
    profile: Profile
    reference: ReferenceValues
    model_id: str
    peak_rss_mb: float
    floor_cpu_s: float  # physics floor for this many tokens
    lower_bound_s: float  # least honest CPU seconds per token
    rss_floor_mb: float

    @classmethod
    def of(cls, ev: ChannelEvidence, profile: Profile, ref: ReferenceValues, lease: Lease) -> DecodeWork:
        """From evidence that has a decode window (at least two streamed tokens)."""
        window = ev.decode_window
        if window is None:
            raise ValueError("DecodeWork needs a decode window: at least two streamed tokens")
        return cls(
            window=window,
            profile=profile,
            reference=ref,
            model_id=lease.model_id,
            peak_rss_mb=ev.peak_rss_mb(),
            floor_cpu_s=window.tokens * ref.flops_per_token / profile.peak_flops_per_cpu_s,
            lower_bound_s=work_lower_bound(profile),
            rss_floor_mb=memory_floor_mb(profile, ref.param_count, lease.precision),
        )

    @property
    def per_token_s(self) -> float:
        return self.window.cpu_s / self.window.tokens

    @property
    def score(self) -> float:
        return float(min(1.0, self.per_token_s / self.profile.decode_cpu_s_per_token.mean))

    def details(self) -> dict[str, Any]:
        w = self.window
        return {
            "decode_tokens": w.tokens,
            "decode_wall_s": round(w.wall_s, 4),
            "decode_cpu_s": round(w.cpu_s, 4),
            "cpu_ms_per_token": round(self.per_token_s * 1000, 3),
            "profile_cpu_ms_per_token": round(self.profile.decode_cpu_s_per_token.mean * 1000, 3),
            "lower_bound_cpu_ms": round(self.lower_bound_s * 1000, 3),
            "physics_floor_cpu_s": round(self.floor_cpu_s, 5),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_floor_mb": round(self.rss_floor_mb, 1),
        }


def physics_floor(w: DecodeWork) -> Finding | None:
    cpu = w.window.cpu_s
    if np.isfinite(cpu) and cpu + ACCOUNTING_SLACK_S >= w.floor_cpu_s:
        return None
    return Finding(
        f"physics floor: {w.window.tokens} tokens of {w.model_id} need at least {w.floor_cpu_s:.4f} "
        f"CPU-s at this device's measured peak, Maxwell measured {cpu:.4f}",
        0.0,
    )


def work_per_token(w: DecodeWork) -> Finding | None:
    if (w.window.cpu_s + ACCOUNTING_SLACK_S) / w.window.tokens >= w.lower_bound_s:
        return None
    return Finding(
        f"work: expected >= {w.lower_bound_s * 1000:.1f} CPU-ms per token (honest "
        f"{w.model_id} here: {w.profile.decode_cpu_s_per_token.mean * 1000:.1f}), "
        f"measured {w.per_token_s * 1000:.2f}",
        w.score,
    )


def memory_floor(w: DecodeWork) -> Finding | None:
    if w.peak_rss_mb >= w.rss_floor_mb:
        return None
    return Finding(
        f"memory: expected the weights resident (peak RSS >= {w.rss_floor_mb:.0f} MB), "
        f"measured {w.peak_rss_mb:.0f} MB",
        w.score,
    )


def trace_shape(
    classifier: WorkloadClassifier | None, ev: ChannelEvidence, w: DecodeWork, precision: str
) -> tuple[Finding | None, dict[str, Any]]:
    """(a finding when the classifier is confident this is not inference, what it said)."""
    feats = trace_features(ev, w.profile, w.reference, precision) if classifier is not None else None
    if classifier is None or feats is None:
        return None, {}
    label, p, extra = classifier.predict(feats)
    said = {"trace_class": label, "trace_class_p": round(p, 3), **extra}
    if extra["p_inference"] >= CLASSIFIER_REJECT_BELOW:
        return None, said
    return Finding(
        f"trace shape: expected inference, the trace classifier says {label} (p={p:.2f})",
        extra["p_inference"],
    ), said


class ThermodynamicLayer(EvidenceLayer):
    """L1; see the module docstring for the checks."""

    name = LayerName.THERMODYNAMIC

    def __init__(
        self, registry: Registry, profiles: ProfileStore, classifier: WorkloadClassifier | None = None
    ) -> None:
        super().__init__(profiles)
        self.registry = registry
        self.classifier = classifier

    def decide_on(self, ctx: Appraisal, ev: ChannelEvidence) -> Outcome:
        lease = ctx.lease
        if not isinstance(lease.job, GenerateJob):
            return skipped(
                "embedding jobs are one short forward pass; the prototype's per-lease process "
                "start-up would dominate the measurement"
            )
        profile = self.profile(ctx, ev)
        if profile is None:
            return skipped(
                f"no reference profile for {lease.model_id} on {ev.device_class}: "
                f"run `poi profile {lease.model_id}`"
            )
        if lease.job.max_new_tokens < 2:
            return skipped("a one-token lease has no decode window (first to last streamed token)")
        if ev.decode_window is None:
            return failed(
                f"work: expected streamed tokens to measure the decode window, got {len(ev.stream_tokens)}"
            )
        w = DecodeWork.of(ev, profile, self.registry.reference(lease.model_id), lease)
        details = w.details()
        for check in (physics_floor, work_per_token, memory_floor):
            problem = check(w)
            if problem:
                return failed(problem.reason, problem.score, **details)
        problem, said = trace_shape(self.classifier, ev, w, lease.precision)
        details.update(said)
        if problem:
            return failed(problem.reason, problem.score, **details)
        return passed(
            f"{w.per_token_s * 1000:.1f} CPU-ms/token "
            f"(profile {profile.decode_cpu_s_per_token.mean * 1000:.1f}), "
            f"{w.peak_rss_mb:.0f} MB resident, {w.window.cpu_s / w.floor_cpu_s:.0f}x above the physics floor",
            w.score,
            **details,
        )
