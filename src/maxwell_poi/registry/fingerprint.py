"""Fingerprints computed from hidden states (torch): the top-k entries of a chunk, committed or
compared in protocol.fingerprint's wire format. Here rather than in protocol/ so that reading and
writing the wire format needs no torch; the prover and the verifier both import it from here.
"""

from __future__ import annotations

import numpy as np
import torch

from ..protocol.fingerprint import ChunkComparison, compare_values, encode_values


def top_entries(hidden: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and float16 values of the k largest |entries| of a chunk of hidden states."""
    flat = hidden.detach().reshape(-1).float().cpu()
    k = min(k, flat.numel())
    idx = torch.topk(flat.abs(), k, sorted=True).indices
    values = flat[idx].to(torch.float16).numpy()
    return idx.numpy().astype(np.int64), values


def encode_chunk(hidden: torch.Tensor, k: int) -> bytes:
    idx, values = top_entries(hidden, k)
    return encode_values(idx, values, k)


def compare_chunk(chunk: bytes, hidden: torch.Tensor, k: int, positions: tuple[int, int]) -> ChunkComparison:
    idx, mine = top_entries(hidden, k)
    return compare_values(chunk, idx, mine, positions)
