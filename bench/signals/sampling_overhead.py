"""CPU the telemetry sampler itself costs, as a fraction of one core, watching this process idle and
busy; prints JSON.

    python -m bench.signals.sampling_overhead [seconds]     # default 5 s per run
"""

from __future__ import annotations

import json
import os
import sys
import time

from maxwell_poi.observer.telemetry import ProcessSource


def measure_sampling_overhead(seconds: float = 5.0, hz: float = 10.0, busy: bool = False) -> dict[str, float]:
    """CPU the sampler itself costs, as a fraction of one core, while watching this process.

    busy=True spins the main thread meanwhile, so the sampler also has to win the GIL back.
    """
    src = ProcessSource(hz=hz)
    src.begin_window(os.getpid())
    t0 = time.monotonic()
    if busy:
        while time.monotonic() - t0 < seconds:
            pass
    else:
        time.sleep(seconds)
    m = src.end_window()
    cpu = m.totals["sampler_cpu_s"]
    return {
        "hz": hz,
        "busy": float(busy),
        "wall_s": m.duration_s,
        "samples": float(m.t.shape[0]),
        "sampler_cpu_s": cpu,
        "sampler_cpu_ms_per_sample": 1e3 * cpu / max(m.t.shape[0], 1),
        "sampling_overhead_cpu_fraction": cpu / m.duration_s,
    }


def main(argv: list[str]) -> int:
    secs = float(argv[1]) if len(argv) > 1 else 5.0
    print(json.dumps([measure_sampling_overhead(secs), measure_sampling_overhead(secs, busy=True)], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
