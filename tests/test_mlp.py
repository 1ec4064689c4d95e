"""Tests for npllm/layers/mlp.py: SwiGLU, the GELU (tanh) MLP, the exact (erf) GELU MLP and the ReLU MLP, and erf.

Derivation: docs/derivations/mlp.md.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.mlp import (
    MLP_KINDS,
    erf,
    erfc,
    gelu_backward,
    gelu_erf_backward,
    gelu_erf_forward,
    gelu_forward,
    mlp_backward,
    mlp_forward,
    relu_backward,
    relu_forward,
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
    for kind in ("swiglu", "gelu", "gelu_erf", "relu"):
        p = make_params(rng, kind, 3, 4, bias=True)
        y, _ = mlp_forward(kind, {n: backend.asarray(v) for n, v in p.items()}, backend.asarray(x))
        expected = np.zeros((2, 3))
        for r in range(2):
            for f in range(4):
                h1 = sum(x[r, c] * p["w1"][c, f] for c in range(3)) + p["b1"][f]
                if kind == "swiglu":
                    h3 = sum(x[r, c] * p["w3"][c, f] for c in range(3)) + p["b3"][f]
                    act = h1 / (1.0 + math.exp(-h1)) * h3  # silu(h1) * h3
                elif kind == "gelu":
                    act = 0.5 * h1 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (h1 + 0.044715 * h1**3)))
                elif kind == "gelu_erf":
                    act = 0.5 * h1 * (1.0 + math.erf(h1 / math.sqrt(2.0)))
                else:
                    act = max(h1, 0.0)
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
    pairs = (("swiglu", swiglu_forward, swiglu_backward), ("gelu", gelu_forward, gelu_backward),
             ("gelu_erf", gelu_erf_forward, gelu_erf_backward), ("relu", relu_forward, relu_backward))
    assert [kind for kind, _, _ in pairs] == list(MLP_KINDS)
    for kind, fwd, bwd in pairs:
        p = make_params(rng, kind, 2, 3, bias=False)
        y, cache = mlp_forward(kind, p, x)
        np.testing.assert_array_equal(y, fwd(p, x)[0])
        dx, grads = mlp_backward(kind, np.ones_like(y), cache)
        np.testing.assert_array_equal(dx, bwd(np.ones_like(y), fwd(p, x)[1])[0])
        assert list(grads) == list(p)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="mlp='geglu'"):
        mlp_forward("geglu", {}, np.zeros((1, 1)))


# erf and erfc against Python's math.erf / math.erfc (the C library's), on points that cover every branch of Cody's
# approximations (|z| <= 0.46875, up to 4, beyond 4, past 26.543 where erfc underflows), tiny and subnormal z, and
# the break points themselves. Measured: erf's largest relative error is 4.5e-16 (4 units in the last place, just past
# 0.46875, where erf = 1 - erfc adds erfc's rounding), erfc's 9.0e-16 (where erfc >= 1e-300).
ERF_POINTS = np.concatenate([
    np.linspace(-30.0, 30.0, 60_001), np.logspace(-310, 1.5, 20_000), -np.logspace(-310, 1.5, 20_000),
    np.random.default_rng(0).standard_normal(20_000) * 3.0,
    [0.0, -0.0, 0.46875, -0.46875, np.nextafter(0.46875, 1.0), 4.0, -4.0, np.nextafter(4.0, 5.0), 26.543, 27.0],
])


def test_erf_matches_math_erf_to_a_few_ulps():
    expected = np.array([math.erf(z) for z in ERF_POINTS])
    got = erf(ERF_POINTS)
    normal = np.abs(expected) >= np.finfo(np.float64).tiny  # a subnormal result has fewer than 53 bits to compare
    rel = np.abs(got - expected)[normal] / np.abs(expected[normal])
    assert rel.max() <= 1e-15, f"largest relative error {rel.max():.2e} at z = {ERF_POINTS[normal][rel.argmax()]}"
    assert np.abs(got - expected)[~normal].max() <= 2 * 5e-324  # within two subnormal spacings
    np.testing.assert_array_equal(erf(np.array([np.inf, -np.inf, 40.0, -40.0])), [1.0, -1.0, 1.0, -1.0])
    assert np.isnan(erf(np.array([np.nan]))).all()
    np.testing.assert_array_equal(erf(-ERF_POINTS), -got)  # odd, exactly


def test_erfc_matches_math_erfc_to_a_few_ulps():
    expected = np.array([math.erfc(z) for z in ERF_POINTS])
    got = erfc(ERF_POINTS)
    normal = expected >= 1e-300  # beyond z ~ 26.2 math.erfc is subnormal and has few digits left to compare
    rel = np.abs(got - expected)[normal] / expected[normal]
    assert rel.max() <= 2e-15, f"largest relative error {rel.max():.2e} at z = {ERF_POINTS[normal][rel.argmax()]}"
    assert np.abs(got - expected)[~normal].max() <= 1e-300
    np.testing.assert_array_equal(erfc(np.array([np.inf, -np.inf])), [0.0, 2.0])


def test_erf_in_float32_stays_float32():
    z = np.linspace(-6, 6, 1001, dtype=np.float32)
    got = erf(z)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [math.erf(v) for v in z.astype(np.float64)], rtol=0, atol=3e-7)


def test_erf_derivative_is_two_over_sqrt_pi_exp_minus_z_squared():
    # central differences of erf (step 1e-5: truncation ~1e-11, rounding ~1e-16 / 1e-5 = 1e-11) against the formula
    # that gelu_erf_backward uses, through Phi'(h) = exp(-h^2 / 2) / sqrt(2 pi)
    z = np.linspace(-5.0, 5.0, 2001)
    step = 1e-5
    numerical = (erf(z + step) - erf(z - step)) / (2 * step)
    np.testing.assert_allclose(numerical, 2.0 / math.sqrt(math.pi) * np.exp(-z * z), rtol=0, atol=1e-9)


def test_gelu_erf_keeps_its_relative_accuracy_in_the_negative_tail():
    # gelu(h) = h Phi(h) with Phi(h) = 0.5 erfc(-h / sqrt 2): no 1 + erf(.) ~ 1 - 1 cancellation for h << 0, so the
    # relative error stays at the conditioning of erfc(y), ~2 y^2 = h^2 times the rounding of y = h / sqrt 2 (here
    # and in the reference); measured: at most 3e-15 for h > -5 and 7.2e-16 h^2 beyond. (1 + erf(.) loses every
    # digit from h = -8.375 on, where erf(h / sqrt 2) rounds to -1, and is off by 2e-6 at h = -7 already.)
    h = -np.linspace(0.5, 37.0, 500)
    one = np.ones((1, 1))
    y, _ = gelu_erf_forward({"w1": one, "w2": one}, h[:, None])
    expected = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2.0)) for v in h])
    rel = np.abs(y[:, 0] - expected) / np.abs(expected)
    assert (rel <= 4e-15 + 1e-15 * h * h).all(), f"relative error {rel.max():.2e} at h = {h[rel.argmax()]}"
    assert (expected < 0).all() and (y[:, 0] < 0).all()  # down to h = -37, where gelu(h) = -2.1e-298


def kink_margin(x, p):
    """How far the finite differences move a ReLU pre-activation: the step times four (the five-point stencil goes
    to +-2 h; another factor 2 for safety) times the largest distance a unit perturbation of x, w1 or b1 can move
    h = x @ w1 + b1 (a column of w1, a row of x, or 1)."""
    C = p["w1"].shape[0]
    rows = x.reshape(-1, C)
    scale = max(1.0, np.linalg.norm(p["w1"], axis=0).max(), np.linalg.norm(rows, axis=1).max())
    return 4 * 3e-4 * scale


@pytest.mark.parametrize("kind", ["gelu_erf", "relu"])
@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(**mlp_cases)
def test_gelu_erf_and_relu_gradients(backend, grad_check, kind, bias, lead, C, F, x_scale, seed):
    rng = np.random.default_rng(seed)
    p = make_params(rng, kind, C, F, bias)
    x = x_scale * rng.standard_normal((*lead, C))  # (..., C)
    if kind == "relu":  # finite differences across the kink at h = 0 would be wrong there, not the backward
        h = x @ p["w1"] + (p["b1"] if bias else 0.0)
        assume(np.abs(h).min() > kink_margin(x, p))
    p = {n: backend.asarray(v) for n, v in p.items()}
    fwd, bwd = MLP_KINDS[kind]
    errors = grad_check.layer(f"{kind} mlp (bias={bias})", fwd, bwd, p, backend.asarray(x), seed=seed)
    assert set(errors) == set(p) | {"x"}


@pytest.mark.parametrize("kind", ["gelu_erf", "relu"])
@pytest.mark.parametrize("bias", [False, True])
def test_gelu_erf_and_relu_agree_with_torch(kind, bias):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    C, F = 5, 9
    p = make_params(rng, kind, C, F, bias)
    x = 2.0 * rng.standard_normal((2, 4, C))
    dy = rng.standard_normal((2, 4, C))
    y, cache = mlp_forward(kind, p, x)
    dx, grads = mlp_backward(kind, dy, cache)

    tp = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in p.items()}
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    h = tx @ tp["w1"] + (tp["b1"] if bias else 0.0)
    a = torch.nn.functional.gelu(h, approximate="none") if kind == "gelu_erf" else torch.nn.functional.relu(h)
    ty = a @ tp["w2"] + (tp["b2"] if bias else 0.0)
    ty.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-13, atol=1e-13)
    for n in p:
        np.testing.assert_allclose(grads[n], tp[n].grad.numpy(), rtol=1e-13, atol=1e-13, err_msg=n)


def test_gelu_erf_and_relu_at_huge_preactivations():
    # gelu(h) -> h and relu(h) = h for h >> 0, both 0 for h << 0, with slopes 1 and 0; no overflow, no NaN
    C, F = 1, 4
    p = {"w1": np.ones((C, F)), "w2": np.ones((F, C))}
    for fwd, bwd in ((gelu_erf_forward, gelu_erf_backward), (relu_forward, relu_backward)):
        for h in (1000.0, -1000.0):
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                y, cache = fwd(p, np.array([[h]]))
                dx, _ = bwd(np.ones_like(y), cache)
            expected = (F * h, F) if h > 0 else (0.0, 0.0)
            np.testing.assert_allclose([y[0, 0], dx[0, 0]], expected, rtol=1e-12, atol=0)
