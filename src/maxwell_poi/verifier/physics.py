"""The layers built on Maxwell's own measurements of the lease: L1 (thermodynamic) and L2
(boundary). Neither trusts a number the agent reports; both compare the runner's evidence with
the model's reference profile on this class of device (registry.profiles).

On this CPU prototype "energy" is the agent process's CPU seconds as the kernel accounts them,
read by Maxwell at the moment each streamed token arrives; with NVML (or RAPL) the same checks
read joules. Where the observer's reading lives in production: a GPU driver shim in the VMM or a
mediated device for the bus, the BMC for power (design.md section 1).
"""

from __future__ import annotations

import hashlib
import statistics
import time

import numpy as np

from ..protocol.encoding import pack_tokens
from ..protocol.lease import GenerateJob
from ..protocol.result import LayerResult, Status
from ..registry.models import Registry
from ..registry.profiles import Profile, ProfileStore
from .classify import WorkloadClassifier, trace_features
from .layers import Appraisal

CLASSIFIER_REJECT_BELOW = 0.2  # P(inference) under which the trace shape alone rejects
# The kernel accounts CPU time in 10 ms ticks: a short decode window is given two ticks of benefit
# of the doubt before the floor and the work check may reject it.
ACCOUNTING_SLACK_S = 0.02
NO_EVIDENCE = "no Maxwell-side evidence (receipt appraised offline)"


def _result(
    layer: str, status: Status, reason: str, start: float, score: float | None = None, **details: object
) -> LayerResult:
    return LayerResult(layer, status, reason, score, time.perf_counter() - start, dict(details))


def work_lower_bound(profile: Profile) -> float:
    """Least CPU seconds per token an honest run can show: 5 standard deviations under the
    profile's mean, but never above 60% of its fastest run nor below 25% of its mean."""
    s = profile.decode_cpu_s_per_token
    return max(0.25 * s["mean"], min(0.6 * s["min"], s["mean"] - 5 * s["std"]))


def interval_lower_bound(profile: Profile) -> float:
    """Shortest median gap between tokens an honest run can show: half its fastest run's."""
    return 0.5 * profile.interval_s["min"]


def memory_floor_mb(profile: Profile, param_count: int, precision: str) -> float:
    """Least peak RSS an agent holding the weights can show: the honest minimum less half the
    weights' size (the runtime's own memory varies by far less than that for models that matter;
    for tiny models this check is weak, and says so by a floor close to the runtime's size)."""
    weights_mb = param_count * (4 if precision == "fp32" else 2) / 2**20
    return profile.peak_rss_mb["min"] - 0.5 * weights_mb


class ThermodynamicLayer:
    """L1: the work Maxwell measured must fit the work claimed.

    - physics floor: the claimed FLOPs cannot be done in fewer CPU seconds than the device's
      measured peak rate allows;
    - work: CPU seconds per decoded token at least the profile's honest lower bound;
    - shape: a classifier of the trace (work, pace, memory, load steadiness, burstiness) must
      not be confident that this is something other than inference;
    - memory: the agent's peak resident memory must reach what holding the weights takes
      (necessary, not sufficient: an agent can pad memory; the audit and, on GPUs, the DRAM
      bandwidth seen by NVML GPM catch what this misses).
    """

    name = "L1-thermodynamic"

    def __init__(
        self, registry: Registry, profiles: ProfileStore, classifier: WorkloadClassifier | None = None
    ) -> None:
        self.registry = registry
        self.profiles = profiles
        self.classifier = classifier

    def appraise(self, ctx: Appraisal) -> LayerResult:
        start = time.perf_counter()
        ev, lease = ctx.evidence, ctx.lease
        if ev is None:
            return _result(self.name, Status.SKIPPED, NO_EVIDENCE, start)
        if not isinstance(lease.job, GenerateJob):
            return _result(
                self.name,
                Status.SKIPPED,
                "embedding jobs are one short forward pass; the "
                "prototype's per-lease process start-up would dominate the measurement",
                start,
            )
        profile = self.profiles.get(lease.model_id, ev.device_class)
        if profile is None:
            return _result(
                self.name,
                Status.SKIPPED,
                f"no reference profile for {lease.model_id} on "
                f"{ev.device_class}: run `poi profile {lease.model_id}`",
                start,
            )
        window = ev.decode_window
        if window is None:
            return _result(
                self.name,
                Status.FAIL,
                f"work: expected streamed tokens to measure the decode window, got {len(ev.stream_tokens)}",
                start,
                0.0,
            )
        wall, cpu, n = window
        ref = self.registry.reference(lease.model_id)
        floor = n * ref.flops_per_token / profile.peak_flops_per_cpu_s
        per_token = cpu / n
        lo = work_lower_bound(profile)
        rss_floor = memory_floor_mb(profile, ref.param_count, lease.precision)
        details = {
            "decode_tokens": n,
            "decode_wall_s": round(wall, 4),
            "decode_cpu_s": round(cpu, 4),
            "cpu_ms_per_token": round(per_token * 1000, 3),
            "profile_cpu_ms_per_token": round(profile.decode_cpu_s_per_token["mean"] * 1000, 3),
            "lower_bound_cpu_ms": round(lo * 1000, 3),
            "physics_floor_cpu_s": round(floor, 5),
            "peak_rss_mb": round(ev.peak_rss_mb(), 1),
            "rss_floor_mb": round(rss_floor, 1),
        }
        score = float(min(1.0, per_token / profile.decode_cpu_s_per_token["mean"]))
        if not np.isfinite(cpu) or cpu + ACCOUNTING_SLACK_S < floor:
            return _result(
                self.name,
                Status.FAIL,
                f"physics floor: {n} tokens of {lease.model_id} need at "
                f"least {floor:.4f} CPU-s at this device's measured peak, Maxwell measured "
                f"{cpu:.4f}",
                start,
                0.0,
                **details,
            )
        if (cpu + ACCOUNTING_SLACK_S) / n < lo:
            return _result(
                self.name,
                Status.FAIL,
                f"work: expected >= {lo * 1000:.1f} CPU-ms per token (honest "
                f"{lease.model_id} here: {profile.decode_cpu_s_per_token['mean'] * 1000:.1f}), "
                f"measured {per_token * 1000:.2f}",
                start,
                score,
                **details,
            )
        if ev.peak_rss_mb() < rss_floor:
            return _result(
                self.name,
                Status.FAIL,
                f"memory: expected the weights resident (peak RSS >= "
                f"{rss_floor:.0f} MB), measured {ev.peak_rss_mb():.0f} MB",
                start,
                score,
                **details,
            )
        if self.classifier is not None:
            feats = trace_features(ev, profile, ref, lease.precision)
            if feats is not None:
                label, p, extra = self.classifier.predict(feats)
                details.update(trace_class=label, trace_class_p=round(p, 3), **extra)
                if extra["p_inference"] < CLASSIFIER_REJECT_BELOW:
                    return _result(
                        self.name,
                        Status.FAIL,
                        f"trace shape: expected inference, the trace classifier says {label} (p={p:.2f})",
                        start,
                        extra["p_inference"],
                        **details,
                    )
        return _result(
            self.name,
            Status.PASS,
            f"{per_token * 1000:.1f} CPU-ms/token (profile "
            f"{profile.decode_cpu_s_per_token['mean'] * 1000:.1f}), {ev.peak_rss_mb():.0f} MB "
            f"resident, {cpu / floor:.0f}x above the physics floor",
            start,
            score,
            **details,
        )


class BoundaryLayer:
    """L2: what crossed the channel must be what the receipt claims, at a plausible pace.

    - the lease bytes the agent was handed are the lease being appraised;
    - the tokens Maxwell saw stream by are exactly the receipt's output;
    - tokens did not arrive faster than this model produces them on this device, nor in a burst.
    """

    name = "L2-boundary"

    def __init__(self, profiles: ProfileStore) -> None:
        self.profiles = profiles

    def appraise(self, ctx: Appraisal) -> LayerResult:
        start = time.perf_counter()
        ev, lease = ctx.evidence, ctx.lease
        if ev is None:
            return _result(self.name, Status.SKIPPED, NO_EVIDENCE, start)
        sent = hashlib.sha256(lease.to_json().encode() + b"\n").hexdigest()
        if ev.sha256_in != sent:
            return _result(
                self.name,
                Status.FAIL,
                f"channel input: expected sha256 {sent[:16]}… of this "
                f"lease, the agent was handed {ev.sha256_in[:16]}…",
                start,
                0.0,
            )
        if not isinstance(lease.job, GenerateJob) or ctx.receipt is None:
            return _result(self.name, Status.PASS, "lease bytes on the channel match", start, 1.0)
        claimed = ctx.receipt.claims.tokens()
        streamed = list(ev.stream_tokens)
        if ev.stream_errors:
            return _result(
                self.name,
                Status.FAIL,
                f"token stream: expected positions 0, 1, 2, … in order, "
                f"got {ev.stream_errors} lines out of order",
                start,
                0.0,
            )
        if not streamed:
            return _result(
                self.name,
                Status.FAIL,
                f"token stream: expected {len(claimed)} tokens streamed as they were chosen, got none",
                start,
                0.0,
            )
        if streamed != claimed:
            diff = [
                i
                for i in range(max(len(streamed), len(claimed)))
                if i >= len(streamed) or i >= len(claimed) or streamed[i] != claimed[i]
            ]
            return _result(
                self.name,
                Status.FAIL,
                f"output: the receipt's {len(claimed)} tokens differ from "
                f"the {len(streamed)} Maxwell saw streamed, at positions {diff[:5]}",
                start,
                0.0,
                streamed_sha256=hashlib.sha256(pack_tokens(streamed, 4)).hexdigest(),
            )
        profile = self.profiles.get(lease.model_id, ev.device_class)
        if profile is None or len(ev.stream_t) < 3:
            return _result(
                self.name,
                Status.PASS,
                "streamed tokens match the receipt (no profile for timing)",
                start,
                1.0,
            )
        gaps = np.diff(np.asarray(ev.stream_t))
        median = float(statistics.median(gaps))
        lo = interval_lower_bound(profile)
        burst = float(np.mean(gaps < 0.1 * profile.interval_s["median"]))
        details = {
            "median_interval_ms": round(median * 1000, 3),
            "lower_bound_ms": round(lo * 1000, 3),
            "profile_interval_ms": round(profile.interval_s["median"] * 1000, 3),
            "burst_fraction": round(burst, 3),
        }
        score = float(min(1.0, median / profile.interval_s["median"]))
        if median < lo:
            return _result(
                self.name,
                Status.FAIL,
                f"timing: expected tokens >= {lo * 1000:.1f} ms apart "
                f"({lease.model_id} here: {profile.interval_s['median'] * 1000:.1f} ms), measured "
                f"median {median * 1000:.2f} ms",
                start,
                score,
                **details,
            )
        if burst > 0.5:
            return _result(
                self.name,
                Status.FAIL,
                f"timing: expected a steady stream, got {burst:.0%} of tokens arriving in bursts",
                start,
                score,
                **details,
            )
        return _result(
            self.name,
            Status.PASS,
            f"streamed tokens match the receipt; median "
            f"{median * 1000:.1f} ms/token (profile {profile.interval_s['median'] * 1000:.1f})",
            start,
            score,
            **details,
        )
