"""L4 for engine receipts (receipt v4, issue 27): Maxwell re-executes the claimed model on prompt +
output (one prefill, its own float32 reference weights) and checks what an unmodified serving
engine returned. `AuditLayer.decide` sends every receipt with an `engine` object here.

Checks, in order:
1. `choice`     greedy decoding: every token is the model's argmax within the calibrated tie gap
                (log-prob units); sampled: a likelihood test of the chosen tokens under the model at
                the lease's temperature and top-k (a foreign engine's seeded sampler cannot be
                replayed): the z-score of their log-likelihood must not fall below the calibrated bound,
                and no token may lie outside the top-k. An answer that ended early (`finish: stop`)
                must end where the model's end-of-sequence token is the choice (greedy) or is scored
                with the rest (sampled);
2. `logprobs`   (fp_kind `logprobs`) every returned log-probability, the chosen token's and the
                top-k's, within the calibrated tolerance of the engine and precision of Maxwell's
                own, and every returned top id really among the model's top-k.

What this cannot catch that SDK receipts can (docs/receipt.md, "Engine receipts"): no hidden-state
fingerprints, so a cheat that returns the same tokens and log-probs from other work (a cache of
the same answer at the same nonce-free greedy prompt) is not told apart; no layer root or trace (L3
cannot open anything); sampled output is judged only statistically, and token-only receipts have
no log-probs at all.

Tolerances: `maxwell_poi/data/engine_tolerance.json`, fitted by `bench/engines/run.py` on half the
honest runs and checked on the other half. An engine or precision without a calibrated entry is
judged by the loosest entry and ends at best `warning`, saying so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..protocol.engine import EngineClaim
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims
from ..registry.forward import prefill
from ..registry.models import LoadedModel
from .appraisal import Appraisal, Outcome, failed, passed, warned

if TYPE_CHECKING:
    from .audit import AuditLayer

TOLERANCE_FILE = "engine_tolerance.json"


@dataclass(frozen=True)
class EngineTolerance:
    """One engine at one precision: `logprob_abs` (largest |engine - Maxwell| log-prob allowed),
    `tie_gap` (greedy: how far below the argmax a chosen token may be), and the likelihood bound."""

    logprob_abs: float
    tie_gap: float
    likelihood_z: float
    label: str  # "llama.cpp fp32 (calibrated)" or what it fell back to
    calibrated: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"logprob_abs": self.logprob_abs, "tie_gap": self.tie_gap, "likelihood_z": self.likelihood_z,
                "tolerance": self.label, "calibrated": self.calibrated}  # fmt: skip


@dataclass(frozen=True)
class EngineTolerances:
    engines: dict[str, dict[str, dict[str, float]]]
    likelihood_z: float
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None = None) -> EngineTolerances:
        text = (
            open(path, encoding="utf-8").read()  # noqa: SIM115
            if path
            else resources.files("maxwell_poi.data").joinpath(TOLERANCE_FILE).read_text(encoding="utf-8")
        )
        data = json.loads(text)
        return cls(data["engines"], float(data["likelihood_z"]), data.get("provenance", {}))

    def for_claim(self, engine: str, precision: str) -> EngineTolerance:
        entry = self.engines.get(engine, {}).get(precision)
        if entry is not None:
            return EngineTolerance(entry.get("logprob_abs", math.inf), entry["tie_gap"], self.likelihood_z,
                                   f"{engine} {precision} (calibrated)")  # fmt: skip
        every = [e for by in self.engines.values() for e in by.values()]
        return EngineTolerance(
            max(e.get("logprob_abs", 0.0) for e in every),
            max(e["tie_gap"] for e in every),
            self.likelihood_z,
            f"no calibrated tolerance for engine {engine!r} at {precision}: the loosest calibrated one",
            calibrated=False,
        )


@dataclass(frozen=True)
class EngineMeasurement:
    """What re-execution found, before any threshold (the calibration reads these)."""

    n: int
    gaps: np.ndarray  # per scored position: log-prob of the argmax minus the chosen token's
    z: float | None  # sampled: z-score of the chosen tokens' log-likelihood at the lease's temperature
    outside_top_k: int  # sampled: tokens below the top-k by more than the tie gap
    lp_err: np.ndarray  # per position: largest |engine - Maxwell| log-prob (NaN: none returned)
    rank_err: float  # largest shortfall of a returned "top" id below Maxwell's k-th best log-prob

    @property
    def max_gap(self) -> float:
        return float(self.gaps.max()) if len(self.gaps) else 0.0

    @property
    def max_lp_err(self) -> float:
        finite = self.lp_err[np.isfinite(self.lp_err)]
        return float(finite.max()) if len(finite) else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.n, "max_gap": self.max_gap, "z": self.z,
                "outside_top_k": self.outside_top_k, "max_logprob_err": self.max_lp_err,
                "rank_err": self.rank_err}  # fmt: skip


def measure_engine(
    lease: Lease, claims: ReceiptClaims, model: LoadedModel, tie_gap: float = 0.0
) -> EngineMeasurement:
    """Re-execute the claimed model on prompt + output (+ its eos, when the engine stopped)."""
    job, engine = lease.job, claims.engine
    assert isinstance(job, GenerateJob) and engine is not None
    prompt = model.encode_prompt(job.prompt)
    tokens = claims.tokens()
    eos = model.tokenizer.eos_token_id
    scored = tokens + ([int(eos)] if engine.finish == "stop" and eos is not None else [])
    _, logits = prefill(model, prompt, scored)
    logits = logits.double()
    logp = torch.log_softmax(logits, dim=-1)
    idx = torch.tensor(scored).unsqueeze(1)
    chosen = logp.gather(1, idx).squeeze(1)
    gaps = (logp.max(dim=1).values - chosen).numpy()
    z, outside = None, 0
    if engine.decoding == "sampled" and job.temperature > 0:
        z, outside = _likelihood(logits, idx, job.temperature, job.top_k, tie_gap)
    lp_err = np.full(len(tokens), np.nan)
    rank_err = 0.0
    if engine.fp_kind == "logprobs":
        width = claims.output.width
        values, ids = engine.values(), engine.top_ids(width)
        ref = logp[: len(tokens)].numpy()
        for pos, (vals, row) in enumerate(zip(values, ids, strict=True)):
            errs = [abs(vals[0] - ref[pos, tokens[pos]])]
            named = [(i, v) for i, v in zip(row, vals[1:], strict=True) if i is not None]
            errs += [abs(v - ref[pos, i]) for i, v in named]
            lp_err[pos] = max(errs) if all(math.isfinite(e) for e in errs) else math.inf
            if named:
                kth = np.partition(ref[pos], -engine.top)[-engine.top]
                rank_err = max(rank_err, max(float(kth - ref[pos, i]) for i, _ in named))
    return EngineMeasurement(len(scored), gaps, z, outside, lp_err, rank_err)


def _likelihood(
    logits: torch.Tensor, idx: torch.Tensor, temperature: float, top_k: int, tie_gap: float
) -> tuple[float, int]:
    """(z, tokens outside the top-k): the chosen tokens' log-likelihood under the model's sampling
    distribution at `temperature` (top-k restricted) against its mean and variance under that same
    distribution. Honest sampling gives z ~ N(0, 1); tokens from another distribution score lower."""
    scaled = logits / temperature
    vocab = scaled.shape[-1]
    outside = 0
    if top_k and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        chosen_logit = logits.gather(1, idx)
        outside = int((chosen_logit < kth - tie_gap).sum())
        keep = (logits >= kth) | (
            torch.arange(vocab).unsqueeze(0) == idx
        )  # the chosen within the edge counts
        scaled = scaled.masked_fill(~keep, -math.inf)
    logq = torch.log_softmax(scaled, dim=-1)
    q = logq.exp()
    plogp = torch.where(q > 0, q * logq, torch.zeros_like(q))
    mean = plogp.sum(-1)
    second = torch.where(q > 0, q * logq * logq, torch.zeros_like(q)).sum(-1)
    var = (second - mean * mean).clamp_min(0)
    ll = logq.gather(1, idx).squeeze(1)
    total_var = float(var.sum())
    z = float((ll.sum() - mean.sum()) / math.sqrt(total_var)) if total_var > 1e-12 else 0.0
    return z if math.isfinite(z) else -math.inf, outside


def judge(m: EngineMeasurement, tol: EngineTolerance, engine: EngineClaim, job: GenerateJob) -> str | None:
    """The first problem, naming expected vs got; None when everything is within tolerance."""
    if engine.decoding == "greedy" or job.temperature == 0:
        if m.max_gap > tol.tie_gap:
            bad = int((m.gaps > tol.tie_gap).sum())
            worst = int(m.gaps.argmax())
            where = "the end (eos)" if engine.finish == "stop" and worst == m.n - 1 else f"position {worst}"
            return (
                f"token choice: expected the claimed model's greedy choice at every position (log-prob "
                f"gap <= {tol.tie_gap:g}), got {bad}/{m.n} off, worst at {where} (gap {m.max_gap:.4g})"
            )
    else:
        if m.outside_top_k:
            return (
                f"token choice: expected every token among the lease's top-{job.top_k}, "
                f"got {m.outside_top_k} outside"
            )
        if m.z is not None and m.z < tol.likelihood_z:
            return (
                f"likelihood: expected the chosen tokens as likely as sampling from the claimed model at "
                f"temperature {job.temperature:g} gives (z >= {tol.likelihood_z:g}), got z = {m.z:.2f}"
            )
    if engine.fp_kind == "logprobs":
        if m.max_lp_err > tol.logprob_abs or not np.isfinite(m.lp_err).all():
            bad = int((~(m.lp_err <= tol.logprob_abs)).sum())
            return (
                f"log-probs: expected the engine's within {tol.logprob_abs:g} of the claimed model's, got "
                f"{bad}/{len(m.lp_err)} positions off (largest difference {m.max_lp_err:.4g})"
            )
        if m.rank_err > tol.logprob_abs:
            return (
                f"top log-probs: expected the returned ids among the claimed model's top-{engine.top}, got "
                f"one {m.rank_err:.4g} below its {engine.top}-th best"
            )
    return None


def audit_engine(layer: AuditLayer, ctx: Appraisal, tolerances: EngineTolerances | None = None) -> Outcome:
    """L4 on an engine receipt (called from AuditLayer.decide)."""
    assert ctx.receipt is not None
    claims, job = ctx.receipt.claims, ctx.lease.job
    engine = claims.engine
    assert engine is not None
    if not isinstance(job, GenerateJob):
        return failed("engine receipt: expected a generation lease")
    tol = (tolerances or _shipped()).for_claim(engine.name, ctx.lease.precision)
    m = measure_engine(ctx.lease, claims, layer.reference_model(ctx.lease.model_id), tol.tie_gap)
    details = {
        "engine": {"name": engine.name, "version": engine.version, "fp_kind": engine.fp_kind,
                   "decoding": engine.decoding, "finish": engine.finish},
        **m.as_dict(), **tol.as_dict(),
        "not_checked": NOT_CHECKED[engine.fp_kind],
    }  # fmt: skip
    problem = judge(m, tol, engine, job)
    used = f" [{tol.label}]"
    if problem:
        return failed(problem + used, 0.0, **details)
    how = (
        "greedy choice" if engine.decoding == "greedy" or job.temperature == 0 else f"likelihood z {m.z:.2f}"
    )
    lps = f"; log-probs within {m.max_lp_err:.3g}" if engine.fp_kind == "logprobs" else "; token-only receipt"
    greedy_for_sampled = (
        f"; the engine decoded greedily (the lease asked temperature {job.temperature:g})"
        if engine.decoding == "greedy" and job.temperature > 0
        else ""
    )
    ok = f"engine receipt ({engine.name}): {m.n} tokens by {how}{lps}{greedy_for_sampled}{used}"
    if not tol.calibrated:
        return warned(ok + "; not affirmed: this engine is not calibrated", 0.5, **details)
    return passed(ok, 1.0, **details)


NOT_CHECKED = {
    "logprobs": "no hidden-state fingerprints, layer root or trace (engine receipt)",
    "tokens": "no hidden-state fingerprints, layer root, trace or log-probs (token-only engine receipt)",
}

_cache: dict[str, EngineTolerances] = {}


def _shipped() -> EngineTolerances:
    if "shipped" not in _cache:
        _cache["shipped"] = EngineTolerances.load()
    return _cache["shipped"]


def stream_tie_gap(precision: str) -> tuple[float, str]:
    """The tie gap a running check of an engine agent's greedy tokens may cut at before the receipt
    names its engine (verifier.engine_stream): the loosest calibrated one, so it never cuts where
    the final check, with the receipt's engine, would pass."""
    loosest = _shipped().for_claim("", precision)
    return loosest.tie_gap, "the loosest calibrated engine's"
