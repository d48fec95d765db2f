"""A batched prover: several leases in one forward pass, each with its own receipt.

    receipts = BatchedProver(key).run_many(leases)   # signed receipts, in the leases' order

Serving engines batch requests; a resident agent handed several leases at once does the same.
Generation leases on the same model and precision run as one left-padded batch (see
`registry.forward.generate_batch`). Each row keeps its own sampler, its own commitments (the
exact chunk layout of the one-lease `Prover`, over the row's real positions only) and its own
token stream. Maxwell still audits every lease alone (L4): the batch only changes the floats by
kernel rounding, which the audit's fingerprint tolerance is there for.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

from pydantic import JsonValue

from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims, sign_receipt, token_output
from ..protocol.schedule import RUNTIME_KEY, batch_declaration
from ..registry.forward import generate_batch
from ..registry.models import LoadedModel, Registry
from ..registry.sampling import SeededSampler
from .recorder import ActivationRecorder, CommitmentBuilder
from .sdk import Prover, claims_for
from .stream import chunk_sink_for, current_lease_sink

GroupKey = tuple[str, str, str]  # (model_id, precision, job kind)


def group_leases(leases: list[Lease]) -> dict[GroupKey, list[int]]:
    """Indices of the leases that can share a forward pass, in first-seen order."""
    groups: dict[GroupKey, list[int]] = {}
    for i, lease in enumerate(leases):
        groups.setdefault((lease.model_id, lease.precision, lease.job.kind), []).append(i)
    return groups


def row_stream(leases: list[Lease]) -> Callable[[int, int, int], None] | None:
    """The active lease sink as `on_token(row, pos, token)`: each row streams under its lease id."""
    sink = current_lease_sink()
    if sink is None:
        return None
    return lambda row, pos, token: sink(leases[row].lease_id, pos, token)


class BatchedProver:
    """Runs many leases honestly, batching generations that share a model and precision."""

    def __init__(
        self,
        key: AgentKey,
        registry: Registry | None = None,
        *,
        threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        self.key = key
        # The one-lease prover holds the converted model copies and runs embeddings as they are.
        self.prover = Prover(key, registry, threads=threads, batch=1, device=device)
        self.registry = self.prover.registry

    def probe_line(self, request: bytes) -> bytes:
        return self.prover.probe_line(request)

    def runtime(self, rows: int) -> dict[str, JsonValue]:
        return {**self.prover.runtime(), "batch": rows}

    def run_many(self, leases: list[Lease]) -> list[bytes]:
        return [sign_receipt(claims, self.key) for claims in self.claims_many(leases)]

    def claims_many(self, leases: list[Lease]) -> list[ReceiptClaims]:
        out: list[ReceiptClaims | None] = [None] * len(leases)
        for (_model, _precision, kind), indices in group_leases(leases).items():
            group = [leases[i] for i in indices]
            if kind == "generate":
                claims = self.generate_group(group)
            else:  # embeddings: one lease at a time on the existing path
                claims = [self.prover.claims(lease) for lease in group]
            for i, c in zip(indices, claims, strict=True):
                out[i] = c
        assert all(c is not None for c in out)
        return out  # type: ignore[return-value]

    def generate_group(self, leases: list[Lease]) -> list[ReceiptClaims]:
        """One batched generation for leases on the same model and precision."""
        model = self.prover.model_for(leases[0])
        claimed = self.registry.reference(leases[0].model_id)
        outputs, builders = self.generate(leases, model)
        runtime = self.runtime(len(leases))
        if len(leases) > 1:  # the batch's shape, so a native audit can replay it (protocol.schedule)
            width = max(len(model.encode_prompt(lease.job.prompt)) for lease in leases)  # type: ignore[union-attr]
            runtime[RUNTIME_KEY] = batch_declaration(len(leases), width)
        return [
            claims_for(lease, claimed, builder, output=token_output(tokens, claimed.vocab), runtime=runtime)
            for lease, tokens, builder in zip(leases, outputs, builders, strict=True)
        ]

    def generate(
        self, leases: list[Lease], model: LoadedModel
    ) -> tuple[list[list[int]], list[CommitmentBuilder]]:
        jobs: list[GenerateJob] = []
        for lease in leases:
            assert isinstance(lease.job, GenerateJob)
            jobs.append(lease.job)
        prompts = [model.encode_prompt(job.prompt) for job in jobs]
        width = max(len(p) for p in prompts)
        pairs = list(zip(leases, jobs, strict=True))
        builders = [
            CommitmentBuilder(lease.nonce_bytes, job.fingerprint_k, chunk_sink_for(lease.lease_id))
            for lease, job in pairs
        ]
        samplers = [SeededSampler(lease.seed_bytes, job.temperature, job.top_k) for lease, job in pairs]
        on_token = row_stream(leases)
        with ExitStack() as stack:
            recorders = [
                stack.enter_context(ActivationRecorder(model, row=r, skip=width - len(p)))
                for r, p in enumerate(prompts)
            ]

            def commit(pos: int) -> None:
                """The one-lease Prover's layout per row: the prompt's real positions as chunk 0,
                then decode positions every `chunk`, then the partial chunk when the row ends."""
                for recorder, builder, job in zip(recorders, builders, jobs, strict=True):
                    if not recorder.active:
                        continue
                    if pos < 0:
                        builder.drain(recorder)
                        recorder.skip = 0  # decode steps have no padding
                    elif recorder.pending >= job.chunk:
                        builder.drain(recorder)
                    if pos >= job.max_new_tokens - 2:  # its last fed token went through
                        builder.drain(recorder)
                        recorder.active = False

            tokens = generate_batch(
                model,
                prompts,
                [job.max_new_tokens for job in jobs],
                samplers,
                after_step=commit,
                on_token=on_token,
            )
        return tokens, builders
