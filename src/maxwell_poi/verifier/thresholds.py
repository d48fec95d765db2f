"""Tolerances for the audit, per claimed precision and hardware-class pair, measured by
bench/audit/calibrate.py.

Two sets: `cross_class` (the prover ran on another kind of device than the verifier, or Maxwell
does not know which: calibrated for cross-hardware noise) and `same_class` (Maxwell's own node
measured the prover's device and it is the verifier's kind: near-exact, calibrated on this
class's honest variants — threads, batching, speculative decoding). The class comes from the
node's evidence (LeaseEvidence.device_class), never from the agent's receipt.

The shipped file `maxwell_poi/data/thresholds.json` is the calibration's output; its data and
the distributions behind it are in bench/results/calibration.json.

Measured class pairs (`maxwell_poi/data/class_pairs.json`, written by bench/audit/class_pairs.py
from committed GPU results): a prover class and a verifier class that are not the same kind of
device but were measured to agree exactly at fingerprint resolution (GPU strict fp32 -> CPU fp32 on
one H200) get the same-class tolerance for the measured precision, with the measurement named.
A prover class is the node's measured device class, with "@strict-fp32" when the node ran the
agent with TF32 off and math attention.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    min_close: float  # per chunk: fraction of top-k values within two float16 ulps
    max_median_rel: float  # per chunk: median relative error of the committed values
    token_gap: float  # per position: best sampler score minus the chosen token's score
    embed_max_abs: float  # embeddings: largest element-wise difference
    logit_tol: float = 0.0  # logits: the prover's rounding allowance at the top-k edge and near-ties


@dataclass(frozen=True)
class ClassPair:
    """A measured hardware-class pair that earns the same-class tolerance for one precision."""

    prover: str  # fnmatch pattern over the prover's numerics class ("cuda:NVIDIA H200@strict-fp32")
    verifier: str  # fnmatch pattern over the verifier's ("cpu:*")
    precision: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def matches(self, prover: str, verifier: str, precision: str) -> bool:
        return (
            precision == self.precision
            and fnmatch.fnmatchcase(prover, self.prover)
            and fnmatch.fnmatchcase(verifier, self.verifier)
        )


@dataclass(frozen=True)
class Thresholds:
    by_precision: dict[str, Tolerance]  # cross-class (the safe default)
    same_class: dict[str, Tolerance] = field(default_factory=dict)
    class_pairs: tuple[ClassPair, ...] = ()

    def measured_pair(self, prover: str, verifier: str, precision: str) -> ClassPair | None:
        """The measured pair covering this prover -> verifier claim, if one exists and a same-class
        tolerance exists for the precision."""
        if precision not in self.same_class:
            return None
        return next((p for p in self.class_pairs if p.matches(prover, verifier, precision)), None)

    def for_precision(self, precision: str, same_class: bool = False) -> Tolerance:
        """The tolerance for a claim; `same_class` only where Maxwell measured the prover's device
        to be of the verifier's kind (falls back to cross-class where no same-class set exists)."""
        if same_class and precision in self.same_class:
            return self.same_class[precision]
        return self.by_precision[precision]

    @classmethod
    def load(cls, path: Path | None = None, pairs_path: Path | None = None) -> Thresholds:
        """The tolerances (`path`, default the shipped file) and the measured class pairs
        (`pairs_path`, default the shipped class_pairs.json; none when absent)."""
        pairs = load_class_pairs(pairs_path)
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
        return cls(out, same_out, pairs)


def load_class_pairs(path: Path | None = None) -> tuple[ClassPair, ...]:
    try:
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("class_pairs.json").read_text()
        else:
            text = Path(path).read_text()
    except (FileNotFoundError, OSError):
        return ()
    return tuple(
        ClassPair(str(p["prover"]), str(p["verifier"]), str(p["precision"]), dict(p.get("provenance", {})))
        for p in json.loads(text)["pairs"]
    )
