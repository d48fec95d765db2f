"""The receipt: an in-toto Statement in a DSSE envelope, signed with the agent's Ed25519 key.

Everything in it is a *claim* by the agent. The verifier checks the signature and the bindings
(L0), then tests the claims against Maxwell's own recomputation (L4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from google.protobuf import json_format
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator
from securesystemslib.dsse import Envelope

from .encoding import b64, pack_tokens, sha256_hex, token_width, unb64, unpack_tokens
from .engine import EngineClaim, engine_body_bytes
from .errors import ReceiptFormatError
from .fingerprint import chunk_size_bytes, chunk_spans
from .keys import AgentKey
from .lease import EmbedJob, GenerateJob, Lease, _preview

if TYPE_CHECKING:
    import numpy as np

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
# v3: the optional activation-trace root `trace` (L3, protocol.trace); v2 receipts (no trace) are
# still read. v2: leases of version 2 (fingerprint_k).
PREDICATE_TYPE = "https://maxwell-poi.dev/receipt/v3"
PREDICATE_V2 = "https://maxwell-poi.dev/receipt/v2"
# v4: an engine receipt (protocol.engine, issue 27): the `engine` object in place of `fp`, `layers`
# and `trace`; only engine receipts use it, SDK receipts stay v3
PREDICATE_V4 = "https://maxwell-poi.dev/receipt/v4"
PAYLOAD_TYPE = "application/vnd.in-toto+json"

HEX64 = r"^[0-9a-f]{64}$"


class Fingerprints(BaseModel):
    """Top-k activation commitments, one encoded chunk after another (see protocol.fingerprint)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    k: int = Field(ge=1, le=1024)
    chunk: int = Field(ge=1, le=1024)
    data: str


class Output(BaseModel):
    """The answer itself: token ids for generation, a float32 matrix for embeddings."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    tokens: str | None = None
    width: Literal[2, 4] = 2
    embedding: str | None = None
    shape: list[int] | None = None

    def to_bytes(self) -> bytes:
        return unb64(self.tokens if self.tokens is not None else self.embedding or "", "output")


class ReceiptClaims(BaseModel):
    """The predicate of the Statement. Field names are short because they travel per receipt."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    lease: str = Field(pattern=r"^[0-9a-f]{32}$")
    nonce: str = Field(pattern=HEX64)
    agent: str = Field(min_length=1, max_length=128)
    model: str = Field(min_length=1, max_length=128)
    weights: str = Field(pattern=HEX64, description="blake3 of the weights the agent says it ran")
    precision: Literal["fp32", "bf16"]
    input: str = Field(pattern=HEX64, description="sha256 of the lease input as the agent read it")
    output: Output
    fp: Fingerprints | None = None  # required, except in an engine receipt (v4), which has none
    layers: str | None = Field(
        default=None, pattern=HEX64, description="Merkle root of nonce-bound per-layer digests"
    )
    trace: str | None = Field(
        default=None, pattern=HEX64, description="Merkle root of the activation trace (v3; L3 opens it)"
    )
    runtime: dict[str, JsonValue] = Field(default_factory=dict, description="self-reported, any JSON")
    engine: EngineClaim | None = Field(default=None, description="v4: what a serving engine returned")

    @model_validator(mode="after")
    def _commitments(self) -> ReceiptClaims:
        """An SDK receipt commits to activations (fp, layers); an engine receipt cannot and must not."""
        if self.engine is None and (self.fp is None or self.layers is None):
            missing = [f for f in ("fp", "layers") if getattr(self, f) is None]
            raise ValueError(f"{' and '.join(missing)}: required (only an engine receipt, v4, has none)")
        if self.engine is not None and (self.fp, self.layers, self.trace) != (None, None, None):
            raise ValueError("an engine receipt (v4) carries no fp, layers or trace")
        return self

    @property
    def predicate_type(self) -> str:
        return PREDICATE_V4 if self.engine is not None else PREDICATE_TYPE

    def tokens(self) -> list[int]:
        if self.output.tokens is None:
            return []
        return unpack_tokens(unb64(self.output.tokens, "output.tokens"), self.output.width)

    def embedding(self) -> np.ndarray:
        import numpy as np  # here, not at the top: reading a receipt needs no numpy

        if self.output.embedding is None or self.output.shape is None:
            raise ValueError("receipt carries no embedding")
        raw = unb64(self.output.embedding, "output.embedding")
        return np.frombuffer(raw, dtype="<f4").reshape(self.output.shape)

    def fingerprint_bytes(self) -> bytes:
        return b"" if self.fp is None else unb64(self.fp.data, "fp.data")

    def output_digest(self) -> str:
        return sha256_hex(self.output.to_bytes())


def embedding_output(matrix: np.ndarray) -> Output:
    import numpy as np

    arr = np.ascontiguousarray(matrix, dtype="<f4")
    return Output(embedding=b64(arr.tobytes()), shape=list(arr.shape))


def token_output(tokens: list[int], vocab: int) -> Output:
    width = token_width(vocab)
    return Output(tokens=b64(pack_tokens(tokens, width)), width=width)


def claims_for_lease(
    lease: Lease,
    weights_digest: str,
    output: Output,
    fingerprints: bytes,
    layer_root: str,
    runtime: dict[str, JsonValue] | None = None,
    trace_root: str | None = None,
) -> ReceiptClaims:
    """The predicate an agent signs for `lease`: the lease's own bindings plus what it computed.
    One builder for the SDK and for every adversary program, so they differ only in content."""
    job = lease.job
    return ReceiptClaims(
        lease=lease.lease_id,
        nonce=lease.nonce,
        agent=lease.agent_id,
        model=lease.model_id,
        weights=weights_digest,
        precision=lease.precision,
        input=sha256_hex(lease.input_bytes()),
        output=output,
        fp=Fingerprints(
            k=job.fingerprint_k,
            chunk=job.chunk if isinstance(job, GenerateJob) else 1,
            data=b64(fingerprints),
        ),
        layers=layer_root,
        trace=trace_root,
        runtime=runtime or {},
    )


def fingerprint_size(lease: Lease) -> int:
    """Bytes of fingerprints a receipt for `lease` carries. The prompt is one chunk whatever its
    length, so the count needs no tokenizer: one chunk per text, or the prompt's plus the decode
    chunks."""
    job = lease.job
    chunks = (
        len(chunk_spans(0, job.max_new_tokens, job.chunk)) if isinstance(job, GenerateJob) else len(job.texts)
    )
    return chunks * chunk_size_bytes(job.fingerprint_k)


def max_receipt_bytes(lease: Lease, hidden: int, engine: bool | None = None) -> int:
    """Size limit for a lease's receipt: generous for honest receipts, fatal for floods.
    `hidden` is the model's hidden size (reference values; the model is never built for it).
    `engine`: False for an SDK receipt, True for an engine receipt (v4), None for either (the
    channel's limit, before the receipt is read)."""
    job = lease.job
    if isinstance(job, GenerateJob):
        chunks = 1 + -(-job.max_new_tokens // job.chunk)
        sdk = job.max_new_tokens * 4 + chunks * chunk_size_bytes(job.fingerprint_k)
        eng = engine_body_bytes(job.max_new_tokens)
        body = sdk if engine is False else eng if engine else max(sdk, eng)
    else:
        assert isinstance(job, EmbedJob)
        body = len(job.texts) * (hidden * 4 + chunk_size_bytes(job.fingerprint_k))
    return 16384 + 2 * body * 2  # x2 double base64 (payload + blob), x2 slack


def statement_for(claims: ReceiptClaims) -> dict[str, Any]:
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": f"lease/{claims.lease}/output", "digest": {"sha256": claims.output_digest()}}],
        "predicateType": claims.predicate_type,
        "predicate": claims.model_dump(exclude_none=True),
    }


def sign_receipt(claims: ReceiptClaims, key: AgentKey) -> bytes:
    """Serialise the claims as a Statement, wrap it in DSSE, sign it: the bytes an agent returns."""
    payload = json.dumps(statement_for(claims), separators=(",", ":")).encode()
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(key.signer)
    return json.dumps(envelope.to_dict(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class OpenedReceipt:
    """A receipt whose shape is valid. Its signature is NOT yet checked (that is L0's job)."""

    envelope: Envelope
    claims: ReceiptClaims
    size: int

    @property
    def keyid(self) -> str:
        return next(iter(self.envelope.signatures))


def open_receipt(raw: bytes, max_bytes: int) -> OpenedReceipt:
    """Parse and shape-check a receipt; every refusal says what was expected and what came."""
    if len(raw) > max_bytes:
        raise ReceiptFormatError(f"at most {max_bytes} bytes for this lease", f"{len(raw)} bytes")
    if not raw.strip():
        raise ReceiptFormatError("a DSSE envelope (JSON)", "an empty message")
    try:
        outer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ReceiptFormatError("a DSSE envelope (JSON)", _preview(raw)) from None
    if not isinstance(outer, dict):
        raise ReceiptFormatError("a JSON object", type(outer).__name__)
    try:
        envelope = Envelope.from_dict(outer)
    except Exception as exc:  # securesystemslib raises KeyError/TypeError/binascii errors here
        raise ReceiptFormatError(
            "a DSSE envelope with payload, payloadType and signatures", f"{type(exc).__name__}: {exc}"
        ) from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise ReceiptFormatError(f"payloadType {PAYLOAD_TYPE!r}", repr(envelope.payload_type)[:80])
    if len(envelope.signatures) != 1:
        raise ReceiptFormatError("exactly one signature", f"{len(envelope.signatures)}")
    statement = _statement(envelope.payload)
    try:
        claims = ReceiptClaims.model_validate(statement["predicate"])
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ReceiptFormatError(
            f"valid claims ({where}: {first['msg']})", _preview(json.dumps(first.get("input"), default=str))
        ) from None
    try:
        subject_digest = statement["subject"][0]["digest"].get("sha256")
        actual = claims.output_digest()
    except (ValueError, KeyError, IndexError, AttributeError) as exc:
        raise ReceiptFormatError("a decodable output and subject digest", str(exc)) from None
    if subject_digest != actual:
        raise ReceiptFormatError(f"subject sha256 {actual} (of the output carried)", str(subject_digest))
    return OpenedReceipt(envelope=envelope, claims=claims, size=len(raw))


def _statement(payload: bytes) -> dict[str, Any]:
    try:
        statement = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ReceiptFormatError("an in-toto Statement (JSON) as payload", _preview(payload)) from None
    if not isinstance(statement, dict):
        raise ReceiptFormatError("a Statement object", type(statement).__name__)
    if statement.get("_type") != STATEMENT_TYPE:
        raise ReceiptFormatError(f"_type {STATEMENT_TYPE!r}", repr(statement.get("_type"))[:80])
    kind = statement.get("predicateType")
    if kind not in (PREDICATE_TYPE, PREDICATE_V2, PREDICATE_V4):
        raise ReceiptFormatError(f"predicateType {PREDICATE_TYPE!r} (or v2, v4)", repr(kind)[:80])
    predicate = statement.get("predicate")
    has_engine = isinstance(predicate, dict) and "engine" in predicate
    if (kind == PREDICATE_V4) != has_engine:
        raise ReceiptFormatError(
            "an engine object exactly in a v4 (engine) receipt",
            f"a {kind.rsplit('/', 1)[-1]} receipt {'with' if has_engine else 'without'} one",
        )
    if kind == PREDICATE_V2 and isinstance(predicate, dict) and "trace" in predicate:
        raise ReceiptFormatError("no trace root in a v2 receipt (v3 carries it)", "a v2 receipt with one")
    try:  # the reference in-toto implementation checks subjects and digests
        pb = json_format.ParseDict(statement, statement_pb2.Statement())
        Statement.copy_from_pb(pb).validate()
    except (json_format.ParseError, ValueError, OverflowError) as exc:  # 10**400 overflows a float
        raise ReceiptFormatError("a valid in-toto v1 Statement", str(exc)[:120]) from None
    return statement
