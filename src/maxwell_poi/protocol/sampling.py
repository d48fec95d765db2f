"""Seeded sampling: the lease nonce fixes the randomness, so a verifier can re-check every choice.

Gumbel-max over the top-k candidates: token = argmax_{i in top-k(logits)} (logit_i / T + g(pos, i)).
The noise g for (position, token id) comes from a counter-based generator (SplitMix64 over a key
derived from the lease seed), so either side can draw it for just the ids it needs, in any
order, with integer arithmetic that is the same on every machine. Temperature 0 is greedy
decoding; top_k = 0 samples from the whole vocabulary.

The noise is public once the nonce is known; what matters is that nobody knows it before the
lease is issued, and that an old answer cannot match the noise of a new nonce.

This module is the rule (numpy only, imported inside the functions); the sampler that applies it to
logits is registry.sampling.SeededSampler (torch).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB


def sampling_key(seed: bytes) -> int:
    """The generator's 64-bit key for a lease seed."""
    return int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little")


def _splitmix64(counters: np.ndarray, key: int) -> np.ndarray:
    import numpy as np

    with np.errstate(over="ignore"):
        z = np.uint64(key) + (counters + np.uint64(1)) * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
        return z ^ (z >> np.uint64(31))


def gumbel_noise(key: int, positions: np.ndarray, ids: np.ndarray, offset: int = 0) -> np.ndarray:
    """Gumbel(0, 1) noise (float64) for token `ids` at answer positions `offset + positions`
    (broadcast together): counter (position << 32) | id through SplitMix64 under `key`."""
    import numpy as np

    at = np.asarray(positions, dtype=np.uint64) + np.uint64(offset)
    counters = (at << np.uint64(32)) | np.asarray(ids, dtype=np.uint64)
    bits = _splitmix64(counters, key)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # strictly inside (0, 1)
    return -np.log(-np.log(u))
