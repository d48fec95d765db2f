"""GPU telemetry through NVML (nvidia-ml-py): power, utilisation, clocks, temperature, PCIe, the
energy counter and Hopper GPM pipe utilisation. Every read is declared once in a table that both
the capability probe and the per-tick sampler use; NVML constants come from the pynvml module."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .sampler import SampledSource, _integrate, _why
from .trace import Capability, TrustLevel

# GPM metric of each series, as the name of its pynvml constant (ids are read from the binding)
GPM_METRICS = {
    "tensor_util": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "int_util": "NVML_GPM_METRIC_INTEGER_UTIL",
    "fp16_util": "NVML_GPM_METRIC_FP16_UTIL",
    "fp32_util": "NVML_GPM_METRIC_FP32_UTIL",
    "dram_bw_util": "NVML_GPM_METRIC_DRAM_BW_UTIL",
}
# power through nvmlDeviceGetFieldValues, both in one call per tick (values in mW)
POWER_FIELDS = {"power_w": "NVML_FI_DEV_POWER_INSTANT", "power_avg_w": "NVML_FI_DEV_POWER_AVERAGE"}
# nvmlFieldValue_t.value is a union: valueType names the member that holds the number
_VALUE_TYPES = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}


@dataclass(frozen=True)
class _Reader:
    """One NVML read: the series it fills, the call (named in capability reasons) and the call itself.

    `read(nvml, handle)` returns one value per name in `series`. `when` says how often it runs:
    every tick, at most `pcie_hz` (PCIe throughput calls block), or only at begin/end of a window.
    """

    series: tuple[str, ...]
    how: str
    read: Callable[[Any, Any], tuple[float, ...]]
    when: Literal["tick", "pcie", "window"] = "tick"


def _utilization(nv: Any, h: Any) -> tuple[float, float]:
    u = nv.nvmlDeviceGetUtilizationRates(h)
    return float(u.gpu), float(u.memory)


# a fallback, not in _READERS: only used when the instant power field cannot be read
_POWER_USAGE = _Reader(
    ("power_w",), "nvmlDeviceGetPowerUsage", lambda nv, h: (nv.nvmlDeviceGetPowerUsage(h) / 1000.0,)
)
_ENERGY = _Reader(  # mJ since the driver loaded; only the difference over a window is used
    ("energy_j",),
    "nvmlDeviceGetTotalEnergyConsumption",
    lambda nv, h: (float(nv.nvmlDeviceGetTotalEnergyConsumption(h)),),
    when="window",
)
_READERS = (
    _Reader(("gpu_util", "mem_util"), "nvmlDeviceGetUtilizationRates", _utilization),
    _Reader(
        ("sm_clock_mhz",),
        "nvmlDeviceGetClockInfo(NVML_CLOCK_SM)",
        lambda nv, h: (float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),),
    ),
    _Reader(
        ("temp_c",),
        "nvmlDeviceGetTemperature(NVML_TEMPERATURE_GPU)",
        lambda nv, h: (float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),),
    ),
    _Reader(
        ("pcie_tx_kbs",),
        "nvmlDeviceGetPcieThroughput(NVML_PCIE_UTIL_TX_BYTES)",
        lambda nv, h: (float(nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_TX_BYTES)),),
        when="pcie",
    ),
    _Reader(
        ("pcie_rx_kbs",),
        "nvmlDeviceGetPcieThroughput(NVML_PCIE_UTIL_RX_BYTES)",
        lambda nv, h: (float(nv.nvmlDeviceGetPcieThroughput(h, nv.NVML_PCIE_UTIL_RX_BYTES)),),
        when="pcie",
    ),
    _ENERGY,
)
NVML_SERIES = (
    *POWER_FIELDS,
    *(s for r in _READERS if r.when != "window" for s in r.series),
    *GPM_METRICS,
)
NVML_TOTALS = ("energy_j", "energy_j_integrated")


class NvmlSource(SampledSource):
    """GPU telemetry through NVML (nvidia-ml-py). Trust HOST by default; pass TrustLevel.GUEST when the
    NVML it reads is the guest driver inside the agent's VM, since the agent controls that driver.

    Each capability is probed once here; whatever raises (NVMLError, a function or constant this
    pynvml or driver lacks) is reported unavailable with the reason. GPM (Hopper+) needs two samples
    at least `gpm_min_interval_s` apart, so a GPM value covers the interval since the previous GPM
    sample and a tick that comes sooner is NaN; at hz=10 about every other tick carries GPM.

    PCIe throughput is read at most `pcie_hz` times a second (default 2), not every tick: each
    nvmlDeviceGetPcieThroughput call blocks for its ~20 ms measuring window, and two of them per tick
    at 20 Hz would make ticks slip and power samples drift. On ticks between PCIe reads
    pcie_tx_kbs / pcie_rx_kbs are left out of the row, so they are NaN for that sample.

    Caveats worth knowing: on A100/H100 NVML power covers only part of runtime (SC'24, arXiv
    2312.02741), which is why the energy counter (energy_j) is preferred over the integral of
    sampled power (energy_j_integrated); MIG instances (nvmlGpmMigSampleGet) are not handled.
    """

    trust = TrustLevel.HOST

    def __init__(
        self,
        index: int = 0,
        hz: float = 10.0,
        nvml: Any = None,
        trust: TrustLevel = TrustLevel.HOST,
        gpm_min_interval_s: float = 0.1,
        pcie_hz: float = 2.0,
    ) -> None:
        super().__init__(hz)
        if not pcie_hz > 0:
            raise ValueError(f"pcie_hz: expected > 0, got {pcie_hz}")
        self.index = index
        self.name = f"nvml:{index}"
        self.trust = TrustLevel(trust)
        self.gpm_min_interval_s = gpm_min_interval_s
        self.pcie_hz = float(pcie_hz)
        self.device = f"gpu{index}"
        self._nvml = nvml
        self._handle: Any = None
        self._fields: dict[str, int] = {}  # series -> field id read through nvmlDeviceGetFieldValues
        self._value_attr: dict[int, str] = {}  # nvmlValueType_t -> union member
        self._tick: list[_Reader] = []  # readers that probed fine, run from the sampling thread
        self._pcie_t = -math.inf  # monotonic time of the last PCIe read
        self._gpm_ids: dict[str, int] = {}  # series -> GPM metric id, for metrics that probed fine
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

    def _ok(self, name: str) -> bool:
        c = self._caps.get(name)
        return c is not None and c.available

    # -- probe ---------------------------------------------------------------------------------
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
        self._value_attr = {getattr(nv, k): v for k, v in _VALUE_TYPES.items() if hasattr(nv, k)}
        self._probe_power()
        for r in _READERS:
            try:
                r.read(nv, self._handle)
                ok, reason = True, r.how
            except Exception as e:
                ok, reason = False, f"{r.how}: {_why(e)}"
            for n in r.series:
                self._set(n, ok, reason)
            if ok and r.when != "window":
                self._tick.append(r)
        power = self._caps["power_w"]
        self._set(
            "energy_j_integrated",
            power.available,
            "trapezoid of power_w" if power.available else "needs power_w",
        )
        self._probe_gpm()

    def _field_value(self, v: Any) -> float:
        """Decode one nvmlFieldValue_t by its declared type (the union has no single meaning)."""
        return float(getattr(v.value, self._value_attr.get(int(v.valueType), "uiVal")))

    def _probe_power(self) -> None:
        """Instant and 1 s average power as field values; nvmlDeviceGetPowerUsage if the instant one fails."""
        nv, h = self._nvml, self._handle
        want: dict[str, int] = {}
        field_err: dict[str, str] = {}
        for series, const in POWER_FIELDS.items():
            try:
                want[series] = int(getattr(nv, const))
            except AttributeError as e:
                field_err[series] = f"{const}: {_why(e)}"
        try:
            values = nv.nvmlDeviceGetFieldValues(h, list(want.values())) if want else []
            for (series, fid), v in zip(want.items(), values, strict=True):
                if int(v.nvmlReturn) == nv.NVML_SUCCESS:
                    self._field_value(v)
                    self._fields[series] = fid
                else:
                    field_err[series] = f"field {fid} returned NVML error {int(v.nvmlReturn)}"
        except Exception as e:
            field_err.update({s: f"nvmlDeviceGetFieldValues: {_why(e)}" for s in want})
        if "power_w" in self._fields:
            self._set("power_w", True, f"field NVML_FI_DEV_POWER_INSTANT ({self._fields['power_w']})")
        else:
            try:
                _POWER_USAGE.read(nv, h)
                self._tick.append(_POWER_USAGE)
                self._set(
                    "power_w",
                    True,
                    "fallback nvmlDeviceGetPowerUsage (a 1 s average on Ampere and newer); "
                    f"instant field: {field_err['power_w']}",
                )
            except Exception as e:
                self._set("power_w", False, f"{field_err['power_w']}; nvmlDeviceGetPowerUsage: {_why(e)}")
        if "power_avg_w" in self._fields:
            self._set("power_avg_w", True, f"field NVML_FI_DEV_POWER_AVERAGE ({self._fields['power_avg_w']})")
        else:
            self._set("power_avg_w", False, field_err["power_avg_w"])

    def _probe_gpm(self) -> None:
        nv, h = self._nvml, self._handle
        ids: dict[str, int] = {}
        for n, const in GPM_METRICS.items():
            try:
                ids[n] = int(getattr(nv, const))
            except AttributeError as e:  # an older nvidia-ml-py without this metric
                self._set(n, False, f"GPM: {const}: {_why(e)}")
        if not ids:
            return
        try:
            support = nv.nvmlGpmQueryDeviceSupport(h)
            if not int(support.isSupportedDevice):
                raise RuntimeError("GPM not supported on this device (needs Hopper or newer)")
            self._gpm_bufs = [nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()]
            nv.nvmlGpmSampleGet(h, self._gpm_bufs[0])
            time.sleep(self.gpm_min_interval_s)
            nv.nvmlGpmSampleGet(h, self._gpm_bufs[1])
            got = self._gpm_get(self._gpm_bufs[0], self._gpm_bufs[1], ids)
        except Exception as e:
            for n in ids:
                self._set(n, False, f"GPM: {_why(e)}")
            self._free_gpm()
            return
        for n, mid in ids.items():
            if n in got:
                self._set(n, True, f"GPM metric {GPM_METRICS[n]} ({mid})")
            else:
                self._set(n, False, f"GPM metric {GPM_METRICS[n]} ({mid}) returned an NVML error")
        self._gpm_ids = {n: mid for n, mid in ids.items() if n in got}
        if not self._gpm_ids:
            self._free_gpm()

    def _gpm_get(self, s1: Any, s2: Any, ids: dict[str, int]) -> dict[str, float]:
        """Metrics between two GPM samples; metrics whose own return code is an error are left out."""
        nv = self._nvml
        mg = nv.c_nvmlGpmMetricsGet_t()
        mg.version = nv.NVML_GPM_METRICS_GET_VERSION
        mg.numMetrics = len(ids)
        mg.sample1 = s1
        mg.sample2 = s2
        for i, mid in enumerate(ids.values()):
            mg.metrics[i].metricId = mid
        nv.nvmlGpmMetricsGet(mg)
        out: dict[str, float] = {}
        for i, n in enumerate(ids):
            m = mg.metrics[i]
            if int(m.nvmlReturn) == nv.NVML_SUCCESS:
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

    # -- window --------------------------------------------------------------------------------
    def _series_names(self) -> list[str]:
        return [n for n in NVML_SERIES if self._ok(n)]

    def _begin(self, pid: int | None) -> dict[str, float] | None:
        if not self.available:
            return None
        self._energy0 = None
        if self._ok("energy_j"):
            try:
                self._energy0 = _ENERGY.read(self._nvml, self._handle)[0]
            except Exception as e:
                self._error("energy counter at begin", e)
        self._pcie_t = -math.inf  # the t=0 sample carries PCIe
        if self._gpm_bufs and self._gpm_ids:
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
                    if int(v.nvmlReturn) == nv.NVML_SUCCESS:
                        row[series] = self._field_value(v) / 1000.0
            except Exception as e:
                self._error("nvmlDeviceGetFieldValues", e)
        now = time.monotonic()
        pcie = now - self._pcie_t >= 1.0 / self.pcie_hz
        if pcie:
            self._pcie_t = now
        for r in self._tick:
            if r.when == "pcie" and not pcie:
                continue  # NaN this tick rather than block the sampler for another 20 ms
            try:
                row.update(zip(r.series, r.read(nv, h), strict=True))
            except Exception as e:
                self._error(r.how, e)
        if gpm and self._gpm_ids and math.isfinite(self._gpm_prev_t):
            now = time.monotonic()
            if now - self._gpm_prev_t >= self.gpm_min_interval_s:
                nxt = 1 - self._gpm_prev
                try:
                    nv.nvmlGpmSampleGet(h, self._gpm_bufs[nxt])
                    prev, cur = self._gpm_bufs[self._gpm_prev], self._gpm_bufs[nxt]
                    row.update(self._gpm_get(prev, cur, self._gpm_ids))
                    self._gpm_prev, self._gpm_prev_t = nxt, now
                except Exception as e:
                    self._error("GPM", e)
        return row

    def _totals(self, t: np.ndarray, series: dict[str, np.ndarray], duration_s: float) -> dict[str, float]:
        totals: dict[str, float] = {}
        if self._energy0 is not None:
            try:
                e1 = _ENERGY.read(self._nvml, self._handle)[0]
                totals["energy_j"] = (e1 - self._energy0) / 1000.0
            except Exception as e:
                self._error("energy counter at end", e)
                totals["energy_j"] = math.nan
        if "power_w" in series:
            totals["energy_j_integrated"] = _integrate(t, series["power_w"])
        return totals
