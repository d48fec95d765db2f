"""Cheat: a mid-stream switch. The leased model decodes the first part of the answer honestly;
from `--switch-at` (a fraction of the output) a small model takes over, and the leased model then
prefills the whole output once so every fingerprint chunk is the leased model's real activations.
Only a per-token check of the switched part against the leased model's seeded choice catches it."""

from __future__ import annotations

from ..protocol.lease import GenerateJob, Lease
from ..prover.stream import current_sink
from ..registry.forward import generate
from ..registry.models import LoadedModel
from ..registry.sampling import SeededSampler
from ._agent import parser, run
from .cheap_draft import DraftProver, prefilled_commitments


class MidSwitchProver(DraftProver):
    def __init__(self, key, draft_id: str, switch_at: float = 0.5, **kw) -> None:
        super().__init__(key, draft_id, **kw)
        self.switch_at = switch_at

    def generate(self, lease: Lease, model: LoadedModel):
        job = lease.job
        assert isinstance(job, GenerateJob)
        prompt = model.encode_prompt(job.prompt)
        sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
        honest_n = max(1, min(job.max_new_tokens - 1, int(job.max_new_tokens * self.switch_at)))
        sink = current_sink()
        head = generate(model, prompt, honest_n, sampler, on_token=sink)
        tail_sink = (lambda pos, tok: sink(pos + honest_n, tok)) if sink else None
        tail = generate(
            self.draft(),
            prompt + head,
            job.max_new_tokens - honest_n,
            sampler.from_position(honest_n),
            on_token=tail_sink,
        )
        tokens = head + tail
        return tokens, prefilled_commitments(lease, model, prompt, tokens)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--draft", required=True, help="small model that takes over")
    p.add_argument("--switch-at", type=float, default=0.5, help="fraction of the output decoded honestly")
    args = p.parse_args()
    run(args, lambda key: MidSwitchProver(key, args.draft, args.switch_at).run)


if __name__ == "__main__":
    main()
