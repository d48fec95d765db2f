"""What kind of work a lease's trace looks like, from Maxwell's own measurements only.

Features are normalised by the claimed model's profile on this device, so one classifier serves
every model: the work per token, the pace, how much of the weights' memory is resident, how many
cores were busy, how steady the CPU load was, and how bursty the token stream. Trained with
scikit-learn on recordings of honest inference and of the physics adversaries (bench/signals/recordings.py
writes the table `maxwell_poi/data/workload_features.json`).
"""

from __future__ import annotations

import functools
import json
import statistics
from importlib import resources
from pathlib import Path

import numpy as np

from ..observer.evidence import LeaseEvidence
from ..registry.models import ReferenceValues
from ..registry.profiles import Profile

FEATURES = ["cpu_ratio", "interval_ratio", "memory_margin", "cores_busy", "util_cv", "burst"]
INFERENCE = "inference"


def trace_features(
    ev: LeaseEvidence, profile: Profile, ref: ReferenceValues, precision: str
) -> dict[str, float] | None:
    """Profile-relative features of one run; None when there is no decode window to measure."""
    window = ev.decode_window
    if window is None:
        return None
    wall, cpu, n = window.wall_s, window.cpu_s, window.tokens
    gaps = np.diff(np.asarray(ev.stream_t))
    weights_mb = ref.param_count * (4 if precision == "fp32" else 2) / 2**20
    util = ev.telemetry.get("process")
    util_cv = 0.0
    if util is not None and "cpu_util" in util.series:
        u = util.series["cpu_util"]
        u = u[np.isfinite(u)]
        util_cv = float(u.std() / u.mean()) if u.size and u.mean() > 0 else 0.0
    return {
        "cpu_ratio": (cpu / n) / profile.decode_cpu_s_per_token.mean,
        "interval_ratio": float(statistics.median(gaps)) / profile.interval_s.median,
        "memory_margin": (ev.peak_rss_mb() - profile.peak_rss_mb.min) / max(weights_mb, 1.0),
        "cores_busy": cpu / wall if wall > 0 else 0.0,
        "util_cv": util_cv,
        "burst": float(np.mean(gaps < 0.1 * profile.interval_s.median)),
    }


class WorkloadClassifier:
    """Random forest over `FEATURES`; labels are "inference" or the kind of non-work."""

    def __init__(self, rows: list[dict]) -> None:
        from sklearn.ensemble import RandomForestClassifier

        self.rows = rows
        self.model = RandomForestClassifier(n_estimators=200, random_state=0, min_samples_leaf=2)
        self.model.fit(self._x(rows), [r["label"] for r in rows])

    @staticmethod
    def _x(rows: list[dict]) -> np.ndarray:
        return np.array([[float(np.clip(r[f], -50, 50)) for f in FEATURES] for r in rows])

    def predict(self, features: dict[str, float]) -> tuple[str, float, dict[str, float]]:
        """(label, its probability, P(inference))."""
        proba = self.proba(self._x([features]))[0]
        classes = list(self.model.classes_)
        best = int(np.argmax(proba))
        p_inf = float(proba[classes.index(INFERENCE)]) if INFERENCE in classes else 0.0
        return classes[best], float(proba[best]), {"p_inference": p_inf}

    def proba(self, x: np.ndarray) -> np.ndarray:
        """The forest's predict_proba: the mean of its trees' class fractions, summed here rather than
        through joblib's dispatch, which cost ~37 ms of intake's CPU per lease for one row and 200
        trees (the trees' own predict is ~10 us each; tests/test_classify.py holds it equal)."""
        x = x.astype(np.float32)  # what the forest's own validation hands its trees
        total = np.zeros((x.shape[0], len(self.model.classes_)))
        for tree in self.model.estimators_:
            total += tree.predict_proba(x, check_input=False)
        return total / len(self.model.estimators_)

    @classmethod
    def load(cls, path: Path | None = None) -> WorkloadClassifier | None:
        """The shipped training table (or `path`), fitted once per process and shared, or None
        when it has not been recorded yet. Fitting takes ~0.2 s; every Verifier used to pay it."""
        return _fitted(str(path) if path is not None else None)


@functools.cache
def _fitted(path: str | None) -> WorkloadClassifier | None:
    try:
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("workload_features.json").read_text()
        else:
            text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return None
    rows = json.loads(text)["rows"]
    return WorkloadClassifier(rows) if len({r["label"] for r in rows}) >= 2 else None
