"""Verification layers. Each has one job: `appraise(ctx) -> LayerResult`, with a reason that
names what was expected and what came."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from securesystemslib.exceptions import VerificationError

from ..observer.evidence import ChannelEvidence
from ..protocol.encoding import sha256_hex
from ..protocol.errors import ReceiptFormatError, UnknownAgentError, UnknownModelError
from ..protocol.fingerprint import ChunkComparison, chunk_size_bytes, chunk_spans, compare_chunk
from ..protocol.keys import Keyring
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.receipt import OpenedReceipt, ReceiptClaims, open_receipt
from ..protocol.result import LayerResult, Status
from ..protocol.sampling import SeededSampler
from ..prover.inference import embed_one, prefill
from ..registry.models import LoadedModel, ReferenceValues, Registry
from .thresholds import Thresholds, Tolerance


@dataclass
class Appraisal:
    """Everything the layers look at for one receipt. L0 fills in `receipt` once it parses."""

    lease: Lease
    raw: bytes
    evidence: ChannelEvidence | None = None
    received_at: float = field(default_factory=time.time)
    receipt: OpenedReceipt | None = None


class Layer(Protocol):
    name: str

    def appraise(self, ctx: Appraisal) -> LayerResult: ...


def max_receipt_bytes(lease: Lease, hidden: int) -> int:
    """Size limit for a lease's receipt: generous for honest receipts, fatal for floods."""
    job = lease.job
    if isinstance(job, GenerateJob):
        chunks = 1 + -(-job.max_new_tokens // job.chunk)
        body = job.max_new_tokens * 4 + chunks * chunk_size_bytes(job.topk)
    else:
        body = len(job.texts) * (hidden * 4 + chunk_size_bytes(job.topk))
    return 16384 + 2 * body * 2  # x2 double base64 (payload + blob), x2 slack


def _fail(layer: str, reason: str, start: float, **details: object) -> LayerResult:
    return LayerResult(layer, Status.FAIL, reason, 0.0, time.perf_counter() - start, dict(details))


class IntegrityLayer:
    """L0: shape, size, signature by the leased agent's enrolled key, and every binding to the
    lease (id, nonce, agent, model and weights digest, precision, input digest, deadline)."""

    name = "L0-integrity"

    def __init__(self, registry: Registry, keyring: Keyring) -> None:
        self.registry = registry
        self.keyring = keyring
        self._settled: set[str] = set()

    def appraise(self, ctx: Appraisal) -> LayerResult:
        start = time.perf_counter()
        lease = ctx.lease
        try:
            ref = self.registry.reference(lease.model_id)  # L0 never needs the model itself
            key = self.keyring.key_for(lease.agent_id)
        except (UnknownModelError, UnknownAgentError) as exc:
            return _fail(self.name, str(exc), start)
        limit = max_receipt_bytes(lease, ref.hidden)
        if ctx.evidence and ctx.evidence.receipt_bytes > limit:  # Maxwell counted the whole flood
            return _fail(
                self.name,
                f"receipt: expected at most {limit} bytes for this lease, got {ctx.evidence.receipt_bytes}",
                start,
            )
        try:
            receipt = open_receipt(ctx.raw, limit)
        except ReceiptFormatError as exc:
            return _fail(self.name, str(exc), start)
        try:
            receipt.envelope.verify([key], 1)
        except VerificationError:
            signer = self.keyring.agent_for_keyid(receipt.keyid)
            who = f"enrolled agent {signer!r}" if signer else "a key not in the keyring"
            return _fail(
                self.name,
                f"signature: expected a valid signature by {lease.agent_id!r} "
                f"(keyid {key.keyid[:16]}…), got one claiming keyid {receipt.keyid[:16]}… "
                f"({who}) that does not verify under it",
                start,
            )
        problem = self._binding_problem(ctx, receipt, ref)
        if problem:
            return _fail(self.name, problem, start)
        if lease.lease_id in self._settled:
            return _fail(self.name, f"lease {lease.lease_id} was already settled; replay refused", start)
        self._settled.add(lease.lease_id)
        ctx.receipt = receipt
        return LayerResult(
            self.name,
            Status.PASS,
            "signed by the leased agent; bound to lease, nonce, model, input",
            1.0,
            time.perf_counter() - start,
            {"receipt_bytes": receipt.size},
        )

    def _binding_problem(self, ctx: Appraisal, receipt: OpenedReceipt, ref: ReferenceValues) -> str | None:
        lease, c = ctx.lease, receipt.claims
        expected = [
            ("lease id", lease.lease_id, c.lease),
            ("nonce", lease.nonce, c.nonce),
            ("agent", lease.agent_id, c.agent),
            ("model", lease.model_id, c.model),
            ("weights digest", ref.weights_digest, c.weights),
            ("precision", lease.precision, c.precision),
            ("input sha256", sha256_hex(lease.input_bytes()), c.input),
        ]
        for what, want, got in expected:
            if want != got:
                return f"{what}: expected {want}, got {got}"
        arrived = ctx.evidence.finished_at if ctx.evidence else ctx.received_at
        if arrived > lease.deadline:
            return f"deadline: expected by {lease.deadline:.3f}, arrived {arrived:.3f}"
        return _output_shape_problem(lease, receipt, ref, self.registry)


def _output_shape_problem(
    lease: Lease, receipt: OpenedReceipt, ref: ReferenceValues, registry: Registry
) -> str | None:
    c, job = receipt.claims, lease.job
    fp_len = len(c.fingerprint_bytes())
    if c.fp.k != job.topk:
        return f"fingerprint k: expected {job.topk}, got {c.fp.k}"
    if isinstance(job, GenerateJob):
        tokens = c.tokens()
        if c.output.tokens is None or len(tokens) != job.max_new_tokens:
            return f"output tokens: expected {job.max_new_tokens}, got {len(tokens)}"
        if max(tokens) >= ref.vocab:
            return f"output tokens: expected ids < {ref.vocab}, got {max(tokens)}"
        if c.fp.chunk != job.chunk:
            return f"fingerprint chunk: expected {job.chunk}, got {c.fp.chunk}"
        prompt_len = len(registry.encode_prompt(lease.model_id, job.prompt))
        chunks = len(chunk_spans(prompt_len, job.max_new_tokens, job.chunk))
    else:
        want = [len(job.texts), ref.hidden]
        if c.output.shape != want or c.output.embedding is None:
            return f"embedding shape: expected {want}, got {c.output.shape}"
        chunks = len(job.texts)
    if fp_len != chunks * chunk_size_bytes(job.topk):
        return f"fingerprint bytes: expected {chunks * chunk_size_bytes(job.topk)}, got {fp_len}"
    return None


class AuditLayer:
    """L4: Maxwell re-executes the claimed model on its own reference weights (one prefill pass)
    and checks (a) every output token is the one the model's logits and the seeded sampler
    choose, within a near-tie tolerance; (b) the committed top-k values match chunk by chunk."""

    name = "L4-audit"

    def __init__(self, registry: Registry, thresholds: Thresholds | None = None, device: str = "cpu") -> None:
        self.registry = registry
        self.thresholds = thresholds or Thresholds.load()
        self.device = device
        self._on_device: dict[str, LoadedModel] = {}

    def reference_model(self, model_id: str) -> LoadedModel:
        """Maxwell's float32 reference copy, on the audit device."""
        model = self.registry.load(model_id)
        if self.device == "cpu":
            return model
        if model_id not in self._on_device:
            self._on_device[model_id] = model.copied_to(self.device)
        return self._on_device[model_id]

    def appraise(self, ctx: Appraisal) -> LayerResult:
        start = time.perf_counter()
        if ctx.receipt is None:
            return LayerResult(self.name, Status.SKIPPED, "not run: receipt failed integrity")
        model = self.reference_model(ctx.lease.model_id)
        tol = self.thresholds.for_precision(ctx.lease.precision)
        if isinstance(ctx.lease.job, GenerateJob):
            status, reason, details = self._generation(ctx, model, tol)
        else:
            status, reason, details = self._embedding(ctx, model, tol)
        score = details.pop("score", None)
        return LayerResult(self.name, status, reason, score, time.perf_counter() - start, details)

    def _generation(self, ctx: Appraisal, model: LoadedModel, tol: Tolerance) -> tuple[Status, str, dict]:
        m = measure_generation(ctx.lease, ctx.receipt.claims, model, tol.logit_tol)
        details: dict = {
            "max_token_gap": m.max_gap,
            "token_gap_tolerance": tol.token_gap,
            "chunks": [c.as_dict() for c in m.chunks],
            "score": m.worst_close,
        }
        if m.max_gap > tol.token_gap:
            bad = int((m.gaps > tol.token_gap).sum())
            worst = int(m.gaps.argmax())
            return (
                Status.FAIL,
                f"token choice: expected the claimed model's seeded choice at every position "
                f"(score gap <= {tol.token_gap:g}), got {bad}/{len(m.gaps)} off, worst at "
                f"position {worst} (gap {m.max_gap:.4g})",
                details,
            )
        bad_chunk = _worst_chunk(m.chunks, tol)
        if bad_chunk:
            return Status.FAIL, bad_chunk, details
        return (
            Status.PASS,
            f"{len(m.gaps)} tokens match the seeded choice; {len(m.chunks)} fingerprint chunks "
            f"within {ctx.lease.precision} tolerance",
            details,
        )

    def _embedding(self, ctx: Appraisal, model: LoadedModel, tol: Tolerance) -> tuple[Status, str, dict]:
        m = measure_embedding(ctx.lease, ctx.receipt.claims, model)
        details: dict = {
            "max_embedding_diff": m.max_diff,
            "chunks": [c.as_dict() for c in m.chunks],
            "score": m.worst_close,
        }
        if not m.max_diff <= tol.embed_max_abs:  # also catches NaN
            i = int(np.nanargmax(m.diffs)) if np.isfinite(m.diffs).any() else 0
            return (
                Status.FAIL,
                f"embedding: expected within {tol.embed_max_abs:g} of the reference, got max "
                f"difference {m.max_diff:.4g} on text {i}",
                details,
            )
        bad_chunk = _worst_chunk(m.chunks, tol)
        if bad_chunk:
            return Status.FAIL, bad_chunk, details
        return Status.PASS, f"{len(m.chunks)} embeddings and fingerprints match the reference", details


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
    lease: Lease, claims: ReceiptClaims, model: LoadedModel, edge_tol: float = 0.0
) -> AuditMeasurement:
    """Re-execute the claimed model on prompt + output and compare, before any threshold.
    `edge_tol` is the logit allowance for the prover's rounding (see SeededSampler.score_gaps)."""
    job = lease.job
    assert isinstance(job, GenerateJob)
    prompt = model.encode_prompt(job.prompt)
    tokens = claims.tokens()
    hidden, logits = prefill(model, prompt, tokens)
    sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
    gaps = sampler.score_gaps(logits, tokens, edge_tol).numpy()
    spans = chunk_spans(len(prompt), len(tokens), job.chunk)
    chunks = [
        compare_chunk(data, hidden[s:e], job.topk, (s, e))
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
        chunks.append(compare_chunk(data, hidden, job.topk, (i, i + 1)))
    return AuditMeasurement(chunks=chunks, diffs=np.asarray(diffs))


def _worst_chunk(comparisons: list[ChunkComparison], tol: Tolerance) -> str | None:
    for c in comparisons:
        if c.close_fraction < tol.min_close or c.median_rel_error > tol.max_median_rel:
            return (
                f"fingerprint chunk at positions {c.positions[0]}-{c.positions[1]}: expected "
                f">= {tol.min_close:.0%} of top-k values close and median error <= "
                f"{tol.max_median_rel:g}, got {c.close_fraction:.0%} close, median error "
                f"{c.median_rel_error:.3g}"
            )
    return None
