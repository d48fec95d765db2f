"""Reference profiles: what honest inference of a model looks like on one class of device.

Measured by Maxwell (`poi profile MODEL`) by running the honest reference agent through the same
runner and Observer that watch every lease, so the numbers are of the same kind as the evidence
they are compared with: per-token timing seen on Maxwell's side of the channel, the agent's CPU
seconds per decoded token from the kernel's accounting, its peak resident memory, and the
device's measured peak arithmetic rate (the physics floor). The device class is part of the key.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .models import poi_home

if TYPE_CHECKING:
    from ..observer.evidence import ChannelEvidence


def device_class() -> str:
    """A stable name for the kind of device agents run on here (CPU model and core count, or GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model}:{os.cpu_count()}cores"


_DEVICE: str | None = None


def this_device() -> str:
    """`device_class()` of this host, worked out once per process."""
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = device_class()
    return _DEVICE


def measure_peak_flops(seconds: float = 0.5, n: int = 1024) -> dict[str, float]:
    """Best fp32 matmul rate on this CPU with the current torch threads (and per busy core)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    cpu_rate = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        flops = 2 * n**3
        best = max(best, flops / dt)
        if dc > 0:
            cpu_rate = max(cpu_rate, flops / dc)
    return {"peak_flops_per_s": best, "peak_flops_per_cpu_s": cpu_rate or best}


def _stats(values: list[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
        "median": float(np.median(arr)),
        "runs": [round(float(v), 6) for v in arr],
    }


@dataclass(frozen=True)
class Profile:
    device_class: str
    model_id: str
    runs: int
    tokens: int
    interval_s: dict[str, Any]  # per run: median gap between streamed tokens (Maxwell's clock)
    decode_cpu_s_per_token: dict[str, Any]  # per run: agent CPU seconds per decoded token
    decode_cores_busy: dict[str, Any]  # per run: CPU seconds / wall seconds while decoding
    peak_rss_mb: dict[str, Any]
    peak_flops_per_s: float
    peak_flops_per_cpu_s: float
    measured_at: float
    threads: list[int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ProfileStore:
    """Profiles on disk: {device_class: {model_id: profile}} in $POI_HOME/profiles.json."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or poi_home() / "profiles.json"
        self._cached: tuple[float, dict] | None = None  # (mtime, data): appraisals stay sub-ms

    def _all(self) -> dict[str, dict[str, dict]]:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return {}
        if self._cached and self._cached[0] == mtime:
            return self._cached[1]
        try:
            data = json.loads(self.path.read_text())
        except ValueError as exc:
            raise ValueError(f"profile store {self.path} is unreadable: {exc}") from exc
        self._cached = (mtime, data)
        return data

    def get(self, model_id: str, device: str | None = None) -> Profile | None:
        entry = self._all().get(device or this_device(), {}).get(model_id)
        return Profile(**entry) if entry else None

    def put(self, profile: Profile) -> None:
        data = self._all()
        data.setdefault(profile.device_class, {})[profile.model_id] = profile.as_dict()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)  # atomic: other models' profiles are never lost to a crash


PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
]


def honest_runs(
    model_id: str, runs: int, tokens: int, threads: tuple[int, ...] = (1, 2), registry=None
) -> Iterator[tuple[int, ChannelEvidence]]:
    """Run the honest reference agent `runs` times (alternating thread counts) through Maxwell's
    runner with process telemetry; yields (threads, evidence) and raises if a run fails."""
    import sys
    import tempfile

    from ..observer.channel import run_agent
    from ..observer.telemetry import Observer, ProcessSource
    from ..protocol.keys import AgentKey
    from ..protocol.lease import GenerateJob, Lease
    from ..verifier.layers import max_receipt_bytes
    from .models import Registry

    registry = registry or Registry()
    hidden = registry.reference(model_id).hidden
    with tempfile.TemporaryDirectory() as tmp:
        key_path = Path(tmp) / "honest.pem"
        AgentKey.generate().save(key_path)
        for i in range(runs):
            n_threads = threads[i % len(threads)]
            job = GenerateJob(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens)
            lease = Lease.issue("profiler", model_id, job)
            argv = [
                sys.executable,
                "-m",
                "maxwell_poi",
                "agent",
                "--key",
                str(key_path),
                "--threads",
                str(n_threads),
            ]
            run = run_agent(
                argv, lease, max_bytes=max_receipt_bytes(lease, hidden), observer=Observer([ProcessSource()])
            )
            if run.evidence.exit_code != 0 or run.evidence.decode_window is None:
                raise RuntimeError(f"honest run {i} of {model_id} failed: {run.evidence.stderr_tail[-500:]}")
            yield n_threads, run.evidence


def measure_profile(
    model_id: str,
    *,
    runs: int = 4,
    tokens: int = 48,
    threads: tuple[int, ...] = (1, 2),
    registry=None,
    on_progress: Callable[[str], None] | None = None,
) -> Profile:
    """What honest decoding of `model_id` looks like on this device, from `runs` honest runs."""
    intervals, cpu_per_token, busy, rss = [], [], [], []
    for i, (n_threads, ev) in enumerate(honest_runs(model_id, runs, tokens, threads, registry)):
        wall, cpu, n = ev.decode_window
        intervals.append(statistics.median(np.diff(ev.stream_t)))
        cpu_per_token.append(cpu / n)
        busy.append(cpu / wall if wall > 0 else 0.0)
        rss.append(ev.peak_rss_mb())
        if on_progress:
            on_progress(
                f"{model_id} run {i + 1}/{runs} ({n_threads} threads): "
                f"{intervals[-1] * 1000:.1f} ms/token, {cpu_per_token[-1] * 1000:.1f} CPU-ms/token"
            )
    peak = measure_peak_flops()
    return Profile(
        device_class=device_class(),
        model_id=model_id,
        runs=runs,
        tokens=tokens,
        interval_s=_stats(intervals),
        decode_cpu_s_per_token=_stats(cpu_per_token),
        decode_cores_busy=_stats(busy),
        peak_rss_mb=_stats(rss),
        peak_flops_per_s=peak["peak_flops_per_s"],
        peak_flops_per_cpu_s=peak["peak_flops_per_cpu_s"],
        measured_at=time.time(),
        threads=list(threads),
    )
