"""The Observer: several telemetry sources run over one window; `default_sources` picks the ones
this host can actually read."""

from __future__ import annotations

from .nvml import NvmlSource
from .process import ProcessSource
from .rapl import RaplSource
from .sampler import TelemetrySource
from .trace import Capability, Measurement


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


def gpu_observer() -> Observer | None:
    """NVML alone when this host can read a GPU (a resident agent's busy spans); None on a CPU-only
    host, where the sandbox's cgroup already gives CPU and memory at every token."""
    nv = NvmlSource()
    if nv.available:
        return Observer([nv])
    nv.close()
    return None
