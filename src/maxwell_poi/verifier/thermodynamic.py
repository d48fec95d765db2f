"""L1 thermodynamic: the work Maxwell measured must fit the work claimed.

Never trusts a number the agent reports: it compares the runner's evidence with the model's
reference profile on this class of device (registry.profiles). On this CPU prototype "energy" is
the agent process's CPU seconds as the kernel accounts them, read by Maxwell the moment each
streamed token arrives; with NVML (or RAPL) the same checks read joules. In production the
Observer's readings come from a GPU driver shim in the VMM or a mediated device for the bus, and
the BMC for power (design.md section 1).

First, `escape_attempts` (verifier/containment.py): the node saw none of the agent's processes leave
its sandbox (what left was not measured). Then, in order, over the decode window (first to last
streamed token):
1. `physics_floor`   the claimed FLOPs cannot be done in fewer CPU seconds than the device's
                     measured peak rate allows;
2. `on_cpu`          (where Maxwell measured the sandbox's run-queue delay) the sandbox was on a CPU
                     for a fair share of the decode window's wall time, once the time its threads
                     waited for a CPU is taken out: decoding is compute-bound, sleeping is not —
                     honest gpt2-micro showed 0.96-1.02 cores busy on a free core with two CPU hogs
                     beside it, a sleeper 0.00 (issue 23);
2b. `work_per_token` CPU seconds per decoded token at least the honest lower bound of the profile
                     runs matching the cores the sandbox kept busy (verifier.work_basis: an honest
                     1-thread agent burns half the CPU of a 2-thread one here); the reason names them;
3. `memory_floor`    peak resident memory reaches what holding the weights takes (necessary, not
                     sufficient: an agent can pad memory; the audit and, on GPUs, the DRAM
                     bandwidth NVML GPM sees catch what this misses);
4. `trace_shape`     a classifier of the trace (work, pace, memory, load steadiness, burstiness)
                     must not be confident that this is something other than inference;
5. `idle_work`       (resident) the sandbox did no work while no lease was in flight before this
                     one: a process left running between leases (mining, relaying) shows here.
GPU leases (evidence carrying an NVML window, source nvml:<i>) are judged by verifier/gpu_signals.py
instead of 1-4: workload class, model-size class and energy per token from the NVML telemetry.

Resident agents (observer.resident) are measured as a sandbox, over a window: the CPU is the whole
sandbox's (cgroup nanoseconds), so when leases were batched the decode window's CPU is judged
against every token streamed in it, at the profile's per-token cost for that batch size; the
trace classifier, trained on lone leases, only judges unbatched windows. Embedding leases, one
short forward pass each, are judged by resident agents only (no process start-up in the window):
sandbox CPU over the lease window against the input tokens, when no other lease overlapped it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..observer.evidence import RESIDENT_REGIME, DecodeWindow, LeaseEvidence
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.result import LayerName, Status
from ..registry.models import ReferenceValues, Registry
from ..registry.profiles import Profile, ProfileStore, Stats
from .appraisal import Appraisal, EvidenceLayer, Finding, Outcome, failed, no_profile, not_measured, passed
from .classify import WorkloadClassifier, trace_features
from .conditions import contention_details, excused, unjudged
from .containment import escape_attempts
from .gpu_signals import GpuSignals, gpu_outcome, nvml_window
from .work_basis import WorkBasis, work_basis

CLASSIFIER_REJECT_BELOW = 0.2  # P(inference) under which the trace shape alone rejects
# A short window is given two accounting ticks of benefit of the doubt before the floor and the
# work check may reject it (10 ms ticks for rusage and /proc; cgroups count nanoseconds).
ACCOUNTING_SLACK_TICKS = 2
# Between leases an honest resident agent waits on its stdin; the runtime's thread pools may spin
# down for a moment after a batch. More than this is work nobody leased.
IDLE_CPU_ALLOWANCE_S = 0.05
IDLE_CPU_FRACTION = 0.05
WORK_MIN_FRACTION = 0.35  # of the smallest honest run's CPU per token (stats_lower_bound says why)
ON_CPU_FRACTION = 0.3  # of the profile's least cores busy while decoding, on a free core
# of the profile's least peak memory, allowed below it whatever the model's size: the runtime's own
# memory moves by this much (a tiny model's user was refused at 298 MB against a 301 MB floor)
RUNTIME_MEMORY_SLACK = 0.1
ONESHOT_EMBEDDING = (
    "embedding jobs are one short forward pass: judged only for resident agents, whose lease window "
    "holds no process start-up (`poi node`, with a resident embedding profile)"
)


def accounting_slack_s(ev: LeaseEvidence) -> float:
    return ACCOUNTING_SLACK_TICKS * ev.accounting_resolution_s


def stats_lower_bound(s: Stats, regime: str = "oneshot") -> float:
    """Least value an honest run can show: under the mean by 5 standard deviations (one-shot; 3 for
    a resident window, whose nanosecond counts have a long upper tail that inflates the deviation),
    but never above a fraction of the smallest run nor below 20% of the mean.

    The fraction is what this host's drift allows, measured (issue 23): one honest resident
    gpt2-micro agent showed 0.87-2.26 CPU-ms per token within minutes on the shared 2-core VM, with
    and without a neighbour (0.38 of its first runs), and profiled in a test suite's load it was
    later refused at 0.63 of the profile's mean. So the bound is 0.35 of the smallest honest run:
    it catches work skipped wholesale (a sleeper, a replay, a relay doing nothing), not a model a few
    times smaller; that is left to the audits (L4, L3) whose catch rate the tier policy prices."""
    if regime == "oneshot":
        return max(0.2 * s.mean, min(WORK_MIN_FRACTION * s.min, s.mean - 5 * s.std))
    return max(0.2 * s.mean, min(WORK_MIN_FRACTION * s.min, s.mean - 3 * s.std))


def basis_of(profile: Profile, ev: LeaseEvidence) -> WorkBasis | None:
    """The honest runs this window's work floor is a fraction of: those matching the cores the
    sandbox kept busy, at the window's batch size (None when batched and no runs measured batches)."""
    return work_basis(profile, ev, lambda s: stats_lower_bound(s, ev.regime))


def per_token_stats(profile: Profile, ev: LeaseEvidence) -> Stats | None:
    """The honest CPU per token L1 judges this window by (`basis_of`); L2 and the plots use the same."""
    basis = basis_of(profile, ev)
    return basis.per_token if basis else None


def work_lower_bound(profile: Profile) -> float:
    """Least CPU seconds per token an honest unbatched run can show."""
    return stats_lower_bound(profile.decode_cpu_s_per_token)


def memory_floor_mb(profile: Profile, param_count: int, precision: str) -> float:
    """Least peak RSS an agent holding the weights can show: the honest minimum less half the
    weights' size or RUNTIME_MEMORY_SLACK of it, whichever is more (for tiny models this check is
    weak, and says so by a floor under the runtime's own size)."""
    weights_mb = param_count * (4 if precision == "fp32" else 2) / 2**20
    least = profile.peak_rss_mb.min
    return least - max(0.5 * weights_mb, RUNTIME_MEMORY_SLACK * least)


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
    slack_s: float  # accounting resolution's benefit of the doubt
    batch: int = 1  # leases streaming in the window (this one and those it was batched with)
    honest_per_token_s: float = 0.0  # the profile's mean at that batch size
    wait_s: float | None = None  # the sandbox's run-queue delay over the lease (None: not measured)
    basis: WorkBasis | None = None  # which profile runs the work floor came from
    from_lease_start: bool = False  # the tokens arrived bunched: `window` is the lease's (lease_window)

    @classmethod
    def of(
        cls, ev: LeaseEvidence, profile: Profile, ref: ReferenceValues, lease: Lease, basis: WorkBasis
    ) -> DecodeWork:
        """From evidence that has a decode window (at least two streamed tokens); `basis` is the
        honest CPU per token at the window's batch size and parallelism. Co-served tokens are taken
        to be of the same model (one model per resident agent in this prototype)."""
        per_token = basis.per_token
        window = ev.decode_window
        if window is None:
            raise ValueError("DecodeWork needs a decode window: at least two streamed tokens")
        lower = stats_lower_bound(per_token, ev.regime)
        bunched = arrived_bunched(ev, window, lower, profile)
        return cls(
            window=lease_window(ev) if bunched else window,
            profile=profile,
            reference=ref,
            model_id=lease.model_id,
            peak_rss_mb=ev.peak_rss_mb(),
            floor_cpu_s=profile.physics_floor_cpu_s(window.batch_tokens, ref.flops_per_token),
            lower_bound_s=lower,
            rss_floor_mb=memory_floor_mb(profile, ref.param_count, lease.precision),
            slack_s=accounting_slack_s(ev),
            batch=1 + ev.co_leases,
            honest_per_token_s=per_token.mean,
            wait_s=ev.contention.get("wait_s"),
            basis=basis,
            from_lease_start=bunched,
        )

    @property
    def tokens(self) -> int:
        return self.window.batch_tokens

    @property
    def per_token_s(self) -> float:
        return self.window.cpu_s / self.tokens

    @property
    def cores_on_free_cpu(self) -> float | None:
        """CPU seconds over the decode window's wall time less the time the sandbox waited for a
        CPU (summed over its threads, so divided by the cores the profile kept busy); None when the
        delay was not measured. At least a tenth of the wall time is kept, so it stays finite."""
        if self.wait_s is None or self.window.wall_s <= 0:
            return None
        # the delay is summed over the threads that wanted a CPU: as many as the matched runs kept
        # busy (the default thread count's for a 1-thread agent would leave most of its wait in)
        busy = self.basis.runs_cores if self.basis is not None else self.profile.decode_cores_busy
        threads = max(1.0, busy.max)
        free = max(0.1 * self.window.wall_s, self.window.wall_s - self.wait_s / threads)
        return self.window.cpu_s / free

    @property
    def basis_text(self) -> str:
        return self.basis.describe() if self.basis is not None else "floor from the profile's runs"

    def basis_details(self) -> dict[str, Any]:
        b = self.basis
        assert b is not None
        return {
            "floor_threads": b.threads,
            "floor_per_core": b.per_core,
            "floor_from": b.describe(),
            **({} if b.cores_busy is None else {"cores_busy": round(b.cores_busy, 3)}),
        }

    @property
    def score(self) -> float:
        return float(min(1.0, self.per_token_s / self.honest_per_token_s))

    def details(self) -> dict[str, Any]:
        w = self.window
        return {
            "decode_tokens": w.tokens,
            "batch": self.batch,
            "batch_tokens": self.tokens,
            "decode_wall_s": round(w.wall_s, 4),
            **({"window": "lease (the tokens arrived bunched)"} if self.from_lease_start else {}),
            "decode_cpu_s": round(w.cpu_s, 4),
            "cpu_ms_per_token": round(self.per_token_s * 1000, 3),
            "profile_cpu_ms_per_token": round(self.honest_per_token_s * 1000, 3),
            "lower_bound_cpu_ms": round(self.lower_bound_s * 1000, 3),
            **({} if self.basis is None else self.basis_details()),
            "physics_floor_cpu_s": round(self.floor_cpu_s, 5),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_floor_mb": round(self.rss_floor_mb, 1),
            **({} if (on := self.cores_on_free_cpu) is None else {"cores_on_free_cpu": round(on, 3)}),
        }


BUNCHED_CORES = 2.0  # a window needing this many times the cores any honest run kept busy


def lease_window_fair(ev: LeaseEvidence) -> bool:
    """Whether the lease's own window (hand-over to last token, its CPU to the receipt) may stand in
    for stamps that arrived bunched: resident evidence (a one-shot run's stamps count from the process
    start) and not the sandbox's first lease (no idle gap before it, nothing beside it: its window
    and CPU hold the agent's start-up). L1's and L2's `bunched` rules both ask this."""
    after_start_up = ev.idle_before is not None or bool(ev.overlapped)
    return ev.regime == RESIDENT_REGIME and bool(ev.stream_t) and after_start_up


def arrived_bunched(ev: LeaseEvidence, window: DecodeWindow, lower_s: float, profile: Profile) -> bool:
    """Whether the decode window is too short to have held the least honest work even on BUNCHED_CORES
    times the cores any profiled run kept busy: Maxwell's stamps then did not see the decode (the node's
    reader was late and read the tokens together; stamps are late, never early), as L2's `bunched`.
    Only a lone lease (a batch's window is shared) where the lease window is fair."""
    if ev.co_leases or not lease_window_fair(ev):
        return False
    cores = BUNCHED_CORES * max(1.0, profile.decode_cores_busy.max)
    return window.wall_s * cores < lower_s * window.batch_tokens


def lease_window(ev: LeaseEvidence) -> DecodeWindow:
    """From the lease's hand-over to its end: every streamed token against all the sandbox's CPU of
    the lease (the prefill's too: more work counted, never less, so only in the agent's favour as
    far as an honest run goes; a cheat still has to have burnt the floor inside its own lease)."""
    return DecodeWindow(ev.stream_t[-1], ev.cpu_s, len(ev.stream_t), ev.co_tokens)


def physics_floor(w: DecodeWork) -> Finding | None:
    cpu = w.window.cpu_s
    if np.isfinite(cpu) and cpu + w.slack_s >= w.floor_cpu_s:
        return None
    return Finding(
        f"physics floor: {w.tokens} tokens of {w.model_id} need at least {w.floor_cpu_s:.4f} "
        f"CPU-s at this device's measured peak, Maxwell measured {cpu:.4f}",
        0.0,
    )


def on_cpu(w: DecodeWork) -> Finding | None:
    busy = w.cores_on_free_cpu
    least = ON_CPU_FRACTION * w.profile.least_cores_busy  # a 1-thread agent keeps one core busy
    if busy is None or busy + w.slack_s / max(w.window.wall_s, 1e-9) >= least:
        return None
    return Finding(
        f"work: expected the sandbox on a CPU while decoding (>= {least:.2f} cores busy once the "
        f"{w.wait_s:.3f} s it waited for a CPU is taken out; honest {w.model_id} here: "
        f"{w.profile.decode_cores_busy.median:.2f}), measured {busy:.2f}",
        float(min(1.0, busy / max(w.profile.decode_cores_busy.median, 1e-9))),
    )


def work_per_token(w: DecodeWork) -> Finding | None:
    if (w.window.cpu_s + w.slack_s) / w.tokens >= w.lower_bound_s:
        return None
    batched = f" in a batch of {w.batch} ({w.tokens} tokens in the window)" if w.batch > 1 else ""
    return Finding(
        f"work: expected >= {w.lower_bound_s * 1000:.1f} CPU-ms per token{batched} (honest "
        f"{w.model_id} here: {w.honest_per_token_s * 1000:.1f}; {w.basis_text}), measured "
        f"{w.per_token_s * 1000:.2f}",
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
    classifier: WorkloadClassifier | None, ev: LeaseEvidence, w: DecodeWork, precision: str
) -> tuple[Finding | None, dict[str, Any]]:
    """(a finding when the classifier is confident this is not inference, what it said)."""
    if classifier is None or w.batch > 1:  # trained on lone leases; a batch's trace is another shape
        return None, {}
    feats = trace_features(ev, w.profile, w.reference, precision)
    if feats is None:
        return None, {}
    label, p, extra = classifier.predict(feats)
    said = {"trace_class": label, "trace_class_p": round(p, 3), **extra}
    if extra["p_inference"] >= CLASSIFIER_REJECT_BELOW:
        return None, said
    return Finding(
        f"trace shape: expected inference, the trace classifier says {label} (p={p:.2f})",
        extra["p_inference"],
    ), said


def idle_work(ev: LeaseEvidence) -> Finding | None:
    """A resident sandbox must be quiet while no lease is in flight."""
    idle = ev.idle_before
    if idle is None:
        return None
    allowed = IDLE_CPU_ALLOWANCE_S + IDLE_CPU_FRACTION * idle.gap_s
    if idle.cpu_s <= allowed:
        return None
    return Finding(
        f"work between leases: expected an idle sandbox (<= {allowed:.3f} CPU-s in the "
        f"{idle.gap_s:.2f} s before this lease, no lease in flight), measured {idle.cpu_s:.3f} CPU-s"
    )


def embed_work(ev: LeaseEvidence, profile: Profile, ref: ReferenceValues, input_tokens: int) -> Outcome:
    """A resident embedding lease: the sandbox's CPU over the lease window against its input."""
    stats = profile.embed_cpu_s_per_token
    assert stats is not None
    floor = profile.physics_floor_cpu_s(input_tokens, ref.flops_per_token)
    bound = stats_lower_bound(stats, ev.regime) * input_tokens
    cpu, slack = ev.cpu_s, accounting_slack_s(ev)
    details = {
        "input_tokens": input_tokens,
        "lease_cpu_s": round(cpu, 5),
        "lower_bound_cpu_s": round(bound, 5),
        "physics_floor_cpu_s": round(floor, 6),
        "peak_rss_mb": round(ev.peak_rss_mb(), 1),
    }
    score = float(min(1.0, cpu / (stats.mean * input_tokens)))
    if not np.isfinite(cpu) or cpu + slack < floor:
        return failed(
            f"physics floor: {input_tokens} input tokens of {ref.model_id} need at least {floor:.5f} "
            f"CPU-s at this device's measured peak, Maxwell measured {cpu:.5f}",
            0.0,
            **details,
        )
    if cpu + slack < bound:
        return failed(
            f"work: expected >= {bound * 1000:.1f} CPU-ms for {input_tokens} input tokens (honest "
            f"{ref.model_id} here: {stats.mean * input_tokens * 1000:.1f}), measured {cpu * 1000:.2f}",
            score,
            **details,
        )
    return passed(f"{cpu * 1000:.1f} CPU-ms for {input_tokens} input tokens", score, **details)


class ThermodynamicLayer(EvidenceLayer):
    """L1; see the module docstring for the checks."""

    name = LayerName.THERMODYNAMIC

    def __init__(
        self,
        registry: Registry,
        profiles: ProfileStore,
        classifier: WorkloadClassifier | None = None,
        gpu_signals: GpuSignals | None = None,
    ) -> None:
        super().__init__(profiles)
        self.registry = registry
        self.classifier = classifier
        self.gpu_signals = gpu_signals if gpu_signals is not None else GpuSignals.load()

    def decide_on(self, ctx: Appraisal, ev: LeaseEvidence) -> Outcome:
        lease = ctx.lease
        escaped = escape_attempts(ev)  # before anything measured: what escaped was not measured
        problem = idle_work(ev)
        if escaped:
            also = f"; {problem.reason}" if problem else ""
            return failed(escaped.reason + also, escaped.score, sandbox_escapes=list(ev.sandbox_escapes))
        if problem:
            idle = ev.idle_before
            assert idle is not None  # idle_work finds nothing without an idle gap
            return failed(problem.reason, problem.score, idle_gap_s=idle.gap_s, idle_cpu_s=idle.cpu_s)
        if isinstance(lease.job, EmbedJob) and ev.regime == "oneshot":
            return not_measured(ONESHOT_EMBEDDING)  # before the profile: none would help here
        gpu = nvml_window(ev.telemetry)
        if gpu is not None and isinstance(lease.job, GenerateJob):  # a GPU lease: judged from NVML
            if lease.job.max_new_tokens < 2:
                return not_measured("a one-token lease has no decode window (first to last streamed token)")
            ref = self.registry.reference(lease.model_id)
            return gpu_outcome(self.gpu_signals, ev, gpu, ref.param_count, lease.precision)
        profile = self.profile(ctx, ev)
        if profile is None:
            return not_measured(no_profile(lease.model_id, ev))
        if isinstance(lease.job, EmbedJob):
            return self.embedding(ctx, ev, profile)
        assert isinstance(lease.job, GenerateJob)
        if lease.job.max_new_tokens < 2:
            return not_measured("a one-token lease has no decode window (first to last streamed token)")
        if ev.decode_window is None:
            return failed(
                "work: expected streamed tokens, each with its arrival and CPU reading, to measure the "
                f"decode window, got {len(ev.stream_tokens)} tokens, {len(ev.stream_t)} arrivals, "
                f"{len(ev.stream_cpu_s)} CPU readings"
            )
        basis = basis_of(profile, ev)
        if basis is None:
            return not_measured(
                f"batched with {ev.co_leases} other leases, and the profile of {lease.model_id} on "
                f"{ev.profile_key} has no batch sizes: run `poi profile {lease.model_id} --resident "
                "--batches 1,2,4`"
            )
        w = DecodeWork.of(ev, profile, self.registry.reference(lease.model_id), lease, basis)
        details = {**w.details(), **contention_details(ev)}
        warning = None
        for check in (physics_floor, on_cpu, work_per_token, memory_floor):
            problem = check(w)
            if problem:
                if check is work_per_token:  # the gross-miss test takes no benefit of the doubt
                    warning = excused(problem, w.per_token_s, w.lower_bound_s, profile, ev, **details)
                    if warning is not None:
                        continue  # the checks load cannot explain still judge (a smaller model's memory)
                return failed(problem.reason, problem.score, **details)
        if warning is not None:  # not the trace classifier: it judges work per token too
            return warning
        problem, said = trace_shape(self.classifier, ev, w, lease.precision)
        details.update(said)
        if problem:
            # its features (pace, cores busy, bursts) move with the host's load, and every check with a
            # gross bound has passed: under contention the profile's runs never saw, a WARN (unpaid)
            return unjudged(problem, profile, ev, **details) or failed(
                problem.reason, problem.score, **details
            )
        return passed(
            f"{w.per_token_s * 1000:.1f} CPU-ms/token (profile {w.honest_per_token_s * 1000:.1f}"
            + (f", batch of {w.batch}" if w.batch > 1 else "")
            + f"; {w.basis_text}), {w.peak_rss_mb:.0f} MB resident, "
            f"{w.window.cpu_s / w.floor_cpu_s:.0f}x above the physics floor",
            w.score,
            **details,
        )

    def embedding(self, ctx: Appraisal, ev: LeaseEvidence, profile: Profile) -> Outcome:
        lease = ctx.lease
        assert isinstance(lease.job, EmbedJob)
        if profile.embed_cpu_s_per_token is None:
            return not_measured(
                f"the profile of {lease.model_id} on {ev.profile_key} has no embedding work: run "
                f"`poi profile {lease.model_id} --resident`"
            )
        if ev.overlapped:
            return not_measured(
                f"embedding lease served alongside {ev.overlapped} other leases: this prototype "
                "judges embedding work only for leases alone in their window"
            )
        ref = self.registry.reference(lease.model_id)
        tokens = self.registry.embed_input_tokens(lease.model_id, lease.job.texts)
        outcome = embed_work(ev, profile, ref, tokens)
        if outcome.status is not Status.PASS:
            return outcome
        floor = memory_floor_mb(profile, ref.param_count, lease.precision)
        if ev.peak_rss_mb() < floor:
            return failed(
                f"memory: expected the weights resident (peak >= {floor:.0f} MB), "
                f"measured {ev.peak_rss_mb():.0f} MB",
                outcome.score,
                **outcome.details,
            )
        return outcome
