"""Tests for npllm/layers/positions.py: the sinusoidal positional encoding table.

Derivation: docs/derivations/positions.md. The references: the paper's formula evaluated entry by entry with
math.sin / math.cos, and Hugging Face's own tables (DistilBERT's interleaved one; Marian's [sin | cos] one, which is
ours with the columns permuted) when transformers is importable.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.positions import sinusoidal_table


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 12), half=st.integers(1, 8), offset=st.integers(0, 5000))
def test_table_matches_the_formula_entry_by_entry(backend, T, half, offset):
    dim = 2 * half
    positions = np.arange(offset, offset + T)
    table = sinusoidal_table(positions, dim, xp=backend, dtype=np.float64)
    assert table.shape == (T, dim) and table.dtype == np.float64
    expected = np.empty((T, dim))
    for t, pos in enumerate(positions):
        for d in range(half):
            angle = pos / 10000.0 ** (2 * d / dim)
            expected[t, 2 * d] = math.sin(angle)
            expected[t, 2 * d + 1] = math.cos(angle)
    # the angle pos * 10000^(-2d/dim) and pos / 10000^(2d/dim) differ by ~1 ulp of the angle (<= 5000 * 1.1e-16)
    np.testing.assert_allclose(asnumpy(table), expected, rtol=0, atol=2e-12)


@settings(max_examples=20, deadline=None)
@given(pos=st.integers(0, 2000), shift=st.integers(-50, 50), half=st.integers(1, 6))
def test_a_shift_is_a_fixed_rotation_of_each_pair(pos, shift, half):
    # PE[pos + shift, 2d : 2d+2] = Shift_d PE[pos, 2d : 2d+2], a rotation by shift * f_d (not depending on pos)
    dim = 2 * half
    pos = max(pos, -shift)  # keep pos + shift >= 0
    both = sinusoidal_table(np.array([pos, pos + shift]), dim, dtype=np.float64)  # (2, dim)
    f = 10000.0 ** (-np.arange(half) * 2.0 / dim)  # (half,) the frequencies f_d
    sin_pos, cos_pos = both[0, 0::2], both[0, 1::2]
    cos_shift, sin_shift = np.cos(shift * f), np.sin(shift * f)
    np.testing.assert_allclose(both[1, 0::2], sin_pos * cos_shift + cos_pos * sin_shift, rtol=0, atol=1e-12)
    np.testing.assert_allclose(both[1, 1::2], cos_pos * cos_shift - sin_pos * sin_shift, rtol=0, atol=1e-12)


def test_float32_is_the_rounded_float64_table():
    positions = np.arange(0, 4096, 7)
    t64 = sinusoidal_table(positions, 64, dtype=np.float64)
    t32 = sinusoidal_table(positions, 64)  # float32 is the default
    assert t32.dtype == np.float32
    np.testing.assert_array_equal(t32, t64.astype(np.float32))
    assert np.array_equal(t64[0, 0::2], np.zeros(32)) and np.array_equal(t64[0, 1::2], np.ones(32))


def test_agrees_with_hugging_face_tables():
    torch = pytest.importorskip("torch")
    distilbert = pytest.importorskip("transformers.models.distilbert.modeling_distilbert")
    marian = pytest.importorskip("transformers.models.marian.modeling_marian")
    n_pos, dim = 300, 24
    ours = sinusoidal_table(np.arange(n_pos), dim, dtype=np.float64)
    hf_interleaved = distilbert._create_sinusoidal_embeddings(n_pos, dim, torch.empty(n_pos, dim)).numpy()
    hf_halves = marian.MarianSinusoidalPositionalEmbedding(n_pos, dim).create_weight().detach().numpy()
    # both are float32 tables computed in float64 by another formula (pos / 10000^(2i/dim)): one float32 rounding
    np.testing.assert_allclose(hf_interleaved, ours, rtol=0, atol=1.2e-7)
    order = np.r_[0:dim:2, 1:dim:2]  # Marian: all sines, then all cosines
    np.testing.assert_allclose(hf_halves, ours[:, order], rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("dim", [0, 3, 2.0, True])
def test_odd_or_non_int_dim_is_refused(dim):
    with pytest.raises(ValueError, match="dim="):
        sinusoidal_table(np.arange(4), dim)


@pytest.mark.parametrize("positions", [np.array([0.5, 1.0]), np.array([-1, 2]), np.zeros((2, 2), dtype=int)])
def test_bad_positions_are_refused(positions):
    with pytest.raises(ValueError, match="positions"):
        sinusoidal_table(positions, 8)
