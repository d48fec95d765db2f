"""How finely a sandbox's CPU counter actually moves, measured rather than declared."""

from __future__ import annotations

import sys
import time

from .base import Sandbox

_BUSY = "while True: pass"


def measure_resolution(sandbox: Sandbox, seconds: float = 0.5) -> float:
    """Smallest positive cpu_ns step between consecutive `usage()` reads, in seconds.

    Spawns a busy-looping child in `sandbox` (this uses the sandbox's one spawn: pass a fresh one),
    polls as fast as it can for `seconds`, then kills the child. The declared `resolution_ns` is the
    counter's unit; this is how often the kernel really updates it (scheduler ticks for cgroups,
    CLK_TCK for /proc). Returns inf if the counter never moved.
    """
    child = sandbox.spawn([sys.executable, "-c", _BUSY])
    try:
        prev = sandbox.usage().cpu_ns
        smallest = float("inf")
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            now = sandbox.usage().cpu_ns
            if now > prev:
                smallest = min(smallest, now - prev)
            prev = now
    finally:
        child.kill()
        child.wait()
    return smallest / 1e9
