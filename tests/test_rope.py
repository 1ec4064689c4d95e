"""Tests for npllm/layers/rope.py: rotary position embedding and its transposed rotation.

Derivation: docs/derivations/rope.md. The reference below rotates each pair (i, i + hs/2) by its own angle, written
from the formula one scalar at a time, with no tables and no rotate_half.
"""

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.rope import rope_backward, rope_forward, rope_tables

head_sizes = st.integers(1, 5).map(lambda n: 2 * n)  # hs even, 2..10
thetas = st.floats(1.0, 1e6)
offsets = st.integers(0, 5000)  # first position: T_past in cached decoding


def naive_rope(x, positions, theta):
    """x (B, H, T, hs): rotate (x[i], x[i + hs/2]) by angle pos * theta^(-2i/hs), one pair at a time."""
    B, H, T, hs = x.shape
    half = hs // 2
    y = np.empty_like(x)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                for i in range(half):
                    angle = positions[t] * theta ** (-2.0 * i / hs)
                    c, s = math.cos(angle), math.sin(angle)
                    x1, x2 = x[b, h, t, i], x[b, h, t, i + half]
                    y[b, h, t, i] = x1 * c - x2 * s
                    y[b, h, t, i + half] = x2 * c + x1 * s
    return y


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), hs=head_sizes, theta=thetas,
       offset=offsets, seed=st.integers(0, 2**32 - 1))
def test_rope_gradient(backend, grad_check, B, H, T, hs, theta, offset, seed):
    cos, sin = rope_tables(np.arange(offset, offset + T), hs, theta, xp=backend, dtype=np.float64)  # (T, hs)
    x = backend.asarray(np.random.default_rng(seed).standard_normal((B, H, T, hs)))  # (B, H, T, hs)
    errors = grad_check.layer("rope", lambda p, x: rope_forward(x, cos, sin), rope_backward, {}, x, seed=seed)
    assert set(errors) == {"x"}


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), hs=head_sizes, theta=thetas,
       offset=offsets, seed=st.integers(0, 2**32 - 1))
def test_rope_forward_matches_per_pair_rotation(backend, B, H, T, hs, theta, offset, seed):
    positions = np.arange(offset, offset + T)
    cos, sin = rope_tables(positions, hs, theta, xp=backend, dtype=np.float64)
    x = np.random.default_rng(seed).standard_normal((B, H, T, hs))
    y, _ = rope_forward(backend.asarray(x), cos, sin)
    np.testing.assert_allclose(asnumpy(y), naive_rope(x, positions, theta), rtol=0, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(hs=head_sizes, theta=thetas, m=offsets, n=offsets, shift=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1))
def test_rotation_keeps_norms_and_scores_depend_only_on_relative_position(hs, theta, m, n, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((1, 1, 1, hs)), rng.standard_normal((1, 1, 1, hs))

    def rot(x, pos):
        return rope_forward(x, *rope_tables(np.array([pos]), hs, theta, dtype=np.float64))[0]

    np.testing.assert_allclose(np.linalg.norm(rot(q, m)), np.linalg.norm(q), rtol=1e-12)
    score = float((rot(q, m) * rot(k, n)).sum())
    shifted = float((rot(q, m + shift) * rot(k, n + shift)).sum())
    # angles up to ~6000 rad lose ~1e-12 of absolute precision in cos/sin
    assert abs(score - shifted) <= 1e-9 * (1 + abs(score))


def test_backward_is_the_transpose_of_forward():
    # <rope(x), dy> == <x, rope_backward(dy)> for a linear map and its adjoint
    rng = np.random.default_rng(3)
    cos, sin = rope_tables(np.arange(7, 11), 6, 500.0, dtype=np.float64)
    x, dy = rng.standard_normal((2, 3, 4, 6)), rng.standard_normal((2, 3, 4, 6))
    y, cache = rope_forward(x, cos, sin)
    dx, grads = rope_backward(dy, cache)
    assert grads == {}
    np.testing.assert_allclose((y * dy).sum(), (x * dx).sum(), rtol=1e-12)


def test_tables_shape_and_dtype():
    cos, sin = rope_tables(np.arange(5), 8, 10000.0)
    assert cos.shape == sin.shape == (5, 8)
    assert cos.dtype == sin.dtype == np.float32
    np.testing.assert_array_equal(cos[0], np.ones(8, dtype=np.float32))  # position 0 is no rotation
    np.testing.assert_array_equal(cos[:, :4], cos[:, 4:])  # pair i and i + hs/2 share an angle
