from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maxwell_poi.protocol import fingerprint as fp
from maxwell_poi.registry.fingerprint import compare_chunk, encode_chunk, top_entries


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_interpolation_passes_through_every_point(data):
    n = data.draw(st.integers(1, 64))
    xs = np.array(data.draw(st.lists(st.integers(0, fp.PRIME - 1), min_size=n, max_size=n, unique=True)))
    ys = np.array(data.draw(st.lists(st.integers(0, fp.PRIME - 1), min_size=n, max_size=n)))
    coeffs = fp.interpolate(xs, ys)
    assert len(coeffs) == n
    assert np.array_equal(fp.evaluate(coeffs, xs), ys)


def test_read_back_recovers_committed_values_at_the_provers_indices():
    hidden = torch.randn(32, 768, generator=torch.Generator().manual_seed(0))
    chunk = encode_chunk(hidden, 32)
    assert len(chunk) == fp.chunk_size_bytes(32)
    idx, values = top_entries(hidden, 32)
    assert np.array_equal(fp.read_back(chunk, idx).view(np.uint16), values.view(np.uint16))


def test_comparison_separates_same_perturbed_and_unrelated_states():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, 256, generator=g)
    chunk = encode_chunk(hidden, 32)
    same = compare_chunk(chunk, hidden.clone(), 32, (0, 32))
    noisy = compare_chunk(chunk, hidden * (1 + 0.01 * torch.randn(hidden.shape, generator=g)), 32, (0, 32))
    other = compare_chunk(chunk, torch.randn(32, 256, generator=g), 32, (0, 32))
    assert same.exact_fraction == 1.0 and same.median_rel_error == 0.0
    assert noisy.close_fraction < 0.5 and noisy.median_rel_error > 1e-3
    assert other.close_fraction < 0.1 and other.median_rel_error > 0.1


def test_indices_beyond_the_field_get_an_injective_modulus():
    idx = np.array([5, 70_000, 140_001, 200_003])
    m = fp.injective_modulus(idx)
    assert m <= fp.PRIME and len(set((idx % m).tolist())) == len(idx)
    hidden = torch.zeros(300_000)
    hidden[idx] = torch.tensor([5.0, -4.0, 3.0, 2.0])
    chunk = encode_chunk(hidden, 4)
    assert compare_chunk(chunk, hidden, 4, (0, 1)).exact_fraction == 1.0


@pytest.mark.parametrize(("prompt", "new", "chunk"), [(5, 1, 32), (5, 2, 32), (7, 64, 32), (3, 65, 16)])
def test_chunk_spans_cover_every_fed_position_once(prompt, new, chunk):
    spans = fp.chunk_spans(prompt, new, chunk)
    assert spans[0] == (0, prompt)
    covered = [p for s, e in spans for p in range(s, e)]
    assert covered == list(range(prompt + new - 1))
    assert all(e - s <= chunk for s, e in spans[1:])


def test_zero_modulus_is_refused():
    with pytest.raises(ValueError, match="modulus 0"):
        fp.read_back(b"\x00\x00" + b"\x01\x00" * 4, np.array([1, 2]))
