"""Causal multi-head self-attention with grouped-query attention (GQA) and optional RoPE.

Query head h reads key/value head h // G, G = NH / NKV. The NH query heads are viewed as (NKV, G) so the key/value
heads are broadcast, never copied.  Derivation: docs/derivations/attention.md

    q = x @ wq + bq,  k = x @ wk + bk,  v = x @ wv + bv         split into heads
    q, k = rope(q), rope(k)                                      when RoPE
    s = q @ k^T / sqrt(hs),  s[i, j] = -inf for j > i             causal mask
    P = softmax(s),  o = P @ v,  y = merge_heads(o) @ wo + bo
"""

import math

from ..backend import get_array_module
from .rope import rope_backward, rope_forward


def _split_heads(x, n_heads):
    B, T, _ = x.shape
    return x.reshape(B, T, n_heads, -1).transpose(0, 2, 1, 3)  # (B, n_heads, T, hs)


def _merge_heads(x):
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)  # (B, T, H*hs)


def _project(x, p, w, b):
    y = x @ p[w]
    return y + p[b] if b in p else y


def attention_forward(p, x, n_heads, n_kv_heads, rope=None, past_kv=None):
    """Causal self-attention.

    p: {"wq": (C, NH*hs), "wk": (C, NKV*hs), "wv": (C, NKV*hs), "wo": (NH*hs, C)}, and "bq", "bk", "bv", "bo" when
       the model has biases. (A tensor-parallel caller passes its shard of heads and adds "bo" itself.)
    x: (B, T, C).  rope: (cos, sin) tables (T, hs) for the positions of x, or None.
    past_kv: (k, v) of earlier positions, each (B, NKV, T_past, hs), for cached decoding; forward only.
    Returns y (B, T, C) and the cache; cache["k"], cache["v"] hold all keys/values (past included).
    """
    xp = get_array_module(x)
    B, T, _ = x.shape
    G = n_heads // n_kv_heads
    q = _split_heads(_project(x, p, "wq", "bq"), n_heads)  # (B, NH, T, hs)
    k = _split_heads(_project(x, p, "wk", "bk"), n_kv_heads)  # (B, NKV, T, hs)
    v = _split_heads(_project(x, p, "wv", "bv"), n_kv_heads)  # (B, NKV, T, hs)
    hs = q.shape[-1]
    if rope is not None:
        q, _ = rope_forward(q, *rope)
        k, _ = rope_forward(k, *rope)
    T_past = 0
    if past_kv is not None:
        T_past = past_kv[0].shape[2]
        k = xp.concatenate([past_kv[0], k], axis=2)  # (B, NKV, T_past+T, hs)
        v = xp.concatenate([past_kv[1], v], axis=2)  # (B, NKV, T_past+T, hs)
    Tk = T_past + T
    scale = 1.0 / math.sqrt(hs)
    qg = q.reshape(B, n_kv_heads, G, T, hs)  # (B, NKV, G, T, hs): query head h = kv * G + g
    s = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale  # (B, NKV, G, T, Tk)
    # query i sits at absolute position T_past + i and may read keys j <= T_past + i
    future = xp.arange(Tk)[None, :] > (T_past + xp.arange(T))[:, None]  # (T, Tk)
    s = xp.where(future, -xp.inf, s)
    s = s - s.max(axis=-1, keepdims=True)  # stable softmax: the row max is always a visible key
    e = xp.exp(s)
    P = e / e.sum(axis=-1, keepdims=True)  # (B, NKV, G, T, Tk)
    o = (P @ v[:, :, None]).reshape(B, n_heads, T, hs)  # (B, NH, T, hs)
    o_merged = _merge_heads(o)  # (B, T, NH*hs)
    y = _project(o_merged, p, "wo", "bo")  # (B, T, C)
    # keep x, q, k, v (after RoPE), P and o_merged: P is (T x T) per head, the memory price of not recomputing it
    cache = dict(p=p, x=x, q=qg, k=k, v=v, P=P, o=o_merged, rope=rope, scale=scale,
                 n_heads=n_heads, n_kv_heads=n_kv_heads, T_past=T_past)
    return y, cache


def attention_backward(dy, cache):
    """Backward of attention_forward (without past_kv). Returns dx (B, T, C) and grads with the keys of p."""
    if cache["T_past"]:
        raise ValueError("attention_backward does not support past_kv (cached decoding is forward-only)")
    p, x, qg, k, v, P, rope, scale = (cache[n] for n in ("p", "x", "q", "k", "v", "P", "rope", "scale"))
    n_heads, n_kv_heads = cache["n_heads"], cache["n_kv_heads"]
    B, T, C = x.shape
    hs = k.shape[-1]
    grads = {}
    # forward was y = o_merged @ wo + bo
    x_rows = x.reshape(B * T, C)  # (BT, C)
    dy_rows = dy.reshape(B * T, C)  # (BT, C)
    grads["wo"] = cache["o"].reshape(B * T, -1).T @ dy_rows  # (NH*hs, C)
    if "bo" in p:
        grads["bo"] = dy_rows.sum(axis=0)  # (C,)
    do = (dy @ p["wo"].T).reshape(B, T, n_kv_heads, -1, hs).transpose(0, 2, 3, 1, 4)  # (B, NKV, G, T, hs)
    # forward was o = P @ v (v broadcast over the G query heads of a group), so
    dP = do @ v[:, :, None].swapaxes(-1, -2)  # (B, NKV, G, T, T)
    dv = (P.swapaxes(-1, -2) @ do).sum(axis=2)  # (B, NKV, T, hs): sum over the G heads that read v
    # forward was P = softmax(s) row-wise, so ds = P * (dP - sum_j dP * P); masked entries have P = 0, so ds = 0
    ds = P * (dP - (dP * P).sum(axis=-1, keepdims=True))  # (B, NKV, G, T, T)
    # forward was s = q @ k^T * scale
    dq = (ds @ k[:, :, None]) * scale  # (B, NKV, G, T, hs)
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2) * scale  # (B, NKV, T, hs)
    dq = dq.reshape(B, n_heads, T, hs)  # (B, NH, T, hs)
    if rope is not None:  # forward was q = rope(q_lin), k = rope(k_lin)
        dq, _ = rope_backward(dq, rope)
        dk, _ = rope_backward(dk, rope)
    rows = {name: _merge_heads(d).reshape(B * T, -1) for name, d in (("q", dq), ("k", dk), ("v", dv))}  # (BT, H*hs)
    for name, d_rows in rows.items():  # forward was q_lin = x @ wq + bq (and likewise k, v)
        grads["w" + name] = x_rows.T @ d_rows  # (C, H*hs)
        if "b" + name in p:
            grads["b" + name] = d_rows.sum(axis=0)  # (H*hs,)
    dx = (rows["q"] @ p["wq"].T + rows["k"] @ p["wk"].T + rows["v"] @ p["wv"].T).reshape(B, T, C)  # (B, T, C)
    return dx, {name: grads[name] for name in p}
