"""The prover SDK: what an honest agent runs to answer a lease with a signed receipt.

    key = AgentKey.load("agent.key")
    receipt_bytes = Prover(key).run(lease)

Third-party agents can use the pieces (`ActivationRecorder`, `CommitmentBuilder`,
`claims_for`, `sign_receipt`) or produce the documented format themselves (docs/receipt.md).
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

import numpy as np
import torch
from pydantic import JsonValue

from ..protocol.keys import AgentKey
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.receipt import (
    Output,
    ReceiptClaims,
    claims_for_lease,
    embedding_output,
    sign_receipt,
    token_output,
)
from ..protocol.schedule import RUNTIME_KEY
from ..protocol.stream import parse_open_request, refusal_line
from ..protocol.trace import Opening, Trace, opening_line
from ..registry.blocks import architecture
from ..registry.forward import embed_one, generate
from ..registry.models import PRECISION_DTYPES, LoadedModel, ReferenceValues, Registry
from ..registry.sampling import SeededSampler
from ..registry.w8a8 import is_w8a8
from .probe import probe_answerer
from .recorder import ActivationRecorder, CommitmentBuilder
from .stream import chunk_sink_for, current_sink
from .trace import TraceRecorder
from .w8a8 import IntTraceRecorder


def claims_for(
    lease: Lease,
    reference: ReferenceValues,
    builder: CommitmentBuilder,
    *,
    output: Output,
    runtime: dict[str, JsonValue] | None = None,
    trace_root: str | None = None,
) -> ReceiptClaims:
    """The predicate an agent signs for `lease`, from its output and its commitments."""
    return claims_for_lease(
        lease,
        reference.weights_digest,
        output,
        builder.fingerprint_bytes,
        builder.layer_root,
        runtime,
        trace_root,
    )


def with_dtype(model: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """A copy of the model in another dtype (the registry's copy stays float32)."""
    if dtype == torch.float32:
        return model
    return model.copied_to(dtype)


def batch_peers(prompt_len: int, count: int, vocab: int, seed: int = 7) -> list[list[int]]:
    """Other requests of the same length to batch beside the lease (an honest serving variant)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1000, vocab, size=(count, prompt_len)).tolist()


class Prover:
    """Runs a lease honestly on the model it names and returns the signed receipt bytes."""

    def __init__(
        self,
        key: AgentKey,
        registry: Registry | None = None,
        *,
        threads: int | None = None,
        batch: int = 1,
        device: str = "cpu",
        trace_dir: Path | None = None,
    ) -> None:
        """`trace_dir`: record each generation's activation trace (GPT-2 and Llama blocks), keep it there as
        <lease>.npz for the dispute window, and sign its root (receipt v3, L3 opens it)."""
        self.key = key
        self.trace_dir = trace_dir
        self.registry = registry or Registry()
        self.batch = max(1, batch)
        self.device = device
        if threads:
            torch.set_num_threads(threads)
        self._converted: dict[tuple[str, str], LoadedModel] = {}

    def model_for(self, lease: Lease) -> LoadedModel:
        key = (lease.model_id, lease.precision)
        if key not in self._converted:
            model = with_dtype(self.registry.load(lease.model_id), PRECISION_DTYPES[lease.precision])
            if self.device != "cpu":  # a copy on the accelerator; the registry's stays on the CPU
                model = model.copied_to(self.device)
            self._converted[key] = model
        return self._converted[key]

    def runtime(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "device": self.device if self.device == "cpu" else torch.cuda.get_device_name(self.device),
            "threads": torch.get_num_threads(),
            "batch": self.batch,
            "torch": torch.__version__,
            "host": platform.machine(),
        }
        if self.batch > 1:  # peers of the prompt's length beside it: the pass shape a replay needs
            out[RUNTIME_KEY] = {"batch": self.batch}
        return out

    def run(self, lease: Lease) -> bytes:
        return sign_receipt(self.claims(lease), self.key)

    def claims(self, lease: Lease) -> ReceiptClaims:
        model = self.model_for(lease)
        claimed = self.registry.reference(lease.model_id)  # what the lease asked for (no build)
        trace_root = None
        if isinstance(lease.job, GenerateJob):
            traced = self.trace_dir is not None and architecture(model) is not None
            with _recorder(model) if traced else contextlib.nullcontext() as recorder:
                tokens, builder = self.generate(lease, model)
            if recorder is not None:
                trace = recorder.trace()
                trace.save(self.trace_dir / f"{lease.lease_id}.npz")
                # the leaves are bound to the nonce: kept beside the trace, so an opening survives a restart
                (self.trace_dir / f"{lease.lease_id}.nonce").write_text(lease.nonce)
                trace_root = trace.root(lease.nonce_bytes)
            output = token_output(tokens, claimed.vocab)
        else:
            matrix, builder = self.embed(lease, model)
            output = embedding_output(matrix)
        return claims_for(
            lease, claimed, builder, output=output, runtime=self.runtime(), trace_root=trace_root
        )

    def open_line(self, request: bytes) -> bytes:
        """Answer an L3 challenge (protocol.stream.open_request_line) from the kept trace: the asked
        tensors and every leaf digest, one line; a refusal line when it cannot."""
        try:
            lease_id, keys = parse_open_request(request)
        except ValueError as exc:
            return refusal_line("", str(exc))
        path = self.trace_dir / f"{lease_id}.npz" if self.trace_dir else None
        if path is None or not path.exists():
            return refusal_line(lease_id, f"no kept trace for lease {lease_id}")
        trace = Trace.load(path)
        if any(k not in trace.tensors for k in keys):
            return refusal_line(lease_id, f"the trace has no tensor among {keys[:4]}")
        nonce = bytes.fromhex(path.with_suffix(".nonce").read_text())
        return opening_line(lease_id, Opening({k: trace.tensors[k] for k in keys}, trace.leaves(nonce)))

    def probe_line(self, request: bytes) -> bytes:
        """Answer Maxwell's work probe (protocol.probe) with the model this prover serves the
        probe's model and precision with; an error line when it cannot."""
        return probe_answerer(self.model_for)(request)

    def generate(self, lease: Lease, model: LoadedModel) -> tuple[list[int], CommitmentBuilder]:
        job = lease.job
        assert isinstance(job, GenerateJob)
        prompt = model.encode_prompt(job.prompt)
        builder = CommitmentBuilder(lease.nonce_bytes, job.fingerprint_k, chunk_sink_for(lease.lease_id))
        sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
        peers = batch_peers(len(prompt), self.batch - 1, model.reference.vocab)
        with ActivationRecorder(model) as recorder:

            def commit_full_chunks(pos: int) -> None:
                if pos < 0 or recorder.pending >= job.chunk:
                    builder.drain(recorder)

            tokens = generate(
                model,
                prompt,
                job.max_new_tokens,
                sampler,
                after_step=commit_full_chunks,
                peers=peers,
                on_token=current_sink(),
            )
            builder.drain(recorder)
        return tokens, builder

    def embed(self, lease: Lease, model: LoadedModel) -> tuple[np.ndarray, CommitmentBuilder]:
        job = lease.job
        assert isinstance(job, EmbedJob)
        builder = CommitmentBuilder(lease.nonce_bytes, job.fingerprint_k)
        rows = []
        with ActivationRecorder(model) as recorder:
            for text in job.texts:
                _, emb = embed_one(model, text)
                rows.append(emb)
                builder.drain(recorder)  # one chunk per text
        return np.stack(rows), builder


def _recorder(model: LoadedModel) -> TraceRecorder | IntTraceRecorder:
    """The trace a model's blocks commit to: float tensors, or a W8A8 variant's int8 inputs and int32
    accumulators (L3's exact integer mode)."""
    return IntTraceRecorder(model) if is_w8a8(model) else TraceRecorder(model)
