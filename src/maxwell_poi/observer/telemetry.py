"""The Observer's telemetry: what Maxwell itself measured of the hardware it leased to an agent.

Why this module exists: the thermodynamic layer (L1) and the Energy Wallet must rest on numbers
the agent cannot edit. Every figure here is read by Maxwell's own code from a declared source, and
each `Measurement` carries that source's `TrustLevel`, because the same code reads very different
things depending on where it runs: host-side NVML sees a GPU the host still owns, but a GPU passed
whole into a VM (VFIO, Firecracker) is invisible to it, and then the reading comes from the guest's
driver (the agent's side: GUEST, weaker), from a mediated device, or out of band from the BMC.

Sources (all follow Zeus's ``begin_window`` / ``end_window`` shape):

- `NvmlSource`      GPU power, utilisation, clocks, PCIe, Hopper GPM pipe utilisation, energy counter.
- `ProcessSource`   CPU seconds, RSS and block I/O of a process tree (/proc on Linux, else psutil).
- `RaplSource`      CPU package energy from Linux powercap (intel-rapl) sysfs.
- `ReplaySource`    a recorded trace fed through the same API (trust RECORDED).
- `SimulatedSource` synthetic series for unit tests ONLY (trust SIMULATED); never feeds a reported figure.

A capability a source cannot read is listed in `Measurement.capabilities` as unavailable with the
reason; it is never filled with zeros. A reading that fails during a window is NaN for that sample.

Trace file format ``maxwell-poi-trace/v1`` (`save_trace` / `load_trace`): one JSON object, gzip-
compressed when the file name ends in ``.gz``::

    {
      "format": "maxwell-poi-trace/v1",
      "source": "nvml:0",                  # TelemetrySource.name that produced it
      "trust": "host",                     # a TrustLevel value
      "device": "gpu0 NVIDIA H100 80GB HBM3",
      "label": "gpt2-small inference",     # free text
      "started_at": 1717000000.123,        # unix seconds (Maxwell's clock) at begin_window
      "duration_s": 12.5,                  # monotonic seconds from begin_window to end_window
      "t": [0.0, 0.1, ...],                # sample times, seconds since window start (6 significant digits)
      "series": {"power_w": [312.4, ...]}, # each the same length as t; 4 significant digits; null = NaN
      "totals": {"energy_j": 3904.2, "sampler_cpu_s": 0.004},   # full precision; null = NaN
      "capabilities": [{"name": "tensor_util", "available": false, "reason": "..."}]
    }

A file whose "format" is anything else is refused with a ValueError naming expected vs got.

Series names: NVML power_w, power_avg_w, gpu_util, mem_util, sm_clock_mhz, temp_c, pcie_tx_kbs,
pcie_rx_kbs, tensor_util, int_util, fp16_util, fp32_util, dram_bw_util; process cpu_util (cores
busy), rss_mb, io_read_bytes_per_s, io_write_bytes_per_s; RAPL cpu_power_w. Totals: energy_j,
energy_j_integrated, cpu_s, io_read_bytes, io_write_bytes, peak_rss_mb, cpu_energy_j, and for every
sampled source sampler_cpu_s (the sampler's own CPU cost) and sample_errors.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import platform
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

TRACE_FORMAT = "maxwell-poi-trace/v1"


class TrustLevel(StrEnum):
    """Who stands behind a reading; the verifier weighs evidence by this, not by the number alone."""

    HOST = "host"  # Maxwell's own host-side reading
    GUEST = "guest-driver"  # read through the driver inside the agent's VM: the agent could lie
    OUT_OF_BAND = "out-of-band"  # BMC / Redfish / PDU: outside the host's and the agent's reach
    RECORDED = "recorded"  # replayed from a trace file
    SIMULATED = "simulated"  # synthetic, unit tests only


@dataclass(frozen=True)
class Capability:
    """Whether a source can read one series or total here, and why (not)."""

    name: str
    available: bool
    reason: str = ""


def _frozen_array(x: Any) -> np.ndarray:
    a = np.array(x, dtype=np.float64).reshape(-1)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)  # eq=False: arrays have no single truth value
class Measurement:
    """One source's observation of one window: sample times, series, counters and what it could read."""

    source: str
    trust: TrustLevel
    device: str
    started_at: float
    duration_s: float
    t: np.ndarray
    series: dict[str, np.ndarray]
    totals: dict[str, float]
    capabilities: tuple[Capability, ...]
    label: str = ""

    def __post_init__(self) -> None:
        t = _frozen_array(self.t)
        series = {k: _frozen_array(v) for k, v in self.series.items()}
        for k, v in series.items():
            if v.shape != t.shape:
                raise ValueError(f"series {k!r}: expected {t.shape[0]} samples (len(t)), got {v.shape[0]}")
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "series", series)
        object.__setattr__(self, "totals", {k: float(v) for k, v in self.totals.items()})
        object.__setattr__(self, "trust", TrustLevel(self.trust))
        object.__setattr__(self, "capabilities", tuple(self.capabilities))

    def capability(self, name: str) -> Capability | None:
        return next((c for c in self.capabilities if c.name == name), None)

    def summary(self) -> dict[str, float]:
        """Flat numbers a cheap verifier layer can compare with a profile (NaN samples ignored)."""
        out: dict[str, float] = {}
        for name, values in self.series.items():
            v = values[np.isfinite(values)]
            if v.size == 0:
                continue
            out[f"{name}_mean"] = float(v.mean())
            out[f"{name}_p95"] = float(np.percentile(v, 95))
            out[f"{name}_max"] = float(v.max())
            out[f"{name}_std"] = float(v.std())
        out.update(self.totals)
        out["duration_s"] = float(self.duration_s)
        out["samples"] = float(self.t.shape[0])
        return out

    def to_dict(self) -> dict[str, Any]:
        """The trace-file object (format maxwell-poi-trace/v1); arrays are rounded, NaN becomes null."""
        return {
            "format": TRACE_FORMAT,
            "source": self.source,
            "trust": str(self.trust),
            "device": self.device,
            "label": self.label,
            "started_at": self.started_at,
            "duration_s": self.duration_s,
            "t": _rounded(self.t, 6),
            "series": {k: _rounded(v, 4) for k, v in self.series.items()},
            "totals": {k: (v if math.isfinite(v) else None) for k, v in self.totals.items()},
            "capabilities": [
                {"name": c.name, "available": c.available, "reason": c.reason} for c in self.capabilities
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Measurement:
        """Parse a trace object; refuses another format string or a malformed trace with a ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"trace: expected a JSON object, got {type(d).__name__}")
        got = d.get("format")
        if got != TRACE_FORMAT:
            raise ValueError(f"trace format: expected {TRACE_FORMAT!r}, got {got!r}")
        try:
            return cls(
                source=str(d["source"]),
                trust=TrustLevel(d["trust"]),
                device=str(d["device"]),
                label=str(d.get("label", "")),
                started_at=float(d["started_at"]),
                duration_s=float(d["duration_s"]),
                t=_unnull(d["t"]),
                series={str(k): _unnull(v) for k, v in d["series"].items()},
                totals={str(k): (math.nan if v is None else float(v)) for k, v in d["totals"].items()},
                capabilities=tuple(
                    Capability(str(c["name"]), bool(c["available"]), str(c.get("reason", "")))
                    for c in d["capabilities"]
                ),
            )
        except KeyError as e:
            raise ValueError(f"trace: missing field {e.args[0]!r}") from None


def _rounded(a: np.ndarray, sig: int) -> list[float | None]:
    return [float(f"{x:.{sig}g}") if math.isfinite(x) else None for x in a.tolist()]


def _unnull(values: Iterable[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


def save_trace(m: Measurement, path: str | os.PathLike[str]) -> Path:
    """Write a measurement as a maxwell-poi-trace/v1 file (gzip when the name ends in .gz)."""
    path = Path(path)
    data = json.dumps(m.to_dict(), allow_nan=False, separators=(",", ":")).encode()
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: same trace, same bytes
    path.write_bytes(data)
    return path


def load_trace(path: str | os.PathLike[str]) -> Measurement:
    """Read a maxwell-poi-trace/v1 file; gzip is recognised by its magic bytes, not only the name."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"trace {path}: not JSON ({e})") from None
    return Measurement.from_dict(d)


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


# ---------------------------------------------------------------------------------------------
# NVML


FI_POWER_AVERAGE = 185  # NVML_FI_DEV_POWER_AVERAGE: 1 s average, mW
FI_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT: instantaneous, mW
CLOCK_SM = 1  # NVML_CLOCK_SM
TEMPERATURE_GPU = 0  # NVML_TEMPERATURE_GPU
PCIE_TX, PCIE_RX = 0, 1  # NVML_PCIE_UTIL_TX_BYTES / RX_BYTES
GPM_METRICS = {"tensor_util": 5, "int_util": 4, "fp16_util": 13, "fp32_util": 12, "dram_bw_util": 10}
GPM_METRICS_GET_VERSION = 1
_FIELD_VALUE_ATTR = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
NVML_SERIES = (
    "power_w",
    "power_avg_w",
    "gpu_util",
    "mem_util",
    "sm_clock_mhz",
    "temp_c",
    "pcie_tx_kbs",
    "pcie_rx_kbs",
    *GPM_METRICS,
)
NVML_TOTALS = ("energy_j", "energy_j_integrated")


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".rstrip(": ")


def _field_value(v: Any) -> float:
    """Decode one nvmlFieldValue_t by its declared type (the union has no single meaning)."""
    return float(getattr(v.value, _FIELD_VALUE_ATTR.get(int(v.valueType), "uiVal")))


class NvmlSource(SampledSource):
    """GPU telemetry through NVML (nvidia-ml-py). Trust HOST by default; pass TrustLevel.GUEST when the
    NVML it reads is the guest driver inside the agent's VM, since the agent controls that driver.

    Each capability is probed once here; whatever raises (NVMLError, a function this pynvml or
    driver lacks) is reported unavailable with the reason. GPM (Hopper+) needs two samples at least
    `gpm_min_interval_s` apart, so a GPM value covers the interval since the previous GPM sample and a
    tick that comes sooner is NaN; at hz=10 about every other tick carries GPM. Caveats worth knowing:
    on A100/H100 NVML power covers only part of runtime (SC'24, arXiv 2312.02741), which is why the
    energy counter (energy_j) is preferred over the integral of sampled power (energy_j_integrated);
    nvmlDeviceGetPcieThroughput reports a 20 ms window; MIG instances (nvmlGpmMigSampleGet) are not
    handled.
    """

    trust = TrustLevel.HOST

    def __init__(
        self,
        index: int = 0,
        hz: float = 10.0,
        nvml: Any = None,
        trust: TrustLevel = TrustLevel.HOST,
        gpm_min_interval_s: float = 0.1,
    ) -> None:
        super().__init__(hz)
        self.index = index
        self.name = f"nvml:{index}"
        self.trust = TrustLevel(trust)
        self.gpm_min_interval_s = gpm_min_interval_s
        self.device = f"gpu{index}"
        self._nvml = nvml
        self._handle: Any = None
        self._fields: dict[str, int] = {}  # series -> field id read through nvmlDeviceGetFieldValues
        self._gpm_bufs: list[Any] = []
        self._gpm_prev = 0
        self._gpm_prev_t = 0.0
        self._energy0: float | None = None
        self._initialised = False
        self._probe()

    def _set(self, name: str, available: bool, reason: str) -> None:
        self._caps[name] = Capability(name, available, reason)

    def _all_unavailable(self, reason: str) -> None:
        for name in (*NVML_SERIES, *NVML_TOTALS):
            self._set(name, False, reason)

    def _probe(self) -> None:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as e:
                self._all_unavailable(f"pynvml not importable: {_why(e)}")
                return
            self._nvml = pynvml
        nv = self._nvml
        try:
            nv.nvmlInit()
            self._initialised = True
            self._handle = nv.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as e:
            self._all_unavailable(f"NVML unavailable (device {self.index}): {_why(e)}")
            return
        try:
            name = nv.nvmlDeviceGetName(self._handle)
            self.device = f"gpu{self.index} {name.decode() if isinstance(name, bytes) else name}"
        except Exception:
            pass
        h = self._handle

        # power through field values: instant (186) and 1 s average (185), one call per tick
        field_err: dict[str, str] = {}
        want = {"power_w": FI_POWER_INSTANT, "power_avg_w": FI_POWER_AVERAGE}
        try:
            values = nv.nvmlDeviceGetFieldValues(h, list(want.values()))
            for (series, fid), v in zip(want.items(), values, strict=True):
                if int(v.nvmlReturn) == 0:
                    _field_value(v)
                    self._fields[series] = fid
                else:
                    field_err[series] = f"field {fid} returned NVML error {int(v.nvmlReturn)}"
        except Exception as e:
            field_err = {s: f"nvmlDeviceGetFieldValues: {_why(e)}" for s in want}
        if "power_w" in self._fields:
            self._set("power_w", True, "field NVML_FI_DEV_POWER_INSTANT (186)")
        else:
            try:
                nv.nvmlDeviceGetPowerUsage(h)
                self._set(
                    "power_w",
                    True,
                    "fallback nvmlDeviceGetPowerUsage (a 1 s average on Ampere and newer); "
                    f"instant field: {field_err['power_w']}",
                )
            except Exception as e:
                self._set("power_w", False, f"{field_err['power_w']}; nvmlDeviceGetPowerUsage: {_why(e)}")
        if "power_avg_w" in self._fields:
            self._set("power_avg_w", True, "field NVML_FI_DEV_POWER_AVERAGE (185)")
        else:
            self._set("power_avg_w", False, field_err["power_avg_w"])

        probes: list[tuple[tuple[str, ...], str, Callable[[], Any]]] = [
            (
                ("gpu_util", "mem_util"),
                "nvmlDeviceGetUtilizationRates",
                lambda: nv.nvmlDeviceGetUtilizationRates(h),
            ),
            (("sm_clock_mhz",), "nvmlDeviceGetClockInfo(SM)", lambda: nv.nvmlDeviceGetClockInfo(h, CLOCK_SM)),
            (
                ("temp_c",),
                "nvmlDeviceGetTemperature(GPU)",
                lambda: nv.nvmlDeviceGetTemperature(h, TEMPERATURE_GPU),
            ),
            (
                ("pcie_tx_kbs",),
                "nvmlDeviceGetPcieThroughput(TX)",
                lambda: nv.nvmlDeviceGetPcieThroughput(h, PCIE_TX),
            ),
            (
                ("pcie_rx_kbs",),
                "nvmlDeviceGetPcieThroughput(RX)",
                lambda: nv.nvmlDeviceGetPcieThroughput(h, PCIE_RX),
            ),
            (
                ("energy_j",),
                "nvmlDeviceGetTotalEnergyConsumption",
                lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h),
            ),
        ]
        for names, how, fn in probes:
            try:
                fn()
                ok, reason = True, how
            except Exception as e:
                ok, reason = False, f"{how}: {_why(e)}"
            for n in names:
                self._set(n, ok, reason)
        power = self._caps["power_w"]
        self._set(
            "energy_j_integrated",
            power.available,
            "trapezoid of power_w" if power.available else "needs power_w",
        )
        self._probe_gpm()

    def _probe_gpm(self) -> None:
        nv, h = self._nvml, self._handle
        try:
            support = nv.nvmlGpmQueryDeviceSupport(h)
            if not int(support.isSupportedDevice):
                raise RuntimeError("GPM not supported on this device (needs Hopper or newer)")
            self._gpm_bufs = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            nv.nvmlGpmSampleGet(h, self._gpm_bufs[0])
            time.sleep(self.gpm_min_interval_s)
            nv.nvmlGpmSampleGet(h, self._gpm_bufs[1])
            got = self._gpm_get(self._gpm_bufs[0], self._gpm_bufs[1])
        except Exception as e:
            for n in GPM_METRICS:
                self._set(n, False, f"GPM: {_why(e)}")
            self._free_gpm()
            return
        for n, mid in GPM_METRICS.items():
            if n in got:
                self._set(n, True, f"GPM metric {mid}")
            else:
                self._set(n, False, f"GPM metric {mid} returned an NVML error")

    def _gpm_get(self, s1: Any, s2: Any) -> dict[str, float]:
        """Metrics between two GPM samples; metrics whose own return code is an error are left out."""
        nv = self._nvml
        want = [
            (n, mid) for n, mid in GPM_METRICS.items() if not self._caps.get(n) or self._caps[n].available
        ]
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version = getattr(nv, "NVML_GPM_METRICS_GET_VERSION", GPM_METRICS_GET_VERSION)
        mg.numMetrics = len(want)
        mg.sample1 = s1
        mg.sample2 = s2
        for i, (_, mid) in enumerate(want):
            mg.metrics[i].metricId = mid
        nv.nvmlGpmMetricsGet(mg)
        out: dict[str, float] = {}
        for i, (n, _) in enumerate(want):
            m = mg.metrics[i]
            if int(m.nvmlReturn) == 0:
                out[n] = float(m.value)
        return out

    def _free_gpm(self) -> None:
        for buf in self._gpm_bufs:
            with contextlib.suppress(Exception):
                self._nvml.nvmlGpmSampleFree(buf)
        self._gpm_bufs = []

    def close(self) -> None:
        """Release GPM buffers and this source's NVML reference (NVML init/shutdown is ref-counted)."""
        self._free_gpm()
        if self._initialised:
            self._initialised = False
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()

    def _ok(self, name: str) -> bool:
        c = self._caps.get(name)
        return c is not None and c.available

    def _series_names(self) -> list[str]:
        return [n for n in NVML_SERIES if self._ok(n)]

    def _begin(self, pid: int | None) -> dict[str, float] | None:
        if not self.available:
            return None
        self._energy0 = None
        if self._ok("energy_j"):
            try:
                self._energy0 = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            except Exception as e:
                self._error("energy counter at begin", e)
        if self._gpm_bufs and any(self._ok(n) for n in GPM_METRICS):
            try:
                self._gpm_prev = 0
                self._nvml.nvmlGpmSampleGet(self._handle, self._gpm_bufs[0])
                self._gpm_prev_t = time.monotonic()
            except Exception as e:
                self._error("GPM sample at begin", e)
                self._gpm_prev_t = math.inf
        return self._read(gpm=False)

    def _sample(self) -> dict[str, float]:
        return self._read(gpm=True)

    def _read(self, gpm: bool) -> dict[str, float]:
        nv, h = self._nvml, self._handle
        row: dict[str, float] = {}
        if self._fields:
            try:
                values = nv.nvmlDeviceGetFieldValues(h, list(self._fields.values()))
                for series, v in zip(self._fields, values, strict=True):
                    if int(v.nvmlReturn) == 0:
                        row[series] = _field_value(v) / 1000.0
            except Exception as e:
                self._error("nvmlDeviceGetFieldValues", e)
        reads: list[tuple[str, Callable[[], float]]] = []
        if self._ok("power_w") and "power_w" not in self._fields:
            reads.append(("power_w", lambda: nv.nvmlDeviceGetPowerUsage(h) / 1000.0))
        if self._ok("gpu_util"):
            try:
                u = nv.nvmlDeviceGetUtilizationRates(h)
                row["gpu_util"], row["mem_util"] = float(u.gpu), float(u.memory)
            except Exception as e:
                self._error("nvmlDeviceGetUtilizationRates", e)
        if self._ok("sm_clock_mhz"):
            reads.append(("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, CLOCK_SM)))
        if self._ok("temp_c"):
            reads.append(("temp_c", lambda: nv.nvmlDeviceGetTemperature(h, TEMPERATURE_GPU)))
        if self._ok("pcie_tx_kbs"):
            reads.append(("pcie_tx_kbs", lambda: nv.nvmlDeviceGetPcieThroughput(h, PCIE_TX)))
        if self._ok("pcie_rx_kbs"):
            reads.append(("pcie_rx_kbs", lambda: nv.nvmlDeviceGetPcieThroughput(h, PCIE_RX)))
        for name, fn in reads:
            try:
                row[name] = float(fn())
            except Exception as e:
                self._error(name, e)
        if gpm and self._gpm_bufs and math.isfinite(self._gpm_prev_t):
            now = time.monotonic()
            if now - self._gpm_prev_t >= self.gpm_min_interval_s:
                nxt = 1 - self._gpm_prev
                try:
                    nv.nvmlGpmSampleGet(h, self._gpm_bufs[nxt])
                    row.update(self._gpm_get(self._gpm_bufs[self._gpm_prev], self._gpm_bufs[nxt]))
                    self._gpm_prev, self._gpm_prev_t = nxt, now
                except Exception as e:
                    self._error("GPM", e)
        return row

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        totals: dict[str, float] = {}
        if self._energy0 is not None:
            try:
                e1 = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
                totals["energy_j"] = (e1 - self._energy0) / 1000.0
            except Exception as e:
                self._error("energy counter at end", e)
                totals["energy_j"] = math.nan
        if "power_w" in series:
            totals["energy_j_integrated"] = _integrate(t, series["power_w"])
        return totals


# ---------------------------------------------------------------------------------------------
# Process (psutil)


_IO_NAMES = ("io_read_bytes_per_s", "io_write_bytes_per_s", "io_read_bytes", "io_write_bytes")


def _linux_proc_stat(pid: int) -> tuple[float, float, bytes]:
    """(user+system+reaped children's CPU s, RSS bytes, start time) from one read of /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fl = raw[raw.rindex(b")") + 2 :].split()  # fields after "(comm)": fl[0] is field 3 (state)
    cpu = (int(fl[11]) + int(fl[12]) + int(fl[13]) + int(fl[14])) / _CLK_TCK
    return cpu, float(int(fl[21]) * _PAGE), fl[19]


def _linux_proc_io(pid: int) -> tuple[float, float]:
    """(read_bytes, write_bytes) from /proc/<pid>/io: bytes that reached the storage layer."""
    with open(f"/proc/{pid}/io", "rb") as f:
        kv = dict(line.split(b": ") for line in f.read().splitlines() if b": " in line)
    return float(kv[b"read_bytes"]), float(kv[b"write_bytes"])


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ProcessSource(SampledSource):
    """CPU, memory and block I/O of a process and its descendants, as the kernel accounts them.

    CPU seconds per process are user + system + reaped children's, summed over the live tree, so a
    child that exits and is reaped inside the tree moves its time to its parent without a jump (a
    process that leaves the tree unreaped would make the sum drop; deltas are clamped at 0). The tree
    is listed with psutil every `children_refresh_s` and at begin and end, not at every tick: listing
    scans all of /proc (~1 ms here). A child's CPU is still counted in full once it is seen or reaped
    into the tree; the refresh only delays when it shows in cpu_util. On Linux each tick reads
    /proc/<pid>/stat and /io directly (one file for CPU and RSS; psutil's three reads cost about
    twice as much, and the sampler must stay under 0.5% of a core); elsewhere psutil. Kernel CPU
    accounting ticks at 10 ms, so one 100 ms cpu_util sample is quantised to 0.1 core; cpu_s is exact
    to the tick. rss_mb sums RSS over the tree (shared pages count twice); peak_rss_mb is the largest
    sampled sum, not the kernel's high-water mark.
    """

    name = "process"
    trust = TrustLevel.HOST

    def __init__(
        self, hz: float = 10.0, include_children: bool = True, children_refresh_s: float = 2.0
    ) -> None:
        super().__init__(hz)
        import psutil

        self._psutil = psutil
        self.include_children = include_children
        self.children_refresh_s = children_refresh_s
        self._linux = Path(f"/proc/{os.getpid()}/stat").exists()
        self._root: Any = None
        self._procs: dict[int, Any] = {}  # pid -> psutil.Process
        self._start: dict[int, bytes] = {}  # pid -> start time, to notice a reused pid (Linux path)
        self._io = False
        how = "/proc/<pid>/stat" if self._linux else "psutil cpu_times"
        for name in ("cpu_util", "cpu_s"):
            self._caps[name] = Capability(
                name, True, f"{how}: user+system incl. reaped children, over the tree"
            )
        how = "/proc/<pid>/stat rss" if self._linux else "psutil memory_info().rss"
        self._caps["rss_mb"] = Capability("rss_mb", True, f"{how}, summed over the tree")
        self._caps["peak_rss_mb"] = Capability("peak_rss_mb", True, "max of sampled rss_mb")
        try:
            if self._linux:
                _linux_proc_io(os.getpid())
            else:
                psutil.Process().io_counters()
            io = Capability("io", True, "read_bytes/write_bytes that reached the storage layer")
        except Exception as e:
            io = Capability("io", False, f"io counters: {_why(e)}")
        self._io_available = io.available
        for name in _IO_NAMES:
            self._caps[name] = Capability(name, io.available, io.reason)

    def _series_names(self) -> list[str]:
        names = ["cpu_util", "rss_mb"]
        return [*names, "io_read_bytes_per_s", "io_write_bytes_per_s"] if self._io else names

    def _refresh(self) -> None:
        if self.include_children:
            try:
                for c in self._root.children(recursive=True):
                    self._procs.setdefault(c.pid, c)
            except self._psutil.Error:
                pass
        self._last_refresh = time.monotonic()

    def _read_one(self, pid: int, p: Any) -> tuple[float, float, float, float] | None:
        """Cumulative (cpu_s, rss, read_bytes, write_bytes) of one process; None once it is gone."""
        if self._linux:
            try:
                cpu, rss, start = _linux_proc_stat(pid)
            except (OSError, ValueError, IndexError):
                return None
            if self._start.setdefault(pid, start) != start:
                return None  # the pid now belongs to another process
            rb = wb = 0.0
            if self._io:
                try:
                    rb, wb = _linux_proc_io(pid)
                except (OSError, KeyError, ValueError) as e:
                    self._error(f"io of pid {pid}", e)
            return cpu, rss, rb, wb
        try:
            with p.oneshot():
                ct = p.cpu_times()
                cpu = ct.user + ct.system + ct.children_user + ct.children_system
                rss = float(p.memory_info().rss)
                rb = wb = 0.0
                if self._io:
                    io = p.io_counters()
                    rb, wb = float(io.read_bytes), float(io.write_bytes)
            return cpu, rss, rb, wb
        except self._psutil.NoSuchProcess:
            return None

    def _read(self) -> tuple[float, float, float, float]:
        """Cumulative (cpu_s, rss_bytes, read_bytes, write_bytes) over the tracked tree."""
        cpu = rss = rb = wb = 0.0
        for pid, p in list(self._procs.items()):
            try:
                got = self._read_one(pid, p)
            except self._psutil.AccessDenied as e:
                self._error(f"pid {pid}", e)
                continue
            if got is None:
                del self._procs[pid]
                self._start.pop(pid, None)
                continue
            cpu += got[0]
            rss += got[1]
            rb += got[2]
            wb += got[3]
        return cpu, rss, rb, wb

    def _begin(self, pid: int | None) -> dict[str, float] | None:
        pid = os.getpid() if pid is None else pid
        self.device = f"{platform.node()} pid {pid}"
        self._root = self._psutil.Process(pid)  # NoSuchProcess here is the caller's error: let it raise
        self._procs = {pid: self._root}
        self._start = {}
        self._io = self._io_available
        if self._io:
            try:
                if self._linux:
                    _linux_proc_io(pid)
                else:
                    self._root.io_counters()
            except Exception as e:  # e.g. another user's process
                self._io = False
                for n in _IO_NAMES:
                    self._window_caps[n] = Capability(n, False, f"io counters of pid {pid}: {_why(e)}")
        self._refresh()
        self._prev = self._read()
        self._prev_t = time.monotonic()
        self._acc = [0.0, 0.0, 0.0]  # cpu_s, read_bytes, write_bytes: monotone sums of clamped deltas
        self._peak_rss = self._prev[1]
        return None

    def _before_final(self) -> None:
        self._refresh()

    def _sample(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._last_refresh >= self.children_refresh_s:
            self._refresh()
        cur = self._read()
        dt = max(now - self._prev_t, 1e-9)
        d_cpu, d_rb, d_wb = (max(0.0, cur[i] - self._prev[i]) for i in (0, 2, 3))
        self._acc[0] += d_cpu
        self._acc[1] += d_rb
        self._acc[2] += d_wb
        self._prev, self._prev_t = cur, now
        self._peak_rss = max(self._peak_rss, cur[1])
        row = {"cpu_util": d_cpu / dt, "rss_mb": cur[1] / 2**20}
        if self._io:
            row["io_read_bytes_per_s"] = d_rb / dt
            row["io_write_bytes_per_s"] = d_wb / dt
        return row

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        totals = {"cpu_s": self._acc[0], "peak_rss_mb": self._peak_rss / 2**20}
        if self._io:
            totals["io_read_bytes"] = self._acc[1]
            totals["io_write_bytes"] = self._acc[2]
        return totals


# ---------------------------------------------------------------------------------------------
# RAPL (Linux powercap)

_RAPL_ZONE = re.compile(r"intel-rapl:\d+$")


class RaplSource(SampledSource):
    """CPU package energy from /sys/class/powercap/intel-rapl:N/energy_uj (top-level zones only).

    Sub-zones (intel-rapl:N:M: core, dram) are inside their package and would double count; a "psys"
    zone covers the whole platform including the packages, so it is left out of the sum as well.
    Counters wrap at max_energy_range_uj; each tick adds the wrapped delta, so a window may span many
    wraps as long as ticks come more often than one wrap (minutes). Since 2020 (CVE-2020-8694)
    energy_uj is root-only on most distributions; then the source is unavailable with that reason.
    """

    name = "rapl"
    trust = TrustLevel.HOST

    def __init__(self, hz: float = 10.0, root: Path = Path("/sys/class/powercap")) -> None:
        super().__init__(hz)
        self.root = Path(root)
        self._zones: list[tuple[str, Path, float | None]] = []  # (zone name, energy_uj path, range)
        reason = self._probe()
        ok = bool(self._zones)
        if ok:
            reason = "zones " + ", ".join(z[0] for z in self._zones) + (f"; {reason}" if reason else "")
        for n in ("cpu_power_w", "cpu_energy_j"):
            self._caps[n] = Capability(n, ok, reason)
        self.device = f"{platform.node()} cpu (" + ", ".join(z[0] for z in self._zones) + ")"

    def _read_uj(self, path: Path) -> float:
        return float(path.read_text().strip())

    def _probe(self) -> str:
        if not self.root.is_dir():
            return f"no powercap directory at {self.root}"
        zones = sorted(p for p in self.root.iterdir() if _RAPL_ZONE.fullmatch(p.name))
        if not zones:
            return f"no intel-rapl:N zones under {self.root}"
        notes = []
        for z in zones:
            try:
                label = (z / "name").read_text().strip()
            except OSError:
                label = z.name
            if label == "psys":
                notes.append(f"{z.name} (psys) skipped: includes the packages")
                continue
            try:
                self._read_uj(z / "energy_uj")
            except PermissionError as e:
                return f"{z / 'energy_uj'}: permission denied (root-only since CVE-2020-8694): {e}"
            except (OSError, ValueError) as e:
                notes.append(f"{z.name}: unreadable ({_why(e)})")
                continue
            try:
                rng: float | None = self._read_uj(z / "max_energy_range_uj")
            except (OSError, ValueError):
                rng = None
                notes.append(f"{z.name}: no max_energy_range_uj, a wrap would read as an error")
            self._zones.append((f"{z.name}/{label}", z / "energy_uj", rng))
        return "; ".join(notes) if self._zones else "; ".join(notes) or "no readable zone"

    def _series_names(self) -> list[str]:
        return ["cpu_power_w"] if self._zones else []

    def _begin(self, pid: int | None) -> dict[str, float] | None:
        self._prev = [self._read_uj(p) for _, p, _ in self._zones]
        self._prev_t = time.monotonic()
        self._acc_uj = 0.0
        return None

    def _sample(self) -> dict[str, float]:
        now = time.monotonic()
        total = 0.0
        for i, (zone, path, rng) in enumerate(self._zones):
            cur = self._read_uj(path)
            d = cur - self._prev[i]
            if d < 0:
                if rng is None:
                    raise ValueError(f"{zone}: counter went back and its range is unknown")
                d += rng
            total += d
            self._prev[i] = cur
        dt = max(now - self._prev_t, 1e-9)
        self._prev_t = now
        self._acc_uj += total
        return {"cpu_power_w": total / 1e6 / dt}

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        return {"cpu_energy_j": self._acc_uj / 1e6} if self._zones else {}


# ---------------------------------------------------------------------------------------------
# Replay and simulation


class ReplaySource:
    """A recorded trace through the live API, so verifier code and calibration run on real traces.

    end_window returns the recorded measurement with trust RECORDED (a SIMULATED trace stays
    SIMULATED: replay must not launder synthetic data). The name defaults to the recorded source's
    name so a replay slots into the Observer where the live source was.
    """

    trust = TrustLevel.RECORDED

    def __init__(self, path: str | os.PathLike[str], name: str | None = None) -> None:
        self.path = Path(path)
        self.recorded = load_trace(self.path)
        self.name = name or self.recorded.source
        if self.recorded.trust == TrustLevel.SIMULATED:
            self.trust = TrustLevel.SIMULATED
        self._open = False

    @property
    def available(self) -> bool:
        return True

    def capabilities(self) -> tuple[Capability, ...]:
        return self.recorded.capabilities

    def begin_window(self, pid: int | None = None) -> None:
        self._open = True

    def end_window(self) -> Measurement:
        if not self._open:
            raise RuntimeError(f"{self.name}: end_window without begin_window")
        self._open = False
        return replace(self.recorded, source=self.name, trust=self.trust)


@dataclass
class SimulatedSource:
    """Synthetic telemetry for UNIT TESTS ONLY: it never feeds a reported figure (design §6).

    `profile` maps a series name to a mean or (mean, std); samples are Gaussian around it, clipped
    at 0, at `hz` over `duration_s` (or the real time between begin and end when None), from a fixed
    seed. If power_w is in the profile, totals get energy_j as its integral. Trust is SIMULATED and
    the name must contain "simulated", so a simulated trace can never pass for a measured one.
    """

    profile: Mapping[str, float | tuple[float, float]]
    duration_s: float | None = None
    hz: float = 10.0
    seed: int = 0
    totals: Mapping[str, float] = field(default_factory=dict)
    name: str = "simulated"
    device: str = "simulated-device"
    trust: TrustLevel = field(default=TrustLevel.SIMULATED, init=False)

    def __post_init__(self) -> None:
        if "simulated" not in self.name:
            raise ValueError(f"SimulatedSource name: expected it to contain 'simulated', got {self.name!r}")
        self._begun: tuple[float, float] | None = None

    @property
    def available(self) -> bool:
        return True

    def capabilities(self) -> tuple[Capability, ...]:
        return tuple(Capability(n, True, "simulated") for n in self.profile)

    def begin_window(self, pid: int | None = None) -> None:
        self._begun = (time.time(), time.monotonic())

    def end_window(self) -> Measurement:
        if self._begun is None:
            raise RuntimeError(f"{self.name}: end_window without begin_window")
        started_at, t0 = self._begun
        self._begun = None
        duration = self.duration_s if self.duration_s is not None else time.monotonic() - t0
        n = max(2, round(duration * self.hz) + 1)
        t = np.linspace(0.0, duration, n)
        rng = np.random.default_rng(self.seed)
        series = {}
        for k, spec in self.profile.items():
            mean, std = (spec, 0.0) if isinstance(spec, int | float) else spec
            series[k] = np.clip(mean + std * rng.standard_normal(n), 0.0, None)
        totals = {"sampler_cpu_s": 0.0}
        if "power_w" in series:
            totals["energy_j"] = _integrate(t, series["power_w"])
        totals.update(self.totals)
        return Measurement(
            source=self.name,
            trust=TrustLevel.SIMULATED,
            device=self.device,
            started_at=started_at,
            duration_s=duration,
            t=t,
            series=series,
            totals=totals,
            capabilities=self.capabilities(),
        )


# ---------------------------------------------------------------------------------------------
# Observer


class Observer:
    """Runs several sources over the same window; results are keyed by source name."""

    def __init__(self, sources: list[TelemetrySource]) -> None:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Observer: source names must be unique, got duplicates {dupes}")
        self.sources = list(sources)
        self._open: list[TelemetrySource] = []

    def capabilities(self) -> dict[str, tuple[Capability, ...]]:
        return {s.name: s.capabilities() for s in self.sources}

    def begin_window(self, pid: int | None = None) -> None:
        if self._open:
            raise RuntimeError("Observer: begin_window while a window is open")
        try:
            for s in self.sources:
                s.begin_window(pid)
                self._open.append(s)
        except BaseException:
            self._close_all()
            raise

    def _close_all(self) -> dict[str, Measurement]:
        out: dict[str, Measurement] = {}
        first: BaseException | None = None
        for s in self._open:
            try:
                out[s.name] = s.end_window()
            except BaseException as e:  # stop every sampler before reporting the failure
                first = first or e
        self._open = []
        if first is not None:
            raise first
        return out

    def end_window(self) -> dict[str, Measurement]:
        if not self._open:
            raise RuntimeError("Observer: end_window without begin_window")
        return self._close_all()


def default_sources(hz: float = 10.0, nvml_index: int = 0) -> list[TelemetrySource]:
    """ProcessSource always; NvmlSource and RaplSource when this host can actually read them."""
    sources: list[TelemetrySource] = [ProcessSource(hz=hz)]
    nv = NvmlSource(index=nvml_index, hz=hz)
    if nv.available:
        sources.append(nv)
    else:
        nv.close()
    rapl = RaplSource(hz=hz)
    if rapl.available:
        sources.append(rapl)
    return sources


# ---------------------------------------------------------------------------------------------
# Benchmark


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


if __name__ == "__main__":  # python -m maxwell_poi.observer.telemetry [seconds]
    import sys

    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    print(json.dumps([measure_sampling_overhead(secs), measure_sampling_overhead(secs, busy=True)], indent=2))
