"""Streaming appraisal (L4 while the answer is still coming): judge each chunk as it arrives.

The verifier feeds the claimed model the tokens it has received, a chunk at a time, on a KV cache
(`registry.forward.KVCached`), so the total work stays that of one prefill over the answer. After
each pass it checks (1) every token whose logits it now has is the seeded sampler's choice and
(2) each fingerprint chunk whose positions it has computed matches within tolerance — the same two
checks as `audit.AuditLayer`, in arrival order. The first failure is returned with the token count
at which it was found, so the caller can cut the agent off there (issue 11: the gateway ends the
client's stream, the requester is not charged).

Fingerprint chunks reach it through `receive_chunk` (the gateway relays them as the node streams
them). Its tolerance is a `thresholds.ToleranceChoice`, chosen by the one rule every audit path uses
(`AuditLayer.tolerance`: the class pair the node measured), never a set picked here. `checked` counts
the tokens whose choice has been verified so far: the gateway's verified-before-delivered mode
releases no token past it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..protocol.fingerprint import chunk_spans
from ..protocol.lease import GenerateJob, Lease
from ..registry.fingerprint import compare_chunk
from ..registry.forward import KVCached
from ..registry.models import LoadedModel
from ..registry.sampling import SeededSampler
from .thresholds import Tolerance, ToleranceChoice


@dataclass(frozen=True)
class StreamFinding:
    """Why the stream was cut, and how many tokens had arrived by then."""

    reason: str
    tokens_received: int
    first_bad_token: int | None  # the position the failing check points at (None: a fingerprint chunk)


class StreamingAudit:
    """Checks one generation lease incrementally; see the module docstring."""

    def __init__(
        self,
        lease: Lease,
        model: LoadedModel,
        tolerance: ToleranceChoice,
        block: int | None = None,
        tol: Tolerance | None = None,
    ) -> None:
        job = lease.job
        if not isinstance(job, GenerateJob):
            raise ValueError("streaming appraisal is for generation leases")
        self.job, self.choice, self.tol = job, tolerance, tol or tolerance.tolerance
        self.block = block or job.chunk
        self.sampler = SeededSampler(lease.seed_bytes, job.temperature, job.top_k)
        self.prompt = model.encode_prompt(job.prompt)
        self.spans = chunk_spans(len(self.prompt), job.max_new_tokens, job.chunk)
        self.chunks: dict[int, bytes] = {}
        self.tokens: list[int] = []
        self.checked = 0  # tokens whose choice has been checked
        self.next_chunk = 0
        self.model = KVCached(model)
        hidden, logits = self.model.feed_hidden(self.prompt)
        self.hidden = [hidden]
        self.logits = [logits[-1:]]  # logits for token `checked` onwards, not yet used
        self.finding: StreamFinding | None = None

    def receive_chunk(self, index: int, data: bytes) -> StreamFinding | None:
        self.chunks[index] = data
        return self._check_chunks()

    def receive(self, token: int) -> StreamFinding | None:
        """One streamed token. Feeds the model a block at a time (the final token is never fed)."""
        if self.finding:
            return self.finding
        self.tokens.append(token)
        unfed = len(self.prompt) + len(self.tokens) - len(self.model.fed)
        last = len(self.tokens) == self.job.max_new_tokens
        if unfed >= self.block or last:
            feed = self.tokens[len(self.model.fed) - len(self.prompt) : self.job.max_new_tokens - 1]
            if feed:
                hidden, logits = self.model.feed_hidden(feed)
                self.hidden.append(hidden)
                self.logits.append(logits)
            return self._check_tokens() or self._check_chunks()
        return None

    def _check_tokens(self) -> StreamFinding | None:
        logits = torch.cat(self.logits)
        n = min(len(logits), len(self.tokens) - self.checked)
        if n <= 0:
            return None
        chosen = self.tokens[self.checked : self.checked + n]
        sampler = self.sampler.from_position(self.checked)
        gaps = sampler.score_gaps(logits[:n], chosen, self.tol.logit_tol).numpy()
        self.logits = [logits[n:]]
        bad = np.flatnonzero(gaps > self.tol.token_gap)
        if len(bad):
            pos = self.checked + int(bad[0])
            return self._cut(
                f"token choice: expected the claimed model's seeded choice, got another at position {pos} "
                f"(gap {gaps[bad[0]]:.4g})",
                pos,
            )
        self.checked += n
        return None

    def _check_chunks(self) -> StreamFinding | None:
        if len(self.hidden) > 1:  # one tensor of every computed position, joined once per pass
            self.hidden = [torch.cat(self.hidden)]
        computed = self.hidden[0].shape[0]
        while self.next_chunk < len(self.spans) and self.next_chunk in self.chunks:
            start, end = self.spans[self.next_chunk]
            if end > computed:
                break
            try:
                c = compare_chunk(
                    self.chunks[self.next_chunk],
                    self.hidden[0][start:end],
                    self.job.fingerprint_k,
                    (start, end),
                )
            except ValueError as exc:  # a chunk that cannot be read back (e.g. modulus 0: fuzzing found it)
                return self._cut(f"fingerprint chunk at positions {start}-{end}: unreadable ({exc})", None)
            if c.close_fraction < self.tol.min_close or c.median_rel_error > self.tol.max_median_rel:
                return self._cut(
                    f"fingerprint chunk at positions {start}-{end}: {c.close_fraction:.0%} close, median "
                    f"error {c.median_rel_error:.3g}",
                    None,
                )
            self.next_chunk += 1
        return None

    def _cut(self, reason: str, position: int | None) -> StreamFinding:
        self.finding = StreamFinding(reason, len(self.tokens), position)
        return self.finding


class EitherStream:
    """A native audit as it streams (thresholds.NATIVE): the answer re-executed in the claimed
    precision on the prover's class and at fp32 side by side; the stream is cut only when both have
    failed (an honest bf16 claim served at fp32 fails the first, not the second), and tokens are
    released as far as a track still standing has checked them."""

    def __init__(self, native: StreamingAudit, upgraded: StreamingAudit) -> None:
        self.tracks = [native, upgraded]
        self.choice, self.spans = native.choice, native.spans

    @property
    def checked(self) -> int:
        standing = [t.checked for t in self.tracks if t.finding is None]
        return max(standing, default=self.tracks[0].checked)

    @property
    def next_chunk(self) -> int:
        standing = [t.next_chunk for t in self.tracks if t.finding is None]
        return max(standing, default=self.tracks[0].next_chunk)

    @property
    def finding(self) -> StreamFinding | None:
        native, upgraded = self.tracks
        if native.finding is None or upgraded.finding is None:
            return None
        reason = (
            f"re-executed in {self.choice.native_precision}: {native.finding.reason}; "
            f"at fp32: {upgraded.finding.reason}"
        )
        return StreamFinding(reason, upgraded.finding.tokens_received, native.finding.first_bad_token)

    def receive(self, token: int) -> StreamFinding | None:
        for t in self.tracks:
            if t.finding is None:
                t.receive(token)
        return self.finding

    def receive_chunk(self, index: int, data: bytes) -> StreamFinding | None:
        for t in self.tracks:
            if t.finding is None:
                t.receive_chunk(index, data)
        return self.finding


def streaming_audit(
    lease: Lease, reference: Callable[[str], LoadedModel], choice: ToleranceChoice, block: int | None = None
) -> StreamingAudit | EitherStream:
    """The streaming audit the rule's choice asks for: one track, or a native one beside fp32.
    `reference(precision)` is Maxwell's reference copy of the leased model in that precision."""
    fp32 = StreamingAudit(lease, reference("fp32"), choice, block)
    if choice.native is None:
        return fp32
    native = StreamingAudit(lease, reference(choice.native_precision), choice, block, choice.native)
    return EitherStream(native, fp32)
