"""L0 integrity: is this a well-formed receipt, signed by the leased agent, for this lease?

Checks, in order (each refusal names what was expected and what came):
1. `known_parties`   the leased model is registered and the agent enrolled;
2. `flood`           Maxwell counted no more receipt bytes on the channel than the lease allows;
3. `shape`           DSSE envelope around an in-toto Statement with valid claims (protocol.receipt);
4. `signature`       one Ed25519 signature by the leased agent's enrolled key;
5. `bindings`        lease id, nonce, agent, model, weights digest, precision, input digest;
6. `deadline`        the receipt arrived before the lease's deadline;
7. `output_shape`    the output (token width, ids, embedding shape) and fingerprints (k, chunk,
                     bytes) have the sizes the lease and the model imply;
8. `not_settled`     the lease was not settled before (replay).
"""

from __future__ import annotations

from securesystemslib.exceptions import VerificationError
from securesystemslib.signer import SSlibKey

from ..protocol.encoding import sha256_hex, token_width
from ..protocol.engine import engine_shape_problem
from ..protocol.errors import ReceiptFormatError, UnknownAgentError, UnknownModelError
from ..protocol.keys import Keyring
from ..protocol.lease import GenerateJob
from ..protocol.receipt import OpenedReceipt, fingerprint_size, max_receipt_bytes, open_receipt
from ..protocol.result import LayerName
from ..registry.models import ReferenceValues, Registry
from .appraisal import Appraisal, Finding, Outcome, TimedLayer, failed, passed


class IntegrityLayer(TimedLayer):
    """L0: shape, size, signature and every binding to the lease; a lease is settled once."""

    name = LayerName.INTEGRITY

    def __init__(self, registry: Registry, keyring: Keyring, *, remember_settled: bool = True) -> None:
        """`remember_settled=False`: replay is refused by someone else — the control plane keeps
        settled leases in its database, which survives restarts and a failed transaction (a lease
        remembered here before its settlement rolled back would refuse the honest retry)."""
        self.registry = registry
        self.keyring = keyring
        self.remember_settled = remember_settled
        self._settled: set[str] = set()

    def decide(self, ctx: Appraisal) -> Outcome:
        lease = ctx.lease
        try:
            ref, key = known_parties(self.registry, self.keyring, ctx)
        except (UnknownModelError, UnknownAgentError) as exc:
            return failed(str(exc))
        limit = max_receipt_bytes(lease, ref.hidden)
        problem = flood(ctx, limit)
        if problem:
            return failed(problem.reason)
        try:
            receipt = open_receipt(ctx.raw, limit)
        except ReceiptFormatError as exc:
            return failed(str(exc))
        for problem in (
            kind_size(receipt, max_receipt_bytes(lease, ref.hidden, receipt.claims.engine is not None)),
            signature(self.keyring, key, ctx, receipt),
            bindings(ctx, receipt, ref),
            deadline(ctx),
            output_shape(ctx, receipt, ref),
            not_settled(self._settled, ctx),
        ):
            if problem:
                return failed(problem.reason)
        if self.remember_settled:
            self._settled.add(lease.lease_id)
        ctx.receipt = receipt
        return passed(
            "signed by the leased agent; bound to lease, nonce, model, input", receipt_bytes=receipt.size
        )


def known_parties(registry: Registry, keyring: Keyring, ctx: Appraisal) -> tuple[ReferenceValues, SSlibKey]:
    """Reference values of the leased model (L0 never builds the model) and the agent's key."""
    return registry.reference(ctx.lease.model_id), keyring.key_for(ctx.lease.agent_id)


def flood(ctx: Appraisal, limit: int) -> Finding | None:
    counted = ctx.evidence.receipt_bytes if ctx.evidence else 0  # Maxwell counted the whole flood
    if counted > limit:
        return Finding(f"receipt: expected at most {limit} bytes for this lease, got {counted}")
    return None


def kind_size(receipt: OpenedReceipt, limit: int) -> Finding | None:
    """The channel allowed the larger of the SDK and engine bounds; the receipt's own kind has its own."""
    if receipt.size <= limit:
        return None
    kind = "an engine" if receipt.claims.engine is not None else "an SDK"
    return Finding(
        f"receipt: expected at most {limit} bytes for {kind} receipt of this lease, got {receipt.size}"
    )


def signature(keyring: Keyring, key: SSlibKey, ctx: Appraisal, receipt: OpenedReceipt) -> Finding | None:
    try:
        receipt.envelope.verify([key], 1)
    except VerificationError:
        signer = keyring.agent_for_keyid(receipt.keyid)
        who = f"enrolled agent {signer!r}" if signer else "a key not in the keyring"
        return Finding(
            f"signature: expected a valid signature by {ctx.lease.agent_id!r} "
            f"(keyid {key.keyid[:16]}…), got one claiming keyid {receipt.keyid[:16]}… "
            f"({who}) that does not verify under it"
        )
    return None


def bindings(ctx: Appraisal, receipt: OpenedReceipt, ref: ReferenceValues) -> Finding | None:
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
            return Finding(f"{what}: expected {want}, got {got}")
    return None


def deadline(ctx: Appraisal) -> Finding | None:
    arrived = ctx.evidence.finished_at if ctx.evidence else ctx.received_at
    if arrived > ctx.lease.deadline:
        return Finding(f"deadline: expected by {ctx.lease.deadline:.3f}, arrived {arrived:.3f}")
    return None


def output_shape(ctx: Appraisal, receipt: OpenedReceipt, ref: ReferenceValues) -> Finding | None:
    lease = ctx.lease
    c, job = receipt.claims, lease.job
    if c.engine is not None:  # an engine receipt (v4): tokens and log-probs, no activations
        if not isinstance(job, GenerateJob):
            return Finding("engine receipt: expected a generation lease, got an embedding lease")
        if c.output.tokens is None or c.output.width != token_width(ref.vocab):
            want = token_width(ref.vocab)
            return Finding(f"output token width: expected {want} bytes, got {c.output.width}")
        why = engine_shape_problem(
            c.engine, c.tokens(), job.max_new_tokens, job.temperature, c.output.width, ref.vocab
        )
        return Finding(why) if why else None
    assert c.fp is not None  # the claims' validator: an SDK receipt has fingerprints
    if c.fp.k != job.fingerprint_k:
        return Finding(f"fingerprint k: expected {job.fingerprint_k}, got {c.fp.k}")
    if isinstance(job, GenerateJob):
        tokens = c.tokens()
        if c.output.tokens is None or len(tokens) != job.max_new_tokens:
            return Finding(f"output tokens: expected {job.max_new_tokens}, got {len(tokens)}")
        width = token_width(ref.vocab)
        if c.output.width != width:
            return Finding(f"output token width: expected {width} bytes, got {c.output.width}")
        if max(tokens) >= ref.vocab:
            return Finding(f"output tokens: expected ids < {ref.vocab}, got {max(tokens)}")
        if c.fp.chunk != job.chunk:
            return Finding(f"fingerprint chunk: expected {job.chunk}, got {c.fp.chunk}")
    else:
        want = [len(job.texts), ref.hidden]
        if c.output.shape != want or c.output.embedding is None:
            return Finding(f"embedding shape: expected {want}, got {c.output.shape}")
        if c.fp.chunk != 1:
            return Finding(f"fingerprint chunk: expected 1 (one chunk per text), got {c.fp.chunk}")
    fp_len, want_len = len(c.fingerprint_bytes()), fingerprint_size(lease)
    if fp_len != want_len:
        return Finding(f"fingerprint bytes: expected {want_len}, got {fp_len}")
    return None


def not_settled(settled: set[str], ctx: Appraisal) -> Finding | None:
    if ctx.lease.lease_id in settled:
        return Finding(f"lease {ctx.lease.lease_id} was already settled; replay refused")
    return None
