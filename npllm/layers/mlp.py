"""Feed-forward blocks: SwiGLU (LLaMA), and y = act(x @ w1 + b1) @ w2 + b2 with act one of GELU's tanh approximation
(GPT-2, "gelu"), the exact GELU h * Phi(h) (BERT, "gelu_erf") and ReLU (the original Transformer, "relu").

The act() MLPs can drop out their hidden activations, a = dropout(act(h)), as torch.nn.TransformerEncoderLayer does
(keyword arguments dropout_rate, dropout_key, row_offset, col_offset; off by default).

NumPy has no erf: ``erf`` and ``erfc`` below evaluate W. J. Cody's rational Chebyshev approximations (CuPy arrays use
cupyx.scipy.special). Derivation: docs/derivations/mlp.md
"""

import math

import numpy as np

from ..backend import cupy_special, get_array_module
from .dropout import dropout_backward, dropout_forward

GELU_K = math.sqrt(2.0 / math.pi)  # constant inside gelu's tanh
GELU_A = 0.044715  # cubic coefficient inside gelu's tanh
INV_SQRT2 = 1.0 / math.sqrt(2.0)  # Phi(h) = 0.5 erfc(-h / sqrt(2))
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # phi(h) = exp(-h^2 / 2) / sqrt(2 pi)

# W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23 (1969) 631-637, with the
# coefficients and break points of his SPECFUN routine CALERF (Argonne):
#   |z| <= 0.46875:      erf(z)  = z * R1(z^2),                    R1 = (A . z^2 powers) / (B . z^2 powers)
#   0.46875 < |z| <= 4:  erfc(z) = exp(-z^2) * R2(z)
#   |z| > 4:             erfc(z) = exp(-z^2) / z * (1/sqrt(pi) - R3(1/z^2) / z^2),   and 0 from z = 26.543 on
ERF_SMALL = 0.46875
ERF_A = (3.16112374387056560e00, 1.13864154151050156e02, 3.77485237685302021e02, 3.20937758913846947e03,
         1.85777706184603153e-1)
ERF_B = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03, 2.84423683343917062e03)
ERF_C = (5.64188496988670089e-1, 8.88314979438837594e00, 6.61191906371416295e01, 2.98635138197400131e02,
         8.81952221241769090e02, 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03,
         2.15311535474403846e-8)
ERF_D = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02, 1.62138957456669019e03,
         3.29079923573345963e03, 4.36261909014324716e03, 3.43936767414372164e03, 1.23033935480374942e03)
ERF_P = (3.05326634961232344e-1, 3.60344899949804439e-1, 1.25781726111229246e-1, 1.60837851487422766e-2,
         6.58749161529837803e-4, 1.63153871373020978e-2)
ERF_Q = (2.56852019228982242e00, 1.87295284992346047e00, 5.27905102951428412e-1, 6.05183413124413191e-2,
         2.33520497626869185e-3)
ERFC_ZERO_FROM = 26.543  # erfc(z) underflows float64 beyond this
INV_SQRT_PI = 5.6418958354775628695e-1  # 1 / sqrt(pi)


def _exp_minus_square(y):
    """exp(-y^2) without the rounding of y^2: y = y16 + (y - y16) with y16 = trunc(16 y) / 16 exact in binary, so
    y^2 = y16^2 + (y - y16)(y + y16) and exp(-y^2) = exp(-y16^2) exp(-(y - y16)(y + y16)) (Cody's device)."""
    y16 = np.trunc(y * 16.0) / 16.0  # (...)
    return np.exp(-y16 * y16) * np.exp(-(y - y16) * (y + y16))  # (...)


def erf_small(y, z):
    """erf(z) where y = |z| <= ERF_SMALL: z R1(z^2) (Cody's first region; sign included)."""
    ysq = y * y
    num, den = ERF_A[4] * ysq, ysq
    for a, b in zip(ERF_A[:3], ERF_B[:3]):
        num, den = (num + a) * ysq, (den + b) * ysq
    return z * (num + ERF_A[3]) / (den + ERF_B[3])


def erfc_middle(y):
    """erfc(y) for ERF_SMALL < y <= 4: exp(-y^2) R2(y) (the second region)."""
    num, den = ERF_C[8] * y, y
    for c, d in zip(ERF_C[:7], ERF_D[:7]):
        num, den = (num + c) * y, (den + d) * y
    return _exp_minus_square(y) * (num + ERF_C[7]) / (den + ERF_D[7])


def erfc_large(y):
    """erfc(y) for 4 < y < ERFC_ZERO_FROM: exp(-y^2) / y (1/sqrt(pi) - R3(1/y^2) / y^2) (the third region)."""
    inv_sq = 1.0 / (y * y)
    num, den = ERF_P[5] * inv_sq, inv_sq
    for p_, q_ in zip(ERF_P[:4], ERF_Q[:4]):
        num, den = (num + p_) * inv_sq, (den + q_) * inv_sq
    r3 = inv_sq * (num + ERF_P[4]) / (den + ERF_Q[4])
    return _exp_minus_square(y) * (INV_SQRT_PI - r3) / y


def erf_from_erfc(e, negative, complement):
    """erfc(z) (complement) or erf(z) from e = erfc(|z|) and negative = z < 0: erfc(-y) = 2 - erfc(y); erf(y) =
    1 - erfc(y), written (0.5 - e) + 0.5 as Cody does, and erf(-y) = -erf(y)."""
    if complement:
        return np.where(negative, 2.0 - e, e)
    one_minus = (0.5 - e) + 0.5
    return np.where(negative, -one_minus, one_minus)


def _calerf(z, complement):
    """erf(z) (complement False) or erfc(z) (True) of a NumPy array, by Cody's three rational approximations, each
    evaluated on the elements of its region."""
    y = np.abs(z)  # (...)
    small = y <= ERF_SMALL  # (...) erf is computed directly here
    middle = (y > ERF_SMALL) & (y <= 4.0)  # (...) erfc(|z|) from here on
    large = y > 4.0  # (...)
    out = np.array(z, dtype=np.result_type(z, np.float32), copy=True)  # (...); NaN stays NaN (in no region)

    erf_s = erf_small(y[small], z[small])  # erf(z), sign included
    out[small] = 1.0 - erf_s if complement else erf_s
    out[middle] = erf_from_erfc(erfc_middle(y[middle]), z[middle] < 0, complement)
    yl = y[large]
    e = np.zeros_like(yl)  # erfc(|z|); 0 where it underflows
    finite = yl < ERFC_ZERO_FROM
    e[finite] = erfc_large(yl[finite])
    out[large] = erf_from_erfc(e, z[large] < 0, complement)
    return out


def erf(z):
    """The error function 2/sqrt(pi) int_0^z exp(-u^2) du, elementwise. Its derivative is 2/sqrt(pi) exp(-z^2).

    NumPy: Cody's rational approximations (relative error ~1e-16 in float64 on the whole real line, measured in
    tests/test_mlp.py); CuPy: cupyx.scipy.special.erf.
    """
    xp = get_array_module(z)
    if xp is not np:
        return cupy_special().erf(z)
    return _calerf(np.asarray(z), complement=False)


def erfc(z):
    """1 - erf(z), elementwise, without the cancellation of computing it as 1 - erf(z) (z >> 0: erfc is tiny)."""
    xp = get_array_module(z)
    if xp is not np:
        return cupy_special().erfc(z)
    return _calerf(np.asarray(z), complement=True)


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


def _ffn_forward(p, x, activation, dropout_rate=0.0, dropout_key=None, row_offset=0, col_offset=0):
    """y = dropout(act(x @ w1 + b1)) @ w2 + b2, where activation(xp, h) -> (a, saved) computes a = act(h) and what
    its derivative needs. p = {"w1": (C, F), "w2": (F, C)}, and "b1" (F,), "b2" (C,) with bias.
    dropout_rate, dropout_key: dropout on the hidden activations (off by default; rate 0 is the identity);
    row_offset / col_offset: this call's first global batch row and hidden unit (a tensor-parallel rank's F_tp)."""
    xp = get_array_module(x)
    h = x @ p["w1"]  # (..., F)
    if "b1" in p:
        h = h + p["b1"]
    a, saved = activation(xp, h)  # (..., F) act(h)
    if not dropout_rate:
        y = a @ p["w2"]  # (..., C)
        cache = (p, x, saved, a)
    else:
        if dropout_key is None:
            raise ValueError(f"dropout_rate={dropout_rate!r} needs a dropout_key (npllm.layers.dropout.dropout_key)")
        ad, drop = dropout_forward(a, dropout_rate, dropout_key, row_offset=row_offset,
                                   col_offset=col_offset)  # (..., F)
        y = ad @ p["w2"]  # (..., C)
        cache = (p, x, saved, a, drop)  # keep act(h) and the mask; ad = a * mask * scale is recomputed in backward
    if "b2" in p:
        y = y + p["b2"]
    return y, cache


def _ffn_backward(dy, cache, activation_backward):
    """forward was y = a @ w2 + b2, a = act(h), h = x @ w1 + b1, so
    dw2 = a.T @ dy, db2 = sum dy, da = dy @ w2.T, dh = da * act'(h) (activation_backward), dw1 = x.T @ dh,
    db1 = sum dh, dx = dh @ w1.T."""
    p, x, saved, a = cache[:4]
    drop = cache[4] if len(cache) > 4 else None  # with hidden dropout: forward was y = ad @ w2 + b2, ad = dropout(a)
    ad = a if drop is None else a * drop[0] * drop[1]  # (..., F) the forward's dropped activations
    C, F = p["w1"].shape
    dy2 = dy.reshape(-1, C)  # (N, C)
    grads = {"w2": ad.reshape(-1, F).T @ dy2}  # (F, C)
    if "b2" in p:
        grads["b2"] = dy2.sum(axis=0)  # (C,)
    da = dy @ p["w2"].T  # (..., F)
    if drop is not None:
        da, _ = dropout_backward(da, drop)  # (..., F) forward was ad = a * mask * scale
    dh = activation_backward(da, saved, a)  # (..., F)
    dh2 = dh.reshape(-1, F)  # (N, F)
    grads["w1"] = x.reshape(-1, C).T @ dh2  # (C, F)
    if "b1" in p:
        grads["b1"] = dh2.sum(axis=0)  # (F,)
    dx = dh @ p["w1"].T  # (..., C)
    return dx, {name: grads[name] for name in p}


def _gelu_tanh(xp, h):
    t = xp.tanh(GELU_K * (h + GELU_A * h * h * h))  # (..., F)
    a = 0.5 * h * (1.0 + t)  # (..., F)
    return a, (h, t)  # keep h and tanh(.): tanh is the costly part of the derivative


def _gelu_tanh_backward(da, saved, a):
    """a = 0.5 h (1 + t), t = tanh(u), u = K (h + A h^3): da/dh = 0.5 (1 + t) + 0.5 h (1 - t^2) K (1 + 3 A h^2)."""
    h, t = saved
    return da * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_A * h * h))  # (..., F)


def _gelu_erf(xp, h):
    cdf = 0.5 * erfc(-INV_SQRT2 * h)  # (..., F) Phi(h) = 0.5 (1 + erf(h / sqrt 2)), no cancellation for h << 0
    a = h * cdf  # (..., F)
    return a, (h, cdf)  # keep h and Phi(h); phi(h) = exp(-h^2 / 2) / sqrt(2 pi) is recomputed in backward


def _gelu_erf_backward(da, saved, a):
    """a = h Phi(h): da/dh = Phi(h) + h phi(h), phi(h) = Phi'(h) = exp(-h^2 / 2) / sqrt(2 pi)
    (from erf'(z) = 2/sqrt(pi) exp(-z^2) at z = h / sqrt 2)."""
    h, cdf = saved
    xp = get_array_module(h)
    return da * (cdf + h * (INV_SQRT_2PI * xp.exp(-0.5 * h * h)))  # (..., F)


def _relu(xp, h):
    return xp.maximum(h, 0.0), ()  # (..., F); keep nothing more: a > 0 exactly where h > 0


def _relu_backward(da, saved, a):
    """a = max(h, 0): da/dh = 1 where h > 0, else 0 (0 at h = 0, as torch)."""
    return da * (a > 0)  # (..., F)


def gelu_forward(p, x, **hidden_dropout):
    """y = gelu_tanh(x @ w1 + b1) @ w2 + b2.  p = {"w1": (C, F), "w2": (F, C)}, and "b1" (F,), "b2" (C,) with bias.
    Cache: h, tanh(.) and gelu(h)."""
    return _ffn_forward(p, x, _gelu_tanh, **hidden_dropout)


def gelu_backward(dy, cache):
    """forward was a = 0.5 h (1 + t), t = tanh(u), u = K (h + A h^3), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * (0.5 (1 + t) + 0.5 h (1 - t^2) K (1 + 3 A h^2)), dx = dh @ w1.T."""
    return _ffn_backward(dy, cache, _gelu_tanh_backward)


def gelu_erf_forward(p, x, **hidden_dropout):
    """y = gelu(x @ w1 + b1) @ w2 + b2 with the exact gelu(h) = h Phi(h) = 0.5 h (1 + erf(h / sqrt 2)) (BERT).
    p as gelu_forward. Cache: h, Phi(h) and gelu(h)."""
    return _ffn_forward(p, x, _gelu_erf, **hidden_dropout)


def gelu_erf_backward(dy, cache):
    """forward was a = h Phi(h), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * (Phi(h) + h exp(-h^2 / 2) / sqrt(2 pi)), dx = dh @ w1.T."""
    return _ffn_backward(dy, cache, _gelu_erf_backward)


def relu_forward(p, x, **hidden_dropout):
    """y = relu(x @ w1 + b1) @ w2 + b2, the original Transformer's feed-forward block. p as gelu_forward.
    Cache: relu(h) only (its sign is the derivative)."""
    return _ffn_forward(p, x, _relu, **hidden_dropout)


def relu_backward(dy, cache):
    """forward was a = max(h, 0), y = a @ w2 + b2, h = x @ w1 + b1, so
    da = dy @ w2.T, dh = da * [h > 0], dx = dh @ w1.T."""
    return _ffn_backward(dy, cache, _relu_backward)


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
