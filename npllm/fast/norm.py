"""RMSNorm and LayerNorm over the last axis with fused, all-core elementwise work: the contract of
npllm.layers.norm (same names, signatures, caches (xhat, rstd, w) and grads), computed chunk by chunk of rows.

Each chunk of rows runs the reference's operations in the reference's order, with ``out=`` into the layer's outputs
or one small scratch instead of a fresh (..., C) array per operation, and the chunks run on all cores
(npllm.fast.pool). The row statistics (mean, mean of squares) are sums over the last axis of each row, computed
exactly as the reference computes them, so y, xhat, rstd and dx have the reference's bits. The parameter gradients
dw = sum over rows of dy * xhat and db = sum of dy are summed per chunk while the chunk is in cache, then the
chunks' partial sums are added in row order: those two differ from the reference's one long sum by rounding only.

Derivation: docs/derivations/norm.md
"""

from __future__ import annotations

from ..backend import get_array_module
from .pool import map_rows, sum_parts


def _rows(a, C):
    return a.reshape(-1, C)  # (N, C); a view for the layer's own arrays, a copy of a non-contiguous input


def rmsnorm_forward(p, x, eps):
    """y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps).  p = {"w": (C,)}, x (..., C)."""
    xp = get_array_module(x)
    C = x.shape[-1]
    w = p["w"]
    x2 = _rows(x, C)  # (N, C)
    N = x2.shape[0]
    rstd = xp.empty((N, 1), dtype=xp.result_type(x, eps))  # (N, 1)
    xhat = xp.empty(x2.shape, dtype=rstd.dtype)  # (N, C)
    y = xp.empty(x2.shape, dtype=xp.result_type(xhat, w))  # (N, C)

    def rows(r):
        xr = x2[r]
        s = xp.empty_like(xr)  # (n, C) scratch
        xp.multiply(xr, xr, out=s)  # x^2
        ms = s.mean(axis=-1, keepdims=True)  # (n, 1) mean(x^2)
        ms += eps
        xp.sqrt(ms, out=ms)
        xp.divide(1.0, ms, out=rstd[r])  # rstd = 1 / sqrt(mean(x^2) + eps)
        xp.multiply(xr, rstd[r], out=xhat[r])  # xhat = x * rstd
        xp.multiply(xhat[r], w, out=y[r])  # y = xhat * w

    map_rows(rows, N, C, xp=xp)
    lead = x.shape[:-1]
    cache = (xhat.reshape(x.shape), rstd.reshape(*lead, 1), w)  # the reference's: keep xhat and rstd
    return y.reshape(x.shape), cache


def rmsnorm_backward(dy, cache):
    """forward was xhat = x * rstd, y = xhat * w, so
    dw = sum(dy * xhat), dxhat = dy * w, dx = rstd * (dxhat - xhat * mean(dxhat * xhat))."""
    xhat, rstd, w = cache
    xp = get_array_module(dy)
    C = xhat.shape[-1]
    dy2, xhat2, rstd2 = _rows(dy, C), _rows(xhat, C), rstd.reshape(-1, 1)  # (N, C), (N, C), (N, 1)
    dx = xp.empty(xhat2.shape, dtype=xp.result_type(dy, xhat, rstd, w))  # (N, C)
    gdt = xp.result_type(dy, xhat)  # the dtype of the reference's dw = sum(dy * xhat)

    def rows(r):
        dyr, xr, dxr = dy2[r], xhat2[r], dx[r]
        s = xp.empty_like(dxr)  # (n, C) scratch
        xp.multiply(dyr, xr, out=s)  # dy * xhat
        dw_part = s.sum(axis=0).astype(gdt, copy=False)  # (C,) this chunk's part of dw
        xp.multiply(dyr, w, out=dxr)  # dxhat = dy * w
        xp.multiply(dxr, xr, out=s)  # dxhat * xhat
        m = s.mean(axis=-1, keepdims=True)  # (n, 1) mean(dxhat * xhat)
        xp.multiply(xr, m, out=s)  # xhat * mean(dxhat * xhat)
        dxr -= s
        dxr *= rstd2[r]  # dx = rstd * (dxhat - xhat * mean(dxhat * xhat))
        return dw_part

    parts = map_rows(rows, dx.shape[0], C, xp=xp)
    return dx.reshape(xhat.shape), {"w": sum_parts(xp, parts, C, gdt)}


def layernorm_forward(p, x, eps):
    """y = (x - mean) * rstd * w + b with rstd = 1 / sqrt(var + eps).  p = {"w": (C,), "b": (C,)}, x (..., C)."""
    xp = get_array_module(x)
    C = x.shape[-1]
    w, b = p["w"], p["b"]
    x2 = _rows(x, C)  # (N, C)
    N = x2.shape[0]
    rstd = xp.empty((N, 1), dtype=xp.result_type(x, eps))  # (N, 1)
    xhat = xp.empty(x2.shape, dtype=rstd.dtype)  # (N, C) x - mean, then xhat in place
    y = xp.empty(x2.shape, dtype=xp.result_type(xhat, w, b))  # (N, C)

    def rows(r):
        xr, xc = x2[r], xhat[r]
        mu = xr.mean(axis=-1, keepdims=True)  # (n, 1)
        xp.subtract(xr, mu, out=xc)  # x - mean
        s = xp.empty_like(xc)  # (n, C) scratch
        xp.multiply(xc, xc, out=s)  # (x - mean)^2
        var = s.mean(axis=-1, keepdims=True)  # (n, 1) biased variance
        var += eps
        xp.sqrt(var, out=var)
        xp.divide(1.0, var, out=rstd[r])  # rstd = 1 / sqrt(var + eps)
        xc *= rstd[r]  # xhat = (x - mean) * rstd
        yr = y[r]
        xp.multiply(xc, w, out=yr)
        yr += b  # y = xhat * w + b

    map_rows(rows, N, C, xp=xp)
    lead = x.shape[:-1]
    cache = (xhat.reshape(x.shape), rstd.reshape(*lead, 1), w)  # the reference's: keep xhat and rstd, not the mean
    return y.reshape(x.shape), cache


def layernorm_backward(dy, cache):
    """forward was xhat = (x - mean) * rstd, y = xhat * w + b, so
    dw = sum(dy * xhat), db = sum(dy), dxhat = dy * w,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))."""
    xhat, rstd, w = cache
    xp = get_array_module(dy)
    C = xhat.shape[-1]
    dy2, xhat2, rstd2 = _rows(dy, C), _rows(xhat, C), rstd.reshape(-1, 1)  # (N, C), (N, C), (N, 1)
    dx = xp.empty(xhat2.shape, dtype=xp.result_type(dy, xhat, rstd, w))  # (N, C)
    gdt = xp.result_type(dy, xhat)  # the dtype of the reference's dw = sum(dy * xhat)

    def rows(r):
        dyr, xr, dxr = dy2[r], xhat2[r], dx[r]
        s = xp.empty_like(dxr)  # (n, C) scratch
        xp.multiply(dyr, xr, out=s)  # dy * xhat
        dw_part = s.sum(axis=0).astype(gdt, copy=False)  # (C,) this chunk's part of dw
        db_part = dyr.sum(axis=0)  # (C,) this chunk's part of db
        xp.multiply(dyr, w, out=dxr)  # dxhat = dy * w
        m1 = dxr.mean(axis=-1, keepdims=True)  # (n, 1) mean(dxhat)
        xp.multiply(dxr, xr, out=s)  # dxhat * xhat
        m2 = s.mean(axis=-1, keepdims=True)  # (n, 1) mean(dxhat * xhat)
        dxr -= m1  # dxhat - mean(dxhat)
        xp.multiply(xr, m2, out=s)  # xhat * mean(dxhat * xhat)
        dxr -= s
        dxr *= rstd2[r]  # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        return dw_part, db_part

    parts = map_rows(rows, dx.shape[0], C, xp=xp)
    dw = sum_parts(xp, [dw_part for dw_part, _ in parts], C, gdt)  # (C,)
    db = sum_parts(xp, [db_part for _, db_part in parts], C, dy.dtype)  # (C,)
    return dx.reshape(xhat.shape), {"w": dw, "b": db}


def norm_forward(kind, p, x, eps):
    """Dispatch on the config's ``norm`` field ("rmsnorm" or "layernorm")."""
    return (rmsnorm_forward if kind == "rmsnorm" else layernorm_forward)(p, x, eps)


def norm_backward(kind, dy, cache):
    return (rmsnorm_backward if kind == "rmsnorm" else layernorm_backward)(dy, cache)
