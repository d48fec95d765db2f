"""The source protocol the Observer relies on, and `SampledSource`: the background-thread sampler
that every live source (NVML, process, RAPL) builds on, with the helpers they share."""

from __future__ import annotations

import math
import threading
import time
from typing import Protocol, runtime_checkable

import numpy as np

from .trace import Capability, Measurement, TrustLevel


@runtime_checkable
class TelemetrySource(Protocol):
    """Anything that can measure one window; the Observer needs nothing more."""

    name: str
    trust: TrustLevel

    def capabilities(self) -> tuple[Capability, ...]: ...

    def begin_window(self, pid: int | None = None) -> None: ...

    def end_window(self) -> Measurement: ...


class SampledSource:
    """Base for live sources: a daemon thread calls `_sample()` at `hz` between begin and end.

    It accounts for its own cost (CPU seconds of the sampling thread, plus the synchronous reads in
    begin/end) in ``totals["sampler_cpu_s"]``, because an observer that steals the agent's CPU
    distorts the very figures it reports.
    """

    name: str = "sampled"
    trust: TrustLevel = TrustLevel.HOST

    def __init__(self, hz: float = 10.0) -> None:
        if not hz > 0:
            raise ValueError(f"hz: expected > 0, got {hz}")
        self.hz = float(hz)
        self.device = ""
        self._caps: dict[str, Capability] = {}
        self._window_caps: dict[str, Capability] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rows: list[tuple[float, dict[str, float]]] = []
        self._t0 = 0.0
        self._started_at = 0.0
        self._sync_cpu = 0.0
        self._thread_cpu = 0.0
        self.sample_errors = 0
        self.last_error = ""

    # -- what subclasses provide -------------------------------------------------------------
    def _begin(self, pid: int | None) -> dict[str, float] | None:
        """Read baselines; may return a first sample taken at t=0."""
        return None

    def _sample(self) -> dict[str, float]:
        raise NotImplementedError

    def _before_final(self) -> None:
        """Hook run just before the last sample at end_window."""

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        return {}

    def _series_names(self) -> list[str]:
        """Series this source promises for the window (available capabilities that are series)."""
        return []

    # -- machinery ----------------------------------------------------------------------------
    def capabilities(self) -> tuple[Capability, ...]:
        return tuple({**self._caps, **self._window_caps}.values())

    @property
    def available(self) -> bool:
        return any(c.available for c in self._caps.values())

    def _error(self, what: str, e: BaseException) -> None:
        self.sample_errors += 1
        self.last_error = f"{what}: {type(e).__name__}: {e}"

    def begin_window(self, pid: int | None = None) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: begin_window while a window is open")
        self._rows = []
        self._window_caps = {}
        self.sample_errors = 0
        self.last_error = ""
        self._thread_cpu = 0.0
        c0 = time.thread_time()
        self._t0 = time.monotonic()
        self._started_at = time.time()
        first = self._begin(pid)
        if first is not None:
            self._rows.append((0.0, first))
        self._sync_cpu = time.thread_time() - c0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"telemetry-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        c0 = time.thread_time()
        period = 1.0 / self.hz
        due = self._t0 + period
        try:
            while not self._stop.wait(max(0.0, due - time.monotonic())):
                self._take()
                due += period
                now = time.monotonic()
                if due < now:  # fell behind (slow read, GIL): skip ticks rather than burst
                    due = now + period
        finally:
            self._thread_cpu = time.thread_time() - c0

    def _take(self) -> None:
        at = time.monotonic() - self._t0
        try:
            row = self._sample()
        except Exception as e:  # a failed tick is recorded, never fatal to the window
            self._error("sample", e)
            return
        self._rows.append((at, row))

    def end_window(self) -> Measurement:
        if self._thread is None:
            raise RuntimeError(f"{self.name}: end_window without begin_window")
        self._stop.set()
        self._thread.join()
        self._thread = None
        c0 = time.thread_time()
        self._before_final()
        self._take()
        duration = time.monotonic() - self._t0
        t = np.array([r[0] for r in self._rows], dtype=np.float64)
        names = list(dict.fromkeys([*self._series_names(), *(k for _, row in self._rows for k in row)]))
        series = {
            k: np.array([row.get(k, math.nan) for _, row in self._rows], dtype=np.float64) for k in names
        }
        totals = self._totals(t, series, duration)
        totals["sample_errors"] = float(self.sample_errors)
        totals["sampler_cpu_s"] = self._sync_cpu + self._thread_cpu + (time.thread_time() - c0)
        return Measurement(
            source=self.name,
            trust=self.trust,
            device=self.device,
            started_at=self._started_at,
            duration_s=duration,
            t=t,
            series=series,
            totals=totals,
            capabilities=self.capabilities(),
        )


def _integrate(t: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid over the finite samples: energy from power where no counter exists (or as a check)."""
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    return float(np.trapezoid(y[ok], t[ok]))


def _why(e: BaseException) -> str:
    """An exception as a capability reason: type and message, no trailing ': ' when the message is empty."""
    return f"{type(e).__name__}: {e}".rstrip(": ")
