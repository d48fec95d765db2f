"""Reference profiles: what honest inference of a model looks like on one class of device.

A profile is measured by Maxwell (`poi profile MODEL`, `observer.runs.measure_profile`) by running
the honest reference agent through the same runner and Observer that watch every lease, so its
numbers are of the same kind as the evidence they are compared with. This module holds the record
and its store; the device class is part of the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
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


STAT_FIELDS = ("interval_s", "decode_cpu_s_per_token", "decode_cores_busy", "peak_rss_mb")


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

    def __post_init__(self) -> None:
        for name in STAT_FIELDS:  # stored profiles and hand-built ones carry plain dicts
            object.__setattr__(self, name, Stats.coerce(getattr(self, name)))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update({name: getattr(self, name).as_dict() for name in STAT_FIELDS})
        return out


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
