"""The Observer's telemetry: what Maxwell itself measured of the hardware it leased to an agent.

The thermodynamic layer (L1) and the Energy Wallet must rest on numbers the agent cannot edit, so
every figure here is read by Maxwell's own code from a declared source, and each `Measurement`
carries that source's `TrustLevel` (host-side NVML, the guest's driver, out of band, a recording).

Sources, one module each, all with Zeus's ``begin_window`` / ``end_window`` shape:

- `NvmlSource` (nvml.py)       GPU power, utilisation, clocks, PCIe, Hopper GPM, energy counter.
- `ProcessSource` (process.py) CPU seconds, RSS and block I/O of a process tree.
- `RaplSource` (rapl.py)       CPU package energy from Linux powercap (intel-rapl) sysfs.
- `ReplaySource` (replay.py)   a recorded trace fed through the same API (trust RECORDED).

`Observer` (observer.py) runs several over one window; `SampledSource` (sampler.py) is the sampling
thread they share. A capability a source cannot read is listed as unavailable with the reason, never
filled with zeros. The trace file format ``maxwell-poi-trace/v1`` is documented in trace.py.

This package imports only numpy, psutil and pynvml (and its own modules), so a GPU script can load
it standalone, without the rest of maxwell_poi.
"""

from .nvml import NvmlSource
from .observer import Observer, default_sources, gpu_observer
from .process import ProcessSource
from .rapl import RaplSource
from .replay import ReplaySource
from .sampler import SampledSource, TelemetrySource
from .trace import TRACE_FORMAT, Capability, Measurement, TrustLevel, load_trace, save_trace

__all__ = [
    "gpu_observer",
    "TRACE_FORMAT",
    "Capability",
    "Measurement",
    "NvmlSource",
    "Observer",
    "ProcessSource",
    "RaplSource",
    "ReplaySource",
    "SampledSource",
    "TelemetrySource",
    "TrustLevel",
    "default_sources",
    "load_trace",
    "save_trace",
]
