"""Tests for npllm/layers/embedding.py: the row gather and its scatter-add adjoint.

Derivation: docs/derivations/embedding.md. Token embeddings are gathered with (B, T) indices, learned positions with
(T,) indices starting at an offset (the cached-decoding case); both must give exact gradients, repeated indices
included.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.embedding import embedding_backward, embedding_forward


@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 12), C=st.integers(1, 6), B=st.integers(1, 3), T=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
def test_token_embedding_gradient(backend, grad_check, N, C, B, T, seed):
    rng = np.random.default_rng(seed)
    p = {"w": backend.asarray(rng.standard_normal((N, C)))}  # (N, C)
    idx = backend.asarray(rng.integers(0, N, size=(B, T)))  # (B, T), repeats are likely: N is small
    errors = grad_check.layer("embedding (tokens)", embedding_forward, embedding_backward, p, idx, wrt_input=False,
                              seed=seed)
    assert set(errors) == {"w"}


@settings(max_examples=25, deadline=None)
@given(T_max=st.integers(1, 16), C=st.integers(1, 6), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_learned_position_embedding_gradient(backend, grad_check, T_max, C, data, seed):
    offset = data.draw(st.integers(0, T_max - 1), label="offset")  # T_past in cached decoding
    T = data.draw(st.integers(1, T_max - offset), label="T")
    rng = np.random.default_rng(seed)
    p = {"w": backend.asarray(rng.standard_normal((T_max, C)))}  # (T_max, C)
    positions = backend.arange(offset, offset + T)  # (T,)
    grad_check.layer("embedding (learned positions)", embedding_forward, embedding_backward, p, positions,
                     wrt_input=False, seed=seed)


def test_forward_is_a_row_gather(backend):
    w = backend.asarray(np.arange(12.0).reshape(4, 3))  # (4, 3)
    idx = backend.asarray(np.array([[3, 0], [0, 2]]))  # (2, 2)
    y, _ = embedding_forward({"w": w}, idx)
    np.testing.assert_array_equal(asnumpy(y), np.arange(12.0).reshape(4, 3)[[[3, 0], [0, 2]]])


def test_backward_sums_repeated_rows_and_returns_no_input_gradient(backend):
    w = backend.asarray(np.zeros((5, 2)))  # (5, 2)
    idx = backend.asarray(np.array([[1, 1, 4], [1, 0, 4]]))  # (2, 3): row 1 three times, row 4 twice
    _, cache = embedding_forward({"w": w}, idx)
    dy = backend.asarray(np.arange(12.0).reshape(2, 3, 2))  # (2, 3, 2)
    dx, grads = embedding_backward(dy, cache)
    assert dx is None
    assert set(grads) == {"w"}
    expected = np.zeros((5, 2))
    expected[1] = [0 + 2 + 6, 1 + 3 + 7]
    expected[4] = [4 + 10, 5 + 11]
    expected[0] = [8, 9]
    np.testing.assert_array_equal(asnumpy(grads["w"]), expected)
    assert grads["w"].dtype == w.dtype
