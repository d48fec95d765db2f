"""Resident profiles at 1, 2 and N torch threads (issue 24): what L1's work floor follows.

An honest agent's CPU per token depends on its thread count (multi-threaded BLAS spin-waits and
syncs: honest gpt2-small here took 32.6 CPU-ms per token at 1 thread, 62.7 at 2, at the same pace),
so one profile at the default thread count set a floor that honest single-thread agents could not
reach. `measure_threaded_profile` measures the default thread count as `measure_resident_profile`
always has (pace, memory, contention, batches) and adds the honest runs at each other thread count:
their CPU per token at every batch size and the cores they kept busy, which is how L1 matches a
lease to them (verifier.work_basis). Maxwell chooses the reference agent's threads here, so
`--threads` is Maxwell's own setting, not an agent's claim.

The pace follows the threads too, the other way: on a busy 2-core host honest gpt2-micro streamed a
token every 1-8 ms at 1 thread and every 55-85 ms at 2 (the two threads wait on each other for a
CPU), so L2's burst rule, against the 2-thread median, took a 1-thread stream for one long burst.
The profile's pace (`interval_s`, `interval_free_s`) is the fastest thread count's: L2's floors are
lower bounds on the gap, and the fastest honest runs give the lowest.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..registry.models import Registry
from ..registry.profiles import Profile, Stats, ThreadRuns
from .resident_runs import honest_batches, measure_resident_profile, window_cpu_per_token


def thread_counts(text: str = "1,2,N", cpus: int | None = None) -> tuple[int, ...]:
    """Thread counts from a comma-separated list where N is this host's CPU count, sorted, each
    once; a ValueError names what was wrong."""
    n = cpus or os.cpu_count() or 1
    try:
        counts = {n if part.strip().upper() == "N" else int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise ValueError(f"thread counts: expected numbers or N, like 1,2,N; got {text!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"thread counts: expected at least one count >= 1, like 1,2,N; got {text!r}")
    return tuple(sorted(counts))


def default_threads() -> int:
    """The torch thread count an agent started without --threads takes here (same host, same
    environment: OMP_NUM_THREADS, else torch's choice)."""
    import torch

    return torch.get_num_threads()


def measure_threaded_profile(
    model_id: str,
    *,
    threads: Sequence[int] = (1, 2),
    runs: int = 3,
    tokens: int = 32,
    batches: Sequence[int] = (1, 2, 4),
    registry: Registry | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Profile:
    """`measure_resident_profile` at the default thread count, with the honest runs at each of
    `threads` (the default's included) in `Profile.threads_runs`; the profile's least peak memory is
    taken over every thread count's runs, its pace from the fastest thread count's (module
    docstring). Embedding models: the default thread count only (L1 judges embedding leases by their
    own floor)."""
    registry = registry or Registry()
    top = measure_resident_profile(
        model_id, runs=runs, tokens=tokens, batches=batches, registry=registry, on_progress=on_progress
    )
    if registry.get(model_id).kind == "embedding":
        return top
    default = default_threads()
    table = {
        default: ThreadRuns(
            default, top.decode_cpu_s_per_token, top.decode_cores_busy, top.batch_cpu_s_per_token
        )
    }
    memory = list(top.peak_rss_mb.runs)
    pace = {"interval_s": top.interval_s, "interval_free_s": top.interval_free_s}
    for t in threads:
        if t in table:
            continue
        measured = runs_at(model_id, t, runs, tokens, batches, registry, on_progress)
        table[t] = measured.summary
        memory += measured.memory
        if measured.intervals.median < pace["interval_s"].median:
            pace = {"interval_s": measured.intervals, "interval_free_s": measured.free_intervals}
    return dataclasses.replace(
        top,
        threads=sorted(table),
        threads_runs={str(t): table[t] for t in sorted(table)},
        peak_rss_mb=Stats.of(memory),
        **pace,
    )


@dataclass(frozen=True)
class MeasuredRuns:
    """One thread count's honest runs: their summary, and what the profile takes over from them."""

    summary: ThreadRuns
    memory: list[float]  # each lone run's peak memory, MB
    intervals: Stats  # each lone run's median gap between streamed tokens
    free_intervals: Stats | None  # the same less the run-queue delay (None where it was not measured)


def runs_at(
    model_id: str,
    threads: int,
    runs: int,
    tokens: int,
    batches: Sequence[int],
    registry: Registry,
    on_progress: Callable[[str], None] | None = None,
) -> MeasuredRuns:
    """Honest resident runs at `threads` torch threads."""
    per_batch: dict[int, list[float]] = {}
    cores, memory, gaps, free = [], [], [], []
    for b, wave in honest_batches(model_id, batches, runs, tokens, registry, threads=threads):
        # one value per wave: its leases share one window's CPU, they are not independent samples
        per_batch.setdefault(b, []).append(statistics.fmean(window_cpu_per_token(r) for r in wave))
        if b == 1:
            ev = wave[0].evidence
            w = ev.decode_window
            assert w is not None  # window_cpu_per_token refused a run without one
            cores.append(w.cpu_s / w.wall_s if w.wall_s > 0 else 0.0)
            memory.append(ev.peak_rss_mb())
            gaps.append(float(statistics.median(np.diff(ev.stream_t))))
            free.append(ev.free_interval_s())
        if on_progress:
            on_progress(
                f"{model_id} {threads} threads, batch {b}: {per_batch[b][-1] * 1000:.1f} CPU-ms per token"
            )
    if 1 not in per_batch:
        raise ValueError("measure_threaded_profile: batch size 1 must be among `batches`")
    summary = ThreadRuns(
        threads,
        Stats.of(per_batch[1]),
        Stats.of(cores),
        {str(b): Stats.of(v) for b, v in per_batch.items()},
    )
    free_known = [f for f in free if f is not None]
    return MeasuredRuns(
        summary,
        memory,
        Stats.of(gaps),
        Stats.of(free_known) if len(free_known) == len(free) else None,
    )
