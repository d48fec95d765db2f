"""CPU package energy from Linux powercap (intel-rapl) sysfs counters."""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

import numpy as np

from .sampler import SampledSource, _why
from .trace import Capability, TrustLevel

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
