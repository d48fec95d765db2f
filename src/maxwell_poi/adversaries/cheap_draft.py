"""Cheat: a small draft model decodes every token (cheap, sequential); the leased model then runs
one prefill over prompt + draft output, so the fingerprints and layer digests really are the
leased model's activations. Known to get past TOPLOC-style fingerprint checks; only a check of
each token against the leased model's own seeded choice catches it."""

from __future__ import annotations

from ..protocol.fingerprint import chunk_spans
from ..protocol.lease import GenerateJob, Lease
from ..prover.recorder import ActivationRecorder, CommitmentBuilder
from ..prover.sdk import Prover
from ..prover.stream import current_sink
from ..registry.forward import generate, prefill
from ..registry.models import LoadedModel
from ..registry.sampling import SeededSampler
from ._agent import parser, run


class DraftProver(Prover):
    def __init__(self, key, draft_id: str, **kw) -> None:
        super().__init__(key, **kw)
        self.draft_id = draft_id
        self._draft: LoadedModel | None = None

    def draft(self) -> LoadedModel:
        """The draft model, on the same device as the leased model (`device=` of the Prover)."""
        if self._draft is None:
            draft = self.registry.load(self.draft_id)
            self._draft = draft if self.device == "cpu" else draft.copied_to(self.device)
        return self._draft

    def generate(self, lease: Lease, model: LoadedModel):
        job = lease.job
        assert isinstance(job, GenerateJob)
        prompt = model.encode_prompt(job.prompt)
        draft = self.draft()
        tokens = generate(
            draft,
            prompt,
            job.max_new_tokens,
            SeededSampler(lease.seed_bytes, job.temperature, job.top_k),
            on_token=current_sink(),  # streams the draft's tokens, as if it were the real thing
        )
        return tokens, prefilled_commitments(lease, model, prompt, tokens)


def prefilled_commitments(lease: Lease, model: LoadedModel, prompt: list[int], tokens: list[int]):
    """Commitments built from one prefill of the leased model over tokens it did not choose: real
    activations of the right model, chunked as an honest decode's would be."""
    job = lease.job
    assert isinstance(job, GenerateJob)
    builder = CommitmentBuilder(lease.nonce_bytes, job.fingerprint_k)
    with ActivationRecorder(model) as recorder:
        prefill(model, prompt, tokens)
        for start, end in chunk_spans(len(prompt), len(tokens), job.chunk):
            builder.drain(recorder, end - start)
    return builder


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--draft", required=True, help="small model that decodes")
    args = p.parse_args()
    run(args, lambda key: DraftProver(key, args.draft).run)


if __name__ == "__main__":
    main()
