"""What one telemetry window produced (`Measurement`), who stands behind it (`TrustLevel`), and the
trace file that stores it (`save_trace` / `load_trace`).

Trace file format ``maxwell-poi-trace/v1``: one JSON object, gzip-compressed when the file name ends
in ``.gz``::

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

import gzip
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

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
