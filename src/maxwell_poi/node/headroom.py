"""A node's thermal budget for the next auction round, from its own telemetry.

GPU (NVML readable): (power limit − power drawn now) × the round's horizon — the joules the card
can still burn within its limit. CPU: idle share of the cores (psutil) × cores × the stated
watts-per-core figure × the horizon — an *estimate*, labelled so, like the CPU energy debit.
The node is Maxwell's own, so this is Maxwell's reading, not an agent's claim.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import psutil

from ..economics.energy import WATTS_PER_CORE_ESTIMATE

HORIZON_S = 60.0  # the round a pull bids capacity for


@dataclass(frozen=True)
class Headroom:
    joules: float
    source: str


def gpu_headroom(horizon_s: float) -> Headroom | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            limit_w = pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
            drawn_w = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML on this host: the CPU estimate is the answer
        return None
    spare = max(0.0, limit_w - drawn_w)
    return Headroom(
        spare * horizon_s, f"nvml: limit {limit_w:.0f} W - drawn {drawn_w:.0f} W, x {horizon_s:g} s"
    )


_since: list[Any] = []  # the host's CPU times at the previous reading (this process's)


def _idle_share(before: Any, after: Any) -> float | None:
    total = sum(after) - sum(before)
    return None if total <= 0 else max(0.0, min(1.0, (after.idle - before.idle) / total))


def cpu_headroom(horizon_s: float, watts_per_core: float = WATTS_PER_CORE_ESTIMATE) -> Headroom:
    """The larger of two idle shares: over 0.1 s now, and since the previous reading (a node reads
    once a pull, so over its last long poll). One instant alone reads a busy moment — a profile just
    run, the node's own work — as a full host, and a lease deferred for it (the gateway's) is
    refused; a long average alone would miss a host that has just become busy for good."""
    cores = os.cpu_count() or 1
    before = psutil.cpu_times()
    time.sleep(0.1)
    times = psutil.cpu_times()
    now = _idle_share(before, times) or 0.0
    average = _idle_share(_since[0], times) if _since else None
    _since[:] = [times]
    idle = max(now, average or 0.0)
    joules = idle * cores * watts_per_core * horizon_s
    seen = f" (now {now:.0%}, since the last reading {average:.0%})" if average is not None else ""
    return Headroom(
        joules,
        f"cpu estimate: {idle:.0%} idle{seen} x {cores} cores x {watts_per_core:g} W x {horizon_s:g} s",
    )


def measure_headroom(
    horizon_s: float = HORIZON_S, watts_per_core: float = WATTS_PER_CORE_ESTIMATE
) -> Headroom:
    return gpu_headroom(horizon_s) or cpu_headroom(horizon_s, watts_per_core)
