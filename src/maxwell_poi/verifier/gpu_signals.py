"""GPU L1: what a lease's NVML window says about the work, from Maxwell's own telemetry only.

Three checks on one NVML window (instant power, energy counter, GPM tensor/integer/FP/DRAM
activity, PCIe rx, clocks), each a `GpuCheck` whose reason names expected vs got:

1. `workload`   nearest centroid over `FEATURES` (log-scaled window means): inference, miner,
                burner or idle; farther than `other_radius` from every centroid is "other" (not
                affirmed, not contraindicated: a workload nobody recorded);
2. `model_size` DRAM bytes per decode step against the claimed model's weight bytes: a decode
                step reads every weight once, so util x effective bandwidth x seconds / steps is
                the weights' size (the effective bandwidth is fitted on recorded inference);
3. `energy`     energy-counter joules per token at least the card's floor for that size class and
                batch (the least an honest serving loop was measured to spend, less a margin).

The parameters (centroids, radius, bandwidth, floors) are shipped in maxwell_poi/data/gpu_signals.json,
written by bench/gpu_signals/evaluate.py from the committed H200 traces; never edited by hand.
Blind spots (docs/gpu.md): nothing shorter than NVML's ~100 ms update, and two models of the same
size from different families read the same bytes per step.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..observer.evidence import LeaseEvidence
from ..observer.telemetry.trace import Measurement
from .appraisal import Outcome, failed, not_measured, passed

FEATURES = ["log_power", "tensor", "integer", "dram", "pcie_rx", "fp"]
SERIES = ("power_w", "tensor_util", "int_util", "dram_bw_util", "pcie_rx_kbs", "fp32_util", "fp16_util")
INFERENCE = "inference"
OTHER = "other"
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1}


def _mean(m: Measurement, name: str) -> float:
    v = m.series.get(name)
    if v is None:
        return math.nan
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def missing_series(m: Measurement) -> list[str]:
    """Series the checks need that this window lacks (or holds no finite sample of)."""
    return [s for s in SERIES if not math.isfinite(_mean(m, s))]


def window_features(m: Measurement) -> dict[str, float]:
    """Window means on log scales (utilisations in %, PCIe in MB/s), so a factor counts the same
    at 1 % as at 50 %; power is doubled in weight since it is the only absolute reading."""
    return {
        "log_power": 2 * math.log(max(_mean(m, "power_w"), 1.0) / 100),
        "tensor": math.log1p(_mean(m, "tensor_util")),
        "integer": math.log1p(_mean(m, "int_util")),
        "dram": math.log1p(_mean(m, "dram_bw_util")),
        "pcie_rx": math.log1p(_mean(m, "pcie_rx_kbs") / 1000),
        "fp": math.log1p(_mean(m, "fp32_util") + _mean(m, "fp16_util")),
    }


def nvml_window(telemetry: dict[str, Measurement]) -> Measurement | None:
    """The NVML measurement among a lease's telemetry sources (named nvml:<index>), if any."""
    return next((m for name, m in sorted(telemetry.items()) if name.startswith("nvml")), None)


def card_of(m: Measurement) -> str:
    """The card named in the trace's device field ("gpu0 NVIDIA H200" -> "NVIDIA H200")."""
    head, _, rest = m.device.partition(" ")
    return rest if head.startswith("gpu") and rest else m.device


@dataclass(frozen=True)
class GpuCheck:
    """One check's outcome: ok True/False, or None when it could not measure (reason says why)."""

    name: str
    ok: bool | None
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuSignals:
    """The fitted parameters (see the module docstring)."""

    card: str
    centroids: dict[str, list[float]]
    other_radius: float
    dram_bw_bytes_per_s: float
    size_classes: list[dict[str, Any]]  # [{"name", "max_params"}], ascending
    energy_floors: dict[str, dict[str, float]]  # size class -> {batch (str): J per token}
    energy_margin: float

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GpuSignals:
        return cls(
            card=d["card"],
            centroids={k: [float(x) for x in v] for k, v in d["centroids"].items()},
            other_radius=float(d["other_radius"]),
            dram_bw_bytes_per_s=float(d["dram_bw_bytes_per_s"]),
            size_classes=list(d["size_classes"]),
            energy_floors={k: {b: float(j) for b, j in v.items()} for k, v in d["energy_floors"].items()},
            energy_margin=float(d["energy_margin"]),
        )

    @classmethod
    def load(cls, path: Path | None = None) -> GpuSignals | None:
        return _loaded(str(path) if path is not None else None)

    # -- workload -------------------------------------------------------------------------------
    def classify(self, feats: dict[str, float]) -> tuple[str, dict[str, float]]:
        """(class, distance to every centroid); "other" beyond the radius of all of them."""
        x = np.array([feats[f] for f in FEATURES])
        dist = {c: float(np.linalg.norm(x - np.array(v))) for c, v in self.centroids.items()}
        best = min(dist, key=dist.__getitem__)
        return (best if dist[best] <= self.other_radius else OTHER), dist

    def workload(self, m: Measurement) -> GpuCheck:
        feats = window_features(m)
        label, dist = self.classify(feats)
        nearest = min(dist, key=dist.__getitem__)
        said = {
            "gpu_class": label,
            "gpu_class_distance": {k: round(v, 3) for k, v in sorted(dist.items())},
            "power_w": round(_mean(m, "power_w"), 1),
            "tensor_util": round(_mean(m, "tensor_util"), 2),
            "int_util": round(_mean(m, "int_util"), 2),
            "dram_bw_util": round(_mean(m, "dram_bw_util"), 2),
            "pcie_rx_mb_s": round(_mean(m, "pcie_rx_kbs") / 1000, 1),
            "sm_clock_mhz": round(_mean(m, "sm_clock_mhz"), 0),
        }
        if label == INFERENCE:
            return GpuCheck("workload", True, "NVML window looks like inference", said)
        if label == OTHER:  # unlike anything recorded: neither affirmed nor contraindicated
            return GpuCheck(
                "workload",
                None,
                f"GPU workload: expected a window within {self.other_radius:.2f} of a recorded class, "
                f"got {min(dist.values()):.2f} from the nearest ({nearest}): not affirmed",
                said,
            )
        return GpuCheck(
            "workload",
            False,
            f"GPU workload: expected inference, NVML says {label} ({said['power_w']:.0f} W, tensor "
            f"{said['tensor_util']:.1f} %, integer {said['int_util']:.1f} %, "
            f"DRAM {said['dram_bw_util']:.1f} %, PCIe rx {said['pcie_rx_mb_s']:.1f} MB/s; "
            f"distance {dist[nearest]:.2f}, "
            f"radius {self.other_radius:.2f})",
            said,
        )

    # -- model size -----------------------------------------------------------------------------
    def size_class(self, params: float) -> str:
        for c in self.size_classes:
            if params <= c["max_params"]:
                return str(c["name"])
        return str(self.size_classes[-1]["name"])

    def implied_params(self, m: Measurement, steps: int, precision: str) -> float:
        """Parameters a decode step must have read, from DRAM activity over the window."""
        bytes_per_step = _mean(m, "dram_bw_util") / 100 * self.dram_bw_bytes_per_s * m.duration_s / steps
        return bytes_per_step / BYTES_PER_PARAM.get(precision, 2)

    def model_size(self, m: Measurement, steps: int, claimed_params: int, precision: str) -> GpuCheck:
        if steps < 1:
            return GpuCheck("model_size", None, "model size: no decode steps in the window to divide by")
        implied = self.implied_params(m, steps, precision)
        want, got = self.size_class(claimed_params), self.size_class(implied)
        said = {
            "claimed_size_class": want,
            "measured_size_class": got,
            "implied_params_b": round(implied / 1e9, 3),
        }
        if want == got:
            return GpuCheck("model_size", True, f"DRAM per decode step fits a {got} model", said)
        return GpuCheck(
            "model_size",
            False,
            f"model size: expected a {want} model ({claimed_params / 1e9:.2f} B parameters, {precision}), "
            f"DRAM read per decode step implies {implied / 1e9:.2f} B ({got})",
            said,
        )

    # -- energy per token -----------------------------------------------------------------------
    def energy_floor(self, size: str, batch: int) -> float | None:
        """The floor at the smallest measured batch >= this one (honest J/token falls with batch,
        so that floor is at or under the one at this batch); None when not measured."""
        floors = self.energy_floors.get(size, {})
        fit = sorted(int(b) for b in floors if int(b) >= batch)
        return floors[str(fit[0])] * self.energy_margin if fit else None

    def energy(self, m: Measurement, tokens: int, size: str, batch: int) -> GpuCheck:
        joules = m.totals.get("energy_j", math.nan)
        floor = self.energy_floor(size, batch)
        if floor is None:
            return GpuCheck(
                "energy",
                None,
                f"energy per token: no floor measured on {self.card} for a {size} model at batch >= {batch}",
            )
        if not math.isfinite(joules) or tokens < 1:
            return GpuCheck(
                "energy",
                False,
                f"energy per token: expected an energy counter and tokens, got {joules} J, {tokens} tokens",
            )
        per = joules / tokens
        said = {"j_per_token": round(per, 4), "j_per_token_floor": round(floor, 4)}
        if per >= floor:
            return GpuCheck("energy", True, f"{per:.3f} J/token (floor {floor:.3f})", said)
        return GpuCheck(
            "energy",
            False,
            f"energy per token: expected >= {floor:.3f} J/token for a {size} model at batch {batch} on "
            f"{self.card}, measured {per:.4f} ({joules:.0f} J over {tokens} tokens)",
            said,
        )

    def judge(
        self, m: Measurement, *, steps: int, tokens: int, batch: int, claimed_params: int, precision: str
    ) -> list[GpuCheck]:
        """Every check on one window; the workload check first (nothing else means much if it fails)."""
        missing = missing_series(m)
        if missing:
            return [
                GpuCheck("workload", None, f"GPU L1: expected NVML series {list(SERIES)}, missing {missing}")
            ]
        if card_of(m) != self.card:
            return [
                GpuCheck(
                    "workload", None, f"GPU L1: fitted on {self.card}, this window is from {card_of(m)!r}"
                )
            ]
        size = self.size_class(claimed_params)
        return [
            self.workload(m),
            self.model_size(m, steps, claimed_params, precision),
            self.energy(m, tokens, size, batch),
        ]


@functools.cache
def _loaded(path: str | None) -> GpuSignals | None:
    try:
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("gpu_signals.json").read_text()
        else:
            text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return None
    return GpuSignals.from_dict(json.loads(text))


def gpu_outcome(
    signals: GpuSignals | None, ev: LeaseEvidence, m: Measurement, param_count: int, precision: str
) -> Outcome:
    """L1's verdict on a GPU lease from its NVML window: a contraindication fails; a workload or
    size that could not be judged is not measured (never a pass); a missing energy floor is named
    in the pass reason."""
    if signals is None:
        return not_measured(
            "GPU L1: no fitted NVML parameters shipped (run python -m bench.gpu_signals.evaluate)"
        )
    window = ev.decode_window
    if window is None:
        return failed(
            f"work: expected streamed tokens to measure the decode window, got {len(ev.stream_tokens)}"
        )
    checks = signals.judge(
        m,
        steps=window.tokens,
        tokens=window.batch_tokens,
        batch=1 + ev.co_leases,
        claimed_params=param_count,
        precision=precision,
    )
    details: dict[str, Any] = {"l1_path": "gpu-nvml", "nvml_trust": str(m.trust), "card": card_of(m)}
    for c in checks:
        details.update(c.details)
        details[f"gpu_{c.name}"] = {True: "pass", False: "fail", None: "not measured"}[c.ok]
    bad = next((c for c in checks if c.ok is False), None)
    if bad is not None:
        return failed(bad.reason, 0.0, **details)
    unsure = next((c for c in checks if c.ok is None and c.name != "energy"), None)
    if unsure is not None:
        return not_measured(unsure.reason, **details)
    energy = next((c for c in checks if c.name == "energy"), None)
    tail = f"; {energy.reason}" if energy is not None else ""
    return passed(
        f"NVML window: inference, a {details['measured_size_class']} model by DRAM per decode step{tail}",
        1.0,
        **details,
    )
