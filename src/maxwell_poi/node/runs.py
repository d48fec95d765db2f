"""Running leases under Maxwell's runner with the Observer watching: the one path that `poi run`,
the demo, profiling and the benchmarks all take, and the honest runs a reference profile is
measured from."""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..observer.evidence import LeaseEvidence, profile_conditions
from ..observer.host import measure_peak_flops, this_device
from ..observer.telemetry import Observer, TelemetrySource, default_sources
from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import max_receipt_bytes
from ..registry.models import Registry
from ..registry.profiles import Profile, Stats
from ..registry.prompts import PROMPTS
from .channel import AgentRun, run_agent

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # nothing is downloaded at run time


def run_lease(
    command: str | list[str],
    lease: Lease,
    registry: Registry,
    *,
    sources: list[TelemetrySource] | None = None,
    timeout_s: float | None = None,
) -> AgentRun:
    """Run one agent program on one lease as its own process, with the Observer's telemetry
    (`default_sources()` unless given) over its whole life. The receipt limit comes from the
    model's reference values; the model itself is never built here."""
    limit = max_receipt_bytes(lease, registry.reference(lease.model_id).hidden)
    observer = Observer(sources if sources is not None else default_sources())
    return run_agent(command, lease, max_bytes=limit, timeout_s=timeout_s, env=OFFLINE_ENV, observer=observer)


def honest_agent_argv(key: Path, *extra: str) -> list[str]:
    """The honest reference agent (`poi agent`) as a command line."""
    return [sys.executable, "-m", "maxwell_poi", "agent", "--key", str(key), *extra]


def honest_runs(
    model_id: str,
    runs: int,
    tokens: int,
    threads: tuple[int, ...] = (1, 2),
    registry: Registry | None = None,
) -> Iterator[tuple[int, LeaseEvidence]]:
    """Run the honest reference agent `runs` times (alternating thread counts) through the
    runner; yields (threads, evidence) and raises if a run fails."""
    registry = registry or Registry()
    with tempfile.TemporaryDirectory() as tmp:
        key_path = Path(tmp) / "honest.pem"
        AgentKey.generate().save(key_path)
        for i in range(runs):
            n_threads = threads[i % len(threads)]
            job = GenerateJob(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens)
            lease = Lease.issue("profiler", model_id, job)
            run = run_lease(honest_agent_argv(key_path, "--threads", str(n_threads)), lease, registry)
            if run.evidence.exit_code != 0 or run.evidence.decode_window is None:
                raise RuntimeError(f"honest run {i} of {model_id} failed: {run.evidence.stderr_tail[-500:]}")
            yield n_threads, run.evidence


def measure_profile(
    model_id: str,
    *,
    runs: int = 4,
    tokens: int = 48,
    threads: tuple[int, ...] = (1, 2),
    registry: Registry | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Profile:
    """What honest decoding of `model_id` looks like on this device, from `runs` honest runs."""
    intervals, cpu_per_token, busy, rss, seen = [], [], [], [], []
    for i, (n_threads, ev) in enumerate(honest_runs(model_id, runs, tokens, threads, registry)):
        seen.append(ev)
        window = ev.decode_window
        assert window is not None  # honest_runs refuses runs without one
        intervals.append(statistics.median(np.diff(ev.stream_t)))
        cpu_per_token.append(window.cpu_s / window.tokens)
        busy.append(window.cpu_s / window.wall_s if window.wall_s > 0 else 0.0)
        rss.append(ev.peak_rss_mb())
        if on_progress:
            on_progress(
                f"{model_id} run {i + 1}/{runs} ({n_threads} threads): "
                f"{intervals[-1] * 1000:.1f} ms/token, {cpu_per_token[-1] * 1000:.1f} CPU-ms/token"
            )
    return Profile.from_runs(
        this_device(),
        model_id,
        tokens,
        intervals=intervals,
        cpu_per_token=cpu_per_token,
        busy=busy,
        memory=rss,
        peak=measure_peak_flops(),
        measured_at=time.time(),
        threads=list(threads),
        conditions={k: Stats.of(v) for k, v in profile_conditions(seen).items()},
    )
