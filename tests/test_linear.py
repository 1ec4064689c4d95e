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
