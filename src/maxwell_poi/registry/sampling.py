"""The seeded sampler (torch): protocol.sampling's rule applied to logits, the same code for the
prover's choice and the verifier's re-check. Here rather than in protocol/ so that the wire side
needs no torch.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..protocol.sampling import gumbel_noise, sampling_key


class SeededSampler:
    def __init__(self, seed: bytes, temperature: float, top_k: int = 0) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        self.temperature = temperature
        self.top_k = top_k
        self._key = sampling_key(seed)
        self.offset = 0  # position 0 here is position `offset` of the lease's answer

    def from_position(self, offset: int) -> SeededSampler:
        """The same draws for a part of the answer that starts at `offset` (a continuation, or a
        check of the answer's later tokens): its position 0 is the answer's position `offset`."""
        shifted = copy.copy(self)
        shifted.offset = self.offset + offset
        return shifted

    def noise(self, positions: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        """Gumbel(0, 1) noise for token `ids` at `positions` (broadcast together)."""
        return torch.from_numpy(gumbel_noise(self._key, positions, ids, self.offset)).float()

    def _candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, ids) of the logits sampling may pick from, along the last dimension."""
        vocab = logits.shape[-1]
        if self.top_k and self.top_k < vocab:
            return torch.topk(logits, self.top_k, dim=-1)
        ids = torch.arange(vocab, device=logits.device).expand_as(logits)
        return logits, ids

    def choose(self, logits: torch.Tensor, position: int) -> int:
        logits = logits.float()
        if self.temperature == 0:
            return int(torch.argmax(logits))
        values, ids = self._candidates(logits)
        g = self.noise(np.full(ids.shape, position), ids.cpu().numpy()).to(logits.device)
        return int(ids[torch.argmax(values / self.temperature + g)])

    def score_gaps(self, logits: torch.Tensor, chosen: list[int], edge_tol: float = 0.0) -> torch.Tensor:
        """Per position: how far the chosen token is from being the pick (0 = it was the pick).

        `edge_tol` (in logits) is the verifier's allowance for the prover's own rounding: a
        candidate whose logit is within it of the k-th largest may not have been a candidate for
        the prover, so it cannot outbid the chosen token; and a chosen token within it below the
        k-th largest counts as a candidate. For a token outside the top-k by more than that, the
        gap is at least how far its scaled logit falls short.
        """
        logits = logits.float()
        chosen_t = torch.tensor(chosen, device=logits.device).unsqueeze(1)
        chosen_logit = logits.gather(1, chosen_t).squeeze(1)
        if self.temperature == 0:
            return (logits.max(dim=1).values - chosen_logit - edge_tol).clamp_min(0).cpu()
        values, ids = self._candidates(logits)
        positions = np.arange(len(chosen))
        scores = values / self.temperature + self.noise(positions[:, None], ids.cpu().numpy()).to(
            logits.device
        )
        topk = bool(self.top_k and self.top_k < logits.shape[-1])
        if topk and edge_tol > 0:  # edge candidates may have been outside the prover's set
            edge = values < (values[:, -1:] + edge_tol)
            scores = torch.where(edge & (ids != chosen_t), torch.full_like(scores, -float("inf")), scores)
        best = scores.max(dim=1).values
        own_noise = self.noise(positions, np.asarray(chosen)).to(logits.device)
        own = chosen_logit / self.temperature + own_noise
        gaps = (best - own - edge_tol / self.temperature).clamp_min(0)
        if topk:
            short = ((values[:, -1] - chosen_logit - edge_tol) / self.temperature).clamp_min(0)
            gaps = torch.maximum(gaps, short)
        return gaps.cpu()
