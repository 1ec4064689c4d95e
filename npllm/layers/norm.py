"""RMSNorm (LLaMA) and LayerNorm (GPT-2) over the last axis.

Derivation: docs/derivations/norm.md
"""

from ..backend import get_array_module


def rmsnorm_forward(p, x, eps):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps).  p = {"w": (C,)}, x (..., C)."""
    xp = get_array_module(x)
    rstd = 1.0 / xp.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x * rstd  # (..., C)
    y = xhat * p["w"]  # (..., C)
    cache = (xhat, rstd, p["w"])  # keep xhat and rstd (one extra activation, saves recomputing the mean)
    return y, cache


def rmsnorm_backward(dy, cache):
    """forward was xhat = x * rstd, y = xhat * w, so
    dw = sum(dy * xhat), dxhat = dy * w, dx = rstd * (dxhat - xhat * mean(dxhat * xhat))."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    dxhat = dy * w  # (..., C)
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))  # (..., C)
    return dx, {"w": dw}


def layernorm_forward(p, x, eps):
    """y = (x - mean) * rstd * w + b with rstd = 1 / sqrt(var + eps).  p = {"w": (C,), "b": (C,)}, x (..., C)."""
    xp = get_array_module(x)
    mu = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mu  # (..., C)
    rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=-1, keepdims=True) + eps)  # (..., 1), biased variance
    xhat = xc * rstd  # (..., C)
    y = xhat * p["w"] + p["b"]  # (..., C)
    cache = (xhat, rstd, p["w"])  # keep xhat and rstd; the mean itself is not needed again
    return y, cache


def layernorm_backward(dy, cache):
    """forward was xhat = (x - mean) * rstd, y = xhat * w + b, so
    dw = sum(dy * xhat), db = sum(dy), dxhat = dy * w,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    xhat, rstd, w = cache
    C = xhat.shape[-1]
    dw = (dy * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    db = dy.reshape(-1, C).sum(axis=0)  # (C,)
    dxhat = dy * w  # (..., C)
    dx = rstd * (
        dxhat - dxhat.mean(axis=-1, keepdims=True) - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )  # (..., C)
    return dx, {"w": dw, "b": db}


def norm_forward(kind, p, x, eps):
    """Dispatch on the config's ``norm`` field ("rmsnorm" or "layernorm")."""
    return (rmsnorm_forward if kind == "rmsnorm" else layernorm_forward)(p, x, eps)


def norm_backward(kind, dy, cache):
    return (rmsnorm_backward if kind == "rmsnorm" else layernorm_backward)(dy, cache)
