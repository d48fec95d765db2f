"""How contended the host was while a lease ran, as Maxwell measures it (issue 23).

An agent's wall-clock pace depends on how long its threads waited for a CPU, and its CPU-seconds per
token drift with what else the host runs (on the 2-core VM this project is measured on, honest
gpt2-micro ranged 0.87-2.26 CPU-ms per token within minutes, with and without a neighbour). Maxwell
owns the host, so it reads the contention instead of hoping the profile's conditions hold:

- `wait_s`        the sandbox's threads' run-queue delay (`/proc/<pid>/task/<tid>/schedstat`, field
                  2, nanoseconds): time ready to run but not running — not the agent's doing;
- `others_cores`  cores the rest of the host kept busy (`/proc/stat` non-idle time, less the
                  sandbox's own CPU), averaged over the window (windows of MIN_TICKS ticks or more:
                  /proc/stat counts in 10 ms ticks);
- `steal_cores`   cores' worth of time the hypervisor gave to other guests (`/proc/stat` steal;
                  same windows);
- `cpu_pressure`  the fraction of the window some task on the host waited for a CPU (PSI
                  `/proc/pressure/cpu` "some" total; absent where the kernel has no PSI);
- `load1`         the one-minute load average at the window's end (context only).

Nothing here comes from the agent. A figure the kernel does not offer is left out of the mapping, so
a verifier can tell "not measured" from zero.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# /proc/stat counts each CPU in ticks (10 ms at CLK_TCK 100): over a window of W seconds the cores
# figures are off by up to cpus x tick / W, so they are reported only over windows this many ticks long
MIN_TICKS = 20
FIELDS = ("window_s", "wait_s", "others_cores", "steal_cores", "cpu_pressure", "load1")


@dataclass(frozen=True)
class HostSample:
    """One reading of the host's CPU counters (seconds since boot, summed over every CPU)."""

    at: float  # perf_counter
    busy_s: float | None  # non-idle CPU time of all CPUs
    steal_s: float | None
    pressure_us: int | None  # PSI cpu "some" total, microseconds


def host_sample() -> HostSample:
    busy = steal = None
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        ticks = [int(v) for v in first[1:]]
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        counted = sum(ticks[:8])
        busy = (counted - idle) / CLK_TCK
        steal = (ticks[7] if len(ticks) > 7 else 0) / CLK_TCK
    except (OSError, ValueError, IndexError):
        pass
    return HostSample(time.perf_counter(), busy, steal, _pressure_total_us())


def _pressure_total_us() -> int | None:
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n", 1)[0]
    except OSError:
        return None
    for part in some.split():
        if part.startswith("total="):
            return int(part[len("total=") :])
    return None


def run_delay_s(pids: Iterable[int]) -> float | None:
    """Run-queue delay so far of every thread of `pids` (None when schedstat cannot be read at all).
    A thread that exited takes its delay with it: the figure is a lower bound."""
    total, seen = 0, False
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
            except OSError:
                continue
            if len(fields) >= 2:
                total += int(fields[1])
                seen = True
    return total / 1e9 if seen else None


@dataclass(frozen=True)
class Mark:
    """The host and the sandbox at one moment: where a window starts or ends."""

    host: HostSample
    wait_s: float | None  # the sandbox's run-queue delay so far


def mark(pids: Iterable[int]) -> Mark:
    return Mark(host_sample(), run_delay_s(pids))


def between(start: Mark, end: Mark, sandbox_cpu_s: float) -> dict[str, float]:
    """The contention over [start, end] as evidence fields (only those the kernel gave)."""
    window = end.host.at - start.host.at
    out: dict[str, float] = {"window_s": round(window, 6)}
    if window <= 0:
        return out
    if start.wait_s is not None and end.wait_s is not None:
        out["wait_s"] = round(max(0.0, end.wait_s - start.wait_s), 6)
    if window >= MIN_TICKS / CLK_TCK:  # else a tick's rounding would be most of the figure
        if start.host.busy_s is not None and end.host.busy_s is not None:
            others = (end.host.busy_s - start.host.busy_s - sandbox_cpu_s) / window
            out["others_cores"] = round(max(0.0, others), 4)
        if start.host.steal_s is not None and end.host.steal_s is not None:
            out["steal_cores"] = round(max(0.0, (end.host.steal_s - start.host.steal_s) / window), 4)
    if start.host.pressure_us is not None and end.host.pressure_us is not None:
        waited = (end.host.pressure_us - start.host.pressure_us) / 1e6
        out["cpu_pressure"] = round(min(1.0, waited / window), 4)
    with contextlib.suppress(OSError):
        out["load1"] = round(os.getloadavg()[0], 2)
    return out
