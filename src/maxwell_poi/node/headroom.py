"""A node's thermal budget for the next auction round, from its own telemetry.

GPU (NVML readable): (power limit − power drawn now) × the round's horizon — the joules the card
can still burn within its limit. CPU: idle share of the cores (psutil) × cores × the stated
watts-per-core figure × the horizon — an *estimate*, labelled so, like the CPU energy debit.
The node is Maxwell's own, so this is Maxwell's reading, not an agent's claim.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def cpu_headroom(horizon_s: float, watts_per_core: float = WATTS_PER_CORE_ESTIMATE) -> Headroom:
    cores = os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=0.1) / 100.0
    joules = (1.0 - busy) * cores * watts_per_core * horizon_s
    return Headroom(
        joules, f"cpu estimate: {1 - busy:.0%} idle x {cores} cores x {watts_per_core:g} W x {horizon_s:g} s"
    )


def measure_headroom(
    horizon_s: float = HORIZON_S, watts_per_core: float = WATTS_PER_CORE_ESTIMATE
) -> Headroom:
    return gpu_headroom(horizon_s) or cpu_headroom(horizon_s, watts_per_core)
