"""Feed-forward blocks with fused, all-core elementwise work: the contract of npllm.layers.mlp, computed faster.

Same names, signatures, caches and grads as the reference (``gelu_forward(p, x) -> (y, cache)``,
``gelu_backward(dy, cache) -> (dx, grads)``, ...): a cache made here can go to the reference's backward and the
other way round. The matmuls are the reference's (BLAS already uses every core); what changes is the elementwise
work between them. The reference makes a fresh (N, F) array for every operation of its formulas (GELU's forward: 12
of them, its backward: 14), and each of those costs a pass over memory and fresh pages; here every ufunc writes with
``out=`` into the layer's own outputs or into a small per-chunk scratch, chunk by chunk of rows (npllm.fast.pool), so
a chunk's arrays stay in cache from the first operation to the last and the chunks run on all cores.

    forward  h = x @ w1 (+ b1 in place), then per chunk of rows the activation (written into the cache's arrays)
    backward da = dy @ w2.T, then per chunk act'(h) into a scratch and dh = da * act'(h) written over da; the bias
             gradient's per-chunk partial sums come from the same pass, while the chunk is in cache

The fused formulas (same math as the reference, fewer operations; each line below is one ufunc per chunk):
    gelu      -2u = h (-2K - 2KA h^2), s = 1 / (1 + exp(-2u)) = 0.5 (1 + tanh(u)), a = h s, t = 2 s - 1
              (one exp instead of tanh: NumPy's float32 exp takes ~2/3 of tanh's time here; the chain ran ~28%
              faster for one more cheap operation; exp(-2u) overflows to inf for u << 0, where s = 0 and t = -1
              exactly, with NumPy's overflow warning silenced for that one call, in the chunk's own thread)
    gelu'     0.5 (1 + t) + 0.5 h (1 - t^2) K (1 + 3 A h^2) = (0.5 t + 0.5) (1 + K h (1 + 3 A h^2) (1 - t))
              (1 - t^2 = (1 - t)(1 + t) factored out: two operations fewer, and no cancellation in 1 - t*t at t ~ -1)
    gelu_erf  Phi(h) = 0.5 erfc(-h / sqrt 2) by the reference's Cody evaluation, a = h Phi(h), and
              gelu_erf' = Phi(h) + h exp(-h^2 / 2) / sqrt(2 pi): the reference's operations in its order (its bits).
              The reference gathers each of Cody's three regions with a boolean index (~70 ns per element here, most
              of it the boolean gathers and scatters); a chunk instead runs the formula of a region holding a
              quarter of its elements or more over all of them and keeps the region's values by a bitwise select
              (_put), and gathers a smaller region by integer index. A formula outside its region may overflow:
              those values are dropped, with NumPy's warnings silenced for those calls.
    swiglu    the reference's operations in the reference's order (bit-identical outputs and dh1, dh3)
    relu      a = max(h, 0) written over h (the cache keeps a only); dh = da * [a > 0]

Hidden dropout (gelu, gelu_erf, relu; keyword arguments dropout_rate, dropout_key, row_offset, col_offset as the
reference's):
ad = dropout(a) with the reference's mask, bit for bit (npllm.layers.dropout.keep_mask, drawn in the calling thread),
applied chunk by chunk on the pool. The cache is the reference's (p, x, saved, a, (mask, scale)).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from ..backend import get_array_module
from ..checks import check_number
from ..layers import mlp as reference
from ..layers.dropout import keep_mask
from ..layers.mlp import (ERF_SMALL, ERFC_ZERO_FROM, GELU_A, GELU_K, INV_SQRT2, INV_SQRT_2PI, erf_small,
                          erfc_large, erfc_middle)
from .pool import map_rows, sum_parts

GELU_KA = GELU_K * GELU_A  # K A: u = h (K + K A h^2)
GELU_3KA = 3.0 * GELU_K * GELU_A  # 3 K A: K (1 + 3 A h^2) = K + 3 K A h^2


def _no_overflow_warning(xp):
    """np.errstate(over="ignore") for NumPy (per thread and per context: nothing outside the block changes)."""
    return np.errstate(over="ignore") if xp is np else contextlib.nullcontext()


def _rows(a):
    """(..., X) -> (N, X) view of a C-contiguous array (the layer's own fresh arrays always are)."""
    return a.reshape(-1, a.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# dropout on the hidden activations


def _dropout_forward(xp, a, dropout_rate, dropout_key, row_offset, col_offset):
    """ad = a * mask * scale, npllm.layers.dropout.dropout_forward(a, ...) bit for bit: the reference's keep_mask drawn
    in this thread, then applied chunk by chunk on the pool. Returns ad (same shape as a) and the reference's dropout
    cache (mask, scale).

    The mask is drawn in one call, not per chunk on the pool: Philox is ~60 NumPy operations of ~10 us each per pass
    of keep_mask's counters, and two threads running operations that short mostly wait for each other's hand-offs
    of the GIL. On the 2-core machine of benchmarks/RESULTS.md the mask of a (16, 64, 512) array took 23 ms drawn
    per chunk on two threads and 17 ms in one call; per chunk on one thread it was no faster than one call."""
    if dropout_key is None:
        raise ValueError(f"dropout_rate={dropout_rate!r} needs a dropout_key (npllm.layers.dropout.dropout_key)")
    rate = check_number("dropout_rate", dropout_rate, 0.0, 1.0, high_open=True)
    scale = 1.0 / (1.0 - rate)
    mask = keep_mask(a.shape, rate, dropout_key, xp, row_offset=row_offset, col_offset=col_offset)  # (..., F) bool
    return _dropped(xp, a, mask, scale), (mask, scale)  # keep the boolean mask (1 byte per element), as the reference


def _dropped(xp, a, mask, scale):
    """The forward's ad = a * mask * scale again, chunk by chunk; a itself without dropout (mask None)."""
    if mask is None:
        return a
    ad = xp.empty_like(a)  # (..., F)

    def rows(r):
        xp.multiply(a[r], mask[r], out=ad[r])
        ad[r] *= scale

    map_rows(rows, a.shape[0], math.prod(a.shape[1:]), xp=xp)
    return ad


def _output(xp, p, a, dropout_rate, dropout_key, row_offset, col_offset):
    """y = dropout(a) @ w2 + b2: returns y (..., C) and the dropout cache (None without dropout)."""
    drop = None
    if dropout_rate:
        a, drop = _dropout_forward(xp, a, dropout_rate, dropout_key, row_offset, col_offset)  # (..., F)
    y = a @ p["w2"]  # (..., C)
    if "b2" in p:
        y += p["b2"]
    return y, drop


# ----------------------------------------------------------------------------------------------------------
# GELU (tanh approximation)


def _act_mlp_forward(p, x, activation_rows, dropout_rate, dropout_key, row_offset, col_offset):
    """y = dropout(act(h)) @ w2 + b2, h = x @ w1 + b1, for the GELUs: per chunk of rows the bias is added to h in
    place, then activation_rows(hr, sr, ar) writes what act' needs into sr and act(h) into ar. Returns y and the
    reference's cache (p, x, (h, saved), a[, (mask, scale)])."""
    xp = get_array_module(x)
    h = x @ p["w1"]  # (..., F) fresh; + b1 in place, chunk by chunk
    saved = xp.empty_like(h)  # (..., F) what act' needs besides h
    a = xp.empty_like(h)  # (..., F) act(h)
    h2, s2, a2 = _rows(h), _rows(saved), _rows(a)  # (N, F) views
    b1 = p.get("b1")

    def rows(r):
        hr = h2[r]
        if b1 is not None:
            hr += b1  # h = x @ w1 + b1
        activation_rows(hr, s2[r], a2[r])

    map_rows(rows, h2.shape[0], h2.shape[1], xp=xp)
    y, drop = _output(xp, p, a, dropout_rate, dropout_key, row_offset, col_offset)  # (..., C)
    cache = (p, x, (h, saved), a)
    return y, cache if drop is None else (*cache, drop)


def gelu_forward(p, x, *, dropout_rate=0.0, dropout_key=None, row_offset=0, col_offset=0):
    """y = dropout(gelu_tanh(x @ w1 + b1)) @ w2 + b2.  p = {"w1": (C, F), "w2": (F, C)}, and "b1" (F,), "b2" (C,) with
    bias. dropout_*, row_offset, col_offset: the hidden dropout, as the reference's (off by default).
    Cache: h, tanh(.) and gelu(h) (and the dropout mask), as the reference's (tanh(u): the costly part of act')."""
    xp = get_array_module(x)

    def gelu_rows(hr, tr, ar):  # tr: tanh(u), ar: gelu(h)
        xp.multiply(hr, hr, out=tr)  # h^2
        tr *= -2.0 * GELU_KA  # -2 K A h^2
        tr -= 2.0 * GELU_K  # -2 K (1 + A h^2)
        tr *= hr  # -2u = -2 K (h + A h^3)
        with _no_overflow_warning(xp):
            xp.exp(tr, out=tr)  # exp(-2u); inf where u << 0 (u < -44 in float32), and then s = 0 exactly
        tr += 1.0
        xp.divide(1.0, tr, out=tr)  # s = 1 / (1 + exp(-2u)) = 0.5 (1 + tanh(u))
        xp.multiply(hr, tr, out=ar)  # a = h s = 0.5 h (1 + t)
        tr *= 2.0
        tr -= 1.0  # t = 2 s - 1 = tanh(u)

    return _act_mlp_forward(p, x, gelu_rows, dropout_rate, dropout_key, row_offset, col_offset)


def gelu_backward(dy, cache):
    """forward was a = 0.5 h (1 + t), t = tanh(u), u = K (h + A h^3), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * (0.5 t + 0.5) (1 + K h (1 + 3 A h^2) (1 - t)), dx = dh @ w1.T; with hidden dropout
    y = ad @ w2 + b2, ad = a * mask * scale, and da = (dy @ w2.T) * mask * scale."""
    p, _, (h, t), _ = cache[:4]
    xp = get_array_module(dy)
    h2, t2 = _rows(h), _rows(t)  # (N, F) views

    def times_derivative(r, gr):
        hr, tr = h2[r], t2[r]
        w = xp.empty_like(hr)  # (n, F) act'(h), built up in place
        s = xp.empty_like(hr)  # (n, F) scratch
        xp.multiply(hr, hr, out=w)  # h^2
        w *= GELU_3KA  # 3 K A h^2
        w += GELU_K  # K (1 + 3 A h^2)
        w *= hr  # K h (1 + 3 A h^2)
        xp.subtract(1.0, tr, out=s)  # 1 - t
        w *= s  # K h (1 + 3 A h^2) (1 - t)
        w += 1.0  # 1 + K h (1 + 3 A h^2) (1 - t)
        xp.multiply(tr, 0.5, out=s)  # 0.5 t
        s += 0.5  # 0.5 (1 + t)
        w *= s  # act'(h)
        gr *= w  # dh = da * act'(h)

    return _act_mlp_backward(dy, cache, times_derivative)


def _act_mlp_backward(dy, cache, times_derivative):
    """The backward of y = dropout(a) @ w2 + b2, a = act(h), h = x @ w1 + b1 (gelu, gelu_erf, relu), from the
    reference's cache (p, x, saved, a[, (mask, scale)]). times_derivative(r, gr) multiplies gr, the rows r of da
    (after the dropout mask), by act'(h) there, in place; the bias gradient's partial sums come from the same pass."""
    p, x, _, a = cache[:4]
    mask, scale = cache[4] if len(cache) > 4 else (None, None)
    xp = get_array_module(dy)
    C, F = p["w1"].shape
    dy2 = dy.reshape(-1, C)  # (N, C)
    grads = {"w2": _rows(_dropped(xp, a, mask, scale)).T @ dy2}  # (F, C)
    if "b2" in p:
        grads["b2"] = dy2.sum(axis=0)  # (C,)
    dh = dy @ p["w2"].T  # (..., F) da, turned into dh in place below
    dh2 = _rows(dh)  # (N, F)
    mask2 = None if mask is None else _rows(mask)  # (N, F)
    with_b1 = "b1" in p

    def rows(r):
        gr = dh2[r]
        if mask2 is not None:  # forward was ad = a * mask * scale
            gr *= mask2[r]
            gr *= scale
        times_derivative(r, gr)  # dh = da * act'(h)
        return gr.sum(axis=0) if with_b1 else None  # (F,) this chunk's part of db1

    parts = map_rows(rows, dh2.shape[0], F, xp=xp)
    grads["w1"] = x.reshape(-1, C).T @ dh2  # (C, F)
    if with_b1:
        grads["b1"] = sum_parts(xp, parts, F, dh2.dtype)  # (F,)
    dx = dh @ p["w1"].T  # (..., C)
    return dx, {name: grads[name] for name in p}


# ----------------------------------------------------------------------------------------------------------
# GELU (exact, with erf)


def _put(dest, values, mask):
    """dest = values where mask, else dest (in place), by the bits: dest ^= (values ^ dest) & m with m all ones where
    mask. The same result as np.copyto(dest, values, where=mask), ~4x faster on a random mask (np.where and copyto
    take ~5 ns per element there, the three bitwise operations ~1)."""
    bits = np.dtype(f"u{dest.dtype.itemsize}")
    m = np.negative(mask.view(np.uint8).astype(bits))  # 0 or all ones
    d = dest.view(bits)
    diff = np.bitwise_xor(values.view(bits), d)
    diff &= m
    d ^= diff
    return dest


def _region_into(out, region, values_of, y, z):
    """out = values_of(y, z) inside region, out unchanged elsewhere; values_of is one of Cody's region formulas,
    elementwise, so any subset of elements gets the same bits. A region of a quarter of the chunk or more: the
    formula over the whole chunk, then _put (no gather: np.where and boolean indexing take ~5-15 ns per element on a
    random mask); a smaller one: its elements gathered by integer index (np.take, ~1-2 ns per element) and put back."""
    count = np.count_nonzero(region)  # the indices themselves only where they are used
    if 4 * count >= region.size:
        _put(out, values_of(y, z), region)
    elif count:
        idx = np.flatnonzero(region)
        out.reshape(-1)[idx] = values_of(np.take(y, idx), np.take(z, idx))


def _erfc_small(y, z):
    return 1.0 - erf_small(y, z)  # erfc = 1 - erf where |z| <= ERF_SMALL


def _erfc_middle(y, z):
    e = erfc_middle(y)  # erfc(|z|)
    return _put(e, 2.0 - e, z < 0)  # erfc(-y) = 2 - erfc(y): erf_from_erfc's np.where, by the bits


def _erfc_large(y, z):
    e = np.where(y < ERFC_ZERO_FROM, erfc_large(y), 0.0)  # erfc(|z|), 0 where it underflows
    return _put(e, 2.0 - e, z < 0)


def _erfc_into(xp, z, out):
    """out = erfc(z) for a contiguous chunk z (NumPy: npllm.layers.mlp.erfc bit for bit; CuPy: its erfc), region by
    region of Cody's (_region_into)."""
    if xp is not np:
        out[...] = reference.erfc(z)
        return out
    y = np.abs(z)
    out[...] = z  # NaN stays NaN (in no region), as the reference's
    with np.errstate(all="ignore"):  # a formula outside its region may overflow or divide by 0: dropped there
        _region_into(out, y <= ERF_SMALL, _erfc_small, y, z)
        _region_into(out, (y > ERF_SMALL) & (y <= 4.0), _erfc_middle, y, z)
        _region_into(out, y > 4.0, _erfc_large, y, z)
    return out


def gelu_erf_forward(p, x, *, dropout_rate=0.0, dropout_key=None, row_offset=0, col_offset=0):
    """y = dropout(h Phi(h)) @ w2 + b2, h = x @ w1 + b1, Phi(h) = 0.5 erfc(-h / sqrt 2) (BERT's exact GELU). p and the
    hidden dropout as gelu_forward. Cache: h, Phi(h) and gelu(h) (and the dropout mask), as the reference's."""
    xp = get_array_module(x)

    def gelu_erf_rows(hr, cr, ar):  # cr: Phi(h), ar: gelu(h)
        _erfc_into(xp, -INV_SQRT2 * hr, cr)  # erfc(-h / sqrt 2)
        cr *= 0.5  # Phi(h)
        xp.multiply(hr, cr, out=ar)  # a = h Phi(h)

    return _act_mlp_forward(p, x, gelu_erf_rows, dropout_rate, dropout_key, row_offset, col_offset)


def gelu_erf_backward(dy, cache):
    """forward was a = h Phi(h), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * (Phi(h) + h exp(-h^2 / 2) / sqrt(2 pi)), dx = dh @ w1.T (hidden dropout as gelu's)."""
    _, _, (h, cdf), _ = cache[:4]
    xp = get_array_module(dy)
    h2, cdf2 = _rows(h), _rows(cdf)  # (N, F) views

    def times_derivative(r, gr):
        hr = h2[r]
        w = xp.multiply(hr, -0.5)  # (n, F) -h / 2, built up to act'(h) in place
        w *= hr  # -h^2 / 2
        xp.exp(w, out=w)
        w *= INV_SQRT_2PI  # phi(h)
        w *= hr  # h phi(h)
        w += cdf2[r]  # act'(h) = Phi(h) + h phi(h)
        gr *= w  # dh = da * act'(h)

    return _act_mlp_backward(dy, cache, times_derivative)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU


def swiglu_forward(p, x):
    """y = (silu(x @ w1 + b1) * (x @ w3 + b3)) @ w2 + b2.
    p = {"w1": (C, F), "w3": (C, F), "w2": (F, C)}, and "b1", "b3" (F,), "b2" (C,) when the model has biases.
    Cache: h1, h3, sigmoid(h1), silu(h1), g, as the reference's."""
    xp = get_array_module(x)
    h1 = x @ p["w1"]  # (..., F) fresh; + b1 in place below
    h3 = x @ p["w3"]  # (..., F) fresh; + b3 in place below
    sig = xp.empty_like(h1)  # (..., F) sigmoid(h1)
    a = xp.empty_like(h1)  # (..., F) silu(h1)
    g = xp.empty_like(h1)  # (..., F) silu(h1) * h3
    h1_2, h3_2, sig2, a2, g2 = _rows(h1), _rows(h3), _rows(sig), _rows(a), _rows(g)  # (N, F) views
    b1, b3 = p.get("b1"), p.get("b3")

    def rows(r):
        h1r, h3r, sr, ar = h1_2[r], h3_2[r], sig2[r], a2[r]
        if b1 is not None:
            h1r += b1  # h1 = x @ w1 + b1
            h3r += b3  # h3 = x @ w3 + b3
        xp.multiply(h1r, 0.5, out=sr)  # h1 / 2
        xp.tanh(sr, out=sr)  # tanh(h1 / 2)
        sr *= 0.5
        sr += 0.5  # sigmoid(h1) = 0.5 (1 + tanh(h1 / 2))
        xp.multiply(h1r, sr, out=ar)  # a = silu(h1) = h1 sigmoid(h1)
        xp.multiply(ar, h3r, out=g2[r])  # g = a * h3

    map_rows(rows, h1_2.shape[0], h1_2.shape[1], xp=xp)
    y = g @ p["w2"]  # (..., C)
    if "b2" in p:
        y += p["b2"]
    return y, (p, x, h1, h3, sig, a, g)  # the reference's cache: the F-wide activations (recomputing costs 2 GEMMs)


def swiglu_backward(dy, cache):
    """forward was g = silu(h1) * h3, y = g @ w2, h1 = x @ w1, h3 = x @ w3, so
    dg = dy @ w2.T, dh3 = dg * silu(h1), dh1 = dg * h3 * sig * (1 + h1 * (1 - sig)), dx = dh1 @ w1.T + dh3 @ w3.T."""
    p, x, h1, h3, sig, a, g = cache
    xp = get_array_module(dy)
    C, F = p["w1"].shape
    dy2 = dy.reshape(-1, C)  # (N, C)
    x2 = x.reshape(-1, C)  # (N, C)
    grads = {"w2": _rows(g).T @ dy2}  # (F, C)
    dh1 = dy @ p["w2"].T  # (..., F) dg, turned into dh1 in place below
    dh3 = xp.empty_like(dh1)  # (..., F)
    h1_2, h3_2, sig2, a2, dh1_2, dh3_2 = _rows(h1), _rows(h3), _rows(sig), _rows(a), _rows(dh1), _rows(dh3)
    with_bias = "b1" in p

    def rows(r):
        h1r, sr, d1 = h1_2[r], sig2[r], dh1_2[r]
        d3 = dh3_2[r]
        xp.multiply(d1, a2[r], out=d3)  # dh3 = dg * silu(h1)
        w = xp.empty_like(h1r)  # (n, F) silu'(h1) / sig
        d1 *= h3_2[r]  # dg * h3
        d1 *= sr  # dg * h3 * sig
        xp.subtract(1.0, sr, out=w)  # 1 - sig
        w *= h1r  # h1 (1 - sig)
        w += 1.0  # 1 + h1 (1 - sig)
        d1 *= w  # dh1 = dg * h3 * sig * (1 + h1 (1 - sig))
        return (d1.sum(axis=0), d3.sum(axis=0)) if with_bias else None  # (F,) each: this chunk's db1, db3

    parts = map_rows(rows, dh1_2.shape[0], F, xp=xp)
    grads["w1"] = x2.T @ dh1_2  # (C, F)
    grads["w3"] = x2.T @ dh3_2  # (C, F)
    if with_bias:
        grads["b1"] = sum_parts(xp, [d1 for d1, _ in parts], F, dh1.dtype)  # (F,)
        grads["b3"] = sum_parts(xp, [d3 for _, d3 in parts], F, dh3.dtype)  # (F,)
    if "b2" in p:
        grads["b2"] = dy2.sum(axis=0)  # (C,)
    dx = dh1 @ p["w1"].T  # (..., C)
    dx += dh3 @ p["w3"].T  # (..., C)
    return dx, {name: grads[name] for name in p}


# ----------------------------------------------------------------------------------------------------------
# ReLU


def relu_forward(p, x, *, dropout_rate=0.0, dropout_key=None, row_offset=0, col_offset=0):
    """y = dropout(relu(x @ w1 + b1)) @ w2 + b2. p and the hidden dropout as gelu_forward. Cache: relu(h) only (its
    sign is the derivative), and the dropout mask."""
    xp = get_array_module(x)
    a = x @ p["w1"]  # (..., F) h, turned into relu(h) in place below
    a2 = _rows(a)  # (N, F)
    b1 = p.get("b1")

    def rows(r):
        ar = a2[r]
        if b1 is not None:
            ar += b1  # h = x @ w1 + b1
        xp.maximum(ar, 0.0, out=ar)  # a = max(h, 0)

    map_rows(rows, a2.shape[0], a2.shape[1], xp=xp)
    y, drop = _output(xp, p, a, dropout_rate, dropout_key, row_offset, col_offset)  # (..., C)
    cache = (p, x, (), a)  # the reference's cache: keep relu(h) only
    return y, cache if drop is None else (*cache, drop)


def relu_backward(dy, cache):
    """forward was a = max(h, 0), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * [a > 0], dx = dh @ w1.T; with hidden dropout as gelu_backward."""
    a2 = _rows(cache[3])  # (N, F)

    def times_derivative(r, gr):
        gr *= a2[r] > 0  # dh = da * [h > 0]

    return _act_mlp_backward(dy, cache, times_derivative)


MLP_KINDS = {  # the config's ``mlp`` field -> (forward, backward)
    "swiglu": (swiglu_forward, swiglu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_erf": (gelu_erf_forward, gelu_erf_backward),
    "relu": (relu_forward, relu_backward),
}


def _pair(kind):
    if kind not in MLP_KINDS:
        raise ValueError(f"mlp={kind!r} is not allowed; use one of: {', '.join(MLP_KINDS)}")
    return MLP_KINDS[kind]


def mlp_forward(kind, p, x, **hidden_dropout):
    """Dispatch on the config's ``mlp`` field ("swiglu", "gelu", "gelu_erf" or "relu"). hidden_dropout: dropout_rate,
    dropout_key, row_offset, col_offset of dropout on the hidden activations (gelu, gelu_erf, relu only)."""
    if hidden_dropout and kind == "swiglu":
        raise ValueError("dropout inside the MLP is for mlp='gelu', 'gelu_erf' or 'relu', not 'swiglu'")
    return _pair(kind)[0](p, x, **hidden_dropout)


def mlp_backward(kind, dy, cache):
    return _pair(kind)[1](dy, cache)
