"""Tolerances for the audit, per claimed precision and hardware-class pair, measured by
bench/audit/calibrate.py.

Two sets: `cross_class` (the prover ran on another kind of device than the verifier, or Maxwell
does not know which: calibrated for cross-hardware noise) and `same_class` (Maxwell's own node
measured the prover's device and it is the verifier's kind: near-exact, calibrated on this
class's honest variants — threads, batching, speculative decoding). The class comes from the
node's evidence (LeaseEvidence.device_class), never from the agent's receipt.

The shipped file `maxwell_poi/data/thresholds.json` is the calibration's output; its data and
the distributions behind it are in bench/results/calibration.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
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
    by_precision: dict[str, Tolerance]  # cross-class (the safe default)
    same_class: dict[str, Tolerance] = field(default_factory=dict)

    def for_precision(self, precision: str, same_class: bool = False) -> Tolerance:
        """The tolerance for a claim; `same_class` only where Maxwell measured the prover's device
        to be of the verifier's kind (falls back to cross-class where no same-class set exists)."""
        if same_class and precision in self.same_class:
            return self.same_class[precision]
        return self.by_precision[precision]

    @classmethod
    def load(cls, path: Path | None = None) -> Thresholds:
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("thresholds.json").read_text()
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        same = data.get("same_class", {})
        out = {p: Tolerance(**v) for p, v in data.items() if not p.startswith("_") and p != "same_class"}
        same_out = {p: Tolerance(**v) for p, v in same.items() if not p.startswith("_")}
        for label, tol in [*out.items(), *(("same-class " + p, t) for p, t in same_out.items())]:
            bad = [k for k, v in vars(tol).items() if not math.isfinite(v) or v < 0]
            if bad:  # an infinite tolerance would switch a check off without saying so
                raise ValueError(f"thresholds for {label}: expected finite values >= 0, got {bad}")
        return cls(out, same_out)
