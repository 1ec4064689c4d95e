"""Tests for npllm/layers/attention.py: causal multi-head attention with GQA, optional biases and RoPE.

Derivation: docs/derivations/attention.md. The reference below is attention written as loops over batch b, query
head h, query i and key j, with the causal mask as the loop bound j <= i, GQA as the index h // (NH / NKV), and RoPE
as a rotation of each pair (m, m + hs/2) computed from the formula, so it shares no code with the layer.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.layers.attention import attention_backward, attention_forward
from npllm.layers.rope import rope_tables


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
