"""Tests for npllm/layers/mlp.py: SwiGLU and the GELU (tanh) MLP.

Derivation: docs/derivations/mlp.md.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.mlp import (
    gelu_backward,
    gelu_forward,
    mlp_backward,
    mlp_forward,
    swiglu_backward,
    swiglu_forward,
)


def make_params(rng, kind, C, F, bias):
    shapes = {"w1": (C, F), "w2": (F, C)}
    if kind == "swiglu":
        shapes["w3"] = (C, F)
    if bias:
        shapes.update(b1=(F,), b2=(C,))
        if kind == "swiglu":
            shapes["b3"] = (F,)
    return {name: rng.standard_normal(shape) / math.sqrt(shape[0] if len(shape) == 2 else 1)
            for name, shape in shapes.items()}


# x of std <= 2 puts the pre-activations at std <= ~2.2. At 4 (tried), a draw with one row and F = 1 can land the only
# hidden unit at h < -5, where gelu(h) ~ 1e-6: then w2's gradient (a^T dy) is ~1e-6 of f = sum(y * R) and the
# check's own rounding (~1e-16 |f| / h) reads as a 6e-7 relative error. The far tails are tested exactly below.
mlp_cases = dict(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), C=st.integers(1, 6),
                 F=st.integers(1, 8), x_scale=st.sampled_from([0.1, 1.0, 2.0]), seed=st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=15, deadline=None)
@given(**mlp_cases)
def test_swiglu_gradient(backend, grad_check, bias, lead, C, F, x_scale, seed):
    rng = np.random.default_rng(seed)
    p = {n: backend.asarray(v) for n, v in make_params(rng, "swiglu", C, F, bias).items()}
    x = backend.asarray(x_scale * rng.standard_normal((*lead, C)))  # (..., C)
    errors = grad_check.layer(f"swiglu (bias={bias})", swiglu_forward, swiglu_backward, p, x, seed=seed)
    assert set(errors) == set(p) | {"x"}


@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=15, deadline=None)
@given(**mlp_cases)
def test_gelu_mlp_gradient(backend, grad_check, bias, lead, C, F, x_scale, seed):
    rng = np.random.default_rng(seed)
    p = {n: backend.asarray(v) for n, v in make_params(rng, "gelu", C, F, bias).items()}
    x = backend.asarray(x_scale * rng.standard_normal((*lead, C)))  # (..., C)
    errors = grad_check.layer(f"gelu mlp (bias={bias})", gelu_forward, gelu_backward, p, x, seed=seed)
    assert set(errors) == set(p) | {"x"}


def test_forwards_match_the_scalar_formulas(backend):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3))
    for kind in ("swiglu", "gelu"):
        p = make_params(rng, kind, 3, 4, bias=True)
        y, _ = mlp_forward(kind, {n: backend.asarray(v) for n, v in p.items()}, backend.asarray(x))
        expected = np.zeros((2, 3))
        for r in range(2):
            for f in range(4):
                h1 = sum(x[r, c] * p["w1"][c, f] for c in range(3)) + p["b1"][f]
                if kind == "swiglu":
                    h3 = sum(x[r, c] * p["w3"][c, f] for c in range(3)) + p["b3"][f]
                    act = h1 / (1.0 + math.exp(-h1)) * h3  # silu(h1) * h3
                else:
                    act = 0.5 * h1 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (h1 + 0.044715 * h1**3)))
                expected[r] += act * p["w2"][f]
            expected[r] += p["b2"]
        np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-12, atol=1e-13)


def test_huge_preactivations_neither_overflow_nor_lose_the_gradient():
    # silu(h) -> h and gelu(h) -> h for h >> 0, both -> 0 for h << 0; exp(+-1000) must not be formed
    C, F = 1, 4
    p_s = {"w1": np.ones((C, F)), "w3": np.ones((C, F)), "w2": np.ones((F, C))}
    p_g = {"w1": np.ones((C, F)), "w2": np.ones((F, C))}
    for x in (np.array([[1000.0]]), np.array([[-1000.0]])):
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y_s, c_s = swiglu_forward(p_s, x)
            dx_s, _ = swiglu_backward(np.ones_like(y_s), c_s)
            y_g, c_g = gelu_forward(p_g, x)
            dx_g, _ = gelu_backward(np.ones_like(y_g), c_g)
        h = x[0, 0]
        if h > 0:  # y = F * h^2 (swiglu, h3 = h), F * h (gelu); slopes 2 F h and F
            np.testing.assert_allclose([y_s[0, 0], dx_s[0, 0]], [F * h * h, 2 * F * h], rtol=1e-12)
            np.testing.assert_allclose([y_g[0, 0], dx_g[0, 0]], [F * h, F], rtol=1e-12)
        else:
            np.testing.assert_array_equal([y_s[0, 0], y_g[0, 0]], [0.0, 0.0])
            assert abs(dx_s[0, 0]) < 1e-300 and dx_g[0, 0] == 0.0


def test_dispatch_by_kind():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2))
    for kind, fwd, bwd in (("swiglu", swiglu_forward, swiglu_backward), ("gelu", gelu_forward, gelu_backward)):
        p = make_params(rng, kind, 2, 3, bias=False)
        y, cache = mlp_forward(kind, p, x)
        np.testing.assert_array_equal(y, fwd(p, x)[0])
        dx, grads = mlp_backward(kind, np.ones_like(y), cache)
        np.testing.assert_array_equal(dx, bwd(np.ones_like(y), fwd(p, x)[1])[0])
        assert list(grads) == list(p)
