"""A public finite-difference gradient checker, for our layers, the whole model, and your own code.

Central differences: df/dx_i ~= (f(x + h e_i) - f(x - h e_i)) / (2 h), whose error is O(h^2) (truncation) plus
O(eps_machine * |f| / h) (rounding). In float64 with h = 1e-5 both stay near 1e-10 relative to the gradient for
O(1) functions whose gradient is O(1) too, so a correct backward shows relative errors far below the 1e-6 the tests
demand, and a wrong one (a missing term, a transposed matrix) shows errors near 1. The rounding term is relative to
|f|, not to the gradient: where a gradient is 1e-5 of f, it reads as a 1e-6 relative error (see ``order=4``).

Relative error of an analytic gradient a against a numerical n (both vectors), beyond the differences' own
rounding noise r:
    rel = max(0, ||a - n|| - ||r||) / max(||a||, ||n||)
r_i bounds the rounding error of the i-th difference: each value of f is taken to be off by at most ``f_ulps`` units
in the last place of its magnitude, and the stencil divides those errors by h, so r_i = sum_k |c_k| 2 f_ulps eps
max|f| / h (k, c_k: the stencil below; eps = 2.2e-16). Without it, a gradient that is itself near that floor (a
query bias whose softmax sees one key and a second one barely, ~1e-8 of a loss of 5: finite differences at h = 3e-4
cannot resolve it better than ~1e-11 absolute) reads as a relative error of 1e-4 although the backward is right; with
it, such a gradient is checked to what the differences can see and no further. A wrong backward (a missing term, a
transposed matrix) errs by a sizeable part of the gradient, far above r, and still shows an error near 1. The default
``f_ulps`` = 4 is ~5x the measured worst case: over 298 tiny seq2seq models (tests/test_seq2seq.py's draws, at
h = 3e-4, order 4) the differences erred by at most 0.73 times the one-ulp bound. ``f_ulps=0`` compares the raw
difference.

When both norms are below ``zero_tol`` (default 1e-8) the gradient is zero on both sides, as far as finite
differences can tell, and the error is reported as 0. A gradient that is truly zero (the key bias, which shifts every
score of a softmax row equally) would otherwise divide noise by noise; a backward that wrongly returns zero is still
caught, because then ||n|| is well above ``zero_tol``.

Small arrays (<= ``max_elementwise`` entries) are checked entry by entry; larger ones along ``n_directions``
random unit directions u, comparing <a, u> with (f(x + h u) - f(x - h u)) / (2 h).

``order=4`` uses the five-point stencil (8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))) / (12 h), whose truncation
error is O(h^4): with it a larger step (e.g. 3e-4) keeps the truncation error small while cutting the rounding error
(which grows as 1/h) about 30-fold. That matters for a whole model, where some parameters have gradients 1e-5 times
the loss (a query bias behind a near one-hot softmax) and the rounding error of the loss itself is what limits a
second-order check at h = 1e-5. It costs twice the evaluations of f.
"""

from __future__ import annotations

import numpy as np

from .backend import asnumpy, get_array_module

DEFAULT_STEP = 1e-5
DEFAULT_F_ULPS = 4.0  # the rounding error assumed of each value of f, in units in the last place of its magnitude
EPS = float(np.finfo(np.float64).eps)

# f'(x) ~ sum over k of c_k (f(x + k h) - f(x - k h)) / h: the central-difference stencils, {order: {k: c_k}}
STENCILS = {2: {1: 1 / 2}, 4: {1: 2 / 3, 2: -1 / 12}}


def relative_error(analytic, numerical, zero_tol: float = 1e-8, noise=0.0) -> float:
    """max(0, ||a - n|| - ||noise||) / max(||a||, ||n||); 0 when both norms are at most zero_tol. ``noise``: a bound
    on the rounding error of each entry of the numerical gradient (a scalar or one per entry)."""
    a = np.asarray(asnumpy(analytic), dtype=np.float64).ravel()
    n = np.asarray(asnumpy(numerical), dtype=np.float64).ravel()
    scale = max(np.linalg.norm(a), np.linalg.norm(n))
    if scale <= zero_tol:
        return 0.0
    floor = np.linalg.norm(np.broadcast_to(np.asarray(noise, dtype=np.float64), n.shape))
    return float(max(0.0, np.linalg.norm(a - n) - floor) / scale)


def _central_difference(f, move, h: float, order: int, f_ulps: float) -> tuple[float, float]:
    """The derivative of f along the perturbation that ``move(t)`` applies (x = x0 + t * direction), and the bound on
    its rounding error when each value of f is off by at most f_ulps ulps of its magnitude."""
    total, largest = 0.0, 0.0
    for k, c in STENCILS[order].items():
        move(k * h)
        f_plus = f()
        move(-k * h)
        f_minus = f()
        total += c * (f_plus - f_minus)
        largest = max(largest, abs(f_plus), abs(f_minus))
    move(0.0)  # restores x0 exactly
    rounding = sum(abs(c) for c in STENCILS[order].values()) * 2 * f_ulps * EPS * largest / h
    return total / h, rounding


def check_gradients(f, arrays: dict, grads: dict, *, h: float = DEFAULT_STEP, order: int = 2,
                    max_elementwise: int = 64, n_directions: int = 6, seed: int = 0,
                    zero_tol: float = 1e-8, f_ulps: float = DEFAULT_F_ULPS) -> dict[str, float]:
    """Compare ``grads[name]`` with finite differences of the scalar ``f()`` for every name in ``grads``.

    ``f`` takes no arguments and reads ``arrays`` (which must be float64 and C-contiguous); each array is perturbed
    in place and restored exactly. ``order`` is 2 (the three-point central difference) or 4 (five-point).
    ``f_ulps``: the rounding error assumed of each value of f (see the module's docstring; 0 for none).
    Returns {name: relative error}.
    """
    if order not in STENCILS:
        raise ValueError(f"order={order!r} is not allowed; choose one of: {', '.join(map(str, STENCILS))}")
    rng = np.random.default_rng(seed)
    errors = {}
    for name, g in grads.items():
        x = arrays[name]
        if x.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 arrays; {name!r} is {x.dtype}")
        if g.shape != x.shape:
            raise ValueError(f"gradient {name!r} has shape {g.shape}, its array has {x.shape}")
        if not x.flags.c_contiguous:  # reshape(-1) would then copy, and perturbing the copy would not reach f
            raise ValueError(f"gradient checks perturb arrays in place; {name!r} is not C-contiguous "
                             "(pass xp.ascontiguousarray(array))")
        xp = get_array_module(x)
        flat = x.reshape(-1)  # a view: writing to it perturbs x
        if x.size <= max_elementwise:
            numerical, noise = np.empty(x.size), np.empty(x.size)
            for i in range(x.size):
                old = flat[i].copy()

                def move(t, i=i, old=old):
                    flat[i] = old if t == 0 else old + t

                numerical[i], noise[i] = _central_difference(f, move, h, order, f_ulps)
            errors[name] = relative_error(g, numerical, zero_tol, noise)
        else:
            analytic, numerical, noise = [], [], []
            original = flat.copy()
            for _ in range(n_directions):
                u = rng.standard_normal(x.size)
                u /= np.linalg.norm(u)
                u_dev = xp.asarray(u)

                def move(t, u_dev=u_dev):
                    flat[...] = original if t == 0 else original + t * u_dev

                derivative, rounding = _central_difference(f, move, h, order, f_ulps)
                numerical.append(derivative)
                noise.append(rounding)
                analytic.append(float((asnumpy(g).reshape(-1) * u).sum()))
            errors[name] = relative_error(np.array(analytic), np.array(numerical), zero_tol, np.array(noise))
    return errors


def check_layer(forward, backward, p: dict, x, *, seed: int = 0, wrt_input: bool = True, **kwargs) -> dict[str, float]:
    """Check a layer pair ``forward(p, x) -> (y, cache)``, ``backward(dy, cache) -> (dx, grads)``.

    The scalar checked is f = sum(y * R) for a fixed random R, so backward is run with dy = R. Returns
    {"x": error of dx, name: error of grads[name]} (``x`` left out when ``wrt_input`` is False, e.g. for integer
    inputs). Extra keyword arguments go to ``check_gradients``.
    """
    xp = get_array_module(x, *p.values())
    y, cache = forward(p, x)
    R = xp.asarray(np.random.default_rng(seed + 1).standard_normal(y.shape))  # (same shape as y)
    dx, grads = backward(R, cache)
    if set(grads) != set(p):
        raise AssertionError(f"backward returned grads for {sorted(grads)}, the layer has {sorted(p)}")
    arrays = dict(p)
    checked = dict(grads)
    if wrt_input:
        arrays["x"] = x
        checked["x"] = dx

    def f():
        y_, _ = forward(p, x)
        return float((y_ * R).sum())

    return check_gradients(f, arrays, checked, seed=seed, **kwargs)
