"""L4 audit: Maxwell re-executes the claimed model on its own reference weights, one prefill pass.

Checks, in order:
1. generation: `token_choice`   every output token is the seeded sampler's choice under the
   model's logits (near-ties within the calibrated logit allowance tolerated);
   embeddings: `embedding_match` every embedding within the calibrated distance of the reference;
2. `fingerprints_match`          the committed top-k values match chunk by chunk within the
   claimed precision's tolerance.
The tolerance set is chosen by hardware-class pair, by the one rule every audit path shares
(`thresholds.choose_tolerance`): same-class (near-exact) only when the node's own evidence says the
prover ran on the verifier's kind of device; cross-class otherwise, including every appraisal without
Maxwell-side evidence, whose reason then says the class was not measured.
`measure_generation` / `measure_embedding` return what re-execution found before any threshold
(bench/audit/calibrate.py reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..observer.host import numerics_class, this_device
from ..protocol.fingerprint import ChunkComparison, chunk_spans
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims
from ..protocol.result import LayerName
from ..protocol.schedule import DecodeSchedule, schedule_of
from ..registry.fingerprint import compare_chunk
from ..registry.forward import embed_one, prefill, replay_decode
from ..registry.models import LoadedModel, Registry
from ..registry.sampling import SeededSampler
from .appraisal import Appraisal, Finding, Outcome, TimedLayer, failed, passed, skipped
from .thresholds import Thresholds, Tolerance, ToleranceChoice, choose_tolerance


class AuditLayer(TimedLayer):
    """L4: re-execution of the claimed model; see the module docstring for the checks."""

    name = LayerName.AUDIT

    def __init__(self, registry: Registry, thresholds: Thresholds | None = None, device: str = "cpu") -> None:
        self.registry = registry
        self.thresholds = thresholds or Thresholds.load()
        self.device = device
        self._on_device: dict[str, LoadedModel] = {}

    def reference_model(self, model_id: str, precision: str = "fp32") -> LoadedModel:
        """Maxwell's reference copy on the audit device: float32, or in the claimed precision for a
        native audit (converted from the float32 copy once, then kept)."""
        model = self.registry.load_in(model_id, precision)
        if self.device == "cpu":
            return model
        key = f"{model_id}@{precision}"
        if key not in self._on_device:
            self._on_device[key] = model.copied_to(self.device)
        return self._on_device[key]

    def verifier_class(self) -> str:
        """The numerics class of the audit device (a CUDA audit device is named by its card)."""
        if self.device == "cpu":
            return numerics_class(this_device())
        import torch

        return f"cuda:{torch.cuda.get_device_name(self.device)}"

    def tolerance(self, precision: str, prover_device: str | None, model_id: str = "") -> ToleranceChoice:
        """The tolerance set for a claim at `precision` whose prover Maxwell's node measured on
        `prover_device` ("" or None: not measured), by the one rule (thresholds.choose_tolerance)."""
        return choose_tolerance(self.thresholds, precision, prover_device, self.verifier_class(), model_id)

    def tolerance_for(self, ctx: Appraisal) -> ToleranceChoice:
        """The prover's class is the node's measurement (its evidence), never the receipt's claim."""
        measured = ctx.evidence.device_class if ctx.evidence is not None else ""
        return self.tolerance(ctx.lease.precision, measured, ctx.lease.model_id)

    def tolerance_pair(self, ctx: Appraisal) -> tuple[bool, str]:
        """(same-class tolerance?, 'prover class -> verifier class'): `tolerance_for` in brief."""
        choice = self.tolerance_for(ctx)
        return choice.strict, choice.class_pair

    def decide(self, ctx: Appraisal) -> Outcome:
        if ctx.receipt is None:
            return skipped("not run: receipt failed integrity")
        if ctx.receipt.claims.engine is not None:  # an engine receipt (v4): verifier.engine_audit
            from .engine_audit import audit_engine

            return audit_engine(self, ctx)
        try:
            return self._reexecute(ctx)
        except ValueError as exc:  # committed values the right size but unreadable (e.g. modulus 0)
            return failed(f"fingerprints: expected committed values the reference can read back, got {exc}")

    def _reexecute(self, ctx: Appraisal) -> Outcome:
        choice = self.tolerance_for(ctx)
        used = " " + choice.label()  # the verdict names the set and the pair it was chosen for
        assert ctx.receipt is not None  # decide() skips a receipt that failed integrity
        lease, claims = ctx.lease, ctx.receipt.claims
        if choice.replay is not None and isinstance(lease.job, GenerateJob):
            judged = self.replayed(lease, claims, choice)
            if judged.problem:
                return failed(judged.problem + used, judged.worst_close, **judged.details)
            return passed(judged.ok + used, judged.worst_close, **judged.details)
        fp32 = self.reference_model(ctx.lease.model_id)
        if choice.native is None:
            judged = self._judge(lease, claims, fp32, choice.tolerance, choice)
            if judged.problem:
                return failed(judged.problem + used, judged.worst_close, **judged.details)
            return passed(
                f"{judged.ok} within {ctx.lease.precision} tolerance{used}",
                judged.worst_close,
                **judged.details,
            )
        # native: the claimed precision's own kernels on this class first, then fp32 (an upgrade)
        native = self._judge(
            lease,
            claims,
            self.reference_model(lease.model_id, choice.native_precision),
            choice.native,
            choice,
        )
        if not native.problem:
            return passed(
                f"{native.ok} within the native {choice.native_precision} tolerance{used}",
                native.worst_close,
                **native.details,
            )
        upgraded = self._judge(lease, claims, fp32, choice.tolerance, choice)
        if not upgraded.problem:
            return passed(
                f"{upgraded.ok} within the fp32 tolerance: served at fp32 (re-executed in "
                f"{choice.native_precision}: {native.problem}){used}",
                upgraded.worst_close,
                **upgraded.details,
            )
        return failed(
            f"re-executed in {choice.native_precision}: {native.problem}; at fp32: {upgraded.problem}{used}",
            native.worst_close,
            **native.details,
        )

    def replayed(self, lease: Lease, claims: ReceiptClaims, choice: ToleranceChoice) -> Judged:
        """The final verdict on a generation claim whose choice carries a decode-replay set
        (thresholds.REPLAY): the answer re-executed the way it was decoded, in the claimed precision
        on this class, within the near-exact replay set; else at fp32 (a prefill) within the
        same-class fp32 set, an answer served at fp32. Shared by every audit path that judges a whole
        receipt (this layer, the gateway's streaming audit at intake)."""
        assert choice.replay is not None and choice.served_fp32 is not None
        precision = choice.replay_precision
        try:
            prompt_len = len(self.registry.encode_prompt(lease.model_id, lease.job.prompt))  # type: ignore[union-attr]
            schedule = schedule_of(claims.runtime, len(claims.tokens()), prompt_len)
        except ValueError as exc:
            native = Judged(str(exc), "", 0.0, choice.details())
        else:
            model = self.reference_model(lease.model_id, precision)
            native = self._judge(lease, claims, model, choice.replay, choice, schedule)
            if not native.problem:
                how = (
                    f"in a batch of {schedule.batch}, {schedule.pad} columns of padding"
                    if schedule.batched
                    else "the declared passes"
                    if schedule.declared
                    else "one token per pass"
                )
                ok = f"{native.ok} within the {precision} decode-replay tolerance ({how})"
                return replace(native, ok=ok)
        upgraded = self._judge(
            lease, claims, self.reference_model(lease.model_id), choice.served_fp32, choice
        )
        if not upgraded.problem:
            return replace(
                upgraded,
                ok=f"{upgraded.ok} within the fp32 tolerance: served at fp32 (a {precision} decode "
                f"replay: {native.problem})",
            )
        problem = f"a {precision} decode replay: {native.problem}; at fp32: {upgraded.problem}"
        return replace(native, problem=problem)

    def _judge(
        self,
        lease: Lease,
        claims: ReceiptClaims,
        model: LoadedModel,
        tol: Tolerance,
        choice: ToleranceChoice,
        schedule: DecodeSchedule | None = None,
    ) -> Judged:
        """Re-execute on `model` (a prefill, or a decode replay of `schedule`) and apply `tol`: the
        first problem, or what matched."""
        tolerance = choice.details()
        if isinstance(lease.job, GenerateJob):
            m = measure_generation(lease, claims, model, tol.logit_tol, schedule)
            details = {"max_token_gap": m.max_gap, "token_gap_tolerance": tol.token_gap, **tolerance}
            first = token_choice(m, tol)
            ok = f"{len(m.gaps)} tokens match the seeded choice; {len(m.chunks)} fingerprint chunks"
        else:
            m = measure_embedding(lease, claims, model)
            details = {"max_embedding_diff": m.max_diff, **tolerance}
            first = embedding_match(m, tol)
            ok = f"{len(m.chunks)} embeddings and fingerprints match the reference,"
        details["chunks"] = [c.as_dict() for c in m.chunks]
        problem = first or fingerprints_match(m.chunks, tol)
        return Judged(problem.reason if problem else "", ok, m.worst_close, details)


@dataclass(frozen=True)
class Judged:
    """One re-execution judged against one tolerance: `problem` ("" when none) or `ok`'s words."""

    problem: str
    ok: str
    worst_close: float
    details: dict


def token_choice(m: AuditMeasurement, tol: Tolerance) -> Finding | None:
    if m.max_gap <= tol.token_gap:
        return None
    bad = int((m.gaps > tol.token_gap).sum())
    worst = int(m.gaps.argmax())
    return Finding(
        f"token choice: expected the claimed model's seeded choice at every position "
        f"(score gap <= {tol.token_gap:g}), got {bad}/{len(m.gaps)} off, worst at "
        f"position {worst} (gap {m.max_gap:.4g})"
    )


def embedding_match(m: AuditMeasurement, tol: Tolerance) -> Finding | None:
    if m.max_diff <= tol.embed_max_abs:  # NaN fails this comparison, so it is caught too
        return None
    i = int(np.nanargmax(m.diffs)) if np.isfinite(m.diffs).any() else 0
    return Finding(
        f"embedding: expected within {tol.embed_max_abs:g} of the reference, got max "
        f"difference {m.max_diff:.4g} on text {i}"
    )


def fingerprints_match(comparisons: list[ChunkComparison], tol: Tolerance) -> Finding | None:
    for c in comparisons:
        if c.close_fraction < tol.min_close or c.median_rel_error > tol.max_median_rel:
            return Finding(
                f"fingerprint chunk at positions {c.positions[0]}-{c.positions[1]}: expected "
                f">= {tol.min_close:.0%} of top-k values close and median error <= "
                f"{tol.max_median_rel:g}, got {c.close_fraction:.0%} close, median error "
                f"{c.median_rel_error:.3g}"
            )
    return None


@dataclass(frozen=True)
class AuditMeasurement:
    """What re-execution found, before any threshold is applied (calibration reads these)."""

    chunks: list[ChunkComparison]
    gaps: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per new token (generation)
    diffs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per text (embedding)

    @property
    def max_gap(self) -> float:
        return float(self.gaps.max()) if len(self.gaps) else 0.0

    @property
    def max_diff(self) -> float:
        return float(self.diffs.max()) if len(self.diffs) else 0.0

    @property
    def worst_close(self) -> float:
        return min(c.close_fraction for c in self.chunks)

    @property
    def worst_median_rel(self) -> float:
        return max(c.median_rel_error for c in self.chunks)


def _split(data: bytes, parts: int) -> list[bytes]:
    size = len(data) // parts
    return [data[i * size : (i + 1) * size] for i in range(parts)]


def measure_generation(
    lease: Lease,
    claims: ReceiptClaims,
    model: LoadedModel,
    edge_tol: float = 0.0,
    schedule: DecodeSchedule | None = None,
) -> AuditMeasurement:
    """Re-execute the claimed model on prompt + output and compare, before any threshold: one
    prefill, or (`schedule`) a decode replay of its passes and batch (protocol.schedule).
    `edge_tol` is the logit allowance for the prover's rounding (see SeededSampler.score_gaps)."""
    job = lease.job
    assert isinstance(job, GenerateJob)
    prompt = model.encode_prompt(job.prompt)
    tokens = claims.tokens()
    if schedule is None:
        hidden, logits = prefill(model, prompt, tokens)
    else:
        hidden, logits = replay_decode(model, prompt, tokens, schedule.passes, schedule.batch, schedule.pad)
    sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
    gaps = sampler.score_gaps(logits, tokens, edge_tol).numpy()
    spans = chunk_spans(len(prompt), len(tokens), job.chunk)
    chunks = [
        compare_chunk(data, hidden[s:e], job.fingerprint_k, (s, e))
        for data, (s, e) in zip(_split(claims.fingerprint_bytes(), len(spans)), spans, strict=True)
    ]
    return AuditMeasurement(chunks=chunks, gaps=gaps)


def measure_embedding(lease: Lease, claims: ReceiptClaims, model: LoadedModel) -> AuditMeasurement:
    job = lease.job
    assert isinstance(job, EmbedJob)
    claimed = claims.embedding()
    chunks, diffs = [], []
    for i, (text, data) in enumerate(
        zip(job.texts, _split(claims.fingerprint_bytes(), len(job.texts)), strict=True)
    ):
        hidden, emb = embed_one(model, text)
        diffs.append(float(np.max(np.abs(emb - claimed[i]))))
        chunks.append(compare_chunk(data, hidden, job.fingerprint_k, (i, i + 1)))
    return AuditMeasurement(chunks=chunks, diffs=np.asarray(diffs))
