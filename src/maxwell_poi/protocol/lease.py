"""The lease: what Maxwell asks one agent to compute, bound to a fresh nonce and a deadline."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import LeaseFormatError

MAX_LEASE_BYTES = 1 << 20
# 2: the job field `topk` (values committed per fingerprint chunk) became `fingerprint_k`
LEASE_VERSION = 2
Precision = Literal["fp32", "bf16"]


def sampler_seed(nonce_hex: str) -> str:
    return hashlib.sha256(b"maxwell-poi/sampler/v1" + bytes.fromhex(nonce_hex)).hexdigest()


class GenerateJob(BaseModel):
    """Text generation on a causal LM; the prompt is tokenized by the model's tokenizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["generate"] = "generate"
    prompt: str = Field(min_length=1, max_length=20_000)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.8, ge=0.0, le=10.0)
    top_k: int = Field(default=50, ge=0, le=1_000_000, description="sample among the k best; 0 = all")
    chunk: int = Field(default=32, ge=1, le=1024, description="decode tokens per fingerprint")
    fingerprint_k: int = Field(default=32, ge=4, le=1024, description="values committed per chunk")

    def input_bytes(self) -> bytes:
        return self.prompt.encode("utf-8")


class EmbedJob(BaseModel):
    """Sentence embeddings (mean pooling, L2-normalised) of each text, one forward pass each."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["embed"] = "embed"
    texts: list[Annotated[str, Field(min_length=1, max_length=4000)]] = Field(min_length=1, max_length=64)
    fingerprint_k: int = Field(default=32, ge=4, le=1024, description="values committed per text")

    def input_bytes(self) -> bytes:
        return json.dumps(self.texts, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


Job = Annotated[GenerateJob | EmbedJob, Field(discriminator="kind")]


class Lease(BaseModel):
    """Issued by Maxwell. Everything here is Maxwell's own choice; nothing comes from the agent."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[2] = LEASE_VERSION
    lease_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    agent_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
    model_id: str = Field(min_length=1, max_length=128)
    precision: Precision = "fp32"
    nonce: str = Field(pattern=r"^[0-9a-f]{64}$")
    seed: str = Field(pattern=r"^[0-9a-f]{64}$", description="sampler seed = H(nonce)")
    job: Job
    issued_at: float
    deadline: float

    @model_validator(mode="after")
    def _consistent(self) -> Lease:
        if self.seed != sampler_seed(self.nonce):
            raise ValueError("seed must equal sha256('maxwell-poi/sampler/v1' || nonce)")
        if self.deadline <= self.issued_at:
            raise ValueError("deadline must come after issued_at")
        return self

    @classmethod
    def issue(
        cls,
        agent_id: str,
        model_id: str,
        job: GenerateJob | EmbedJob,
        *,
        precision: Precision = "fp32",
        ttl_s: float = 600.0,
        now: float | None = None,
    ) -> Lease:
        """A new lease with a 32-byte nonce from the OS CSPRNG."""
        nonce = secrets.token_bytes(32).hex()
        issued = time.time() if now is None else now
        return cls(
            lease_id=uuid.uuid4().hex,
            agent_id=agent_id,
            model_id=model_id,
            precision=precision,
            nonce=nonce,
            seed=sampler_seed(nonce),
            job=job,
            issued_at=issued,
            deadline=issued + ttl_s,
        )

    @property
    def seed_bytes(self) -> bytes:
        return bytes.fromhex(self.seed)

    @property
    def nonce_bytes(self) -> bytes:
        return bytes.fromhex(self.nonce)

    def input_bytes(self) -> bytes:
        return self.job.input_bytes()

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, raw: str | bytes) -> Lease:
        if len(raw) > MAX_LEASE_BYTES:
            raise LeaseFormatError(f"at most {MAX_LEASE_BYTES} bytes", f"{len(raw)} bytes")
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "lease"
            raise LeaseFormatError(f"a valid lease ({where}: {first['msg']})", _preview(raw)) from exc


def _preview(raw: str | bytes, limit: int = 60) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = text.strip().replace("\n", " ")
    return repr(text[:limit] + ("…" if len(text) > limit else ""))
