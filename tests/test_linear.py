"""Tests for npllm/layers/linear.py: y = x @ w + b with w stored (in, out).

Derivation: docs/derivations/linear.md.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.linear import linear_backward, linear_forward


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), Cin=st.integers(1, 7), Cout=st.integers(1, 7),
       bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_linear_gradient(backend, grad_check, lead, Cin, Cout, bias, seed):
    rng = np.random.default_rng(seed)
    p = {"w": backend.asarray(rng.standard_normal((Cin, Cout)))}  # (Cin, Cout)
    if bias:
        p["b"] = backend.asarray(rng.standard_normal(Cout))  # (Cout,)
    x = backend.asarray(rng.standard_normal((*lead, Cin)))  # (..., Cin)
    label = "linear (bias)" if bias else "linear (no bias)"
    errors = grad_check.layer(label, linear_forward, linear_backward, p, x, seed=seed)
    assert set(errors) == set(p) | {"x"}


def test_forward_is_x_times_w_plus_b(backend):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    y, _ = linear_forward({"w": backend.asarray(w), "b": backend.asarray(b)}, backend.asarray(x))
    expected = np.einsum("btc,cd->btd", x, w) + b
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-12, atol=1e-12)


def test_backward_returns_fresh_arrays():
    # the model accumulates gradients with +=, so a backward must never hand out a view of its input
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((3, 3)), "b": rng.standard_normal(3)}
    x = rng.standard_normal((2, 3))
    _, cache = linear_forward(p, x)
    dy = rng.standard_normal((2, 3))
    dx, grads = linear_backward(dy, cache)
    for out in (dx, grads["w"], grads["b"]):
        for given_array in (dy, x, p["w"], p["b"]):
            assert not np.shares_memory(out, given_array)


def test_weight_gradient_of_a_transposed_weight_is_laid_out_like_the_weight(backend):
    # the tied head: w = tok_emb.T (a transposed view). dw = x.T @ dy as always, but its memory is laid out like w,
    # so that dw.T is contiguous like tok_emb and the model's tok_emb gradient sum reads both terms in memory order
    rng = np.random.default_rng(2)
    table = backend.asarray(rng.standard_normal((7, 4)))  # (V, C) like tok_emb
    x, dy = backend.asarray(rng.standard_normal((2, 3, 4))), backend.asarray(rng.standard_normal((2, 3, 7)))
    _, cache = linear_forward({"w": table.T}, x)  # (C, V) view
    _, grads = linear_backward(dy, cache)
    expected = np.einsum("btc,btv->cv", asnumpy(x), asnumpy(dy))  # (C, V)
    np.testing.assert_allclose(asnumpy(grads["w"]), expected, rtol=1e-12, atol=1e-12)
    assert grads["w"].T.flags.c_contiguous
    _, cache = linear_forward({"w": backend.asarray(np.ascontiguousarray(asnumpy(table).T))}, x)  # a plain weight
    _, grads = linear_backward(dy, cache)
    np.testing.assert_allclose(asnumpy(grads["w"]), expected, rtol=1e-12, atol=1e-12)
    assert grads["w"].flags.c_contiguous
