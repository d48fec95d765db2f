"""Streaming appraisal of an engine agent's tokens (issue 27): what the gateway can check of an
unmodified serving engine's answer while it streams, before the receipt (v4) arrives.

An engine agent streams tokens and no fingerprint chunks, and its sampler is the engine's own, so
`streaming.StreamingAudit` (seeded choice + fingerprints) would cut an honest one. Here the claimed
model is fed the streamed tokens a block at a time on a KV cache (one prefill in total) and:

- greedy leases (temperature 0): every token must be the model's argmax within the tie gap
  (log-prob units). Such a token is *verified* (`checked` counts it): the gateway's verified
  delivery releases it;
- sampled leases: every token must lie within the lease's top-k (within the tie gap) — a cut
  when not, but no verification: an engine's sampled tokens are judged only as a whole, by the
  likelihood test at intake, so `checked` stays 0 and a verified delivery holds them until then.

The tie gap is the loosest calibrated engine's (`engine_tolerance.json`): the engine's name is a
claim of the receipt, which has not arrived, so the running check must not cut where the final one
would pass. The final L4 verdict is not taken here: at intake the receipt goes to `AuditLayer`'s
engine path (verifier.engine_audit), the one judge every other path uses. Fingerprint chunks: an
engine has none, so one relayed is a cut (a receipt v4 cannot carry them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..protocol.lease import GenerateJob, Lease
from ..registry.forward import KVCached
from ..registry.models import LoadedModel
from .streaming import StreamFinding


@dataclass(frozen=True)
class EngineStreamChoice:
    """The running check's tolerance, labelled as the L4 result names it (thresholds.ToleranceChoice's
    `label` and `details`, for an engine agent)."""

    tie_gap: float
    source: str

    def label(self) -> str:
        return f"[engine agent, streamed: tie gap {self.tie_gap:g} ({self.source})]"

    def details(self) -> dict[str, Any]:
        return {"engine_stream_tie_gap": self.tie_gap, "engine_stream_tolerance": self.source}


class EngineStream:
    """Checks one engine agent's generation lease incrementally; see the module docstring."""

    def __init__(self, lease: Lease, model: LoadedModel, choice: EngineStreamChoice, block: int = 8) -> None:
        job = lease.job
        if not isinstance(job, GenerateJob):
            raise ValueError("streaming appraisal is for generation leases")
        self.job, self.choice, self.block = job, choice, block
        self.greedy = job.temperature == 0
        self.prompt = model.encode_prompt(job.prompt)
        self.model = KVCached(model)
        self.logits = [self.model.feed(self.prompt)[-1:]]  # logits for token `seen` onwards
        self.tokens: list[int] = []
        self.seen = 0  # tokens whose logits were looked at
        self.checked = 0  # tokens verified (greedy only)
        self.spans: list[tuple[int, int]] = []  # no fingerprint chunks (LiveLease reads these)
        self.next_chunk = 0
        self.finding: StreamFinding | None = None

    def receive_chunk(self, index: int, data: bytes) -> StreamFinding | None:
        return self._cut(
            f"fingerprint chunk {index}: expected none from an engine agent (receipt v4 carries no "
            f"fingerprints), got {len(data)} bytes",
            None,
        )

    def receive(self, token: int) -> StreamFinding | None:
        """One streamed token; the model is fed a block at a time (an engine may stop early, at
        end-of-sequence: the tokens of a short last block are judged at intake with the rest)."""
        if self.finding:
            return self.finding
        self.tokens.append(token)
        unfed = len(self.prompt) + len(self.tokens) - len(self.model.fed)
        last = len(self.tokens) == self.job.max_new_tokens
        if unfed >= self.block or last:
            feed = self.tokens[len(self.model.fed) - len(self.prompt) : self.job.max_new_tokens - 1]
            if feed:
                self.logits.append(self.model.feed(feed))
            return self._check()
        return None

    def _check(self) -> StreamFinding | None:
        logits = torch.cat(self.logits).double()
        n = min(len(logits), len(self.tokens) - self.seen)
        if n <= 0:
            return None
        self.logits = [logits[n:]]
        logits = logits[:n]
        chosen = torch.tensor(self.tokens[self.seen : self.seen + n]).unsqueeze(1)
        gap = self.choice.tie_gap
        if self.greedy:
            logp = torch.log_softmax(logits, dim=-1)
            gaps = logp.max(dim=1).values - logp.gather(1, chosen).squeeze(1)
            bad = torch.nonzero(gaps > gap).flatten()
            if len(bad):
                i = int(bad[0])
                return self._cut(
                    f"token choice: expected the claimed model's greedy choice (log-prob gap <= {gap:g}), "
                    f"got another at position {self.seen + i} (gap {float(gaps[i]):.4g})",
                    self.seen + i,
                )
            self.checked += n
        elif self.job.top_k and self.job.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.job.top_k, dim=-1).values[:, -1]
            below = kth - logits.gather(1, chosen).squeeze(1)
            bad = torch.nonzero(below > gap).flatten()
            if len(bad):
                i = int(bad[0])
                return self._cut(
                    f"token choice: expected every token among the lease's top-{self.job.top_k}, got one "
                    f"{float(below[i]):.4g} below it at position {self.seen + i}",
                    self.seen + i,
                )
        self.seen += n
        return None

    def _cut(self, reason: str, position: int | None) -> StreamFinding:
        self.finding = StreamFinding(reason, len(self.tokens), position)
        return self.finding
