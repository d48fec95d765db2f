"""Seeded sampling: the lease nonce fixes the randomness, so a verifier can re-check every choice.

Gumbel-max: token = argmax(logits / T + g) with g drawn from a generator seeded by
H(seed, position). Temperature 0 is greedy decoding (no noise). Noise is drawn on the CPU
with torch's Mersenne Twister, which gives the same numbers on every platform, and moved to the
model's device when needed.
"""

from __future__ import annotations

import hashlib

import torch

_TINY = 1e-10


class SeededSampler:
    def __init__(self, seed: bytes, temperature: float) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.seed = seed
        self.temperature = temperature

    def _generator(self, position: int) -> torch.Generator:
        digest = hashlib.blake2b(self.seed + position.to_bytes(8, "little"), digest_size=8)
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 1)

    def noise(self, position: int, vocab: int) -> torch.Tensor:
        u = torch.rand(vocab, generator=self._generator(position), dtype=torch.float32)
        u = u.clamp(_TINY, 1.0 - 1e-7)
        return -torch.log(-torch.log(u))

    def scores(self, logits: torch.Tensor, position: int) -> torch.Tensor:
        """Scores whose argmax is the chosen token at `position` (0 = first new token)."""
        logits = logits.float()
        if self.temperature == 0:
            return logits
        noise = self.noise(position, logits.shape[-1]).to(logits.device)
        return logits / self.temperature + noise

    def choose(self, logits: torch.Tensor, position: int) -> int:
        return int(torch.argmax(self.scores(logits, position)).item())

    def score_gaps(self, logits: torch.Tensor, chosen: list[int]) -> torch.Tensor:
        """For each position, best score minus the chosen token's score (0 = it was the argmax).

        Vectorised over positions: the noise matrix is drawn on the CPU and moved once.
        """
        logits = logits.float()
        if self.temperature == 0:
            scores = logits
        else:
            noise = torch.stack([self.noise(pos, logits.shape[-1]) for pos in range(len(chosen))])
            scores = logits / self.temperature + noise.to(logits.device)
        picked = scores.gather(1, torch.tensor(chosen, device=scores.device).unsqueeze(1)).squeeze(1)
        return (scores.max(dim=1).values - picked).cpu()
