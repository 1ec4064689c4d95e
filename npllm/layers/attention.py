"""Multi-head attention with grouped-query attention (GQA): self-attention (causal or bidirectional, optional RoPE,
key padding, dropout on the probabilities) and cross-attention (queries from x, keys and values from a memory).

Query head h reads key/value head h // G, G = NH / NKV. The NH query heads are viewed as (NKV, G) so the key/value
heads are broadcast, never copied.  Derivation: docs/derivations/attention.md

    q = x @ wq + bq,  k = x @ wk + bk,  v = x @ wv + bv         split into heads (cross-attention: k, v from memory)
    q, k = rope(q), rope(k)                                      when RoPE
    s = q @ k^T / sqrt(hs),  s[i, j] = -inf where query i may not see key j (a future key when causal, padding)
    P = softmax(s),  Pd = dropout(P),  o = Pd @ v,  y = merge_heads(o) @ wo + bo

The part from (q, k, v) to o is written once, attention_core_forward / attention_core_backward, and shared by
self-attention and cross-attention (npllm/fast/attention.py's flash core has the same contract).
"""

import math

from ..backend import get_array_module
from .dropout import dropout_backward, dropout_forward
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


def _check_heads(n_heads, n_kv_heads):
    if n_kv_heads < 1 or n_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")


def _check_core_args(qg, k, v, causal, T_past, key_mask, dropout_rate, dropout_key):
    B, NKV, _, T, hs = qg.shape  # (B, NKV, G, T, hs)
    if k.ndim != 4 or k.shape[:2] != (B, NKV) or k.shape[3] != hs or v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be (B, NKV, Tk, hs) = ({B}, {NKV}, Tk, {hs})")
    Tk = k.shape[2]
    if causal and T_past + T != Tk:
        raise ValueError(f"causal attention needs Tk = T_past + T; got Tk={Tk}, T_past={T_past}, T={T}")
    if not causal and T_past:
        raise ValueError(f"T_past={T_past} (past_kv) is for causal decoding; bidirectional attention takes none")
    if key_mask is not None and (key_mask.shape != (B, Tk) or key_mask.dtype != bool):
        raise ValueError(f"the key mask must be a boolean (B, Tk) = ({B}, {Tk}) array, True for a real key; got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    if dropout_rate and dropout_key is None:
        raise ValueError(f"dropout_rate={dropout_rate!r} needs a dropout_key (npllm.layers.dropout.dropout_key)")


def attention_core_forward(qg, k, v, scale, causal=True, T_past=0, key_mask=None, *, dropout_rate=0.0,
                           dropout_key=None, row_offset=0, head_offset=0):
    """o = dropout(softmax(qg @ k^T * scale, masked)) @ v for every query head: what self- and cross-attention share.

    qg: (B, NKV, G, T, hs), query head h = kv * G + g reads key/value head kv.  k, v: (B, NKV, Tk, hs).
    causal: query i (at position T_past + i) sees keys j <= T_past + i, and then Tk = T_past + T; causal=False:
    every query sees every key (T_past must be 0).  key_mask: None or a boolean (B, Tk), True for a real key, False
    for padding that no query sees. A query row that sees no key at all gets P = 0 and o = 0 (never NaN), and passes
    no gradient.  dropout_rate, dropout_key: dropout on P (off by default); row_offset / head_offset: where this
    call's batch rows and query heads start in the global batch and heads, so that every split draws one mask.
    Returns o (B, NKV, G, T, hs) and the cache.
    """
    _check_core_args(qg, k, v, causal, T_past, key_mask, dropout_rate, dropout_key)
    xp = get_array_module(qg)
    B, NKV, G, T, _ = qg.shape  # (B, NKV, G, T, hs)
    Tk = k.shape[2]
    s = (qg @ k[:, :, None].swapaxes(-1, -2)) * scale  # (B, NKV, G, T, Tk)
    if causal:  # query i sits at absolute position T_past + i and may read keys j <= T_past + i
        future = xp.arange(Tk)[None, :] > (T_past + xp.arange(T))[:, None]  # (T, Tk)
        s = xp.where(future, -xp.inf, s)
    if key_mask is None:
        s = s - s.max(axis=-1, keepdims=True)  # stable softmax: the row max is always a visible key
        e = xp.exp(s)
        P = e / e.sum(axis=-1, keepdims=True)  # (B, NKV, G, T, Tk)
    else:
        s = xp.where(key_mask[:, None, None, None, :], s, -xp.inf)  # (B, NKV, G, T, Tk): padding is never seen
        row_max = s.max(axis=-1, keepdims=True)  # (B, NKV, G, T, 1); -inf for a row that sees no key
        s = s - xp.where(row_max == -xp.inf, 0.0, row_max)  # such a row: subtract 0, since -inf - -inf is NaN
        e = xp.exp(s)  # (B, NKV, G, T, Tk), 0 wherever s = -inf
        denom = e.sum(axis=-1, keepdims=True)  # (B, NKV, G, T, 1); 0 only for a row that sees no key
        P = e / xp.where(denom == 0, 1.0, denom)  # (B, NKV, G, T, Tk); such a row: P = 0, not 0 / 0
    Pd, drop = P, None
    if dropout_rate:
        Pd, drop = dropout_forward(P.reshape(B, NKV * G, T, Tk), dropout_rate, dropout_key, row_offset=row_offset,
                                   head_offset=head_offset)  # (B, NH, T, Tk): head h = kv * G + g
        Pd = Pd.reshape(B, NKV, G, T, Tk)  # (B, NKV, G, T, Tk)
    o = Pd @ v[:, :, None]  # (B, NKV, G, T, hs)
    # keep qg, k, v, P and the dropout mask: P is (T x Tk) per head, the memory price of not recomputing it
    # (Pd = P * mask * scale is recomputed in backward: one multiply instead of another T x Tk array)
    cache = dict(q=qg, k=k, v=v, P=P, drop=drop, scale=scale)
    return o, cache


def attention_core_backward(do, cache):
    """Backward of attention_core_forward: do (B, NKV, G, T, hs) -> dqg (B, NKV, G, T, hs), dk, dv (B, NKV, Tk, hs).

    forward was s = qg @ k^T * scale (masked), P = softmax(s), Pd = dropout(P), o = Pd @ v."""
    qg, k, v, P, drop, scale = (cache[n] for n in ("q", "k", "v", "P", "drop", "scale"))
    B, NKV, G, T, Tk = P.shape
    Pd = P
    if drop is not None:
        mask, keep_scale = drop
        Pd = P * mask.reshape(P.shape) * keep_scale  # (B, NKV, G, T, Tk), the forward's Pd again
    # forward was o = Pd @ v (v broadcast over the G query heads of a group), so
    dP = do @ v[:, :, None].swapaxes(-1, -2)  # (B, NKV, G, T, Tk), the gradient of Pd
    dv = (Pd.swapaxes(-1, -2) @ do).sum(axis=2)  # (B, NKV, Tk, hs): sum over the G heads that read v
    if drop is not None:  # forward was Pd = P * mask * keep_scale
        dP = dropout_backward(dP.reshape(B, NKV * G, T, Tk), drop)[0].reshape(P.shape)  # (B, NKV, G, T, Tk)
    # forward was P = softmax(s) row-wise, so ds = P * (dP - sum_j dP * P); masked entries (and rows that see no key)
    # have P = 0, so ds = 0 there
    ds = P * (dP - (dP * P).sum(axis=-1, keepdims=True))  # (B, NKV, G, T, Tk)
    # forward was s = q @ k^T * scale
    dq = (ds @ k[:, :, None]) * scale  # (B, NKV, G, T, hs)
    dk = (ds.swapaxes(-1, -2) @ qg).sum(axis=2) * scale  # (B, NKV, Tk, hs)
    return dq, dk, dv


def _output_backward(dy, p, o_merged, n_kv_heads, hs):
    """forward was y = o_merged @ wo + bo: returns the grads of wo (and bo) and do (B, NKV, G, T, hs)."""
    B, T, C = dy.shape
    dy_rows = dy.reshape(B * T, C)  # (BT, C)
    grads = {"wo": o_merged.reshape(B * T, -1).T @ dy_rows}  # (NH*hs, C)
    if "bo" in p:
        grads["bo"] = dy_rows.sum(axis=0)  # (C,)
    do = (dy @ p["wo"].T).reshape(B, T, n_kv_heads, -1, hs).transpose(0, 2, 3, 1, 4)  # (B, NKV, G, T, hs)
    return grads, do


def _input_backward(inp, p, d_heads, grads):
    """forward was {name}_lin = inp @ w{name} + b{name} for each name of d_heads (q, k or v), split into heads:
    adds the weight (and bias) gradients to ``grads`` and returns d inp = sum over the names of d_rows @ w{name}.T."""
    B, T, C = inp.shape
    inp_rows = inp.reshape(B * T, C)  # (BT, C)
    d_inp = None
    for name, d in d_heads.items():
        d_rows = _merge_heads(d).reshape(B * T, -1)  # (BT, H*hs)
        grads["w" + name] = inp_rows.T @ d_rows  # (C, H*hs)
        if "b" + name in p:
            grads["b" + name] = d_rows.sum(axis=0)  # (H*hs,)
        term = d_rows @ p["w" + name].T  # (BT, C)
        d_inp = term if d_inp is None else d_inp + term
    return d_inp.reshape(B, T, C)  # (B, T, C)


def attention_forward(p, x, n_heads, n_kv_heads, rope=None, past_kv=None, *, causal=True, key_mask=None,
                      dropout_rate=0.0, dropout_key=None, row_offset=0, head_offset=0):
    """Self-attention: causal (a decoder) by default, bidirectional (an encoder) with causal=False.

    p: {"wq": (C, NH*hs), "wk": (C, NKV*hs), "wv": (C, NKV*hs), "wo": (NH*hs, C)}, and "bq", "bk", "bv", "bo" when
       the model has biases. (A tensor-parallel caller passes its shard of heads and adds "bo" itself.)
    x: (B, T, C).  rope: (cos, sin) tables (T, hs) for the positions of x, or None.
    past_kv: (k, v) of earlier positions, each (B, NKV, T_past, hs), for cached causal decoding; forward only.
    key_mask: None or a boolean (B, Tk), True for a real key (Tk = T_past + T); a query that sees no real key gets 0.
    dropout_rate, dropout_key: dropout on the attention probabilities (off by default); row_offset / head_offset:
    this call's first global batch row and query head (a data-parallel rank's rows, a tensor-parallel rank's heads).
    Returns y (B, T, C) and the cache; cache["k"], cache["v"] hold all keys/values (past included).
    """
    _check_heads(n_heads, n_kv_heads)
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
    scale = 1.0 / math.sqrt(hs)
    qg = q.reshape(B, n_kv_heads, G, T, hs)  # (B, NKV, G, T, hs): query head h = kv * G + g
    o, core = attention_core_forward(qg, k, v, scale, causal, T_past, key_mask, dropout_rate=dropout_rate,
                                     dropout_key=dropout_key, row_offset=row_offset,
                                     head_offset=head_offset)  # (B, NKV, G, T, hs)
    o_merged = _merge_heads(o.reshape(B, n_heads, T, hs))  # (B, T, NH*hs)
    y = _project(o_merged, p, "wo", "bo")  # (B, T, C)
    # keep the core's cache (qg, k, v after RoPE, P, the dropout mask), x and o_merged
    cache = dict(core, p=p, x=x, o=o_merged, rope=rope, n_heads=n_heads, n_kv_heads=n_kv_heads, T_past=T_past)
    return y, cache


def attention_backward(dy, cache):
    """Backward of attention_forward (without past_kv). Returns dx (B, T, C) and grads with the keys of p."""
    if cache["T_past"]:
        raise ValueError("attention_backward does not support past_kv (cached decoding is forward-only)")
    p, x, rope = cache["p"], cache["x"], cache["rope"]
    B, T, _ = x.shape
    n_heads, hs = cache["n_heads"], cache["k"].shape[-1]
    grads, do = _output_backward(dy, p, cache["o"], cache["n_kv_heads"], hs)  # do (B, NKV, G, T, hs)
    dq, dk, dv = attention_core_backward(do, cache)
    dq = dq.reshape(B, n_heads, T, hs)  # (B, NH, T, hs)
    if rope is not None:  # forward was q = rope(q_lin), k = rope(k_lin)
        dq, _ = rope_backward(dq, rope)
        dk, _ = rope_backward(dk, rope)
    # forward was q_lin = x @ wq + bq (and likewise k, v): x receives the sum of the three paths
    dx = _input_backward(x, p, {"q": dq, "k": dk, "v": dv}, grads)  # (B, T, C)
    return dx, {name: grads[name] for name in p}


def cross_attention_kv(p, memory, n_kv_heads):
    """The memory's keys and values, k = memory @ wk + bk and v = memory @ wv + bv split into heads, each
    (B, NKV, Tk, hs): what a decoder computes once per source sequence and passes to every step as memory_kv."""
    k = _split_heads(_project(memory, p, "wk", "bk"), n_kv_heads)  # (B, NKV, Tk, hs)
    v = _split_heads(_project(memory, p, "wv", "bv"), n_kv_heads)  # (B, NKV, Tk, hs)
    return k, v


def cross_attention_forward(p, x, memory, n_heads, n_kv_heads, memory_mask=None, memory_kv=None, *,
                            dropout_rate=0.0, dropout_key=None, row_offset=0, head_offset=0):
    """Cross-attention: queries from x (B, T, C), keys and values from memory (B, Tk, C) (an encoder's output: the
    Tk keys are its positions); every query sees every memory position that memory_mask (B, Tk) marks True (all when
    None).

    p: as attention_forward ("wq", "wk", "wv", "wo" and the biases); wk, wv act on the memory.
    memory_kv: the memory's (k, v), each (B, NKV, Tk, hs), from cross_attention_kv or an earlier call's cache: then
    memory is not read (pass None) and the call is forward-only (decoding).
    dropout_rate, dropout_key, row_offset, head_offset: as attention_forward.
    Returns y (B, T, C) and the cache; cache["k"], cache["v"] hold the memory's keys and values.
    """
    _check_heads(n_heads, n_kv_heads)
    B, T, _ = x.shape
    G = n_heads // n_kv_heads
    if memory_kv is None:
        if memory is None or memory.ndim != 3 or memory.shape[0] != B or memory.shape[2] != x.shape[2]:
            raise ValueError(f"memory must be (B, Tk, C) = ({B}, Tk, {x.shape[2]}); got "
                             f"{None if memory is None else tuple(memory.shape)}")
        k, v = cross_attention_kv(p, memory, n_kv_heads)  # (B, NKV, Tk, hs) each
    else:
        k, v = memory_kv
    q = _split_heads(_project(x, p, "wq", "bq"), n_heads)  # (B, NH, T, hs)
    hs = q.shape[-1]
    qg = q.reshape(B, n_kv_heads, G, T, hs)  # (B, NKV, G, T, hs)
    o, core = attention_core_forward(qg, k, v, 1.0 / math.sqrt(hs), False, 0, memory_mask,
                                     dropout_rate=dropout_rate, dropout_key=dropout_key, row_offset=row_offset,
                                     head_offset=head_offset)  # (B, NKV, G, T, hs)
    o_merged = _merge_heads(o.reshape(B, n_heads, T, hs))  # (B, T, NH*hs)
    y = _project(o_merged, p, "wo", "bo")  # (B, T, C)
    # keep the core's cache (qg, the memory's k and v, P, the dropout mask), x, memory and o_merged
    cache = dict(core, p=p, x=x, memory=memory, o=o_merged, n_heads=n_heads, n_kv_heads=n_kv_heads,
                 memory_kv_given=memory_kv is not None)
    return y, cache


def cross_attention_backward(dy, cache):
    """Backward of cross_attention_forward (without memory_kv). Returns dx (B, T, C), dmemory (B, Tk, C) and grads
    with the keys of p: the queries' path leads to x, the keys' and values' paths to the memory."""
    if cache["memory_kv_given"]:
        raise ValueError("cross_attention_backward does not support memory_kv (precomputed keys/values are for "
                         "decoding, which is forward-only); pass memory instead")
    p, x, memory = cache["p"], cache["x"], cache["memory"]
    B, T, _ = x.shape
    n_heads, hs = cache["n_heads"], cache["k"].shape[-1]
    grads, do = _output_backward(dy, p, cache["o"], cache["n_kv_heads"], hs)  # do (B, NKV, G, T, hs)
    dq, dk, dv = attention_core_backward(do, cache)
    # forward was q_lin = x @ wq + bq, k_lin = memory @ wk + bk, v_lin = memory @ wv + bv
    dx = _input_backward(x, p, {"q": dq.reshape(B, n_heads, T, hs)}, grads)  # (B, T, C)
    dmemory = _input_backward(memory, p, {"k": dk, "v": dv}, grads)  # (B, Tk, C)
    return dx, dmemory, {name: grads[name] for name in p}
