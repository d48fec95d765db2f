"""Tolerances for the audit, per claimed precision, measured by bench/calibrate.py.

The shipped file `maxwell_poi/data/thresholds.json` is the calibration's output; its data and
the distributions behind it are in bench/results/calibration.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class Tolerance:
    min_close: float  # per chunk: fraction of top-k values within two float16 ulps
    max_median_rel: float  # per chunk: median relative error of the committed values
    token_gap: float  # per position: best sampler score minus the chosen token's score
    embed_max_abs: float  # embeddings: largest element-wise difference
    logit_tol: float = 0.0  # logits: the prover's rounding allowance at the top-k edge and near-ties


@dataclass(frozen=True)
class Thresholds:
    by_precision: dict[str, Tolerance]

    def for_precision(self, precision: str) -> Tolerance:
        return self.by_precision[precision]

    @classmethod
    def load(cls, path: Path | None = None) -> Thresholds:
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("thresholds.json").read_text()
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        out = {p: Tolerance(**v) for p, v in data.items() if not p.startswith("_")}
        for precision, tol in out.items():
            bad = [k for k, v in vars(tol).items() if not math.isfinite(v) or v < 0]
            if bad:  # an infinite tolerance would switch a check off without saying so
                raise ValueError(f"thresholds for {precision}: expected finite values >= 0, got {bad}")
        return cls(out)
