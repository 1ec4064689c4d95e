"""Tests for npllm/layers/attention.py: multi-head attention with GQA, optional biases and RoPE; causal or
bidirectional, with key padding and dropout on the probabilities; cross-attention.

Derivation: docs/derivations/attention.md. The reference below is attention written as loops over batch b, query
head h, query i and key j, with the causal mask as the loop bound j <= i, GQA as the index h // (NH / NKV), and RoPE
as a rotation of each pair (m, m + hs/2) computed from the formula, so it shares no code with the layer. The second
reference (masked_reference, further down) is a masked softmax written row by row, for padding, bidirectional and
cross-attention.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.attention import (
    attention_backward,
    attention_forward,
    cross_attention_backward,
    cross_attention_forward,
    cross_attention_kv,
)
from npllm.layers.dropout import dropout_key, keep_mask
from npllm.layers.rope import rope_tables

KEY_FOR_TESTS = dropout_key(7, 1, 0, 0, "attn_probs")


def make_params(rng, C, NH, NKV, hs, bias):
    shapes = {"wq": (C, NH * hs), "wk": (C, NKV * hs), "wv": (C, NKV * hs), "wo": (NH * hs, C)}
    if bias:
        shapes.update(bq=(NH * hs,), bk=(NKV * hs,), bv=(NKV * hs,), bo=(C,))
    return {name: rng.standard_normal(shape) / math.sqrt(shape[0] if len(shape) == 2 else 1)
            for name, shape in shapes.items()}


def rotate(vec, pos, theta):
    """RoPE on one head vector (hs,): rotate the pair (vec[m], vec[m + hs/2]) by pos * theta^(-2m/hs)."""
    hs = vec.shape[0]
    out = np.empty_like(vec)
    for m in range(hs // 2):
        angle = pos * theta ** (-2.0 * m / hs)
        c, s = math.cos(angle), math.sin(angle)
        out[m] = vec[m] * c - vec[m + hs // 2] * s
        out[m + hs // 2] = vec[m + hs // 2] * c + vec[m] * s
    return out


def naive_attention(p, x, NH, NKV, positions=None, theta=None):
    """Loops over b, h, i, j. positions/theta: apply RoPE (None: no RoPE)."""
    B, T, C = x.shape
    hs = p["wq"].shape[1] // NH
    G = NH // NKV
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]  # (B, T, NH*hs), (B, T, NKV*hs) twice
    if "bq" in p:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    o = np.zeros((B, T, NH * hs))
    for b in range(B):
        for h in range(NH):
            kv = h // G  # the key/value head that query head h reads
            for i in range(T):
                qi = q[b, i, h * hs:(h + 1) * hs]
                if positions is not None:
                    qi = rotate(qi, positions[i], theta)
                scores = []
                for j in range(i + 1):  # causal: query i sees keys 0..i
                    kj = k[b, j, kv * hs:(kv + 1) * hs]
                    if positions is not None:
                        kj = rotate(kj, positions[j], theta)
                    scores.append(sum(qi[m] * kj[m] for m in range(hs)) / math.sqrt(hs))
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j in range(i + 1):
                    o[b, i, h * hs:(h + 1) * hs] += weights[j] / total * v[b, j, kv * hs:(kv + 1) * hs]
    y = o @ p["wo"]
    return y + p["bo"] if "bo" in p else y


def to(backend, p):
    return {name: backend.asarray(value) for name, value in p.items()}


# every combination of GQA ratio, bias and RoPE is run; hypothesis draws the shapes, theta, offset and seed
variants = pytest.mark.parametrize("G, bias, use_rope", [(G, bias, use_rope) for G in (1, 2, 4)
                                                          for bias in (False, True) for use_rope in (False, True)])
attention_cases = dict(
    B=st.integers(1, 2), T=st.integers(1, 5), C=st.integers(1, 8), NKV=st.integers(1, 2),
    hs=st.sampled_from([2, 4]), theta=st.floats(10.0, 1e5), offset=st.integers(0, 100),
    seed=st.integers(0, 2**32 - 1),
)


@variants
@settings(max_examples=8, deadline=None)
@given(**attention_cases)
def test_attention_gradient(backend, grad_check, B, T, C, NKV, G, hs, bias, use_rope, theta, offset, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    rope = rope_tables(np.arange(offset, offset + T), hs, theta, xp=backend, dtype=np.float64) if use_rope else None

    def forward(p, x):
        return attention_forward(p, x, NH, NKV, rope=rope)

    errors = grad_check.layer(f"attention (G={G}, bias={bias}, rope={use_rope})", forward, attention_backward, p, x,
                              seed=seed)
    assert set(errors) == set(p) | {"x"}

    if bias and not use_rope:
        # bk adds the same q_i . bk to every score of row i, and softmax ignores a shift of its whole row: the true
        # gradient is exactly zero (gradcheck then reports 0 for both sides), so the analytic one must be ~0 too.
        y, cache = forward(p, x)
        _, grads = attention_backward(backend.asarray(rng.standard_normal(y.shape)), cache)
        scale = max(1.0, float(np.linalg.norm(asnumpy(grads["bq"]))))
        assert float(np.linalg.norm(asnumpy(grads["bk"]))) <= 1e-12 * scale


@variants
@settings(max_examples=5, deadline=None)
@given(**attention_cases)
def test_attention_forward_matches_naive_loops(backend, B, T, C, NKV, G, hs, bias, use_rope, theta, offset, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = make_params(rng, C, NH, NKV, hs, bias)
    x = rng.standard_normal((B, T, C))
    positions = np.arange(offset, offset + T)
    rope = rope_tables(positions, hs, theta, xp=backend, dtype=np.float64) if use_rope else None
    y, _ = attention_forward(to(backend, p), backend.asarray(x), NH, NKV, rope=rope)
    expected = naive_attention(p, x, NH, NKV, positions if use_rope else None, theta)
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(2, 6), NKV=st.integers(1, 2), G=st.sampled_from([1, 2, 4]),
       bias=st.booleans(), use_rope=st.booleans(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_future_positions_do_not_change_the_past(backend, B, T, NKV, G, bias, use_rope, data, seed):
    NH, hs, C = NKV * G, 2, 6
    t = data.draw(st.integers(0, T - 2), label="t")
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = rng.standard_normal((B, T, C))
    x_changed = x.copy()
    x_changed[:, t + 1:] = rng.standard_normal((B, T - t - 1, C))
    rope = rope_tables(np.arange(T), hs, 10000.0, xp=backend, dtype=np.float64) if use_rope else None
    y, _ = attention_forward(p, backend.asarray(x), NH, NKV, rope=rope)
    y_changed, _ = attention_forward(p, backend.asarray(x_changed), NH, NKV, rope=rope)
    np.testing.assert_allclose(asnumpy(y_changed)[:, :t + 1], asnumpy(y)[:, :t + 1], rtol=0, atol=1e-14)
    assert not np.allclose(asnumpy(y_changed)[:, t + 1:], asnumpy(y)[:, t + 1:])  # the change did reach the future


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(2, 6), NKV=st.integers(1, 2), G=st.sampled_from([1, 2, 4]),
       bias=st.booleans(), use_rope=st.booleans(), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_past_kv_gives_the_full_forward(backend, B, T, NKV, G, bias, use_rope, data, seed):
    NH, hs, C = NKV * G, 4, 5
    T_past = data.draw(st.integers(1, T - 1), label="T_past")
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))

    def tables(lo, hi):
        return rope_tables(np.arange(lo, hi), hs, 10000.0, xp=backend, dtype=np.float64) if use_rope else None

    y_full, c_full = attention_forward(p, x, NH, NKV, rope=tables(0, T))
    y_prefix, c_prefix = attention_forward(p, x[:, :T_past], NH, NKV, rope=tables(0, T_past))
    y_suffix, c_suffix = attention_forward(p, x[:, T_past:], NH, NKV, rope=tables(T_past, T),
                                           past_kv=(c_prefix["k"], c_prefix["v"]))
    assert c_suffix["k"].shape == (B, NKV, T, hs)
    np.testing.assert_allclose(asnumpy(y_prefix), asnumpy(y_full)[:, :T_past], rtol=0, atol=1e-12)
    np.testing.assert_allclose(asnumpy(y_suffix), asnumpy(y_full)[:, T_past:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(asnumpy(c_suffix["k"]), asnumpy(c_full["k"]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="past_kv"):
        attention_backward(y_suffix, c_suffix)


def test_softmax_stays_finite_for_huge_scores():
    # scores ~1e4: exp would overflow without the row-max shift
    rng = np.random.default_rng(0)
    p = make_params(rng, 4, 2, 1, 2, bias=False)
    p["wq"] *= 1e3
    p["wk"] *= 1e3
    x = rng.standard_normal((1, 5, 4))
    with np.errstate(over="raise", invalid="raise"):
        y, cache = attention_forward(p, x, 2, 1)
        dx, grads = attention_backward(np.ones_like(y), cache)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    assert all(np.isfinite(g).all() for g in grads.values())
    np.testing.assert_allclose(y, naive_attention(p, x, 2, 1), rtol=1e-10, atol=1e-10)


# ---- bidirectional self-attention, key padding, dropout on P, cross-attention ----------------------------------------
# The reference: masked-softmax attention written row by row. Queries come from x (B, T, C), keys and values from
# memory (B, Tk, C) (memory = x for self-attention); visible (B, T, Tk) says which keys each query may see; a query
# that sees none outputs 0 before wo; keep (B, NH, T, Tk) or None: the dropout mask applied to each row's
# probabilities.


def masked_reference(p, x, memory, NH, NKV, visible, keep=None, rate=0.0):
    B, T, _ = x.shape
    Tk = memory.shape[1]
    hs, G = p["wq"].shape[1] // NH, NH // NKV
    q = x @ p["wq"] + p.get("bq", 0.0)  # (B, T, NH*hs)
    k = memory @ p["wk"] + p.get("bk", 0.0)  # (B, Tk, NKV*hs)
    v = memory @ p["wv"] + p.get("bv", 0.0)  # (B, Tk, NKV*hs)
    o = np.zeros((B, T, NH * hs))
    for b in range(B):
        for h in range(NH):
            kv = h // G
            for i in range(T):
                seen = [j for j in range(Tk) if visible[b, i, j]]
                if not seen:
                    continue  # no key: o = 0
                scores = np.array([q[b, i, h * hs:(h + 1) * hs] @ k[b, j, kv * hs:(kv + 1) * hs] for j in seen])
                weights = np.exp(scores / math.sqrt(hs) - (scores / math.sqrt(hs)).max())
                weights /= weights.sum()
                if keep is not None:
                    weights = weights * keep[b, h, i, seen] / (1.0 - rate)
                o[b, i, h * hs:(h + 1) * hs] = weights @ v[b, seen, kv * hs:(kv + 1) * hs]
    return o @ p["wo"] + p.get("bo", 0.0)


def draw_key_mask(data, B, Tk, label="key_mask"):
    """A (B, Tk) key padding mask: right padding of drawn lengths (0 = a fully padded row) or any pattern."""
    if data.draw(st.booleans(), label=f"{label} by lengths"):
        lengths = data.draw(st.lists(st.integers(0, Tk), min_size=B, max_size=B), label=f"{label} lengths")
        return np.arange(Tk)[None, :] < np.array(lengths)[:, None]
    bits = data.draw(st.lists(st.booleans(), min_size=B * Tk, max_size=B * Tk), label=label)
    return np.array(bits, dtype=bool).reshape(B, Tk)


masked_cases = dict(B=st.integers(1, 3), T=st.integers(1, 5), C=st.integers(1, 6), NKV=st.integers(1, 2),
                    hs=st.sampled_from([2, 4]), data=st.data(), seed=st.integers(0, 2**32 - 1))


@pytest.mark.parametrize("G, bias, causal", [(G, bias, causal) for G in (1, 2, 4) for bias in (False, True)
                                              for causal in (False, True)])
@settings(max_examples=6, deadline=None)
@given(**masked_cases)
def test_self_attention_with_key_padding_gradient_and_reference(backend, grad_check, G, bias, causal, B, T, C, NKV,
                                                                  hs, data, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = make_params(rng, C, NH, NKV, hs, bias)
    x = rng.standard_normal((B, T, C))
    key_mask = draw_key_mask(data, B, T)
    use_rope = data.draw(st.booleans(), label="rope")
    rope = rope_tables(np.arange(T), hs, 10000.0, xp=backend, dtype=np.float64) if use_rope else None
    pb, xb, mb = to(backend, p), backend.asarray(x), backend.asarray(key_mask)

    def forward(p, x):
        return attention_forward(p, x, NH, NKV, rope=rope, causal=causal, key_mask=mb)

    label = f"attention + key padding (G={G}, bias={bias}, causal={causal})"
    errors = grad_check.layer(label, forward, attention_backward, pb, xb, seed=seed)
    assert set(errors) == set(p) | {"x"}
    if not use_rope:
        visible = np.broadcast_to(key_mask[:, None, :], (B, T, T)).copy()
        if causal:
            visible &= np.tril(np.ones((T, T), dtype=bool))
        y, _ = forward(pb, xb)
        np.testing.assert_allclose(asnumpy(y), masked_reference(p, x, x, NH, NKV, visible), rtol=1e-12, atol=1e-12)


def test_a_query_that_sees_no_key_outputs_zero_and_passes_no_gradient():
    rng = np.random.default_rng(0)
    B, T, C, NH, NKV = 3, 4, 8, 4, 2
    p = make_params(rng, C, NH, NKV, 2, bias=True)
    x = rng.standard_normal((B, T, C))
    key_mask = np.array([[True, True, False, False], [False] * 4, [True, False, True, True]])  # row 1: all padding
    with np.errstate(all="raise"):
        y, cache = attention_forward(p, x, NH, NKV, causal=False, key_mask=key_mask)
        dx, grads = attention_backward(rng.standard_normal(y.shape), cache)
    assert np.isfinite(y).all() and np.isfinite(dx).all() and all(np.isfinite(g).all() for g in grads.values())
    np.testing.assert_array_equal(cache["P"][1], 0.0)  # no probability anywhere in batch element 1
    np.testing.assert_array_equal(y[1], np.broadcast_to(p["bo"], (T, C)))  # o = 0, so y = bo
    np.testing.assert_array_equal(dx[1], 0.0)  # its queries see nothing and its keys are seen by no one
    # padded keys do not matter: change x at the padded positions of element 0, its real positions' y stay put
    x2 = x.copy()
    x2[0, 2:] = rng.standard_normal((2, C))
    y2, _ = attention_forward(p, x2, NH, NKV, causal=False, key_mask=key_mask)
    np.testing.assert_allclose(y2[0, :2], y[0, :2], rtol=0, atol=1e-14)
    # causal and padded (a left-padded decoder): in element 2, query 1 sees keys 0 and 1, of which 1 is padding
    _, causal_cache = attention_forward(p, x, NH, NKV, key_mask=key_mask)
    assert causal_cache["P"][2, :, :, 1, 1].max() == 0 and np.allclose(causal_cache["P"][2, :, :, 1, 0], 1.0)


def test_bidirectional_attention_sees_the_future():
    rng = np.random.default_rng(1)
    p = make_params(rng, 6, 2, 1, 3, bias=False)
    x = rng.standard_normal((1, 5, 6))
    x2 = x.copy()
    x2[0, -1] += 1.0
    y, _ = attention_forward(p, x, 2, 1, causal=False)
    y2, _ = attention_forward(p, x2, 2, 1, causal=False)
    assert not np.allclose(y[0, 0], y2[0, 0])  # the first position reads the last
    visible = np.ones((1, 5, 5), dtype=bool)
    np.testing.assert_allclose(y, masked_reference(p, x, x, 2, 1, visible), rtol=1e-12, atol=1e-12)
    # and the default is still causal: the same call without causal=False is the loop reference
    np.testing.assert_allclose(attention_forward(p, x, 2, 1)[0], naive_attention(p, x, 2, 1), rtol=1e-12, atol=1e-12)


def cross_gradient_check(grad_check, label, backend, p, x, memory, NH, NKV, memory_mask, seed, **kwargs):
    """Finite differences of f = sum(y * R) in x, memory and every parameter (check_layer takes one input)."""
    arrays = {**to(backend, p), "x": backend.asarray(x), "memory": backend.asarray(memory)}
    params = {name: arrays[name] for name in p}
    mask = None if memory_mask is None else backend.asarray(memory_mask)

    def forward():
        return cross_attention_forward(params, arrays["x"], arrays["memory"], NH, NKV, memory_mask=mask, **kwargs)

    y, cache = forward()
    R = backend.asarray(np.random.default_rng(seed + 1).standard_normal(y.shape))
    dx, dmemory, grads = cross_attention_backward(R, cache)
    assert list(grads) == list(p)
    errors = grad_check.function(label, lambda: float((forward()[0] * R).sum()), arrays,
                                 {**grads, "x": dx, "memory": dmemory}, seed=seed)
    assert set(errors) == set(p) | {"x", "memory"}
    return y


@pytest.mark.parametrize("G, bias", [(G, bias) for G in (1, 2, 4) for bias in (False, True)])
@settings(max_examples=8, deadline=None)
@given(Tk=st.integers(1, 6), masked=st.booleans(), **masked_cases)
def test_cross_attention_gradient_and_reference(backend, grad_check, G, bias, Tk, masked, B, T, C, NKV, hs, data,
                                                seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = make_params(rng, C, NH, NKV, hs, bias)
    x, memory = rng.standard_normal((B, T, C)), rng.standard_normal((B, Tk, C))  # Tk != T in general
    memory_mask = draw_key_mask(data, B, Tk, "memory_mask") if masked else None
    y = cross_gradient_check(grad_check, f"cross-attention (G={G}, bias={bias})", backend, p, x, memory, NH, NKV,
                             memory_mask, seed)
    visible = np.ones((B, T, Tk), dtype=bool) if memory_mask is None else np.repeat(memory_mask[:, None], T, axis=1)
    np.testing.assert_allclose(asnumpy(y), masked_reference(p, x, memory, NH, NKV, visible), rtol=1e-12, atol=1e-12)


def test_cross_attention_with_precomputed_memory_kv():
    rng = np.random.default_rng(2)
    B, T, Tk, C, NH, NKV = 2, 3, 5, 8, 4, 2
    p = make_params(rng, C, NH, NKV, 2, bias=True)
    x, memory = rng.standard_normal((B, T, C)), rng.standard_normal((B, Tk, C))
    memory_mask = np.array([[True] * 5, [True, True, True, False, False]])
    y, cache = cross_attention_forward(p, x, memory, NH, NKV, memory_mask=memory_mask)
    k, v = cross_attention_kv(p, memory, NKV)
    assert k.shape == v.shape == (B, NKV, Tk, 2)
    np.testing.assert_array_equal(cache["k"], k)
    for step in range(T):  # a decoder's steps: one query each, the memory's keys and values computed once
        y_step, c_step = cross_attention_forward(p, x[:, step:step + 1], None, NH, NKV, memory_mask=memory_mask,
                                                 memory_kv=(k, v))
        np.testing.assert_allclose(y_step[:, 0], y[:, step], rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="memory_kv"):
        cross_attention_backward(y_step, c_step)


@pytest.mark.parametrize("cross", [False, True])
@settings(max_examples=6, deadline=None)
@given(G=st.sampled_from([1, 2]), rate=st.sampled_from([0.1, 0.5]), **masked_cases)
def test_dropout_on_the_probabilities_gradient_and_reference(backend, grad_check, cross, G, rate, B, T, C, NKV, hs,
                                                             data, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = make_params(rng, C, NH, NKV, hs, bias=True)
    Tk = data.draw(st.integers(1, 5), label="Tk") if cross else T
    x, memory = rng.standard_normal((B, T, C)), rng.standard_normal((B, Tk, C))
    key_mask = draw_key_mask(data, B, Tk)
    key = dropout_key(seed, 3, 1, 2, "cross_probs" if cross else "attn_probs")
    drop = dict(dropout_rate=rate, dropout_key=key)
    if cross:
        y = cross_gradient_check(grad_check, f"cross-attention + dropout (G={G})", backend, p, x, memory, NH, NKV,
                                 key_mask, seed, **drop)
        visible = np.repeat(key_mask[:, None], T, axis=1)
    else:
        mb = backend.asarray(key_mask)

        def forward(p, x):
            return attention_forward(p, x, NH, NKV, causal=False, key_mask=mb, **drop)

        grad_check.layer(f"attention + dropout (G={G})", forward, attention_backward, to(backend, p),
                         backend.asarray(x), seed=seed)
        y, _ = forward(to(backend, p), backend.asarray(x))
        memory = x
        visible = np.repeat(key_mask[:, None], T, axis=1)
    keep = keep_mask((B, NH, T, Tk), rate, key)
    expected = masked_reference(p, x, memory, NH, NKV, visible, keep=keep, rate=rate)
    np.testing.assert_allclose(asnumpy(y), expected, rtol=1e-12, atol=1e-12)


def test_dropout_rate_zero_is_the_plain_layer_bit_for_bit():
    rng = np.random.default_rng(3)
    p = make_params(rng, 8, 4, 2, 2, bias=True)
    x = rng.standard_normal((2, 5, 8))
    y, cache = attention_forward(p, x, 4, 2)
    y0, cache0 = attention_forward(p, x, 4, 2, dropout_rate=0.0, dropout_key=KEY_FOR_TESTS)
    assert cache0["drop"] is None
    np.testing.assert_array_equal(y0, y)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(attention_backward(dy, cache0)[0], attention_backward(dy, cache)[0])


def test_dropout_under_data_and_tensor_parallel_splits_equals_one_process():
    # dp: 2 ranks of 2 rows each; tp: 2 ranks of 1 key/value head (2 query heads) each, heads' outputs summed
    rng = np.random.default_rng(4)
    B, T, C, NH, NKV, hs = 4, 5, 8, 4, 2, 2
    p = make_params(rng, C, NH, NKV, hs, bias=False)
    x = rng.standard_normal((B, T, C))
    key_mask = rng.random((B, T)) < 0.8
    drop = dict(dropout_rate=0.3, dropout_key=KEY_FOR_TESTS)
    y, _ = attention_forward(p, x, NH, NKV, causal=False, key_mask=key_mask, **drop)
    for r0 in (0, 2):
        y_dp, _ = attention_forward(p, x[r0:r0 + 2], NH, NKV, causal=False, key_mask=key_mask[r0:r0 + 2],
                                    row_offset=r0, **drop)
        np.testing.assert_array_equal(y_dp, y[r0:r0 + 2])
    y_tp = 0.0
    for r in range(2):  # rank r: key/value head r, query heads 2r, 2r + 1
        q_cols, kv_cols = slice(2 * r * hs, (2 * r + 2) * hs), slice(r * hs, (r + 1) * hs)
        shard = {"wq": p["wq"][:, q_cols], "wk": p["wk"][:, kv_cols], "wv": p["wv"][:, kv_cols],
                 "wo": p["wo"][q_cols]}
        y_r, _ = attention_forward(shard, x, 2, 1, causal=False, key_mask=key_mask, head_offset=2 * r, **drop)
        y_tp = y_tp + y_r
    np.testing.assert_allclose(y_tp, y, rtol=0, atol=1e-13)


def test_bad_masks_and_options_are_refused():
    rng = np.random.default_rng(5)
    p = make_params(rng, 4, 2, 1, 2, bias=False)
    x = rng.standard_normal((2, 3, 4))
    with pytest.raises(ValueError, match="key mask"):
        attention_forward(p, x, 2, 1, key_mask=np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="key mask"):
        attention_forward(p, x, 2, 1, key_mask=np.ones((2, 3)))
    with pytest.raises(ValueError, match="dropout_key"):
        attention_forward(p, x, 2, 1, dropout_rate=0.1)
    with pytest.raises(ValueError, match="rate="):
        attention_forward(p, x, 2, 1, dropout_rate=1.0, dropout_key=KEY_FOR_TESTS)
    with pytest.raises(ValueError, match="n_heads=3"):
        attention_forward(p, x, 3, 2)
    past = (np.zeros((2, 1, 2, 2)), np.zeros((2, 1, 2, 2)))
    with pytest.raises(ValueError, match="T_past=2"):
        attention_forward(p, x, 2, 1, past_kv=past, causal=False)
    with pytest.raises(ValueError, match="memory"):
        cross_attention_forward(p, x, rng.standard_normal((3, 5, 4)), 2, 1)
    with pytest.raises(ValueError, match="key mask"):
        cross_attention_forward(p, x, rng.standard_normal((2, 5, 4)), 2, 1, memory_mask=np.ones((2, 3), dtype=bool))
