"""Each heavy EZKL step (setup, prove) in a child process (circuits/ezkl_child.py) under an
address-space cap, watched so that a deadlocked child fails the step instead of holding its caller.

Two limits, both sized from what was measured rather than guessed:

- a stall rule on the child's CPU *rate*: a child that used less than STALL_RATE of one core over the
  last `stall_s` seconds is deadlocked. ezkl 23.0.5's prover can deadlock (the GIL held across rayon
  workers that log through pyo3-log), and a helper thread of the deadlocked child still burns ~0.7 %
  of a core: "no CPU at all" never holds for it, so any-increase rules wait forever. An honest step
  keeps at least one core busy; 5 % leaves room for a shared machine where it gets a fraction of one.
- a per-step timeout sized to the circuit (`step_timeout_s`), from its rows rather than a flat hour.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..protocol.errors import PoiError

CAP_GB = 12.0  # every child proving step runs under this address-space cap
CHILD = Path(__file__).with_name("ezkl_child.py")
# the window the CPU rate is measured over: 30 s misjudged honest provers slowed by memory pressure
# (two provers on this 2-core, 24 GiB machine); a deadlocked child still shows ~1 % over any window
STALL_S = 60.0
STALL_RATE = 0.02  # below this share of one core over the window: deadlocked (honest provers in CI: >= 3.7 %)
ATTEMPTS = 3
# Per-step timeout: seconds per 2^15 circuit rows, doubling with each logrow, between a floor and a
# cap. bench/results/zk.json's slowest step per 2^15 rows was 54.5 s (logrows 16, 109 s to prove on
# the shared 2-core VM); 60 s leaves that run room, and the floor covers small circuits' fixed costs.
SECONDS_PER_2_15_ROWS = 60.0
TIMEOUT_FLOOR_S = 300.0
TIMEOUT_CAP_S = 3600.0
POLL_S = 0.5


@dataclass(frozen=True)
class Step:
    """One child step's cost."""

    seconds: float
    peak_gb: float


def step_timeout_s(logrows: int | None) -> float:
    """How long one setup or prove of a 2^logrows-row circuit may take (the cap when unknown)."""
    if logrows is None:
        return TIMEOUT_CAP_S
    scaled = SECONDS_PER_2_15_ROWS * 2.0 ** (logrows - 15)
    return min(TIMEOUT_CAP_S, max(TIMEOUT_FLOOR_S, scaled))


def _logrows(args: dict[str, str]) -> int | None:
    """The circuit's logrows from the settings.json in the step's folder, if it has one."""
    try:
        settings = json.loads((Path(args["folder"]) / "settings.json").read_text())
        return int(settings["run_args"]["logrows"])
    except (KeyError, OSError, ValueError, TypeError):
        return None


def run_capped(
    step: str,
    args: dict[str, str],
    cap_gb: float = CAP_GB,
    timeout_s: float | None = None,
    stall_s: float = STALL_S,
    stall_rate: float = STALL_RATE,
) -> Step:
    """Run one EZKL step (`setup` or `prove`) in a child under an address-space cap; its wall time
    and peak RSS. A child whose CPU rate over `stall_s` falls below `stall_rate` of one core is
    killed and the step run again (the deadlock is a race), up to ATTEMPTS times; the time reported
    is the attempt that finished. `timeout_s` defaults to step_timeout_s of the circuit's logrows."""
    limit = timeout_s if timeout_s is not None else step_timeout_s(_logrows(args))
    rates = []
    for _ in range(ATTEMPTS):
        try:
            return _run_child(step, args, cap_gb, limit, stall_s, stall_rate)
        except _Stalled as stalled:
            rates.append(f"{stalled.rate:.1%}")
    raise PoiError(
        f"ezkl {step}: expected it to finish, it deadlocked {ATTEMPTS} times (CPU rate over {stall_s:.0f} s: "
        f"expected >= {stall_rate:.0%} of a core, got {', '.join(rates)}; the pyo3-log / GIL race in "
        "ezkl's prover)"
    )


class _Stalled(Exception):
    def __init__(self, rate: float) -> None:
        super().__init__(f"CPU rate {rate:.1%} of a core")
        self.rate = rate


class CpuRate:
    """A process's CPU rate (share of one core) over a sliding window of samples."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, float]] = deque()  # (monotonic time, CPU seconds)

    def add(self, now: float, cpu_s: float) -> float | None:
        """Record a sample; the rate over the last window, or None until a whole window is seen."""
        self.samples.append((now, cpu_s))
        while len(self.samples) > 1 and self.samples[1][0] <= now - self.window_s:
            self.samples.popleft()  # keep one sample at or before the window's start
        t0, cpu0 = self.samples[0]
        if now - t0 < self.window_s:
            return None
        return (cpu_s - cpu0) / (now - t0)


def _run_child(
    step: str, args: dict[str, str], cap_gb: float, timeout_s: float, stall_s: float, stall_rate: float
) -> Step:
    import psutil

    cap = int(cap_gb * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    with tempfile.TemporaryDirectory(prefix="poi-zk-step-") as tmp:
        peak, errors = Path(tmp) / "peak", Path(tmp) / "stderr"
        cmd = [sys.executable, str(CHILD), step, json.dumps({**args, "peak": str(peak)})]
        t0 = time.perf_counter()
        with errors.open("wb") as err:  # a file, not a pipe: a chatty child never blocks on it
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit)
        watched, rate = psutil.Process(proc.pid), CpuRate(stall_s)
        while proc.poll() is None:
            try:
                times = watched.cpu_times()
            except psutil.Error:  # it just exited
                continue
            now_rate = rate.add(time.monotonic(), times.user + times.system)
            stalled = now_rate is not None and now_rate < stall_rate
            if stalled or time.perf_counter() - t0 > timeout_s:
                proc.kill()
                proc.wait()
                if stalled:
                    raise _Stalled(now_rate)
                raise PoiError(f"ezkl {step}: expected to finish within {timeout_s:.0f} s, it did not")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = " | ".join(errors.read_text(errors="replace").strip().splitlines()[-3:])
            raise PoiError(f"ezkl {step} failed (exit {proc.returncode}, cap {cap_gb:g} GB): {tail}")
        return Step(round(seconds, 3), round(int(peak.read_text()) / 2**20, 3))  # ru_maxrss KiB -> GiB
