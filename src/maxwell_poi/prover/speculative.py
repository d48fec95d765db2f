"""Honest speculative decoding: a draft model proposes, the claimed model decides every token.

Each round the draft proposes up to `block` tokens with the lease's seeded sampler; the claimed
model then runs one verification pass over the last accepted token plus the proposals. A proposal
is kept only while it equals the seeded sampler's choice under the *claimed* model's logits from
that pass; at the first difference the claimed model's own choice is taken instead, and when all
are kept its choice after the last one is a bonus token. So every output token is the claimed
model's seeded choice — the output is that of plain decoding — and L4 checks it like any other.

Fingerprints come from the claimed model's verification passes. A pass computes hidden states for
every fed position, including proposals that were then refused: those rows are dropped from the
recorder and the claimed model's KV cache is cropped back, so the committed rows are exactly the
positions of the final sequence, in order. The count is checked against what the receipt's chunk
layout needs and a shortfall is an error, not a shorter commitment: this is where deployed capture
has broken (SGLang's speculative path returned fewer hidden states than tokens without saying so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..protocol.errors import PoiError
from ..protocol.fingerprint import chunk_spans
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims
from ..protocol.schedule import RUNTIME_KEY, DecodeSchedule
from ..registry.forward import KVCached
from ..registry.models import LoadedModel
from ..registry.sampling import SeededSampler
from .recorder import ActivationRecorder, CommitmentBuilder
from .sdk import Prover
from .stream import chunk_sink_for, current_sink


@dataclass
class DraftStats:
    """How the draft fared over one lease (or several, summed)."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def speculative_generate(
    model: LoadedModel,
    draft: LoadedModel,
    prompt_ids: list[int],
    new_tokens: int,
    sampler: SeededSampler,
    *,
    block: int = 4,
    recorder: ActivationRecorder | None = None,
    after_pass: Callable[[], None] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    stats: DraftStats | None = None,
    passes: list[tuple[int, int]] | None = None,
) -> list[int]:
    """Seeded generation whose every token is `model`'s choice, proposals from `draft`.

    `recorder` (on `model`) loses the rows of refused proposals after each pass; `after_pass()`
    runs after each of the claimed model's passes once its rows are settled; `on_token(pos, id)`
    the moment a token is final; `passes` gains (fed, kept rows) for each verification pass (the
    decode schedule a receipt declares, protocol.schedule).
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    stats = stats if stats is not None else DraftStats()
    target, proposer = KVCached(model), KVCached(draft)
    seq = list(prompt_ids)
    tokens: list[int] = []

    def emit(token: int) -> None:
        tokens.append(token)
        seq.append(token)
        if on_token:
            on_token(len(tokens) - 1, token)

    with torch.inference_mode():
        emit(sampler.choose(target.feed(seq)[-1], 0))
        if after_pass:
            after_pass()
        while len(tokens) < new_tokens:
            # Proposals stop where the output would end: the final token is chosen, never fed.
            room = min(block, new_tokens - len(tokens) - 1)
            proposals: list[int] = []
            if room:
                logits = proposer.catch_up(seq)
                for _ in range(room):
                    proposals.append(sampler.choose(logits[-1], len(tokens) + len(proposals)))
                    if len(proposals) < room:
                        logits = proposer.feed([proposals[-1]])
            logits = target.feed([seq[-1], *proposals])
            stats.rounds += 1
            stats.proposed += len(proposals)
            kept = 0
            for i in range(len(proposals) + 1):
                choice = sampler.choose(logits[i], len(tokens))
                emit(choice)
                if i == len(proposals) or choice != proposals[i] or len(tokens) == new_tokens:
                    break
                kept += 1
            stats.accepted += kept
            refused = len(proposals) - kept  # fed positions whose input token was not kept
            target.crop(len(target.fed) - refused)
            if passes is not None:
                passes.append((len(proposals) + 1, kept + 1))
            if recorder is not None:
                recorder.discard_last(refused)
            if after_pass:
                after_pass()
    return tokens


class SpeculativeProver(Prover):
    """An honest prover that decodes speculatively with `draft_id` (docs in the module string)."""

    def __init__(self, key, draft_id: str, *, block: int = 4, **kw) -> None:
        super().__init__(key, **kw)
        self.draft_id = draft_id
        self.block = block
        self.stats = DraftStats()
        self._draft: LoadedModel | None = None
        self._passes: dict[str, list[tuple[int, int]]] = {}  # by lease id, until its claims are made

    def draft(self, model: LoadedModel) -> LoadedModel:
        """The draft on the claimed model's device; never the claimed model's own module, whose
        recorder hooks would take the draft's passes for the claimed model's."""
        if self._draft is None or self._draft.module is model.module:
            draft = self.registry.load(self.draft_id)
            same = draft.module is model.module
            self._draft = draft.copied_to(self.device) if same or self.device != "cpu" else draft
        return self._draft

    def runtime(self):
        return {**super().runtime(), "decoding": f"speculative ({self.draft_id}, block {self.block})"}

    def claims(self, lease: Lease) -> ReceiptClaims:
        """The receipt declares its verification passes (protocol.schedule): a native audit replays
        them, since how many positions a pass computes together shapes its low-precision rounding."""
        claims = super().claims(lease)
        passes = self._passes.pop(lease.lease_id, None)
        if passes is None:
            return claims
        declared = DecodeSchedule(tuple(passes), True).as_runtime()
        return claims.model_copy(update={"runtime": {**claims.runtime, RUNTIME_KEY: declared}})

    def generate(self, lease: Lease, model: LoadedModel) -> tuple[list[int], CommitmentBuilder]:
        job = lease.job
        assert isinstance(job, GenerateJob)
        prompt = model.encode_prompt(job.prompt)
        builder = CommitmentBuilder(lease.nonce_bytes, job.fingerprint_k, chunk_sink_for(lease.lease_id))
        sizes = [end - start for start, end in chunk_spans(len(prompt), job.max_new_tokens, job.chunk)]
        with ActivationRecorder(model) as recorder:

            def commit_ready() -> None:  # commit whole chunks as soon as their rows are settled
                while sizes and recorder.pending >= sizes[0]:
                    builder.drain(recorder, sizes.pop(0))

            tokens = speculative_generate(
                model,
                self.draft(model),
                prompt,
                job.max_new_tokens,
                SeededSampler(lease.seed_bytes, job.temperature, job.top_k),
                block=self.block,
                recorder=recorder,
                after_pass=commit_ready,
                on_token=current_sink(),
                stats=self.stats,
                passes=self._passes.setdefault(lease.lease_id, []),
            )
            if sizes or recorder.pending:
                raise PoiError(
                    f"speculative decoding: expected hidden states for exactly "
                    f"{len(prompt) + len(tokens) - 1} positions, got {'fewer' if sizes else 'more'} "
                    f"(refusing to commit a short or padded fingerprint)"
                )
        return tokens, builder
