"""`SimulatedSource`: synthetic telemetry for unit tests. It lives under tests/ on purpose, so no
reported figure can ever come from it (import it with ``from simulated import SimulatedSource``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from maxwell_poi.observer.telemetry import Capability, Measurement, TrustLevel


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
        if "power_w" in series:  # clipped Gaussian samples are always finite: a plain trapezoid
            totals["energy_j"] = float(np.trapezoid(series["power_w"], t))
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
