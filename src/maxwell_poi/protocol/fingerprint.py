"""Tolerant activation fingerprints, after the idea published with TOPLOC (arXiv 2501.16007).

For each chunk of positions we take the k largest-magnitude entries of the final hidden state
(after the last norm), round their values to float16, and commit to them as a polynomial over
GF(65497) through the points (index mod m, value bits), where m makes the indices distinct.
Only m and the k coefficients travel: 2 + 2k bytes per chunk. The verifier recomputes the hidden
states, finds its own top-k indices, and evaluates the polynomial there to read back the values
the prover saw; where the two runs agree the values match, where they do not the read-back is
noise. Written for this project from the paper's description; no code from `toploc` is used.

This module is the wire side (numpy only, imported inside the functions so that reading a receipt
needs neither numpy nor torch); taking the top-k of hidden states is registry.fingerprint.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

PRIME = 65497  # largest prime below 2**16 - 38: every finite float16 bit pattern is below it


def _pow_mod(base: np.ndarray, exponent: int) -> np.ndarray:
    import numpy as np

    result = np.ones_like(base)
    b = base % PRIME
    e = exponent
    while e:
        if e & 1:
            result = result * b % PRIME
        b = b * b % PRIME
        e >>= 1
    return result


_INVERSES: np.ndarray | None = None


def _inverse(values: np.ndarray) -> np.ndarray:
    """Modular inverses by table look-up (Fermat once for the whole field, then a gather)."""
    import numpy as np

    global _INVERSES
    if _INVERSES is None:
        _INVERSES = _pow_mod(np.arange(PRIME, dtype=np.int64), PRIME - 2)
    return _INVERSES[values % PRIME]


def interpolate(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Monomial coefficients (low to high) of the polynomial through (xs, ys) over GF(PRIME)."""
    import numpy as np

    x = xs.astype(np.int64) % PRIME
    c = ys.astype(np.int64) % PRIME
    n = len(x)
    for j in range(1, n):  # Newton divided differences, vectorised over i
        num = (c[j:] - c[j - 1 : -1]) % PRIME
        den = (x[j:] - x[: n - j]) % PRIME
        c[j:] = num * _inverse(den) % PRIME
    poly = np.zeros(n, dtype=np.int64)
    poly[0] = c[n - 1]
    for degree, i in enumerate(range(n - 2, -1, -1)):  # poly = poly * (X - x_i) + c_i
        shifted = np.zeros_like(poly)
        shifted[1 : degree + 2] = poly[: degree + 1]
        poly = (shifted - x[i] * poly) % PRIME
        poly[0] = (poly[0] + c[i]) % PRIME
    return poly


def evaluate(coeffs: np.ndarray, xs: np.ndarray) -> np.ndarray:
    import numpy as np

    x = xs.astype(np.int64) % PRIME
    acc = np.zeros_like(x)
    for c in coeffs[::-1]:
        acc = (acc * x + int(c)) % PRIME
    return acc


def injective_modulus(indices: np.ndarray) -> int:
    """Largest m <= PRIME under which the indices stay distinct."""
    import numpy as np

    if len(indices) and int(indices.max()) < PRIME:
        return PRIME
    for m in range(PRIME, len(indices) - 1, -1):
        if len(np.unique(indices % m)) == len(indices):
            return m
    raise ValueError("no injective modulus below 2**16 for these indices")


def chunk_size_bytes(k: int) -> int:
    return 2 + 2 * k


def encode_values(idx: np.ndarray, values: np.ndarray, k: int) -> bytes:
    """One chunk on the wire: the modulus, then the k coefficients through (index, float16 bits)."""
    import numpy as np

    bits = values.view(np.uint16).astype(np.int64)
    m = injective_modulus(idx)
    coeffs = interpolate(idx % m, bits)
    padded = np.zeros(k, dtype=np.int64)  # a chunk smaller than k still takes k slots
    padded[: len(coeffs)] = coeffs
    return struct.pack("<H", m) + padded.astype("<u2").tobytes()


def read_back(chunk: bytes, indices: np.ndarray) -> np.ndarray:
    """Float16 values the prover committed to, evaluated at the verifier's indices."""
    import numpy as np

    (m,) = struct.unpack_from("<H", chunk)
    if m == 0:
        raise ValueError("fingerprint chunk has modulus 0")
    coeffs = np.frombuffer(chunk, dtype="<u2", offset=2).astype(np.int64)
    bits = evaluate(coeffs, indices % m).astype(np.uint16)
    return bits.view(np.float16)


@dataclass(frozen=True)
class ChunkComparison:
    """How closely the prover's committed values match the verifier's at the verifier's top-k."""

    positions: tuple[int, int]
    exact_fraction: float  # float16 bit-identical
    close_fraction: float  # relative error within `close_rel`
    median_rel_error: float
    mean_rel_error: float  # with each error capped at 1, so garbage counts but cannot explode

    def as_dict(self) -> dict[str, object]:
        return {
            "positions": list(self.positions),
            "exact": round(self.exact_fraction, 4),
            "close": round(self.close_fraction, 4),
            "median_rel": float(self.median_rel_error),
            "mean_rel": float(self.mean_rel_error),
        }


CLOSE_REL = 2.0**-9  # two float16 ulps: what honest float32 reruns on other kernels stay within


def compare_values(
    chunk: bytes, idx: np.ndarray, mine: np.ndarray, positions: tuple[int, int]
) -> ChunkComparison:
    """The committed chunk read back at the verifier's top-k indices, against its own float16 values."""
    import numpy as np

    theirs = read_back(chunk, idx)
    with np.errstate(invalid="ignore", over="ignore"):
        mine64 = mine.astype(np.float64)
        theirs64 = theirs.astype(np.float64)
        rel = np.abs(theirs64 - mine64) / np.maximum(np.abs(mine64), 1e-3)
    rel = np.where(np.isfinite(rel), rel, np.inf)
    return ChunkComparison(
        positions=positions,
        exact_fraction=float(np.mean(theirs.view(np.uint16) == mine.view(np.uint16))),
        close_fraction=float(np.mean(rel <= CLOSE_REL)),
        median_rel_error=float(np.median(rel)),
        mean_rel_error=float(np.mean(np.minimum(rel, 1.0))),
    )


def chunk_spans(prompt_len: int, new_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """Position ranges of the fingerprinted chunks: the prompt as one, then the decode steps.

    Generating n tokens feeds n - 1 of them back, so positions [0, prompt_len + n - 1) have
    hidden states; the last token is chosen but never fed.
    """
    spans = [(0, prompt_len)]
    end = prompt_len + max(new_tokens - 1, 0)
    start = prompt_len
    while start < end:
        spans.append((start, min(start + chunk, end)))
        start += chunk
    return spans
