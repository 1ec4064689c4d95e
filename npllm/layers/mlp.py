"""Feed-forward blocks: SwiGLU (LLaMA) and the GELU MLP with the tanh approximation (GPT-2).

Derivation: docs/derivations/mlp.md
"""

import math

from ..backend import get_array_module

GELU_K = math.sqrt(2.0 / math.pi)  # constant inside gelu's tanh
GELU_A = 0.044715  # cubic coefficient inside gelu's tanh


def _sigmoid(xp, z):
    # 1 / (1 + exp(-z)) written as 0.5 (1 + tanh(z / 2)): the same function, one transcendental, no overflow
    return 0.5 * (1.0 + xp.tanh(0.5 * z))


def swiglu_forward(p, x):
    """y = (silu(x @ w1 + b1) * (x @ w3 + b3)) @ w2 + b2.
    p = {"w1": (C, F), "w3": (C, F), "w2": (F, C)}, and "b1", "b3" (F,), "b2" (C,) when the model has biases."""
    xp = get_array_module(x)
    h1 = x @ p["w1"]  # (..., F)
    h3 = x @ p["w3"]  # (..., F)
    if "b1" in p:
        h1 = h1 + p["b1"]
        h3 = h3 + p["b3"]
    sig = _sigmoid(xp, h1)  # (..., F)
    a = h1 * sig  # (..., F) silu(h1)
    g = a * h3  # (..., F)
    y = g @ p["w2"]  # (..., C)
    if "b2" in p:
        y = y + p["b2"]
    cache = (p, x, h1, h3, sig, a, g)  # keep the F-wide activations: recomputing them costs two more GEMMs
    return y, cache


def swiglu_backward(dy, cache):
    """forward was g = silu(h1) * h3, y = g @ w2, h1 = x @ w1, h3 = x @ w3, so
    dg = dy @ w2.T, dh3 = dg * silu(h1), dh1 = dg * h3 * silu'(h1) with silu'(h) = sig * (1 + h * (1 - sig)),
    dx = dh1 @ w1.T + dh3 @ w3.T."""
    p, x, h1, h3, sig, a, g = cache
    C, F = p["w1"].shape
    dy2 = dy.reshape(-1, C)  # (N, C)
    x2 = x.reshape(-1, C)  # (N, C)
    grads = {"w2": g.reshape(-1, F).T @ dy2}  # (F, C)
    dg = dy @ p["w2"].T  # (..., F)
    dh3 = dg * a  # (..., F)
    dh1 = dg * h3 * sig * (1.0 + h1 * (1.0 - sig))  # (..., F)
    dh1_rows, dh3_rows = dh1.reshape(-1, F), dh3.reshape(-1, F)  # (N, F)
    grads["w1"] = x2.T @ dh1_rows  # (C, F)
    grads["w3"] = x2.T @ dh3_rows  # (C, F)
    if "b1" in p:
        grads["b1"] = dh1_rows.sum(axis=0)  # (F,)
        grads["b3"] = dh3_rows.sum(axis=0)  # (F,)
    if "b2" in p:
        grads["b2"] = dy2.sum(axis=0)  # (C,)
    dx = dh1 @ p["w1"].T + dh3 @ p["w3"].T  # (..., C)
    return dx, {name: grads[name] for name in p}


def gelu_forward(p, x):
    """y = gelu_tanh(x @ w1 + b1) @ w2 + b2.  p = {"w1": (C, F), "w2": (F, C)}, and "b1" (F,), "b2" (C,) with bias."""
    xp = get_array_module(x)
    h = x @ p["w1"]  # (..., F)
    if "b1" in p:
        h = h + p["b1"]
    t = xp.tanh(GELU_K * (h + GELU_A * h * h * h))  # (..., F)
    a = 0.5 * h * (1.0 + t)  # (..., F)
    y = a @ p["w2"]  # (..., C)
    if "b2" in p:
        y = y + p["b2"]
    cache = (p, x, h, t, a)  # keep h, tanh(.) and gelu(h): tanh is the costly part of the derivative
    return y, cache


def gelu_backward(dy, cache):
    """forward was a = 0.5 h (1 + t), t = tanh(u), u = K (h + A h^3), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * (0.5 (1 + t) + 0.5 h (1 - t^2) K (1 + 3 A h^2)), dx = dh @ w1.T."""
    p, x, h, t, a = cache
    C, F = p["w1"].shape
    dy2 = dy.reshape(-1, C)  # (N, C)
    grads = {"w2": a.reshape(-1, F).T @ dy2}  # (F, C)
    if "b2" in p:
        grads["b2"] = dy2.sum(axis=0)  # (C,)
    da = dy @ p["w2"].T  # (..., F)
    dh = da * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_A * h * h))  # (..., F)
    dh2 = dh.reshape(-1, F)  # (N, F)
    grads["w1"] = x.reshape(-1, C).T @ dh2  # (C, F)
    if "b1" in p:
        grads["b1"] = dh2.sum(axis=0)  # (F,)
    dx = dh @ p["w1"].T  # (..., C)
    return dx, {name: grads[name] for name in p}


def mlp_forward(kind, p, x):
    """Dispatch on the config's ``mlp`` field ("swiglu" or "gelu")."""
    return (swiglu_forward if kind == "swiglu" else gelu_forward)(p, x)


def mlp_backward(kind, dy, cache):
    return (swiglu_backward if kind == "swiglu" else gelu_backward)(dy, cache)
