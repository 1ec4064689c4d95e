"""Tests for npllm/fast/attention.py: flash-style attention against the reference npllm/layers/attention.py.

Derivation: docs/derivations/attention.md, section "Flash-style attention". The layers: causal and bidirectional
self-attention with key padding masks (a sequence with no real key at all included), GQA, RoPE, cached decoding, and
cross-attention (two input streams, memory_mask, precomputed memory_kv). Small tile sizes (1 to 5 positions) are
drawn so that every shape runs through several query and key tiles, tiles cut by the causal diagonal, tiles skipped
above it, and a last tile shorter than the others. The module sets MIN_WORK_FOR_THREADS to 0 so that threads=2 really
splits the (batch, kv-head) slices over two threads even at these sizes.

Agreement with the reference (float64): every array within 1e-10 of its own largest entry. The two computations
differ only in the order of their float64 sums (online softmax, D = rowsum(do * o), the tile-wise accumulation of dq,
dk, dv), which moves the results by ~1e-15 relative. Some gradients are exactly zero in the reference by cancellation
(the key bias without RoPE, dwq and dbq at T=1 where the softmax has one entry) and rounding noise in the fast path;
for those the floor of the bound is 1e-4 of the layer's largest gradient entry, i.e. 1e-14 of it.
"""

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.fast import attention as fast
from npllm.fast.attention import (
    flash_attention_backward,
    flash_attention_forward,
    flash_core_backward,
    flash_core_forward,
    flash_cross_attention_backward,
    flash_cross_attention_forward,
    flash_cross_attention_kv,
)
from npllm.parallel.cores import blas_thread_control, one_core
from npllm.layers.attention import (
    attention_backward,
    attention_forward,
    cross_attention_backward,
    cross_attention_forward,
    cross_attention_kv,
)
from npllm.layers.rope import rope_tables

AGREE = 1e-10


@pytest.fixture(scope="module", autouse=True)
def threads_even_for_tiny_shapes():
    old = fast.MIN_WORK_FOR_THREADS
    fast.MIN_WORK_FOR_THREADS = 0
    yield
    fast.MIN_WORK_FOR_THREADS = old


def make_params(rng, C, NH, NKV, hs, bias, dtype=np.float64):
    shapes = {"wq": (C, NH * hs), "wk": (C, NKV * hs), "wv": (C, NKV * hs), "wo": (NH * hs, C)}
    if bias:
        shapes.update(bq=(NH * hs,), bk=(NKV * hs,), bv=(NKV * hs,), bo=(C,))
    return {name: (rng.standard_normal(shape) / math.sqrt(shape[0] if len(shape) == 2 else 1)).astype(dtype)
            for name, shape in shapes.items()}


def to(backend, p):
    return {name: backend.asarray(value) for name, value in p.items()}


def assert_agree(got: dict, want: dict, what, floor=1e-4):
    """Each array within AGREE of max(its own largest entry, floor x the largest entry of all of them)."""
    got = {n: asnumpy(a) for n, a in got.items()}
    want = {n: asnumpy(a) for n, a in want.items()}
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    overall = max(float(np.abs(a).max()) for a in want.values() if a.size)
    for name, a in want.items():
        assert got[name].shape == a.shape and got[name].dtype == a.dtype, f"{what}: {name}"
        scale = max(float(np.abs(a).max()) if a.size else 0.0, floor * overall)
        err = float(np.abs(got[name] - a).max()) if a.size else 0.0
        assert err <= AGREE * scale, f"{what}: {name} differs by {err:.3g}, scale {scale:.3g}"


def tables(positions, hs, theta, backend):
    return rope_tables(positions, hs, theta, xp=backend, dtype=np.float64)


layer_cases = dict(
    B=st.integers(1, 2), T=st.integers(1, 11), C=st.integers(1, 6), NKV=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2, 4]), hs=st.sampled_from([2, 4]), bias=st.booleans(), use_rope=st.booleans(),
    q_tile=st.integers(1, 5), k_tile=st.integers(1, 5), threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)


@settings(max_examples=40, deadline=None)
@given(**layer_cases)
def test_layer_matches_the_reference(backend, B, T, C, NKV, G, hs, bias, use_rope, q_tile, k_tile, threads, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    rope = tables(np.arange(T), hs, 10000.0, backend) if use_rope else None
    y, cache = attention_forward(p, x, NH, NKV, rope=rope)
    y_fast, cache_fast = flash_attention_forward(p, x, NH, NKV, rope=rope, q_tile=q_tile, k_tile=k_tile,
                                                 threads=threads)
    dy = backend.asarray(rng.standard_normal(y.shape))  # (B, T, C)
    dx, grads = attention_backward(dy, cache)
    dx_fast, grads_fast = flash_attention_backward(dy, cache_fast)
    assert_agree({"y": y_fast, "k": cache_fast["k"], "v": cache_fast["v"]},
                 {"y": y, "k": cache["k"], "v": cache["v"]}, "forward")
    assert list(grads_fast) == list(p)  # the keys of p, in their order
    assert_agree({"x": dx_fast, **grads_fast}, {"x": dx, **grads}, "backward")


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), T_past=st.integers(1, 9), T=st.sampled_from([1, 1, 2, 3, 5]), NKV=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 2, 4]), bias=st.booleans(), use_rope=st.booleans(), q_tile=st.integers(1, 4),
       k_tile=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_decoding_with_past_keys_matches_the_reference(backend, B, T_past, T, NKV, G, bias, use_rope, q_tile, k_tile,
                                                       seed):
    NH, hs, C = NKV * G, 4, 5
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T_past + T, C)))  # (B, T_past+T, C)

    def rope(lo, hi):
        return tables(np.arange(lo, hi), hs, 500.0, backend) if use_rope else None

    tiles = dict(q_tile=q_tile, k_tile=k_tile)
    _, c_prefix = attention_forward(p, x[:, :T_past], NH, NKV, rope=rope(0, T_past))
    _, c_prefix_fast = flash_attention_forward(p, x[:, :T_past], NH, NKV, rope=rope(0, T_past), **tiles)
    assert_agree({"k": c_prefix_fast["k"], "v": c_prefix_fast["v"]}, {"k": c_prefix["k"], "v": c_prefix["v"]},
                 "prefix cache")
    past = (c_prefix["k"], c_prefix["v"])  # (B, NKV, T_past, hs) each
    y, cache = attention_forward(p, x[:, T_past:], NH, NKV, rope=rope(T_past, T_past + T), past_kv=past)
    y_fast, cache_fast = flash_attention_forward(p, x[:, T_past:], NH, NKV, rope=rope(T_past, T_past + T),
                                                 past_kv=past, **tiles)
    assert cache_fast["k"].shape == (B, NKV, T_past + T, hs)
    assert_agree({"y": y_fast, "k": cache_fast["k"], "v": cache_fast["v"]},
                 {"y": y, "k": cache["k"], "v": cache["v"]}, "decoding")
    with pytest.raises(ValueError, match="past_kv"):
        flash_attention_backward(y_fast, cache_fast)


def draw_key_mask(data, rng, B, Tk):
    """None, or a boolean (B, Tk) padding mask (True: a real key) that may leave one sequence with no real key."""
    if not data.draw(st.booleans(), label="padding"):
        return None
    key_mask = rng.random((B, Tk)) < data.draw(st.sampled_from([0.3, 0.7]), label="real share")  # (B, Tk)
    if data.draw(st.booleans(), label="one sequence all padding"):
        key_mask[0] = False
    return key_mask


@settings(max_examples=40, deadline=None)
@given(**layer_cases, causal=st.booleans(), data=st.data())
def test_bidirectional_and_padded_layer_matches_the_reference(backend, B, T, C, NKV, G, hs, bias, use_rope, q_tile,
                                                              k_tile, threads, seed, causal, data):
    """causal=False (an encoder) and causal=True, each with or without a key padding mask: the flash layer is the
    reference layer. Rows that see no key (a sequence all padding) give 0 and pass no gradient on both."""
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    rope = tables(np.arange(T), hs, 10000.0, backend) if use_rope else None
    key_mask = draw_key_mask(data, rng, B, T)
    mask = None if key_mask is None else backend.asarray(key_mask)
    y, cache = attention_forward(p, x, NH, NKV, rope=rope, causal=causal, key_mask=mask)
    y_fast, cache_fast = flash_attention_forward(p, x, NH, NKV, rope=rope, causal=causal, key_mask=mask,
                                                 q_tile=q_tile, k_tile=k_tile, threads=threads)
    dy = backend.asarray(rng.standard_normal(y.shape))  # (B, T, C)
    dx, grads = attention_backward(dy, cache)
    dx_fast, grads_fast = flash_attention_backward(dy, cache_fast)
    assert_agree({"y": y_fast, "k": cache_fast["k"], "v": cache_fast["v"]},
                 {"y": y, "k": cache["k"], "v": cache["v"]}, f"forward causal={causal}")
    assert list(grads_fast) == list(p)
    assert_agree({"x": dx_fast, **grads_fast}, {"x": dx, **grads}, f"backward causal={causal}")


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 9), Tk=st.integers(1, 11), C=st.integers(1, 6),
       NKV=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]), hs=st.sampled_from([1, 2, 4]), bias=st.booleans(),
       q_tile=st.integers(1, 5), k_tile=st.integers(1, 5), threads=st.sampled_from([1, 2]), data=st.data(),
       seed=st.integers(0, 2**32 - 1))
def test_cross_attention_matches_the_reference(backend, B, T, Tk, C, NKV, G, hs, bias, q_tile, k_tile, threads, data,
                                               seed):
    """Queries from x (B, T, C), keys and values from memory (B, Tk, C), T != Tk, memory_mask with padding (and a
    sequence whose memory is all padding): y, the memory's k and v, dx, dmemory and every weight's gradient."""
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    memory = backend.asarray(rng.standard_normal((B, Tk, C)))  # (B, Tk, C)
    memory_mask = draw_key_mask(data, rng, B, Tk)
    mask = None if memory_mask is None else backend.asarray(memory_mask)
    tiles = dict(q_tile=q_tile, k_tile=k_tile, threads=threads)
    y, cache = cross_attention_forward(p, x, memory, NH, NKV, memory_mask=mask)
    y_fast, cache_fast = flash_cross_attention_forward(p, x, memory, NH, NKV, memory_mask=mask, **tiles)
    dy = backend.asarray(rng.standard_normal(y.shape))  # (B, T, C)
    dx, dmemory, grads = cross_attention_backward(dy, cache)
    dx_fast, dmemory_fast, grads_fast = flash_cross_attention_backward(dy, cache_fast)
    assert_agree({"y": y_fast, "k": cache_fast["k"], "v": cache_fast["v"]},
                 {"y": y, "k": cache["k"], "v": cache["v"]}, "cross forward")
    assert list(grads_fast) == list(p)
    assert_agree({"x": dx_fast, "memory": dmemory_fast, **grads_fast}, {"x": dx, "memory": dmemory, **grads},
                 "cross backward")
    # decoding: the memory's keys and values computed once (either implementation's) and passed as memory_kv
    memory_kv = flash_cross_attention_kv(p, memory, NKV)  # (B, NKV, Tk, hs) each, contiguous
    for got, want in zip(memory_kv, cross_attention_kv(p, memory, NKV)):
        assert got.flags.c_contiguous and np.array_equal(asnumpy(got), asnumpy(want))  # the same values
    for kv in (memory_kv, cross_attention_kv(p, memory, NKV)):
        y_kv, cache_kv = flash_cross_attention_forward(p, x, None, NH, NKV, memory_mask=mask, memory_kv=kv, **tiles)
        assert_agree({"y": y_kv}, {"y": y}, "cross forward from memory_kv")
        with pytest.raises(ValueError, match="memory_kv"):
            flash_cross_attention_backward(dy, cache_kv)


@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 6), Tk=st.integers(1, 7), NKV=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 2]), bias=st.booleans(), padding=st.booleans(), q_tile=st.integers(1, 4),
       k_tile=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_cross_attention_gradient(backend, grad_check, B, T, Tk, NKV, G, bias, padding, q_tile, k_tile, seed):
    """Both input streams and every weight by finite differences: f = sum(y * R)."""
    NH, hs, C = NKV * G, 2, 4
    rng = np.random.default_rng(seed)
    arrays = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    arrays["x"] = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    arrays["memory"] = backend.asarray(rng.standard_normal((B, Tk, C)))  # (B, Tk, C)
    mask = None
    if padding:
        mask = rng.random((B, Tk)) < 0.6  # (B, Tk)
        mask[:, 0] = True  # every query sees a key: f then depends on every query weight
        mask = backend.asarray(mask)
    R = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    tiles = dict(q_tile=q_tile, k_tile=k_tile, threads=2)

    def forward():
        p = {n: a for n, a in arrays.items() if n not in ("x", "memory")}
        return flash_cross_attention_forward(p, arrays["x"], arrays["memory"], NH, NKV, memory_mask=mask, **tiles)

    y, cache = forward()
    dx, dmemory, grads = flash_cross_attention_backward(R, cache)
    errors = grad_check.function(f"flash cross-attention (G={G}, bias={bias}, padding={padding})",
                                 lambda: float((forward()[0] * R).sum()), arrays,
                                 {"x": dx, "memory": dmemory, **grads}, seed=seed)
    assert set(errors) == set(arrays)


# ---- the core on its own: bidirectional attention and key padding, against a plain masked softmax ----

def masked_softmax_attention(qg, k, v, scale, causal, T_past, key_mask):
    """The reference core: the full scores, a boolean mask, softmax, and its backward through P. float64.

    Returns o and a function do -> (dq, dk, dv). A row that sees no key gets P = 0, so o = 0 and no gradient.
    """
    B, T, Tk = qg.shape[0], qg.shape[3], k.shape[2]
    s = np.einsum("bngtd,bnjd->bngtj", qg, k) * scale  # (B, NKV, G, T, Tk)
    visible = np.ones((B, 1, 1, T, Tk), dtype=bool)
    if causal:
        visible &= (np.arange(Tk)[None, :] <= T_past + np.arange(T)[:, None])[None, None, None]
    if key_mask is not None:
        visible &= key_mask[:, None, None, None, :]
    s = np.where(visible, s, -np.inf)
    top = s.max(axis=-1, keepdims=True)  # (B, NKV, G, T, 1)
    e = np.where(visible, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    P = e / np.where(total > 0, total, 1.0)  # (B, NKV, G, T, Tk)
    o = np.einsum("bngtj,bnjd->bngtd", P, v)  # (B, NKV, G, T, hs)

    def backward(do):
        dP = np.einsum("bngtd,bnjd->bngtj", do, v)
        dv = np.einsum("bngtj,bngtd->bnjd", P, do)
        ds = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
        dq = np.einsum("bngtj,bnjd->bngtd", ds, k) * scale
        dk = np.einsum("bngtj,bngtd->bnjd", ds, qg) * scale
        return dq, dk, dv

    return o, backward


core_cases = dict(
    B=st.integers(1, 3), NKV=st.sampled_from([1, 2]), G=st.sampled_from([1, 2, 4]), T=st.integers(1, 9),
    hs=st.sampled_from([1, 3, 4]), q_tile=st.integers(1, 4), k_tile=st.integers(1, 4), threads=st.sampled_from([1, 2]),
    data=st.data(), seed=st.integers(0, 2**32 - 1),
)


def draw_core_inputs(data, rng, B, NKV, G, T, hs, causal):
    T_past = data.draw(st.integers(0, 4), label="T_past") if causal else 0
    Tk = T_past + T if causal else data.draw(st.integers(1, 10), label="Tk")
    qg = rng.standard_normal((B, NKV, G, T, hs))  # (B, NKV, G, T, hs)
    k = rng.standard_normal((B, NKV, Tk, hs))  # (B, NKV, Tk, hs)
    v = rng.standard_normal((B, NKV, Tk, hs))  # (B, NKV, Tk, hs)
    key_mask = None
    if data.draw(st.booleans(), label="padding"):
        key_mask = rng.random((B, Tk)) < data.draw(st.sampled_from([0.3, 0.7]), label="real share")  # (B, Tk)
        if data.draw(st.booleans(), label="one sequence all padding"):
            key_mask[0] = False
    return qg, k, v, T_past, key_mask


@pytest.mark.parametrize("causal", [False, True])
@settings(max_examples=30, deadline=None)
@given(**core_cases)
def test_core_matches_a_masked_softmax(backend, causal, B, NKV, G, T, hs, q_tile, k_tile, threads, data, seed):
    rng = np.random.default_rng(seed)
    qg, k, v, T_past, key_mask = draw_core_inputs(data, rng, B, NKV, G, T, hs, causal)
    scale = 1 / math.sqrt(hs)
    tiles = dict(q_tile=q_tile, k_tile=k_tile, threads=threads)
    mask_dev = None if key_mask is None else backend.asarray(key_mask)
    dev = [backend.asarray(a) for a in (qg, k, v)]
    o, L = flash_core_forward(*dev, scale, causal=causal, T_past=T_past, key_mask=mask_dev, **tiles)
    o_ref, backward_ref = masked_softmax_attention(qg, k, v, scale, causal, T_past, key_mask)
    do = rng.standard_normal(o_ref.shape)  # (B, NKV, G, T, hs)
    dq, dk, dv = flash_core_backward(backend.asarray(do), *dev, o, L, scale, causal=causal, T_past=T_past,
                                     key_mask=mask_dev, **tiles)
    got = {"o": o, "dq": dq, "dk": dk, "dv": dv}
    assert all(np.isfinite(asnumpy(a)).all() for a in got.values())
    assert_agree(got, dict(zip(got, (o_ref, *backward_ref(do)))), f"core causal={causal}")
    if key_mask is not None:
        blind = ~key_mask.any(axis=1)  # (B,): sequences with no real key: their rows see nothing
        assert (asnumpy(o)[blind] == 0).all() and (asnumpy(dq)[blind] == 0).all()
        assert np.isposinf(asnumpy(L)[blind]).all()


@pytest.mark.parametrize("causal", [False, True])
@settings(max_examples=6, deadline=None)
@given(**core_cases)
def test_core_gradient(backend, grad_check, causal, B, NKV, G, T, hs, q_tile, k_tile, threads, data, seed):
    rng = np.random.default_rng(seed)
    qg, k, v, T_past, key_mask = draw_core_inputs(data, rng, B, NKV, G, T, hs, causal)
    arrays = {name: backend.asarray(a) for name, a in (("q", qg), ("k", k), ("v", v))}
    kw = dict(causal=causal, T_past=T_past, key_mask=None if key_mask is None else backend.asarray(key_mask),
              q_tile=q_tile, k_tile=k_tile, threads=threads)
    scale = 1 / math.sqrt(hs)
    R = backend.asarray(rng.standard_normal(qg.shape))  # (B, NKV, G, T, hs): f = sum(o * R)

    def f():
        o, _ = flash_core_forward(arrays["q"], arrays["k"], arrays["v"], scale, **kw)
        return float((o * R).sum())

    o, L = flash_core_forward(arrays["q"], arrays["k"], arrays["v"], scale, **kw)
    dq, dk, dv = flash_core_backward(R, arrays["q"], arrays["k"], arrays["v"], o, L, scale, **kw)
    grad_check.function(f"flash core (causal={causal})", f, arrays, {"q": dq, "k": dk, "v": dv}, seed=seed)


@settings(max_examples=12, deadline=None)
@given(**layer_cases)
def test_layer_gradient(backend, grad_check, B, T, C, NKV, G, hs, bias, use_rope, q_tile, k_tile, threads, seed):
    NH = NKV * G
    rng = np.random.default_rng(seed)
    p = to(backend, make_params(rng, C, NH, NKV, hs, bias))
    x = backend.asarray(rng.standard_normal((B, T, C)))  # (B, T, C)
    rope = tables(np.arange(3, 3 + T), hs, 100.0, backend) if use_rope else None

    def forward(p, x):
        return flash_attention_forward(p, x, NH, NKV, rope=rope, q_tile=q_tile, k_tile=k_tile, threads=threads)

    errors = grad_check.layer(f"flash attention (G={G}, bias={bias}, rope={use_rope})", forward,
                              flash_attention_backward, p, x, seed=seed)
    assert set(errors) == set(p) | {"x"}


def test_float32_stays_float32_and_close_to_float64():
    """float32 in, float32 out, with no float64 anywhere in between.

    Bound: float32 rounds at 6e-8 relative; the layer chains ~5 matrix products of length <= 256 and a softmax, whose
    errors grow like sqrt(length) per product, so ~1e-6 relative is typical. We demand 2e-5 for y (relative to its
    largest entry) and 1e-4 for the gradients (one more chain of products); the float32 reference meets the same
    bounds (asserted too), so the bound is the arithmetic's, not the tiling's.
    """
    B, T, C, NH, NKV, hs = 2, 200, 64, 4, 2, 16
    rng = np.random.default_rng(0)
    p64 = make_params(rng, C, NH, NKV, hs, bias=True)
    x64 = rng.standard_normal((B, T, C))  # (B, T, C)
    dy64 = rng.standard_normal((B, T, C))  # (B, T, C)
    rope64 = rope_tables(np.arange(T), hs, 10000.0, dtype=np.float64)
    y64, c64 = attention_forward(p64, x64, NH, NKV, rope=rope64)
    dx64, g64 = attention_backward(dy64, c64)
    want = {"y": y64, "x": dx64, **g64}
    p32 = {n: a.astype(np.float32) for n, a in p64.items()}
    x32, dy32 = x64.astype(np.float32), dy64.astype(np.float32)
    rope32 = tuple(t.astype(np.float32) for t in rope64)
    for forward, backward, kw in ((flash_attention_forward, flash_attention_backward,
                                   dict(q_tile=48, k_tile=64, threads=2)),
                                  (attention_forward, attention_backward, {})):
        y32, c32 = forward(p32, x32, NH, NKV, rope=rope32, **kw)
        dx32, g32 = backward(dy32, c32)
        got = {"y": y32, "x": dx32, **g32}
        for name, a in got.items():
            assert a.dtype == np.float32, f"{forward.__name__}: {name} is {a.dtype}"
            bound = 2e-5 if name == "y" else 1e-4
            scale = max(float(np.abs(want[name]).max()), 1e-4 * float(np.abs(dx64).max()))
            err = float(np.abs(a - want[name]).max())
            assert err <= bound * scale, f"{forward.__name__}: {name} off by {err:.3g} (scale {scale:.3g})"
        if forward is flash_attention_forward:
            L = c32["L"]
            assert L.dtype == np.float32 and c32["qs"].dtype == np.float32


def test_the_cache_grows_like_T_not_T_squared():
    # the reference keeps P, (B, NH, T, T); the fast path keeps o and L, O(T) per row (default tile sizes here)
    B, T, C, NH, NKV, hs = 1, 300, 8, 4, 2, 2
    rng = np.random.default_rng(0)
    p = make_params(rng, C, NH, NKV, hs, bias=False)
    _, cache = flash_attention_forward(p, rng.standard_normal((B, T, C)), NH, NKV)
    sizes = {name: a.size for name, a in cache.items() if isinstance(a, np.ndarray)}
    assert sizes and max(sizes.values()) <= B * T * max(C, NH * hs), sizes
    assert cache["L"].shape == (B, NKV, NH // NKV, T)


def test_huge_scores_stay_finite():
    # scores ~1e6: exp would overflow without the running max; several key tiles make the max grow tile by tile
    rng = np.random.default_rng(0)
    p = make_params(rng, 4, 2, 1, 2, bias=False)
    p["wq"] *= 1e3
    p["wk"] *= 1e3
    x = rng.standard_normal((1, 9, 4))
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # (it holds in this thread: threads=1)
        y, cache = flash_attention_forward(p, x, 2, 1, q_tile=2, k_tile=2, threads=1)
        dx, grads = flash_attention_backward(np.ones_like(y), cache)
    y_ref, cache_ref = attention_forward(p, x, 2, 1)
    dx_ref, grads_ref = attention_backward(np.ones_like(y), cache_ref)
    assert np.isfinite(dx).all() and all(np.isfinite(g).all() for g in grads.values())
    assert_agree({"y": y}, {"y": y_ref}, "huge scores forward")
    # The softmax is one-hot to float64 precision, so the reference's dq (hence dwq) is exactly 0, and the fast path's
    # is rounding of terms as large as the other gradients (s - L, recomputed in another order, is ~eps * |s| ~ 1e-10
    # off zero on the chosen key): here every array is held to AGREE of the layer's largest gradient entry.
    assert_agree({"x": dx, **grads}, {"x": dx_ref, **grads_ref}, "huge scores backward", floor=1.0)


@pytest.mark.skipif(blas_thread_control() is None, reason="BLAS is not an OpenBLAS whose thread count we can read")
def test_blas_keeps_its_thread_count():
    # the core runs BLAS on one thread while its own threads work, and must give the count back, also on an error
    get = blas_thread_control()[0]
    before = get()
    rng = np.random.default_rng(0)
    qg, k = rng.standard_normal((2, 1, 2, 40, 4)), rng.standard_normal((2, 1, 40, 4))
    flash_core_forward(qg, k, k, 0.5, causal=True, threads=2, q_tile=8)
    assert get() == before

    def failing_chunk(lo, hi):
        raise RuntimeError(f"chunk {lo}:{hi} failed")

    with pytest.raises(RuntimeError, match="chunk"):
        fast._run_over_slices(np, failing_chunk, 2, 10**9, 2)
    assert get() == before


def test_the_core_runs_in_the_calling_thread_inside_a_one_core_thread():
    # a row group side by side with others (npllm.parallel.cores.one_core) has one core: the core splits nothing
    assert fast.default_threads() >= 1
    with one_core():
        assert fast.default_threads() == 1
        seen = []
        fast._run_over_slices(np, lambda lo, hi: seen.append((lo, hi, threading.get_ident())), 4, 10**9, 2)
    me = threading.get_ident()
    assert seen == [(0, 2, me), (2, 4, me)]  # even when a caller asks for 2 threads: one after the other, here


def test_bad_arguments_are_one_line_errors():
    rng = np.random.default_rng(0)
    p = make_params(rng, 4, 3, 2, 2, bias=False)
    x = rng.standard_normal((1, 3, 4))
    with pytest.raises(ValueError, match="n_heads=3"):
        flash_attention_forward(p, x, 3, 2)
    p = make_params(rng, 4, 2, 1, 2, bias=False)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="q_tile"):
            flash_attention_forward(p, x, 2, 1, q_tile=bad)
    with pytest.raises(ValueError, match="dropout_rate=0.1 is not allowed here"):
        flash_attention_forward(p, x, 2, 1, dropout_rate=0.1, dropout_key=(1, 2))
    with pytest.raises(ValueError, match="dropout_rate=0.1 is not allowed here"):
        flash_cross_attention_forward(p, x, x, 2, 1, dropout_rate=0.1, dropout_key=(1, 2))
    flash_attention_forward(p, x, 2, 1, dropout_rate=0.0, dropout_key=(1, 2), row_offset=3, head_offset=1)  # taken
    past = (np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="past_kv is for causal decoding"):
        flash_attention_forward(p, x, 2, 1, past_kv=past, causal=False)
    with pytest.raises(ValueError, match="key_mask"):
        flash_attention_forward(p, x, 2, 1, causal=False, key_mask=np.ones((1, 3)))  # not boolean
    with pytest.raises(ValueError, match=r"memory must be \(B, Tk, C\) = \(1, Tk, 4\); got \(1, 3, 5\)"):
        flash_cross_attention_forward(p, x, np.ones((1, 3, 5)), 2, 1)
    with pytest.raises(ValueError, match="n_heads=3"):
        flash_cross_attention_forward(p, x, x, 3, 2)
    qg, k = rng.standard_normal((1, 1, 2, 3, 2)), rng.standard_normal((1, 1, 4, 2))
    with pytest.raises(ValueError, match="Tk = T_past"):
        flash_core_forward(qg, k, k, 1.0, causal=True, T_past=0)
    with pytest.raises(ValueError, match="T_past=1"):
        flash_core_forward(qg, k, k, 1.0, causal=False, T_past=1)
    with pytest.raises(ValueError, match="key_mask"):
        flash_core_forward(qg, k, k, 1.0, causal=False, key_mask=np.ones((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="k_tile"):
        flash_core_forward(qg, k, k, 1.0, causal=False, k_tile=0)
    with pytest.raises(ValueError, match="threads"):
        flash_core_forward(qg, k, k, 1.0, causal=False, threads=0)
