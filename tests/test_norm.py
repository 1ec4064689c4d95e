"""Tests for npllm/layers/norm.py: RMSNorm and LayerNorm over the last axis.

Derivation: docs/derivations/norm.md. eps is drawn over six orders of magnitude, and the input scale too, so both
the regime where eps is negligible and the one where it dominates the variance are exercised.

A norm bends on the length scale of its row, sqrt(mean(x^2) + eps) (RMSNorm) or sqrt(var + eps) (LayerNorm): a
finite-difference step of 1e-5 is fine for rows of size 1 but is a large step for rows of size 1e-3, where the
O(h^2) truncation error would dominate, while a step shrunk to 1e-8 lets rounding dominate (1e-7 was seen). So the
suite's five-point stencil (order 4, truncation O(h^4); see tests/conftest.py) runs here with a step of 3e-4 times the
smallest row scale (capped at 3e-4): the truncation error is then ~(3e-4)^4 and the rounding error ~1e-16 / 3e-4, at
every scale.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
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


STEP = 3e-4  # the suite's step (tests/conftest.py FD_STEP), here relative to the row scale


def _step(x, eps, centred):
    """STEP times the smallest row scale, at most STEP."""
    x = asnumpy(x)
    if centred:
        x = x - x.mean(axis=-1, keepdims=True)
    row_scale = np.sqrt((x * x).mean(axis=-1) + eps).min()
    return STEP * min(1.0, float(row_scale))


@settings(max_examples=25, deadline=None)
@given(lead=shapes, C=st.integers(2, 8), eps=eps_values, scale=scales, seed=st.integers(0, 2**32 - 1))
def test_rmsnorm_gradient(backend, grad_check, lead, C, eps, scale, seed):
    p, x = _inputs(backend, seed, lead, C, scale, with_bias=False)
    h = _step(x, eps, centred=False)
    errors = grad_check.layer("rmsnorm", lambda p, x: rmsnorm_forward(p, x, eps), rmsnorm_backward, p, x, seed=seed,
                              h=h)
    assert set(errors) == {"w", "x"}


@settings(max_examples=25, deadline=None)
@given(lead=shapes, C=st.integers(3, 8), eps=eps_values, scale=scales, seed=st.integers(0, 2**32 - 1))
def test_layernorm_gradient(backend, grad_check, lead, C, eps, scale, seed):
    p, x = _inputs(backend, seed, lead, C, scale, with_bias=True)
    h = _step(x, eps, centred=True)
    errors = grad_check.layer("layernorm", lambda p, x: layernorm_forward(p, x, eps), layernorm_backward, p, x,
                              seed=seed, h=h)
    assert set(errors) == {"w", "b", "x"}


def test_rmsnorm_of_one_channel_has_the_closed_form_gradient():
    # C = 1 is degenerate: y = w x / sqrt(x^2 + eps) ~ w sign(x), so dy/dx = w eps / (x^2 + eps)^(3/2) is ~1e-6 and a
    # finite difference of an O(1) output cannot resolve it (the property test above draws C >= 2; LayerNorm's, which
    # loses one more degree of freedom to the mean, C >= 3). Check it against the closed form instead.
    x, w, eps = np.array([[0.7], [-1.3], [1e-3]]), np.array([1.7]), 1e-4
    y, cache = rmsnorm_forward({"w": w}, x, eps)
    dy = np.array([[0.5], [2.0], [-1.0]])
    dx, grads = rmsnorm_backward(dy, cache)
    # the code forms 1 - xhat^2 ~ eps / x^2 by subtraction, losing log10(x^2 / eps) ~ 4 of the 16 digits
    np.testing.assert_allclose(dx, dy * w * eps / (x**2 + eps) ** 1.5, rtol=1e-10)
    np.testing.assert_allclose(grads["w"], [(dy * x / np.sqrt(x**2 + eps)).sum()], rtol=1e-12)


def test_layernorm_of_two_channels_has_the_closed_form_gradient():
    # C = 2 is degenerate too: the centred row is (d/2, -d/2) with d = x0 - x1, so xhat = (s, -s) with
    # s = (d/2) / sqrt(d^2/4 + eps) ~ sign(d), and dx0 = -dx1 = (dy0 w0 - dy1 w1) ds/dd,
    # ds/dd = (eps/2) / (d^2/4 + eps)^1.5.
    x = np.array([[0.3, -0.5], [2.0, 2.0 + 2**-10], [-1.0, 4.0]])  # the middle row: d = -2^-10, tiny next to eps
    w, b, eps = np.array([1.5, -0.7]), np.array([0.1, 0.2]), 1e-4
    y, cache = layernorm_forward({"w": w, "b": b}, x, eps)
    d = x[:, 0] - x[:, 1]
    s = (d / 2) / np.sqrt(d**2 / 4 + eps)
    np.testing.assert_allclose(y, np.stack([w[0] * s + b[0], -w[1] * s + b[1]], axis=-1), rtol=1e-13)
    dy = np.array([[1.0, 2.0], [-0.5, 0.25], [3.0, 1.0]])
    dx, grads = layernorm_backward(dy, cache)
    dx0 = (dy[:, 0] * w[0] - dy[:, 1] * w[1]) * (eps / 2) / (d**2 / 4 + eps) ** 1.5
    np.testing.assert_allclose(dx, np.stack([dx0, -dx0], axis=-1), rtol=1e-9)  # the code subtracts ~equal terms
    np.testing.assert_allclose(grads["w"], [(dy[:, 0] * s).sum(), -(dy[:, 1] * s).sum()], rtol=1e-13)
    np.testing.assert_allclose(grads["b"], dy.sum(axis=0), rtol=1e-15)


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
