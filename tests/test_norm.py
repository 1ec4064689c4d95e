"""Tests for npllm/layers/norm.py: RMSNorm and LayerNorm over the last axis.

Derivation: docs/derivations/norm.md. eps is drawn over six orders of magnitude, and the input scale too, so both
the regime where eps is negligible and the one where it dominates the variance are exercised.

A norm bends on the length scale of its row, sqrt(mean(x^2) + eps) (RMSNorm) or sqrt(var + eps) (LayerNorm): a
finite-difference step of 1e-5 is fine for rows of size 1 but is a large step for rows of size 1e-3, where the
O(h^2) truncation error would dominate. So the step is 1e-5 times the smallest row scale (capped at 1e-5), which
keeps the truncation error near 1e-10 at every scale.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.gradcheck import DEFAULT_STEP, check_layer
from npllm.layers.norm import (
    layernorm_backward,
    layernorm_forward,
    norm_backward,
    norm_forward,
    rmsnorm_backward,
    rmsnorm_forward,
)

shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2)  # leading dims (..., C)
eps_values = st.floats(1e-6, 1.0)
scales = st.sampled_from([0.01, 1.0, 10.0])  # the input's standard deviation


def _inputs(backend, seed, lead, C, scale, with_bias):
    rng = np.random.default_rng(seed)
    p = {"w": backend.asarray(rng.standard_normal(C))}  # (C,)
    if with_bias:
        p["b"] = backend.asarray(rng.standard_normal(C))  # (C,)
    x = backend.asarray(scale * rng.standard_normal((*lead, C)) + rng.standard_normal())  # (..., C), off-centre
    return p, x


def _step(x, eps, centred):
    """DEFAULT_STEP times the smallest row scale, at most DEFAULT_STEP."""
    x = asnumpy(x)
    if centred:
        x = x - x.mean(axis=-1, keepdims=True)
    row_scale = np.sqrt((x * x).mean(axis=-1) + eps).min()
    return DEFAULT_STEP * min(1.0, float(row_scale))


@settings(max_examples=25, deadline=None)
@given(lead=shapes, C=st.integers(2, 8), eps=eps_values, scale=scales, seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_gradient(backend, assert_grads, lead, C, eps, scale, seed):
    p, x = _inputs(backend, seed, lead, C, scale, with_bias=False)
    h = _step(x, eps, centred=False)
    errors = check_layer(lambda p, x: rmsnorm_forward(p, x, eps), rmsnorm_backward, p, x, seed=seed, h=h)
    assert set(errors) == {"w", "x"}
    assert_grads(errors, "rmsnorm", h=h)


@settings(max_examples=25, deadline=None)
@given(lead=shapes, C=st.integers(1, 8), eps=eps_values, scale=scales, seed=st.integers(0, 2**32 - 1))
def test_layernorm_gradient(backend, assert_grads, lead, C, eps, scale, seed):
    p, x = _inputs(backend, seed, lead, C, scale, with_bias=True)
    h = _step(x, eps, centred=True)
    errors = check_layer(lambda p, x: layernorm_forward(p, x, eps), layernorm_backward, p, x, seed=seed, h=h)
    assert set(errors) == {"w", "b", "x"}
    assert_grads(errors, "layernorm", h=h)


def test_rmsnorm_of_one_channel_has_the_closed_form_gradient():
    # C = 1 is degenerate: y = w x / sqrt(x^2 + eps) ~ w sign(x), so dy/dx = w eps / (x^2 + eps)^(3/2) is ~1e-6 and a
    # finite difference of an O(1) output cannot resolve it (the property test above draws C >= 2). Check it exactly.
    x, w, eps = np.array([[0.7], [-1.3], [1e-3]]), np.array([1.7]), 1e-4
    y, cache = rmsnorm_forward({"w": w}, x, eps)
    dy = np.array([[0.5], [2.0], [-1.0]])
    dx, grads = rmsnorm_backward(dy, cache)
    # the code forms 1 - xhat^2 ~ eps / x^2 by subtraction, losing log10(x^2 / eps) ~ 4 of the 16 digits
    np.testing.assert_allclose(dx, dy * w * eps / (x**2 + eps) ** 1.5, rtol=1e-10)
    np.testing.assert_allclose(grads["w"], [(dy * x / np.sqrt(x**2 + eps)).sum()], rtol=1e-12)


def test_layernorm_of_one_channel_outputs_its_bias_and_has_zero_input_gradient():
    y, cache = layernorm_forward({"w": np.array([2.0]), "b": np.array([0.25])}, np.array([[3.0], [-4.0]]), 1e-5)
    np.testing.assert_array_equal(y, [[0.25], [0.25]])
    dx, grads = layernorm_backward(np.array([[1.0], [2.0]]), cache)
    np.testing.assert_array_equal(dx, np.zeros((2, 1)))
    np.testing.assert_array_equal(grads["w"], [0.0])
    np.testing.assert_array_equal(grads["b"], [3.0])


def test_rmsnorm_forward_matches_formula(backend):
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    y, _ = rmsnorm_forward({"w": backend.asarray(w)}, backend.asarray(x), 1e-5)
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-13, atol=0)


def test_layernorm_forward_matches_formula(backend):
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal(5)
    y, _ = layernorm_forward({"w": backend.asarray(w), "b": backend.asarray(b)}, backend.asarray(x), 1e-5)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-12, atol=1e-13)


def test_dispatch_by_kind():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4))
    p = {"w": rng.standard_normal(4), "b": rng.standard_normal(4)}
    for kind, fwd, bwd, pk in (("rmsnorm", rmsnorm_forward, rmsnorm_backward, {"w": p["w"]}),
                               ("layernorm", layernorm_forward, layernorm_backward, p)):
        y, cache = norm_forward(kind, pk, x, 1e-5)
        y_ref, cache_ref = fwd(pk, x, 1e-5)
        np.testing.assert_array_equal(y, y_ref)
        dx, g = norm_backward(kind, np.ones_like(y), cache)
        dx_ref, g_ref = bwd(np.ones_like(y), cache_ref)
        np.testing.assert_array_equal(dx, dx_ref)
        assert set(g) == set(pk)
