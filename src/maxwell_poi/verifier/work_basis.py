"""Which honest runs L1's work floor is a fraction of: those matching the parallelism Maxwell
measured (issue 24).

Multi-threaded BLAS burns more CPU per token than one thread: the threads spin-wait and sync. On
this project's 2-core VM honest gpt2-small took 62.7 CPU-ms per token at 2 threads and 32.6 at 1, at
the same pace; under a neighbour the 2-thread agent burned 117 while the 1-thread one stayed at 33.
A floor taken from the default thread count's runs therefore rejected honest single-thread agents.

Maxwell's own measurement decides, never the agent's `--threads` claim: the cores the sandbox kept
busy over the decode window (its CPU-seconds per wall-second, from the cgroup). The sandbox's thread
count (`/proc/<pid>/task`) is not used: torch keeps its pool whether or not it works, and an idle
thread costs nothing. The floor is the lower of

1. the **matched** runs: of the thread counts the profile measured, the most threads whose least
   parallel honest run kept no more cores busy than this sandbox did, else the fewest threads'.
   A sandbox less busy than a thread count's every honest run is judged by fewer threads' runs:
   fewer busy cores can only mean less spinning, never less of the model's work. No interpolation
   upwards: spin overhead makes CPU per token convex in the cores busy, so a chord between two
   profiles would overstate it;
2. the fewest threads' runs **per core**, times the measured cores (at least one): CPU per token
   is cores busy times wall time per token, and fewer threads are never faster. This caps a profile
   whose multi-threaded runs were measured while a neighbour made them spin (the case found: 55
   CPU-ms expected of an honest 1-thread agent doing 43), and gives profiles made before per-thread
   runs (one default thread count) a floor that follows the cores busy.

Either is a lower bound on its own assumption (a representative profile; no speedup beyond the
floor's margin), so the lower of the two holds when either does. Cheats gain nothing from the
choice: fewer busy cores only lower the floor towards the single-thread work the model needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..observer.evidence import LeaseEvidence
from ..registry.profiles import Profile, Stats, ThreadRuns

DEFAULT_THREADS = 0  # ThreadRuns.threads of a profile made before issue 24: the agent's default count


@dataclass(frozen=True)
class WorkBasis:
    """The honest CPU per token L1's work floor is a fraction of, and where it came from."""

    per_token: Stats  # honest CPU-s per token of the batch (scaled when `per_core`)
    threads: int  # the profile runs' torch thread count; DEFAULT_THREADS when not recorded
    runs_cores: Stats  # cores busy of those runs
    cores_busy: float | None  # measured: sandbox CPU-s / wall-s over the decode window
    batch: int = 1  # the batch size of the profile's statistics
    per_core: bool = False  # the runs' work per core times the measured cores busy
    scale: float = 1.0  # per core: the runs' CPU per token times this (measured cores / the runs')

    @property
    def runs_name(self) -> str:
        if self.threads == DEFAULT_THREADS:
            return (
                "the profile's default-thread runs (it has no per-thread runs: re-run poi profile --resident)"
            )
        return f"the profile's {self.threads}-thread runs"

    def describe(self) -> str:
        """Which profile runs and threads the floor came from, against what Maxwell measured."""
        busy = "not measured" if self.cores_busy is None else f"{self.cores_busy:.2f}"
        runs = f"{self.runs_cores.min:.2f}-{self.runs_cores.max:.2f} cores busy"
        if self.per_core:
            return (
                f"floor from {self.runs_name} ({runs}) per core, x{self.scale:.2f} for the {busy} cores "
                "this sandbox kept busy (counted as at least one)"
            )
        return f"floor from {self.runs_name} ({runs}; this sandbox {busy})"


def measured_cores(ev: LeaseEvidence) -> float | None:
    """The cores the sandbox kept busy over the decode window (None without one)."""
    w = ev.decode_window
    if w is None or w.wall_s <= 0:
        return None
    return w.cpu_s / w.wall_s


def thread_runs(profile: Profile) -> list[ThreadRuns]:
    """The profile's honest runs by thread count, fewest threads first (by the count Maxwell ran the
    reference agent at: under a neighbour a 2-thread profile run can keep fewer cores busy than a
    quiet 1-thread one); a profile made before per-thread runs gives its default count's as one."""
    if profile.threads_runs:
        return sorted(profile.threads_runs.values(), key=lambda r: r.threads)
    legacy = ThreadRuns(
        DEFAULT_THREADS,
        profile.decode_cpu_s_per_token,
        profile.decode_cores_busy,
        profile.batch_cpu_s_per_token,
    )
    return [legacy]


def work_basis(
    profile: Profile, ev: LeaseEvidence, lower_bound: Callable[[Stats], float]
) -> WorkBasis | None:
    """The runs L1 judges this lease's decode window by (module docstring); `lower_bound` is L1's
    floor of a Stats. None when the window was batched and no runs measured that batch size."""
    batch = 1 + ev.co_leases
    cores = measured_cores(ev)
    runs = thread_runs(profile)
    least = runs[0]  # the fewest threads: the least spinning, the serial work per token
    matched = least
    for r in runs:
        if cores is not None and r.cores_busy.min <= cores:
            matched = r  # this sandbox was at least as parallel as every run of r
    picked = matched.per_token(batch)
    if picked is None:  # the matched runs measured no such batch size: the least parallel's may have
        matched, picked = least, least.per_token(batch)
    if picked is None:
        return None
    basis = WorkBasis(picked[1], matched.threads, matched.cores_busy, cores, picked[0])
    least_stats = least.per_token(batch)
    if cores is None or least_stats is None:
        return basis
    scale = max(1.0, cores) / max(1.0, least.cores_busy.min)
    per_core = least_stats[1].scaled(scale)
    if lower_bound(per_core) < lower_bound(basis.per_token):
        return WorkBasis(
            per_core, least.threads, least.cores_busy, cores, least_stats[0], per_core=True, scale=scale
        )
    return basis
