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

Native audits (`maxwell_poi/data/native_audit.json`, written by bench/audit/native_bf16.py from
honest runs): a bf16 claim whose prover the node measured on the verifier's own class is re-executed
in bf16 on that class, not only at fp32, so it is held to the bf16 kernels' own near-exact noise
instead of the bf16-vs-fp32 gap that int8-rounded weights hide inside. Such a claim passes if it
matches the native reference within `native`, or the fp32 reference within the same-class fp32 set
(a bf16 claim served at fp32 is an honest upgrade). A native set holds for the models it was fitted
on only (its provenance names them); other models keep the same-class set.

Decode replay (`replay` in the same file, written by bench/audit/native_replay.py): a bf16 prefill
rounds differently from the prover's token-by-token decode, so the native set above still leaves room
(honest runs keep 56-91 % of values close in their worst chunk). Re-executing the answer the way it
was decoded (protocol.schedule: one token per pass, or a speculative decoder's declared passes)
reproduces honest bf16 on this class bit for bit, so the final L4 verdict on a generation claim holds
it to the near-exact `replay` set: it passes if the decode replay in the claimed precision matches
within it, or the fp32 prefill within the same-class fp32 set (an answer served at fp32). The
streaming cut and the work probe keep the sets above: they judge before the schedule is known.

`choose_tolerance` is the one rule every audit path uses to pick the set (the one-shot and the
node's audit, the gateway's streaming audit, the control plane's queued audits, `poi verify` with a
node's evidence); no other module reads the sets (tests/test_tolerance_rule.py checks both). Its
answer, a `ToleranceChoice`, names the set and the class pair so each verdict can say which it used.
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from ..observer.host import numerics_class

SAME, CROSS, NATIVE = "same-class", "cross-class", "same-class native"
REPLAY = "same-class decode replay"
UNMEASURED = "unknown"  # the prover's class when no Maxwell node measured it


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
    native: dict[str, Tolerance] = field(default_factory=dict)  # re-executed in the claimed precision
    native_provenance: dict[str, dict[str, Any]] = field(default_factory=dict)
    # a decode replay in the claimed precision: precision -> model -> set (fitted per model: how far an
    # honest prover's batching moves its rounding is the model's own)
    replay: dict[str, dict[str, Tolerance]] = field(default_factory=dict)
    replay_provenance: dict[str, dict[str, Any]] = field(default_factory=dict)

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

    def published(self) -> tuple[list[tuple[str, str, Tolerance]], tuple[ClassPair, ...]]:
        """Every set's rows as (set name, precision, tolerance) in the file's order, and the measured
        class pairs: what the wire spec prints (verifier.spec), read here so that no module but this
        one touches the sets."""
        rows = [("cross-class", p, t) for p, t in self.by_precision.items()]
        rows += [("same-class", p, t) for p, t in self.same_class.items()]
        rows += [(NATIVE, p, t) for p, t in self.native.items()]
        rows += [(f"{REPLAY} ({m})", p, t) for p, sets in self.replay.items() for m, t in sets.items()]
        return rows, self.class_pairs

    @classmethod
    def load(
        cls, path: Path | None = None, pairs_path: Path | None = None, native_path: Path | None = None
    ) -> Thresholds:
        """The tolerances (`path`, default the shipped file), the measured class pairs
        (`pairs_path`, default the shipped class_pairs.json) and the native sets (`native_path`,
        default the shipped native_audit.json); none of the latter two when absent."""
        pairs = load_class_pairs(pairs_path)
        native, native_provenance = load_native(native_path)
        replay, replay_provenance = load_replay(native_path)
        if path is None:
            text = resources.files("maxwell_poi.data").joinpath("thresholds.json").read_text()
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        same = data.get("same_class", {})
        out = {p: Tolerance(**v) for p, v in data.items() if not p.startswith("_") and p != "same_class"}
        same_out = {p: Tolerance(**v) for p, v in same.items() if not p.startswith("_")}
        labelled = [
            *out.items(),
            *((f"same-class {p}", t) for p, t in same_out.items()),
            *((f"{NATIVE} {p}", t) for p, t in native.items()),
            *((f"{REPLAY} {p} ({m})", t) for p, sets in replay.items() for m, t in sets.items()),
        ]
        for label, tol in labelled:
            bad = [k for k, v in vars(tol).items() if not math.isfinite(v) or v < 0]
            if bad:  # an infinite tolerance would switch a check off without saying so
                raise ValueError(f"thresholds for {label}: expected finite values >= 0, got {bad}")
        return cls(out, same_out, pairs, native, native_provenance, replay, replay_provenance)


def _shipped_or(path: Path | None, name: str) -> str | None:
    """A data file's text: `path`, else the shipped `maxwell_poi/data/<name>`; None when absent."""
    try:
        if path is None:
            return resources.files("maxwell_poi.data").joinpath(name).read_text()
        return Path(path).read_text()
    except (FileNotFoundError, OSError):
        return None


def load_replay(
    path: Path | None = None,
) -> tuple[dict[str, dict[str, Tolerance]], dict[str, dict[str, Any]]]:
    """The decode-replay sets by precision and model, and each precision's provenance."""
    text = _shipped_or(path, "native_audit.json")
    if text is None:
        return {}, {}
    sets = json.loads(text).get("replay", {})
    return (
        {p: {m: Tolerance(**t) for m, t in v["models"].items()} for p, v in sets.items()},
        {p: dict(v.get("provenance", {})) for p, v in sets.items()},
    )


def load_native(path: Path | None = None) -> tuple[dict[str, Tolerance], dict[str, dict[str, Any]]]:
    """The native sets by precision, and each one's provenance (what measured it)."""
    text = _shipped_or(path, "native_audit.json")
    if text is None:
        return {}, {}
    sets = json.loads(text)["precisions"]
    return (
        {p: Tolerance(**v["tolerance"]) for p, v in sets.items()},
        {p: dict(v.get("provenance", {})) for p, v in sets.items()},
    )


def load_class_pairs(path: Path | None = None) -> tuple[ClassPair, ...]:
    text = _shipped_or(path, "class_pairs.json")
    if text is None:
        return ()
    return tuple(
        ClassPair(str(p["prover"]), str(p["verifier"]), str(p["precision"]), dict(p.get("provenance", {})))
        for p in json.loads(text)["pairs"]
    )


@dataclass(frozen=True)
class ToleranceChoice:
    """The tolerance set an audit applies, and why: `tolerance_set` is SAME, CROSS or NATIVE,
    `class_pair` "<prover class> -> <verifier class>" (the prover's as Maxwell's node measured it,
    UNMEASURED when none did), `reason` the rule's words, `provenance` a measured pair's or native
    set's record (else empty). NATIVE: `native` is the set for a re-execution in the claimed precision
    `native_precision`, and `tolerance` the same-class fp32 set for an answer served at fp32."""

    tolerance: Tolerance
    tolerance_set: str
    class_pair: str
    reason: str
    prover_measured: bool
    provenance: dict[str, Any] = field(default_factory=dict)
    native: Tolerance | None = None
    native_precision: str = ""
    replay: Tolerance | None = None  # REPLAY: the final verdict's set for a decode replay
    replay_precision: str = ""
    served_fp32: Tolerance | None = None  # REPLAY: the same-class fp32 set (an answer served at fp32)
    replay_provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def strict(self) -> bool:
        return self.tolerance_set in (SAME, NATIVE)

    def tracks(self) -> list[tuple[str, Tolerance]]:
        """(reference precision, tolerance) pairs, in order: an answer passes if it matches Maxwell's
        reference in that precision within that tolerance for any one of them. One fp32 track,
        except a native choice: the claimed precision's own kernels first, then fp32 (an upgrade)."""
        if self.native is None:
            return [("fp32", self.tolerance)]
        return [(self.native_precision, self.native), ("fp32", self.tolerance)]

    def label(self) -> str:
        """What a verdict's reason ends with: the set and the pair it was chosen for (and, when no
        node measured the prover, that it was not measured)."""
        unmeasured = "" if self.prover_measured else ": prover's class not measured"
        return f"[{self.tolerance_set} tolerance, {self.class_pair}{unmeasured}]"

    def details(self) -> dict[str, Any]:
        """The choice as a layer result's details (and the gateway's `maxwell.tolerance`)."""
        out: dict[str, Any] = {
            "tolerance": self.tolerance_set,
            "class_pair": self.class_pair,
            "tolerance_reason": self.reason,
        }
        if self.provenance:
            out["class_pair_provenance"] = self.provenance
        if self.replay is not None:
            out["decode_replay"] = self.replay_precision
        return out


def choose_tolerance(
    thresholds: Thresholds,
    precision: str,
    prover_device: str | None,
    verifier_class: str,
    model_id: str = "",
) -> ToleranceChoice:
    """THE rule. `prover_device`: the device class Maxwell's node measured the prover on (its
    evidence's or its signed pull's `device_class`, never the agent's claim); empty or None when no
    node measured it. The near-exact same-class set only when that class is the verifier's (CPU model
    or GPU, core count ignored) or a measured class pair covers it for this precision, and a same-class
    set exists for the precision; the cross-class set otherwise, and — fail closed — whenever the class
    was not measured, saying so. The native set (a bf16 claim re-executed in bf16) only for the
    models it was fitted on (its provenance's `models`): how far honest bf16 decoding drifts from a
    bf16 prefill is the model's own (poi-lm's set rejected 49 of 60 honest gpt2-small runs)."""
    prover = numerics_class(prover_device) if prover_device else ""
    verifier = numerics_class(verifier_class)
    pair = f"{prover or UNMEASURED} -> {verifier}"

    def chosen(
        strict: bool, reason: str, text: str = pair, provenance: dict[str, Any] | None = None
    ) -> ToleranceChoice:
        tol = thresholds.for_precision(precision, same_class=strict)
        kind = SAME if strict else CROSS
        return ToleranceChoice(tol, kind, text, f"{kind} tolerance: {reason}", bool(prover), provenance or {})

    def with_replay(choice: ToleranceChoice) -> ToleranceChoice:
        """A same-class choice gains the model's decode-replay set for the final verdict where one is
        fitted for this precision and model and the fp32 same-class set exists (an answer served at
        fp32); unchanged otherwise."""
        fitted = thresholds.replay.get(precision, {}).get(model_id)
        if fitted is None or "fp32" not in thresholds.same_class:
            return choice
        return replace(
            choice,
            reason=f"{choice.reason}; final verdict by a {precision} decode replay ({REPLAY} set)",
            replay=fitted,
            replay_precision=precision,
            served_fp32=thresholds.same_class["fp32"],
            replay_provenance=thresholds.replay_provenance.get(precision, {}),
        )

    if not prover:
        return chosen(False, "the prover's device class was not measured by a Maxwell node")
    measured = None if prover == verifier else thresholds.measured_pair(prover, verifier, precision)
    if prover != verifier and measured is None:
        return chosen(False, "the node measured the prover on another class than the verifier's")
    if precision not in thresholds.same_class:
        return chosen(False, f"no same-class set is calibrated for {precision}")
    native_for = thresholds.native_provenance.get(precision, {}).get("models", [])
    if measured is None and model_id in native_for and "fp32" in thresholds.same_class:
        return with_replay(
            ToleranceChoice(
                thresholds.for_precision("fp32", same_class=True),
                NATIVE,
                pair,
                f"{NATIVE} tolerance: the node measured the prover on the verifier's class; re-executed "
                f"in {precision} on this class (or at fp32, near-exact, for an answer served at fp32)",
                True,
                thresholds.native_provenance.get(precision, {}),
                thresholds.native[precision],
                precision,
            )
        )
    if measured is None:
        return with_replay(chosen(True, "the node measured the prover on the verifier's class"))
    source = measured.provenance.get("source", "class_pairs.json")
    text = pair + " (measured pair)"
    return chosen(True, f"a measured class pair for {precision} ({source})", text, measured.provenance)
