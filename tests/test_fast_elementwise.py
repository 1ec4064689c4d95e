"""Tests for the fused, all-core elementwise fast paths: npllm/fast/pool.py, mlp.py, norm.py, loss.py, optim.py.

Each fast function is checked against its reference (npllm.layers.mlp, npllm.layers.norm,
npllm.parallel.tensor's vocabulary-parallel cross-entropy, npllm.optim.adamw_update) and by finite differences on its
own. The pool is set (fixture ``small_chunks``) to chunks of a few elements and 2 threads even for these tiny shapes,
so that every case runs through several chunks on two threads, with a last chunk shorter than the others; tests that
draw the chunk size set it themselves.

Agreement with the reference, float64: every array within AGREE = 1e-10 of the reference's largest entry (outputs,
caches, dx, every grad). Most fast paths do the reference's operations in the reference's order and agree exactly;
the GELU MLP computes tanh(u) as 2 / (1 + exp(-2u)) - 1 and act' in a factored form (1 - t^2 = (1 - t)(1 + t)), and
the bias and norm gradients add per-chunk partial sums, which moves results by a few ulps (~1e-16 relative).

Exact claims, tested as such (float32 and float64): the norms' y, xhat, rstd and dx; SwiGLU's and ReLU's outputs,
caches, dx and weight gradients; the hidden dropout's masks (drawn chunk by chunk of rows at their global rows) and,
for ReLU, its outputs and gradients with dropout; the loss and dlogits on one rank (both modes); AdamW's p, m and v.

float32 agreement of the rest: the GELU MLP's outputs and grads within 2e-6 of the largest entry. Its t and act'(h)
differ from the reference's by a few ulps (float32 ulp 6e-8; t: 2.4e-7 of max|t| at worst), and dx = dh @ w1.T and
dw1 = x.T @ dh sum F or N such terms of mixed signs, so relative to their largest entry the difference grows: the
test's case shows 6.7e-7 (dw1), 6.1e-7 (dx), 1.3e-7 (y); the worst over 200 seeds of that shape was 1.3e-6. The
partial-sum gradients (bias grads, norm dw and db) within 1e-5 of their largest entry (chunked versus one sequential
float32 sum over N <= 40 rows: each order rounds ~N ulps at worst).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import threading
import tracemalloc
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npllm import optim as ref_optim
from npllm.backend import asnumpy
from npllm.fast import loss as fast_loss
from npllm.fast import mlp as fast_mlp
from npllm.fast import norm as fast_norm
from npllm.fast import optim as fast_optim
from npllm.fast import pool
from npllm.layers import mlp as ref_mlp
from npllm.layers import norm as ref_norm
from npllm.layers.dropout import dropout_key
from npllm.layers.loss import IGNORE_INDEX
from npllm.parallel.comm import LocalComm
from npllm.parallel.tensor import (
    vocab_parallel_cross_entropy_backward,
    vocab_parallel_cross_entropy_forward,
)

from tests.helpers import on_thread_ranks

AGREE = 1e-10  # float64: fast versus reference, relative to the reference's largest entry
F32_ELEMENTWISE = 2e-6  # float32: the GELU MLP's outputs and grads (see the module docstring)
F32_SUMS = 1e-5  # float32: gradients formed from per-chunk partial sums over rows
FAST = settings(max_examples=20, deadline=None)
# float64, tanh-GELU only: an absolute allowance beside AGREE. Where tanh(u) rounds to -1 (u < ~-19, h < ~-5.4) the
# reference's a = 0.5 h (1 + tanh u) cancels to 0, while the fast path's a = h / (1 + exp(-2u)) keeps the true value,
# below 0.5 |h| 2^-53 ~ 3e-15 for the |h| <= 50 these tests draw; y and dw2 sum at most 13 such terms times weights or
# dy of magnitude <~ 4 (<= 1.5e-13). It only decides when a reference array is ~0 everywhere (hypothesis found one:
# C = F = 1, h = -7.37, reference a = -0.0, fast -2.2e-17, a relative error of inf); any array of ordinary size
# already allows AGREE * its largest entry, far more.
GELU_TANH_ATOL = 1e-12


@contextlib.contextmanager
def pool_settings(chunk_elements=5, threads=2, min_parallel=0):
    """Chunks of ``chunk_elements`` elements, ``threads`` threads, threads from ``min_parallel`` elements on."""
    old = pool.CHUNK_ELEMENTS, pool.THREADS, pool.MIN_PARALLEL_ELEMENTS
    pool.CHUNK_ELEMENTS, pool.THREADS, pool.MIN_PARALLEL_ELEMENTS = chunk_elements, threads, min_parallel
    try:
        yield
    finally:
        pool.CHUNK_ELEMENTS, pool.THREADS, pool.MIN_PARALLEL_ELEMENTS = old


@pytest.fixture(autouse=True)
def small_chunks():
    with pool_settings():
        yield


def max_abs_diff(got, want) -> float:
    """max |got - want| (0 for empty arrays; inf for a shape or dtype mismatch)."""
    got, want = asnumpy(got), asnumpy(want)
    if got.shape != want.shape or got.dtype != want.dtype:
        return math.inf
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (0 for two all-zero arrays; inf for a shape or dtype mismatch)."""
    err = max_abs_diff(got, want)
    want = asnumpy(want)
    if err == math.inf or want.size == 0:
        return err
    scale = float(np.abs(want).max())
    return err / scale if scale else (0.0 if err == 0 else math.inf)


def assert_close(got: dict, want: dict, tol, what, atol=0.0):
    """Each array within tol of the reference's largest entry (rel_err), or within atol absolutely."""
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    bad = {name: rel_err(got[name], want[name]) for name in want}
    bad = {name: e for name, e in bad.items()
           if not (e <= tol or (atol and max_abs_diff(got[name], want[name]) <= atol))}
    assert not bad, f"{what}: relative errors above {tol:g}{f' (and absolute above {atol:g})' if atol else ''}: {bad}"


def assert_same(got: dict, want: dict, what):
    assert list(got) == list(want), f"{what}: keys {list(got)} != {list(want)}"
    for name, wanted in want.items():
        g, w = asnumpy(got[name]), asnumpy(wanted)
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: {name} {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
        assert np.array_equal(g, w), f"{what}: {name} differs by {np.abs(g - w).max():.3g}"


def flat_cache(cache):
    """The arrays of an MLP or norm cache, by position (dicts of parameters left out)."""
    out = {}

    def walk(item, key):
        if isinstance(item, (tuple, list)):
            for i, sub in enumerate(item):
                walk(sub, f"{key}.{i}")
        elif hasattr(item, "shape"):
            out[key] = item

    walk(cache[1:] if isinstance(cache[0], dict) else cache, "cache")
    return out


# ----------------------------------------------------------------------------------------------------------
# the pool


def test_map_rows_covers_every_row_once_in_order_on_two_threads():
    seen = []
    lock = threading.Lock()

    def fn(rows):
        with lock:
            seen.append((rows.start, rows.stop, threading.get_ident()))
        return rows.start

    with pool_settings(chunk_elements=6, threads=2):
        results = pool.map_rows(fn, 23, 2)  # 3 rows per chunk: 8 chunks, the last of 2 rows
    assert results == list(range(0, 23, 3))
    assert sorted((a, b) for a, b, _ in seen) == [(lo, min(lo + 3, 23)) for lo in range(0, 23, 3)]


def test_map_rows_chunks_do_not_depend_on_the_thread_count():
    assert pool.row_chunks(10, 3) == pool.row_chunks(10, 3)
    with pool_settings(chunk_elements=7):
        assert [(s.start, s.stop) for s in pool.row_chunks(10, 3)] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
        assert [(s.start, s.stop) for s in pool.row_chunks(3, 100)] == [(0, 1), (1, 2), (2, 3)]  # >= 1 row
        assert pool.row_chunks(0, 5) == []
        for threads in (1, 2, 3):
            assert pool.map_rows(lambda r: (r.start, r.stop), 10, 3, threads=threads) == [
                (0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_small_work_runs_in_the_calling_thread():
    me = threading.get_ident()
    with pool_settings(chunk_elements=4, threads=2, min_parallel=1000):
        idents = pool.map_rows(lambda r: threading.get_ident(), 100, 4)  # 400 elements < 1000
    assert set(idents) == {me}


def test_map_rows_raises_the_first_error_after_the_other_chunks_stop():
    started = []

    def fn(rows):
        started.append(rows.start)
        if rows.start == 4:
            raise KeyError("chunk 4")
        return rows.start

    with pool_settings(chunk_elements=1, threads=2):
        with pytest.raises(KeyError, match="chunk 4"):
            pool.map_rows(fn, 200, 1)
        assert len(started) < 200  # no chunk started after the failure was seen (two were at most in flight)
        assert pool.map_rows(lambda r: r.start, 3, 1) == [0, 1, 2]  # the pool still works


def test_nested_map_rows_runs_serially_without_deadlock():
    def inner(rows):
        return threading.get_ident()

    def outer(rows):
        me = threading.get_ident()
        idents = pool.map_rows(inner, 8, 1)
        return set(idents) == {me}

    with pool_settings(chunk_elements=1, threads=2):
        assert all(pool.map_rows(outer, 16, 1))


def test_sum_parts_adds_in_row_order_and_gives_zeros_without_rows():
    parts = [np.array([1e16, 1.0]), np.array([-1e16, 1.0]), np.array([1.0, 1.0])]
    np.testing.assert_array_equal(pool.sum_parts(np, parts, 2, np.float64), [1.0, 3.0])  # ((a + b) + c)
    z = pool.sum_parts(np, [], 3, np.float32)
    assert z.dtype == np.float32 and np.array_equal(z, np.zeros(3))


# ----------------------------------------------------------------------------------------------------------
# MLPs


def make_mlp_params(rng, kind, C, F, bias, dtype=np.float64):
    shapes = {"w1": (C, F), "w2": (F, C)}
    if kind == "swiglu":
        shapes["w3"] = (C, F)
    if bias:
        shapes.update(b1=(F,), b2=(C,))
        if kind == "swiglu":
            shapes["b3"] = (F,)
    return {name: (rng.standard_normal(shape) / math.sqrt(shape[0] if len(shape) == 2 else 1)).astype(dtype)
            for name, shape in shapes.items()}


FAST_MLPS = ("gelu", "gelu_erf", "swiglu", "relu")
lead_shapes = st.sampled_from([(1,), (1, 1), (7,), (2, 5), (3, 4), (13,)])


def run_layer(fwd, bwd, p, x, dy):
    y, cache = fwd(p, x)
    dx, grads = bwd(dy, cache)
    return y, cache, dx, grads


@FAST
@given(kind=st.sampled_from(FAST_MLPS), bias=st.booleans(), lead=lead_shapes, C=st.integers(1, 6),
       F=st.integers(1, 9), chunk=st.integers(1, 40), threads=st.sampled_from([1, 2]),
       x_scale=st.sampled_from([0.1, 3.0]), seed=st.integers(0, 2**32 - 1))
@example(kind="gelu", bias=True, lead=(1,), C=1, F=1, chunk=1, threads=1, x_scale=3.0, seed=22)  # reference a = -0.0
def test_mlp_matches_the_reference_in_float64(backend, kind, bias, lead, C, F, chunk, threads, x_scale, seed):
    rng = np.random.default_rng(seed)
    p = {n: backend.asarray(v) for n, v in make_mlp_params(rng, kind, C, F, bias).items()}
    x = backend.asarray(x_scale * rng.standard_normal((*lead, C)))  # (..., C)
    dy = backend.asarray(rng.standard_normal((*lead, C)))  # (..., C)
    ref = run_layer(*ref_mlp.MLP_KINDS[kind], p, x, dy)
    with pool_settings(chunk_elements=chunk, threads=threads):
        fast = run_layer(*fast_mlp.MLP_KINDS[kind], p, x, dy)
    want = {"y": ref[0], "dx": ref[2], **flat_cache(ref[1]), **{f"d{n}": g for n, g in ref[3].items()}}
    got = {"y": fast[0], "dx": fast[2], **flat_cache(fast[1]), **{f"d{n}": g for n, g in fast[3].items()}}
    assert_close(got, want, AGREE, f"{kind} mlp", atol=GELU_TANH_ATOL if kind == "gelu" else 0.0)
    if kind != "gelu":  # the reference's operations in its order: the same bits (bias sums aside)
        assert_same({n: a for n, a in got.items() if n not in ("db1", "db3")},
                    {n: a for n, a in want.items() if n not in ("db1", "db3")}, f"{kind} mlp")


@pytest.mark.parametrize("kind", FAST_MLPS)
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_caches_are_interchangeable_with_the_reference(kind, bias):
    """A fast forward's cache fed to the reference's backward (and the other way round) gives the reference's result."""
    rng = np.random.default_rng(7)
    p = make_mlp_params(rng, kind, 5, 11, bias)
    x, dy = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    ref_f, ref_b = ref_mlp.MLP_KINDS[kind]
    fast_f, fast_b = fast_mlp.MLP_KINDS[kind]
    dx_ref, g_ref = ref_b(dy, ref_f(p, x)[1])
    for fwd, bwd in ((fast_f, ref_b), (ref_f, fast_b)):
        dx, g = bwd(dy, fwd(p, x)[1])
        assert_close({"dx": dx, **g}, {"dx": dx_ref, **g_ref}, AGREE, f"{kind}: {fwd.__module__} -> {bwd.__module__}")


@pytest.mark.parametrize("kind", FAST_MLPS)
def test_mlp_float32_agrees_with_the_reference(kind):
    rng = np.random.default_rng(3)
    p = make_mlp_params(rng, kind, 16, 40, bias=True, dtype=np.float32)
    x = (2 * rng.standard_normal((37, 16))).astype(np.float32)  # (N, C), N not a multiple of the chunk
    dy = rng.standard_normal((37, 16)).astype(np.float32)
    ref = run_layer(*ref_mlp.MLP_KINDS[kind], p, x, dy)
    with pool_settings(chunk_elements=100):  # 2 rows per chunk
        fast = run_layer(*fast_mlp.MLP_KINDS[kind], p, x, dy)
    got = {"y": fast[0], "dx": fast[2], **fast[3]}
    want = {"y": ref[0], "dx": ref[2], **ref[3]}
    sums = {"b1", "b3"}
    if kind == "gelu":
        assert_close({n: a for n, a in got.items() if n not in sums}, {n: a for n, a in want.items() if n not in sums},
                     F32_ELEMENTWISE, "gelu float32")
    else:
        assert_same({n: a for n, a in got.items() if n not in sums}, {n: a for n, a in want.items() if n not in sums},
                    f"{kind} float32")
    assert_close({n: got[n] for n in sums & set(got)}, {n: want[n] for n in sums & set(want)}, F32_SUMS, kind)
    assert all(a.dtype == np.float32 for a in got.values())


@pytest.mark.parametrize("kind", ["gelu", "gelu_erf", "swiglu"])
@pytest.mark.parametrize("bias", [False, True])
@settings(max_examples=10, deadline=None)
@given(lead=lead_shapes, C=st.integers(1, 5), F=st.integers(1, 7), seed=st.integers(0, 2**32 - 1))
def test_fast_mlp_gradient(grad_check, kind, bias, lead, C, F, seed):
    rng = np.random.default_rng(seed)
    p = make_mlp_params(rng, kind, C, F, bias)
    x = rng.standard_normal((*lead, C))  # (..., C), std 1 keeps the hidden units out of GELU's flat tail
    fwd, bwd = fast_mlp.MLP_KINDS[kind]
    errors = grad_check.layer(f"fast {kind} mlp (bias={bias})", fwd, bwd, p, x, seed=seed)
    assert set(errors) == set(p) | {"x"}


DROPOUT_MLPS = ("gelu", "relu", "gelu_erf")  # the act() MLPs: dropout on their hidden activations


@FAST
@given(kind=st.sampled_from(DROPOUT_MLPS), bias=st.booleans(), lead=lead_shapes, C=st.integers(1, 6),
       F=st.integers(1, 20), rate=st.sampled_from([0.1, 0.5, 0.9]), row_offset=st.integers(0, 9),
       col_offset=st.integers(0, 17), chunk=st.integers(1, 60), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**32 - 1))
def test_mlp_hidden_dropout_matches_the_reference(backend, kind, bias, lead, C, F, rate, row_offset, col_offset, chunk,
                                                  threads, seed):
    """The same mask bit for bit (F not a multiple of Philox's 8 lanes,
    column offsets inside a group of 8), outputs, caches and gradients as the reference's; the caches interchange."""
    rng = np.random.default_rng(seed)
    p = {n: backend.asarray(v) for n, v in make_mlp_params(rng, kind, C, F, bias).items()}
    x = backend.asarray(rng.standard_normal((*lead, C)))  # (..., C)
    dy = backend.asarray(rng.standard_normal((*lead, C)))  # (..., C)
    drop = dict(dropout_rate=rate, dropout_key=dropout_key(seed % 1000, 3, 0, 1, "mlp_hidden"),
                row_offset=row_offset, col_offset=col_offset)
    y, cache = ref_mlp.mlp_forward(kind, p, x, **drop)
    dx, grads = ref_mlp.mlp_backward(kind, dy, cache)
    with pool_settings(chunk_elements=chunk, threads=threads):
        y_fast, cache_fast = fast_mlp.mlp_forward(kind, p, x, **drop)
        dx_fast, grads_fast = fast_mlp.mlp_backward(kind, dy, cache_fast)
        dx_mixed, grads_mixed = fast_mlp.mlp_backward(kind, dy, cache)  # the reference's cache, the fast backward
    assert len(cache_fast) == 5 and cache_fast[4][1] == cache[4][1]  # (p, x, saved, a, (mask, scale))
    assert_same({"mask": cache_fast[4][0]}, {"mask": cache[4][0]}, f"{kind} dropout mask")
    want = {"y": y, "dx": dx, **flat_cache(cache), **{f"d{n}": g for n, g in grads.items()}}
    got = {"y": y_fast, "dx": dx_fast, **flat_cache(cache_fast), **{f"d{n}": g for n, g in grads_fast.items()}}
    assert_close(got, want, AGREE, f"{kind} mlp with dropout")
    assert_close({"dx": dx_mixed, **grads_mixed}, {"dx": dx, **grads}, AGREE, f"{kind}: reference cache -> fast")
    assert_close({"dx": ref_mlp.mlp_backward(kind, dy, cache_fast)[0]}, {"dx": dx}, AGREE, f"{kind}: fast -> ref")
    if kind != "gelu":  # the reference's operations in its order: the same bits (bias sums aside)
        assert_same({n: a for n, a in got.items() if n != "db1"}, {n: a for n, a in want.items() if n != "db1"},
                    f"{kind} mlp with dropout")


def test_mlp_hidden_dropout_rate_zero_and_errors():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4))
    key = dropout_key(1, 2, 0, 0, "mlp_hidden")
    for kind in DROPOUT_MLPS:
        p = make_mlp_params(rng, kind, 4, 6, True)
        y, cache = fast_mlp.mlp_forward(kind, p, x)
        y0, cache0 = fast_mlp.mlp_forward(kind, p, x, dropout_rate=0.0, dropout_key=key, row_offset=5)
        assert len(cache0) == len(cache) == 4 and np.array_equal(y0, y)  # rate 0: no mask drawn, the same bits
        with pytest.raises(ValueError, match="needs a dropout_key"):
            fast_mlp.mlp_forward(kind, p, x, dropout_rate=0.2)
        with pytest.raises(ValueError, match="rate"):
            fast_mlp.mlp_forward(kind, p, x, dropout_rate=1.0, dropout_key=key)
    with pytest.raises(ValueError, match="not 'swiglu'"):
        fast_mlp.mlp_forward("swiglu", make_mlp_params(rng, "swiglu", 4, 6, True), x, dropout_rate=0.2,
                             dropout_key=key)


@pytest.mark.parametrize("kind", ["gelu", "relu"])
def test_fast_mlp_gradient_under_a_fixed_dropout_mask(grad_check, kind):
    rng = np.random.default_rng(5)
    p = make_mlp_params(rng, kind, 4, 9, True)
    x = rng.standard_normal((3, 5, 4))  # (B, T, C)
    drop = dict(dropout_rate=0.4, dropout_key=dropout_key(7, 1, 0, 2, "mlp_hidden"), row_offset=2, col_offset=9)

    def forward(p, x):
        return fast_mlp.mlp_forward(kind, p, x, **drop)

    errors = grad_check.layer(f"fast {kind} mlp with hidden dropout", forward,
                              lambda dy, cache: fast_mlp.mlp_backward(kind, dy, cache), p, x, seed=5)
    assert set(errors) == set(p) | {"x"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_far_in_its_tails_matches_the_reference_without_warnings(dtype):
    """The fast GELU computes tanh(u) from exp(-2u), which overflows to inf for u << 0: s = 0 and t = -1 there exactly,
    and no warning (warnings are process-wide, so a worker thread's RuntimeWarning would be an error here)."""
    h_values = np.array([-1e4, -500.0, -60.0, -12.0, -9.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 12.0, 60.0, 1e4])
    p = {"w1": np.eye(len(h_values), dtype=dtype), "w2": np.eye(len(h_values), dtype=dtype)}
    x = np.stack([h_values, -h_values]).astype(dtype)  # (2, F): the hidden units are x itself
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, (_, _, (_, t), a) = fast_mlp.gelu_forward(p, x)
    y0, (_, _, (_, t0), a0) = ref_mlp.gelu_forward(p, x)
    assert np.isfinite(y).all() and np.isfinite(t).all()
    np.testing.assert_array_equal(t[x < -60], -1.0)
    np.testing.assert_array_equal(a[x < -60], 0.0)  # gelu(h) ~ h exp(-2|u|) underflows to 0 (as -0.0)
    tol = AGREE if dtype == np.float64 else F32_ELEMENTWISE
    assert_close({"y": y, "t": t, "a": a}, {"y": y0, "t": t0, "a": a0}, tol, "gelu tails")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_erf_in_every_region_of_cody_has_the_reference_bits_without_warnings(dtype):
    """Hidden units in each of Cody's three regions of erfc(-h / sqrt 2) (|h| / sqrt 2 <= 0.46875, <= 4, > 4, and past
    26.543 where erfc underflows), mixed within one chunk, alone in a chunk, and a few among many: the fast exact GELU
    runs a region's formula over whole chunks and keeps the region's values, or gathers a small region's elements;
    forward and backward must have the reference's bits, and the formulas' overflows outside their regions must not
    warn (a worker thread's warning would be an error here)."""
    h_values = np.array([-1e4, -40.0, -37.5, -10.0, -5.7, -5.6, -3.0, -0.66, -0.6, -1e-3, 0.0, 1e-3, 0.6, 0.67, 3.0,
                         5.6, 5.7, 10.0, 40.0, 1e4])
    F = len(h_values)
    p = {"w1": np.eye(F, dtype=dtype), "w2": np.eye(F, dtype=dtype)}
    few = np.full(F, 0.01)
    few[[3, 11]] = [3.0, -10.0]  # one element in the middle region, one in the large: gathered, not run densely
    x = np.stack([h_values, -h_values, np.zeros(F), 0.5 * np.ones(F), few]).astype(dtype)  # (5, F): h = x
    dy = np.ones_like(x)
    with pool_settings(chunk_elements=F), warnings.catch_warnings():  # one row per chunk: rows 2 and 3 one region
        warnings.simplefilter("error")
        y, cache = fast_mlp.gelu_erf_forward(p, x)
        dx, _ = fast_mlp.gelu_erf_backward(dy, cache)
    y0, cache0 = ref_mlp.gelu_erf_forward(p, x)
    dx0, _ = ref_mlp.gelu_erf_backward(dy, cache0)
    for got, want in ((y, y0), (dx, dx0), (cache[2][1], cache0[2][1]), (cache[3], cache0[3])):
        np.testing.assert_array_equal(got, want)
    z = np.array([np.inf, -np.inf, np.nan, 30.0, -30.0, 4.5, 0.1], dtype=dtype)  # erfc's own edge cases
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fast_mlp._erfc_into(np, z, np.empty_like(z))
    np.testing.assert_array_equal(got, ref_mlp.erfc(z))  # erfc(inf) = 0, erfc(-inf) = 2, NaN stays NaN


def test_mlp_dispatch_and_unknown_kind():
    rng = np.random.default_rng(0)
    p = make_mlp_params(rng, "gelu", 3, 4, True)
    x = rng.standard_normal((2, 3))
    y, _ = fast_mlp.mlp_forward("gelu_erf", p, x)
    np.testing.assert_array_equal(y, ref_mlp.gelu_erf_forward(p, x)[0])
    assert set(fast_mlp.MLP_KINDS) == set(ref_mlp.MLP_KINDS)
    with pytest.raises(ValueError, match="mlp='geglu' is not allowed"):
        fast_mlp.mlp_forward("geglu", p, x)


# ----------------------------------------------------------------------------------------------------------
# norms


NORMS = ("rmsnorm", "layernorm")


def make_norm_params(rng, kind, C, dtype=np.float64):
    p = {"w": rng.standard_normal(C).astype(dtype)}
    if kind == "layernorm":
        p["b"] = rng.standard_normal(C).astype(dtype)
    return p


def norm_pair(module, kind, eps):
    fwd, bwd = getattr(module, f"{kind}_forward"), getattr(module, f"{kind}_backward")
    return (lambda p, x: fwd(p, x, eps)), bwd


@FAST
@given(kind=st.sampled_from(NORMS), lead=lead_shapes, C=st.integers(1, 9), eps=st.floats(1e-6, 1.0),
       scale=st.sampled_from([0.01, 1.0, 10.0]), dtype=st.sampled_from([np.float64, np.float32]),
       chunk=st.integers(1, 40), threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_norm_matches_the_reference(backend, kind, lead, C, eps, scale, dtype, chunk, threads, seed):
    rng = np.random.default_rng(seed)
    p = {n: backend.asarray(v) for n, v in make_norm_params(rng, kind, C, dtype).items()}
    x = backend.asarray((scale * rng.standard_normal((*lead, C)) + rng.standard_normal()).astype(dtype))
    dy = backend.asarray(rng.standard_normal((*lead, C)).astype(dtype))
    y0, c0, dx0, g0 = run_layer(*norm_pair(ref_norm, kind, eps), p, x, dy)
    with pool_settings(chunk_elements=chunk, threads=threads):
        y, c, dx, g = run_layer(*norm_pair(fast_norm, kind, eps), p, x, dy)
    # y, the cache (xhat, rstd, w) and dx: the reference's operations on each row, the same bits
    assert_same({"y": y, "xhat": c[0], "rstd": c[1], "dx": dx}, {"y": y0, "xhat": c0[0], "rstd": c0[1], "dx": dx0},
                kind)
    assert c[2] is p["w"]
    assert_close(g, g0, AGREE if dtype == np.float64 else F32_SUMS, kind)  # per-chunk partial sums


@pytest.mark.parametrize("kind", NORMS)
@settings(max_examples=15, deadline=None)
@given(lead=lead_shapes, C=st.integers(3, 8), eps=st.floats(1e-6, 1.0), scale=st.sampled_from([0.01, 1.0, 10.0]),
       seed=st.integers(0, 2**32 - 1))
def test_fast_norm_gradient(grad_check, kind, lead, C, eps, scale, seed):
    rng = np.random.default_rng(seed)
    p = make_norm_params(rng, kind, C)
    x = scale * rng.standard_normal((*lead, C)) + rng.standard_normal()  # (..., C), off-centre
    # a norm bends on the length scale of its row (tests/test_norm.py): the step is 3e-4 of the smallest row scale
    xc = x - x.mean(axis=-1, keepdims=True) if kind == "layernorm" else x
    h = 3e-4 * min(1.0, float(np.sqrt((xc * xc).mean(axis=-1) + eps).min()))
    errors = grad_check.layer(f"fast {kind}", *norm_pair(fast_norm, kind, eps), p, x, seed=seed, h=h)
    assert set(errors) == set(p) | {"x"}


def test_norm_of_a_non_contiguous_input_and_dispatch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 10))[:, ::2]  # (6, 5) a strided view
    dy = rng.standard_normal((6, 5))
    for kind in NORMS:
        p = make_norm_params(rng, kind, 5)
        y, c = fast_norm.norm_forward(kind, p, x, 1e-5)
        y0, c0 = ref_norm.norm_forward(kind, p, x, 1e-5)
        dx, g = fast_norm.norm_backward(kind, dy, c)
        dx0, g0 = ref_norm.norm_backward(kind, dy, c0)
        assert_same({"y": y, "dx": dx}, {"y": y0, "dx": dx0}, kind)
        assert_close(g, g0, AGREE, kind)


# ----------------------------------------------------------------------------------------------------------
# the vocabulary-parallel cross-entropy


def draw_loss_case(rng, lead, V, p_ignore, scale, dtype):
    logits = (scale * rng.standard_normal((*lead, V))).astype(dtype)  # (..., V)
    targets = rng.integers(0, V, size=lead)  # (...)
    targets[rng.random(lead) < p_ignore] = IGNORE_INDEX
    return logits, targets


@FAST
@given(lead=lead_shapes, V=st.sampled_from([1, 2, 3, 7, 64, 257]), p_ignore=st.sampled_from([0.0, 0.3, 1.0]),
       scale=st.sampled_from([0.1, 2.0, 30.0]), dtype=st.sampled_from([np.float64, np.float32]),
       in_place=st.booleans(), dloss=st.sampled_from([1.0, 0.25, -3.0]), chunk=st.integers(1, 600),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**32 - 1))
def test_loss_on_one_rank_is_the_reference_bit_for_bit(backend, lead, V, p_ignore, scale, dtype, in_place, dloss,
                                                        chunk, threads, seed):
    rng = np.random.default_rng(seed)
    logits, targets = draw_loss_case(rng, lead, V, p_ignore, scale, dtype)
    z, tgt = backend.asarray(logits), backend.asarray(targets)
    loss0, cache0 = vocab_parallel_cross_entropy_forward(z, tgt, LocalComm())
    dz0, g0 = vocab_parallel_cross_entropy_backward(dloss, cache0)
    given_z = z.copy()
    with pool_settings(chunk_elements=chunk, threads=threads):
        loss, cache = fast_loss.vocab_parallel_cross_entropy_forward(given_z, tgt, LocalComm(), in_place=in_place)
        dz, g = fast_loss.vocab_parallel_cross_entropy_backward(dloss, cache)
    assert loss == loss0 and g == g0 == {}
    assert_same({"dz": dz}, {"dz": dz0}, "dlogits")
    if in_place:
        assert np.shares_memory(asnumpy(dz), asnumpy(given_z)) or backend is not np
    else:
        assert np.array_equal(asnumpy(given_z), logits)  # the caller's logits untouched
    if p_ignore == 1.0:
        assert loss == 0.0 and not asnumpy(dz).any()


@FAST
@given(tp=st.sampled_from([2, 3]), lead=lead_shapes, V_tp=st.sampled_from([1, 2, 5, 40]),
       p_ignore=st.sampled_from([0.0, 0.3, 1.0]), scale=st.sampled_from([0.1, 2.0, 30.0]), in_place=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_loss_over_several_ranks_is_the_full_vocabulary_loss(tp, lead, V_tp, p_ignore, scale, in_place, seed):
    rng = np.random.default_rng(seed)
    logits, targets = draw_loss_case(rng, lead, V_tp * tp, p_ignore, scale, np.float64)
    if scale == 30.0:  # one rank's slice far below another's: its exp(m - M) underflows to 0 on some rows
        logits[..., :V_tp] -= 800.0
    loss0, cache0 = vocab_parallel_cross_entropy_forward(logits, targets, LocalComm())
    dz0, _ = vocab_parallel_cross_entropy_backward(0.5, cache0)

    def run(r, comm):
        z_r = np.ascontiguousarray(logits[..., r * V_tp:(r + 1) * V_tp])  # (..., V_tp)
        loss, cache = fast_loss.vocab_parallel_cross_entropy_forward(z_r, targets, comm, in_place=in_place)
        return loss, fast_loss.vocab_parallel_cross_entropy_backward(0.5, cache)[0]

    results = on_thread_ranks(tp, run)
    losses = [loss for loss, _ in results]
    assert len(set(losses)) == 1  # the same loss on every rank
    assert abs(losses[0] - loss0) <= AGREE * max(abs(loss0), 1.0)
    assert_close({"dz": np.concatenate([dz for _, dz in results], axis=-1)}, {"dz": dz0}, AGREE, f"tp={tp} dlogits")


@settings(max_examples=20, deadline=None)
@given(lead=lead_shapes, V=st.integers(2, 9), p_ignore=st.sampled_from([0.0, 0.3, 0.7]),
       scale=st.sampled_from([0.1, 1.0, 2.0]), in_place=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fast_loss_gradient(grad_check, lead, V, p_ignore, scale, in_place, seed):
    # logits of std <= 2: see tests/test_loss.py on the conditioning of confident rows
    rng = np.random.default_rng(seed)
    logits, targets = draw_loss_case(rng, lead, V, p_ignore, scale, np.float64)

    def loss():  # in place overwrites its input: each evaluation gets a copy
        z = logits.copy() if in_place else logits
        return fast_loss.cross_entropy_forward(z, targets, in_place=in_place)[0]

    _, cache = fast_loss.cross_entropy_forward(logits.copy() if in_place else logits, targets, in_place=in_place)
    dz, grads = fast_loss.cross_entropy_backward(1.0, cache)
    assert grads == {}
    grad_check.function(f"fast cross-entropy (in_place={in_place})", loss, {"logits": logits}, {"logits": dz})


def test_loss_keeps_no_second_logits_sized_array():
    """tracemalloc (NumPy reports its allocations to it): the forward allocates no (N, V) array, the backward only
    the gradient it returns (in place: none). The reference's forward, measured the same way, allocates 3."""
    rng = np.random.default_rng(0)
    N, V = 256, 4096
    logits, targets = draw_loss_case(rng, (N,), V, 0.1, 2.0, np.float32)
    nv = logits.nbytes  # 4 MiB

    def peaks(fwd, bwd, z, **kw):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            _, cache = fwd(z, targets, LocalComm(), **kw)
            forward_peak = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.reset_peak()
            bwd(1.0, cache)  # dlogits is freed again, after the peak was taken
            backward_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        return forward_peak / nv, backward_peak / nv

    with pool_settings(chunk_elements=1 << 15, threads=2):  # the defaults: 8 rows of 4096 per chunk
        ref_fwd, _ = peaks(vocab_parallel_cross_entropy_forward, vocab_parallel_cross_entropy_backward, logits)
        fwd, bwd = peaks(fast_loss.vocab_parallel_cross_entropy_forward,
                         fast_loss.vocab_parallel_cross_entropy_backward, logits)
        fwd_ip, bwd_ip = peaks(fast_loss.vocab_parallel_cross_entropy_forward,
                               fast_loss.vocab_parallel_cross_entropy_backward, logits.copy(), in_place=True)
    assert ref_fwd >= 2.9  # the measurement sees (N, V) arrays: z - max, exp and the probabilities
    assert fwd < 0.3 and fwd_ip < 0.3  # a chunk per thread, and (N,) vectors
    assert 1.0 <= bwd < 1.3  # dlogits itself, the one (N, V) array the backward must return
    assert bwd_ip < 0.3  # dlogits written over the forward's exp(z - m)


def test_loss_errors():
    logits = np.zeros((2, 3, 5))
    with pytest.raises(ValueError, match="do not match logits"):
        fast_loss.vocab_parallel_cross_entropy_forward(logits, np.zeros((2, 4), dtype=int), LocalComm())
    _, cache = fast_loss.cross_entropy_forward(logits.copy(), np.zeros((2, 3), dtype=int), in_place=True)
    fast_loss.cross_entropy_backward(1.0, cache)
    with pytest.raises(ValueError, match="in-place cross-entropy cache was used"):
        fast_loss.cross_entropy_backward(1.0, cache)
    _, cache = fast_loss.cross_entropy_forward(logits, np.zeros((2, 3), dtype=int))  # not in place: any number of times
    first = fast_loss.cross_entropy_backward(1.0, cache)[0]
    np.testing.assert_array_equal(first, fast_loss.cross_entropy_backward(1.0, cache)[0])


def test_loss_with_logits_near_1e4_stays_finite():
    rng = np.random.default_rng(2)
    for sign in (-1.0, 1.0):
        logits = sign * 1e4 + rng.standard_normal((5, 7))  # (N, V): exp(1e4) overflows float64
        targets = rng.integers(0, 7, size=5)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            loss, cache = fast_loss.cross_entropy_forward(logits, targets)
            dz, _ = fast_loss.cross_entropy_backward(1.0, cache)
        ref_loss, ref_cache = vocab_parallel_cross_entropy_forward(logits, targets, LocalComm())
        assert loss == ref_loss and np.array_equal(dz, vocab_parallel_cross_entropy_backward(1.0, ref_cache)[0])


# ----------------------------------------------------------------------------------------------------------
# AdamW


OPT_SHAPES = {"tok_emb": (7, 5), "layers.0.attn.wq": (5, 3), "layers.0.attn_norm.w": (5,), "cube": (2, 3, 4),
              "lm_head": (5, 7), "one": (1,)}


@FAST
@given(dtype=st.sampled_from([np.float64, np.float32, np.float16]), steps=st.integers(1, 4),
       weight_decay=st.sampled_from([0.0, 0.1]), lr=st.sampled_from([1e-3, 0.3]), chunk=st.integers(1, 50),
       threads=st.sampled_from([1, 2]), strided=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_adamw_is_the_reference_bit_for_bit(dtype, steps, weight_decay, lr, chunk, threads, strided, seed):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s).astype(dtype) for n, s in OPT_SHAPES.items()}
    if strided:  # a tensor that is a strided view: updated whole, not chunked
        params["cube"] = rng.standard_normal((2, 3, 8)).astype(dtype)[:, :, ::2]
    ref_params = {n: p.copy() for n, p in params.items()}
    state, ref_state = ref_optim.adamw_init(params), ref_optim.adamw_init(ref_params)
    kw = {"lr": lr, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": weight_decay}
    with pool_settings(chunk_elements=chunk, threads=threads):
        for _ in range(steps):
            grads = {n: rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
            ref_optim.adamw_update(ref_params, grads, ref_state, **kw)
            fast_optim.adamw_update(params, grads, state, **kw)
    assert state["step"] == ref_state["step"] == steps
    assert_same(params, ref_params, "params")
    assert_same(state["m"], ref_state["m"], "m")
    assert_same(state["v"], ref_state["v"], "v")
    if strided:
        assert not params["cube"].flags.c_contiguous  # updated in place, the view is still the caller's


@FAST
@given(sizes=st.lists(st.integers(1, 40), min_size=0, max_size=12), size=st.integers(1, 30))
def test_adamw_packs_pieces_in_order_up_to_the_chunk(sizes, size):
    """The fast AdamW's packs: every piece once, in parameter order, and no pack over ``size`` elements unless it is
    one piece alone (the pieces come cut to at most the chunk size, so that never happens in adamw_update)."""
    pieces = [(None, np.zeros(n)) for n in sizes]
    packs = fast_optim._packs(pieces, size)
    assert [piece for pack in packs for piece in pack] == pieces
    assert all(pack for pack in packs)
    for pack in packs:
        total = sum(piece[1].size for piece in pack)
        assert total <= size or len(pack) == 1
    for a, b in zip(packs, packs[1:]):  # greedy: the next pack's first piece did not fit into this one
        assert sum(piece[1].size for piece in a) + b[0][1].size > size


def test_adamw_updates_in_place():
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s) for n, s in OPT_SHAPES.items()}
    ids = {n: id(p) for n, p in params.items()}
    before = {n: p.copy() for n, p in params.items()}
    state = ref_optim.adamw_init(params)
    fast_optim.adamw_update(params, {n: np.ones_like(p) for n, p in params.items()}, state, lr=1e-2)
    assert {n: id(p) for n, p in params.items()} == ids
    assert all(not np.array_equal(params[n], before[n]) for n in params)


# ----------------------------------------------------------------------------------------------------------
# no global state: BLAS results and settings are the same after the fast paths ran on two threads


def _openblas_thread_count():
    """openblas_get_num_threads() of the OpenBLAS NumPy loaded, or None where there is none."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for path in paths:
        getter = getattr(ctypes.CDLL(path), "openblas_get_num_threads", None)
        if getter is not None:
            getter.restype = ctypes.c_int
            return getter()
    return None


def _blas_products(rng_seed=11):
    rng = np.random.default_rng(rng_seed)
    out = {}
    for dtype in (np.float32, np.float64):
        a = rng.standard_normal((300, 260)).astype(dtype)
        b = rng.standard_normal((260, 310)).astype(dtype)
        v = rng.standard_normal(260).astype(dtype)
        out[f"gemm {dtype.__name__}"] = a @ b  # large enough for OpenBLAS to use its threads
        out[f"skinny {dtype.__name__}"] = a[:, :64].T @ a[:, 64:128]  # (64, 64) with a long inner sum
        out[f"gemv {dtype.__name__}"] = a @ v
        out[f"dot {dtype.__name__}"] = np.asarray(v @ v)
    return out


def test_fast_paths_leave_blas_results_and_settings_unchanged():
    before = _blas_products()
    threads_before = _openblas_thread_count()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 16)).astype(np.float32)
    dy = rng.standard_normal((64, 16)).astype(np.float32)
    with pool_settings(chunk_elements=64, threads=2):
        for kind in FAST_MLPS:
            p = make_mlp_params(rng, kind, 16, 48, True, np.float32)
            run_layer(*fast_mlp.MLP_KINDS[kind], p, x, dy)
        for kind in NORMS:
            run_layer(*norm_pair(fast_norm, kind, 1e-5), make_norm_params(rng, kind, 16, np.float32), x, dy)
        logits, targets = draw_loss_case(rng, (64,), 300, 0.1, 2.0, np.float32)
        for in_place in (False, True):
            _, cache = fast_loss.cross_entropy_forward(logits.copy(), targets, in_place=in_place)
            fast_loss.cross_entropy_backward(1.0, cache)
        params = {n: rng.standard_normal(s).astype(np.float32) for n, s in OPT_SHAPES.items()}
        fast_optim.adamw_update(params, {n: np.ones_like(p) for n, p in params.items()},
                                ref_optim.adamw_init(params), lr=1e-3)
    assert _openblas_thread_count() == threads_before
    assert_same(_blas_products(), before, "BLAS results after the fast paths")
    in_a_thread = {}
    t = threading.Thread(target=lambda: in_a_thread.update(_blas_products()))
    t.start()
    t.join()
    assert_same(in_a_thread, before, "BLAS results in another thread")
