"""Tests for npllm/gradcheck.py: the finite-difference checker itself must catch wrong backwards.

A checker that passes everything proves nothing, so each kind of mistake a hand-written backward makes (a missing
factor, a missing term, a transposed matrix, a forgotten gradient) is planted here and must show an error near 1,
on both the entry-by-entry path (small arrays) and the random-direction path (large arrays).
"""

import numpy as np
import pytest

from npllm.backend import asnumpy
from npllm.gradcheck import DEFAULT_STEP, STENCILS, check_gradients, check_layer, relative_error
from npllm.layers.linear import linear_backward, linear_forward
from npllm.layers.norm import layernorm_backward, layernorm_forward


def square_forward(p, x):
    return x * x, x


def square_backward_missing_factor_two(dy, x):
    return dy * x, {}  # the truth is 2 x dy


def layernorm_backward_missing_mean_term(dy, cache):
    xhat, rstd, w = cache
    dxhat = dy * w
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # "- mean(dxhat)" left out
    return dx, {"w": (dy * xhat).reshape(-1, xhat.shape[-1]).sum(0), "b": dy.reshape(-1, xhat.shape[-1]).sum(0)}


def linear_backward_transposed(dy, cache):
    x, p = cache
    dx, grads = linear_backward(dy, cache)
    return dy @ p["w"], grads  # w instead of w.T: right shape for a square w, wrong values


def linear_backward_forgets_bias(dy, cache):
    dx, grads = linear_backward(dy, cache)
    grads["b"] = grads["b"] * 0
    return dx, grads


@pytest.mark.parametrize("size", [5, 200])  # entry by entry / random directions (max_elementwise = 64)
@pytest.mark.parametrize("order", [2, 4])
def test_missing_factor_is_caught(backend, size, order):
    x = backend.asarray(np.random.default_rng(0).standard_normal(size))
    errors = check_layer(square_forward, square_backward_missing_factor_two, {}, x, order=order)
    # ||x dy - 2 x dy|| / ||2 x dy|| = 1/2 on the entry-by-entry path; the directions see the same factor
    assert abs(errors["x"] - 0.5) < 1e-6


@pytest.mark.parametrize("lead", [(3,), (40, 3)])  # small and large x
def test_missing_term_transposed_matrix_and_zeroed_gradient_are_caught(backend, lead):
    rng = np.random.default_rng(1)
    x = backend.asarray(rng.standard_normal((*lead, 6)))
    p_norm = {"w": backend.asarray(rng.standard_normal(6)), "b": backend.asarray(rng.standard_normal(6))}

    def norm_forward(p, x):
        return layernorm_forward(p, x, 1e-5)

    right = check_layer(norm_forward, layernorm_backward, p_norm, x)
    wrong = check_layer(norm_forward, layernorm_backward_missing_mean_term, p_norm, x)
    assert max(right.values()) < 1e-8
    assert wrong["x"] > 0.1 and wrong["w"] < 1e-8  # the error is reported where it is

    p_lin = {"w": backend.asarray(rng.standard_normal((6, 6))), "b": backend.asarray(rng.standard_normal(6))}
    assert max(check_layer(linear_forward, linear_backward, p_lin, x).values()) < 1e-8
    assert check_layer(linear_forward, linear_backward_transposed, p_lin, x)["x"] > 0.5
    forgot = check_layer(linear_forward, linear_backward_forgets_bias, p_lin, x)
    # 1 less the differences' rounding bound (~1e-9 of the gradient here)
    assert forgot["b"] == pytest.approx(1.0, abs=1e-8) and forgot["w"] < 1e-8


def test_a_truly_zero_gradient_reports_zero(backend):
    # f does not depend on z at all: both sides are zero up to rounding noise, which must not read as an error
    x = backend.asarray(np.random.default_rng(2).standard_normal(4))
    z = backend.asarray(np.ones(3))
    errors = check_gradients(lambda: float((x * x).sum() + 0.0 * z.sum()), {"x": x, "z": z},
                             {"x": 2 * x, "z": backend.zeros(3)})
    assert errors == {"x": pytest.approx(0.0, abs=1e-9), "z": 0.0}


@pytest.mark.parametrize("order", [2, 4])
def test_a_gradient_below_the_rounding_floor_is_checked_to_the_floor_and_no_further(order):
    # f = 1e3 + 1e-6 sum(x^2): the gradient, 2e-6 x, is 1e-9 of f, so the differences' rounding error (~eps 1e3 / h
    # = 2e-8 at h = 1e-5) swamps it: the raw comparison reads as a relative error near 1 for the right gradient.
    x = np.random.default_rng(7).standard_normal(6)

    def f():
        return float(1e3 + 1e-6 * (x * x).sum())

    right = {"x": 2e-6 * x}
    assert check_gradients(f, {"x": x}, right, order=order, f_ulps=0)["x"] > 1e-3
    assert check_gradients(f, {"x": x}, right, order=order)["x"] == 0.0

    def g():  # at a gradient the differences can resolve, a wrong one is caught in full: 1e-1 x against 2e-1 x
        return float(1e3 + 1e-1 * (x * x).sum())

    assert 0.49 < check_gradients(g, {"x": x}, {"x": 1e-1 * x}, order=order)["x"] <= 0.5


def test_the_five_point_stencil_has_fourth_order_truncation():
    # f = sum(sin(x)) at h = 1e-2: three-point error ~ h^2/6 ~ 1.7e-5, five-point ~ h^4/30 ~ 3e-10
    x = np.random.default_rng(3).uniform(-1, 1, 8)
    exact = {"x": np.cos(x)}
    e2 = check_gradients(lambda: float(np.sin(x).sum()), {"x": x}, exact, h=1e-2, order=2)["x"]
    e4 = check_gradients(lambda: float(np.sin(x).sum()), {"x": x}, exact, h=1e-2, order=4)["x"]
    assert 1e-6 < e2 < 1e-4
    assert e4 < 1e-9
    assert set(STENCILS) == {2, 4}


@pytest.mark.parametrize("size", [5, 200])
@pytest.mark.parametrize("order", [2, 4])
def test_arrays_are_restored_bit_for_bit(backend, size, order):
    x = backend.asarray(np.random.default_rng(4).standard_normal(size) * 1e3)
    before = asnumpy(x).copy()
    check_gradients(lambda: float((x * x).sum()), {"x": x}, {"x": 2 * x}, order=order)
    np.testing.assert_array_equal(asnumpy(x), before)


def test_refuses_float32_arrays():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"float64.*'x' is float32"):
        check_gradients(lambda: float(x.sum()), {"x": x}, {"x": np.ones(3)})
    with pytest.raises(ValueError, match="float64"):
        check_layer(linear_forward, linear_backward, {"w": np.ones((3, 2), dtype=np.float32)}, np.ones((1, 3)))


def test_refuses_mismatched_shapes_non_contiguous_arrays_and_unknown_orders():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"gradient 'x' has shape \(3, 2\), its array has \(2, 3\)"):
        check_gradients(lambda: float(x.sum()), {"x": x}, {"x": np.ones((3, 2))})
    xt = np.ones((3, 2)).T  # a view whose reshape(-1) would be a copy: perturbing it would not reach f
    with pytest.raises(ValueError, match="'xt' is not C-contiguous"):
        check_gradients(lambda: float(xt.sum()), {"xt": xt}, {"xt": np.ones((2, 3))})
    with pytest.raises(ValueError, match="order=3 is not allowed; choose one of: 2, 4"):
        check_gradients(lambda: float(x.sum()), {"x": x}, {"x": np.ones((2, 3))}, order=3)


def test_check_layer_insists_on_a_gradient_for_every_parameter():
    p = {"w": np.ones((2, 2)), "b": np.zeros(2)}

    def backward_without_b(dy, cache):
        dx, grads = linear_backward(dy, cache)
        return dx, {"w": grads["w"]}

    with pytest.raises(AssertionError, match=r"grads for \['w'\], the layer has \['b', 'w'\]"):
        check_layer(linear_forward, backward_without_b, p, np.ones((1, 2)))


def test_relative_error_definition():
    assert relative_error(np.array([1.0, 0.0]), np.array([1.0, 0.0])) == 0.0
    assert relative_error(np.array([3.0, 4.0]), np.array([0.0, 0.0])) == 1.0  # a gradient where there is none
    assert relative_error(np.array([1.0]), np.array([2.0])) == 0.5
    assert relative_error(np.array([1e-9]), np.array([-1e-9])) == 0.0  # both below zero_tol: zero on both sides
    assert relative_error(np.array([1e-9]), np.array([-1e-9]), zero_tol=1e-10) == 2.0
    # only the part of ||a - n|| beyond the numerical side's rounding bound counts
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5]), noise=0.5) == 0.0
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5]), noise=[0.3, 0.4]) == 0.0
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5]), noise=0.2) == pytest.approx(
        (0.5 - 0.2 * np.sqrt(2)) / np.hypot(3.0, 4.5))
    assert DEFAULT_STEP == 1e-5
