"""Reference profiles: what honest inference of a model looks like on one class of device.

A profile is measured by Maxwell (`poi profile MODEL`, `observer.runs.measure_profile`) by running
the honest reference agent through the same runner and Observer that watch every lease, so its
numbers are of the same kind as the evidence they are compared with. This module holds the record
and its store; the device class is part of the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.files import write_json_atomic
from .models import poi_home


@dataclass(frozen=True)
class Stats:
    """Summary of one quantity over a profile's honest runs (each run's value kept in `runs`)."""

    mean: float
    std: float
    min: float
    max: float
    median: float
    runs: tuple[float, ...] = ()

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        arr = np.asarray(list(values), dtype=float)
        if arr.size == 0:
            raise ValueError("Stats.of: expected at least one value, got none")
        return cls(
            mean=float(arr.mean()),
            std=float(arr.std()),
            min=float(arr.min()),
            max=float(arr.max()),
            median=float(np.median(arr)),
            runs=tuple(round(float(v), 6) for v in arr),
        )

    @classmethod
    def coerce(cls, value: Stats | Mapping[str, Any]) -> Stats:
        """A Stats from itself or from its stored dict form."""
        if isinstance(value, Stats):
            return value
        try:
            return cls(
                **{f.name: float(value[f.name]) for f in fields(cls) if f.name != "runs"},
                runs=tuple(float(v) for v in value.get("runs", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"profile statistics: expected mean/std/min/max/median, got {value!r}") from exc

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "runs": list(self.runs)}

    def scaled(self, factor: float) -> Stats:
        """Every value times `factor` (a quantity measured per core, taken for `factor` cores)."""
        return Stats(
            mean=self.mean * factor,
            std=self.std * factor,
            min=self.min * factor,
            max=self.max * factor,
            median=self.median * factor,
            runs=tuple(round(v * factor, 6) for v in self.runs),
        )


STAT_FIELDS = ("interval_s", "decode_cpu_s_per_token", "decode_cores_busy", "peak_rss_mb")


def nearest_batch(table: Mapping[str, Stats], batch: int) -> tuple[int, Stats] | None:
    """The measured batch size to judge a batch of `batch` leases by, and its statistics: the
    smallest measured size at least `batch` (a bigger batch costs less per token, so its bound is the
    safe one), else the largest measured; None when no batch was measured."""
    sizes = sorted(int(b) for b in table)
    if not sizes:
        return None
    chosen = next((b for b in sizes if b >= batch), sizes[-1])
    return chosen, table[str(chosen)]


@dataclass(frozen=True)
class ThreadRuns:
    """Honest resident serving at one torch thread count (issue 24). Multi-threaded BLAS burns more
    CPU per token than one thread (spin-waits and sync: gpt2-small here, 62.7 CPU-ms at 2 threads
    against 32.6 at 1, the same pace), so L1's work floor follows the parallelism Maxwell measured
    rather than one thread count's runs (verifier.work_basis)."""

    threads: int
    cpu_s_per_token: Stats  # per run, unbatched: sandbox CPU seconds per decoded token
    cores_busy: Stats  # per run: CPU seconds / wall seconds while decoding (Maxwell's measurement)
    batch_cpu_s_per_token: dict[str, Stats] = field(default_factory=dict)  # as Profile's, this count

    def __post_init__(self) -> None:
        object.__setattr__(self, "threads", int(self.threads))
        for name in ("cpu_s_per_token", "cores_busy"):
            object.__setattr__(self, name, Stats.coerce(getattr(self, name)))
        batches = {str(b): Stats.coerce(v) for b, v in self.batch_cpu_s_per_token.items()}
        object.__setattr__(self, "batch_cpu_s_per_token", batches)

    @classmethod
    def coerce(cls, value: ThreadRuns | Mapping[str, Any]) -> ThreadRuns:
        return value if isinstance(value, ThreadRuns) else cls(**value)

    def per_token(self, batch: int) -> tuple[int, Stats] | None:
        """(the batch size measured, its CPU per token of the batch) to judge `batch` leases by."""
        if batch <= 1:
            return 1, self.cpu_s_per_token
        return nearest_batch(self.batch_cpu_s_per_token, batch)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "cpu_s_per_token": self.cpu_s_per_token.as_dict(),
            "cores_busy": self.cores_busy.as_dict(),
            "batch_cpu_s_per_token": {b: v.as_dict() for b, v in self.batch_cpu_s_per_token.items()},
        }


@dataclass(frozen=True)
class Profile:
    device_class: str
    model_id: str
    runs: int
    tokens: int
    interval_s: Stats  # per run: median gap between streamed tokens (Maxwell's clock)
    decode_cpu_s_per_token: Stats  # per run: agent CPU seconds per decoded token
    decode_cores_busy: Stats  # per run: CPU seconds / wall seconds while decoding
    peak_rss_mb: Stats
    peak_flops_per_s: float
    peak_flops_per_cpu_s: float
    measured_at: float
    threads: list[int]
    regime: str = "oneshot"  # how the honest runs were measured (observer.evidence: regime)
    # resident regime: CPU seconds per streamed token of all rows when `b` leases are decoded in one
    # batch (keys are str(b)); serving engines batch, and a batch costs less per token than b runs
    batch_cpu_s_per_token: dict[str, Stats] = field(default_factory=dict)
    # resident regime: sandbox CPU seconds per input token of an embedding lease (whole lease window)
    embed_cpu_s_per_token: Stats | None = None
    # per run: the median gap less the run-queue delay per token the sandbox suffered (what the pace
    # would have been on a host with a free core); None where the kernel gave no delay
    interval_free_s: Stats | None = None
    # the host's contention over the honest runs, by observer.contention field (others_cores,
    # cpu_pressure, steal_cores, wait_s per token): a lease measured beyond it is under conditions
    # the profile never saw
    conditions: dict[str, Stats] = field(default_factory=dict)
    # resident regime: the honest runs at each torch thread count measured (keys str(threads); the
    # fields above are the agent's default thread count's); empty for profiles made before issue 24
    threads_runs: dict[str, ThreadRuns] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in STAT_FIELDS:  # stored profiles and hand-built ones carry plain dicts
            object.__setattr__(self, name, Stats.coerce(getattr(self, name)))
        batches = {str(b): Stats.coerce(v) for b, v in self.batch_cpu_s_per_token.items()}
        object.__setattr__(self, "batch_cpu_s_per_token", batches)
        for name in ("embed_cpu_s_per_token", "interval_free_s"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Stats.coerce(getattr(self, name)))
        object.__setattr__(self, "conditions", {k: Stats.coerce(v) for k, v in self.conditions.items()})
        runs = {str(t): ThreadRuns.coerce(v) for t, v in self.threads_runs.items()}
        object.__setattr__(self, "threads_runs", runs)

    @classmethod
    def from_runs(
        cls,
        device_class: str,
        model_id: str,
        tokens: int,
        *,
        intervals: list[float],
        cpu_per_token: list[float],
        busy: list[float],
        memory: list[float],
        peak: Mapping[str, float],
        measured_at: float,
        **extra: Any,
    ) -> Profile:
        """A profile from per-run values (each summarised with `Stats.of`) and the device's
        measured peak FLOP rates (`observer.host.measure_peak_flops`)."""
        return cls(
            device_class=device_class,
            model_id=model_id,
            runs=len(cpu_per_token),
            tokens=tokens,
            interval_s=Stats.of(intervals),
            decode_cpu_s_per_token=Stats.of(cpu_per_token),
            decode_cores_busy=Stats.of(busy),
            peak_rss_mb=Stats.of(memory),
            peak_flops_per_s=peak["peak_flops_per_s"],
            peak_flops_per_cpu_s=peak["peak_flops_per_cpu_s"],
            measured_at=measured_at,
            **{"threads": [], **extra},
        )

    def physics_floor_cpu_s(self, tokens: int, flops_per_token: float) -> float:
        """The fewest CPU-seconds `tokens` tokens of a model can take on this device: their FLOPs at
        the device's measured peak rate per CPU-second (L1's physics floor, also the gateway's
        running check)."""
        return tokens * flops_per_token / self.peak_flops_per_cpu_s

    def batch_stats(self, batch: int) -> tuple[int, Stats] | None:
        """The default thread count's statistics for a batch of `batch` leases (`nearest_batch`)."""
        return nearest_batch(self.batch_cpu_s_per_token, batch)

    @property
    def least_cores_busy(self) -> float:
        """The fewest cores any honest run of any thread count kept busy while decoding."""
        return min([self.decode_cores_busy.min, *(r.cores_busy.min for r in self.threads_runs.values())])

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update({name: getattr(self, name).as_dict() for name in STAT_FIELDS})
        out["batch_cpu_s_per_token"] = {b: v.as_dict() for b, v in self.batch_cpu_s_per_token.items()}
        for name in ("embed_cpu_s_per_token", "interval_free_s"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).as_dict()
        out["conditions"] = {k: v.as_dict() for k, v in self.conditions.items()}
        out["threads_runs"] = {t: r.as_dict() for t, r in self.threads_runs.items()}
        return out

    @property
    def fastest_free_interval_s(self) -> float:
        """The shortest honest gap between tokens the profile saw, on a free core where the
        run-queue delay was measured (L2's pace floor is a fraction of it)."""
        measured = self.interval_s.min
        return min(measured, self.interval_free_s.min) if self.interval_free_s is not None else measured

    def seen(self, condition: str) -> float | None:
        """The most of `condition` (an observer.contention field) any honest run saw; None when
        the profile did not record it."""
        stats = self.conditions.get(condition)
        return stats.max if stats is not None else None


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

    def get(self, model_id: str, device: str) -> Profile | None:
        entry = self._all().get(device, {}).get(model_id)
        return Profile(**entry) if entry else None

    def put(self, profile: Profile) -> None:
        data = self._all()
        data.setdefault(profile.device_class, {})[profile.model_id] = profile.as_dict()
        write_json_atomic(self.path, data)  # other models' profiles are never lost to a crash
