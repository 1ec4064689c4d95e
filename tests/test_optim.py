"""Tests for npllm/optim.py: AdamW, global-norm clipping, the warmup + cosine schedule.

The reference below is the algorithm of docs/derivations/adamw.md transcribed plainly: Python floats, one element
at a time, no in-place tricks, no shared helpers with npllm. In float64 the two differ only by the order of
rounding (e.g. (1-b2)*g*g versus g*g*(1-b2), the order of the sum of squares), i.e. a few ulps per operation;
over <= 8 steps on O(1) values that stays far below 1e-12, so 1e-12 is the tolerance.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm import optim
from npllm.backend import cupy_available
from npllm.optim import (
    adamw_init,
    adamw_update,
    clip_grad_norm,
    decays,
    global_grad_norm,
    grad_sq_sum,
    lr_at,
    moment_dtype,
)

# names mirror the model's; 1-D ones must not decay, >= 2-D ones must
SHAPES = {
    "tok_emb": (5, 4),
    "layers.0.attn.wq": (4, 3),
    "layers.0.attn_norm.w": (4,),
    "layers.0.attn.bq": (3,),
    "cube": (2, 3, 2),
    "lm_head": (4, 5),
}


# ----------------------------------------------------------------------------------------------------------
# the plain reference


def reference_lr(s, lr, W, S, min_lr):
    if s < W:
        return lr * (s + 1) / W
    if s >= S:
        return min_lr
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - W) / (S - W)))


def reference_training(params0, grad_steps, *, lr, W, S, min_lr, b1, b2, eps, wd, max_norm):
    """Run len(grad_steps) AdamW steps with clipping and the schedule; return {name: flat list of floats}."""
    p = {n: [float(x) for x in a.ravel()] for n, a in params0.items()}
    m = {n: [0.0] * len(p[n]) for n in p}
    v = {n: [0.0] * len(p[n]) for n in p}
    for s, grads in enumerate(grad_steps):
        g = {n: [float(x) for x in a.ravel()] for n, a in grads.items()}
        norm = math.sqrt(sum(x * x for n in g for x in g[n]))
        if max_norm > 0 and norm > max_norm:
            g = {n: [x * max_norm / norm for x in g[n]] for n in g}
        lr_s = reference_lr(s, lr, W, S, min_lr)
        t = s + 1
        for n in p:
            two_d = params0[n].ndim >= 2
            for i in range(len(p[n])):
                m[n][i] = b1 * m[n][i] + (1 - b1) * g[n][i]
                v[n][i] = b2 * v[n][i] + (1 - b2) * g[n][i] ** 2
                m_hat = m[n][i] / (1 - b1**t)
                v_hat = v[n][i] / (1 - b2**t)
                decay = lr_s * wd * p[n][i] if two_d else 0.0
                p[n][i] = p[n][i] - lr_s * m_hat / (math.sqrt(v_hat) + eps) - decay
    return p


def random_params_and_grads(seed, n_steps, grad_scale, dtype):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(shape).astype(dtype) for n, shape in SHAPES.items()}
    grads = [{n: (grad_scale * rng.standard_normal(shape)).astype(dtype) for n, shape in SHAPES.items()}
             for _ in range(n_steps)]
    return params, grads


def run_npllm(params, grad_steps, *, lr, W, S, min_lr, b1, b2, eps, wd, max_norm):
    state = adamw_init(params)
    for s, grads in enumerate(grad_steps):
        grads = {n: g.copy() for n, g in grads.items()}
        clip_grad_norm(grads, max_norm)
        adamw_update(params, grads, state, lr=lr_at(s, lr=lr, warmup_steps=W, total_steps=S, min_lr=min_lr),
                     beta1=b1, beta2=b2, eps=eps, weight_decay=wd)
    return state


# ----------------------------------------------------------------------------------------------------------
# AdamW against the reference


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_steps=st.integers(1, 8),
    grad_scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    lr=st.floats(1e-4, 0.1),
    W=st.integers(0, 4),
    decay_len=st.integers(0, 6),
    min_lr_frac=st.floats(0.0, 1.0),
    b1=st.floats(0.0, 0.99),
    b2=st.floats(0.5, 0.999),
    eps=st.sampled_from([1e-10, 1e-8, 1e-6]),
    wd=st.floats(0.0, 0.5),
    max_norm=st.sampled_from([0.0, 0.5, 2.0, 100.0]),
)
def test_adamw_float64_matches_plain_reference(seed, n_steps, grad_scale, lr, W, decay_len, min_lr_frac,
                                               b1, b2, eps, wd, max_norm):
    hp = dict(lr=lr, W=W, S=W + decay_len, min_lr=lr * min_lr_frac, b1=b1, b2=b2, eps=eps, wd=wd,
              max_norm=max_norm)
    params, grad_steps = random_params_and_grads(seed, n_steps, grad_scale, np.float64)
    expected = reference_training(params, grad_steps, **hp)
    state = run_npllm(params, grad_steps, **hp)
    assert state["step"] == n_steps
    for n, p in params.items():
        assert p.dtype == np.float64 and state["m"][n].dtype == np.float64 and state["v"][n].dtype == np.float64
        np.testing.assert_allclose(p.ravel(), expected[n], rtol=1e-12, atol=1e-12, err_msg=n)


def test_adamw_float32_matches_reference_to_float32_rounding():
    hp = dict(lr=3e-2, W=2, S=6, min_lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, max_norm=1.0)
    params, grad_steps = random_params_and_grads(7, 6, 1.0, np.float32)
    expected = reference_training(params, grad_steps, **hp)      # float64 math on the float32 start values
    state = run_npllm(params, grad_steps, **hp)
    for n, p in params.items():
        assert p.dtype == np.float32 and state["m"][n].dtype == np.float32
        # each step moves p by about lr = 3e-2 with float32 relative error ~1e-7: error << 1e-5
        np.testing.assert_allclose(p.ravel(), expected[n], rtol=1e-5, atol=1e-5, err_msg=n)


def test_decay_rule_by_dimension():
    assert decays("tok_emb", (5, 4)) and decays("lm_head", (4, 5)) and decays("layers.0.mlp.w2", (8, 4))
    assert decays("pos_emb", (16, 4)) and decays("cube", (2, 3, 2))
    assert not decays("norm.w", (4,)) and not decays("layers.0.attn_norm.b", (4,))
    assert not decays("layers.0.attn.bq", (3,))


def test_zero_gradient_only_decays_two_d_weights():
    rng = np.random.default_rng(0)
    params = {n: rng.standard_normal(s) for n, s in SHAPES.items()}
    before = {n: p.copy() for n, p in params.items()}
    grads = {n: np.zeros(s) for n, s in SHAPES.items()}
    adamw_update(params, grads, adamw_init(params), lr=0.1, weight_decay=0.5)
    for n, p in params.items():
        # g = 0 gives m = v = 0 and an Adam step of exactly 0; what is left is p = (1 - lr*wd) p for 2-D weights
        expected = before[n] * (1 - 0.1 * 0.5) if p.ndim >= 2 else before[n]
        np.testing.assert_array_equal(p, expected, err_msg=n)


def test_update_is_in_place_and_counts_steps():
    params, (grads,) = random_params_and_grads(1, 1, 1.0, np.float32)
    arrays = {n: p for n, p in params.items()}
    before = {n: p.copy() for n, p in params.items()}
    state = adamw_init(params)
    moments = {n: (state["m"][n], state["v"][n]) for n in params}
    for step in (1, 2):
        adamw_update(params, grads, state, lr=1e-2)
        assert state["step"] == step
    for n in params:
        assert params[n] is arrays[n] and state["m"][n] is moments[n][0] and state["v"][n] is moments[n][1]
        assert not np.array_equal(params[n], before[n])


def test_first_step_moves_each_weight_by_lr_times_sign_of_grad():
    # with bias correction, step 1 has m_hat = g and v_hat = g^2, so the Adam step is lr * g / (|g| + eps)
    p = np.array([1.0, -2.0, 3.0])
    g = np.array([0.5, -4.0, 1e-3])
    params, grads = {"norm.w": p}, {"norm.w": g}
    adamw_update(params, grads, adamw_init(params), lr=0.01, eps=1e-12)
    np.testing.assert_allclose(params["norm.w"], [1.0 - 0.01, -2.0 + 0.01, 3.0 - 0.01], rtol=1e-9)


@pytest.mark.parametrize("dtype,expected", [(np.float64, np.float64), (np.float32, np.float32),
                                            (np.float16, np.float32)])
def test_moment_dtype_rule(dtype, expected):
    assert moment_dtype(dtype) == expected
    state = adamw_init({"w": np.ones((2, 3), dtype=dtype)})
    assert state["step"] == 0
    assert state["m"]["w"].dtype == expected and state["v"]["w"].dtype == expected
    assert state["m"]["w"].shape == (2, 3) and not state["m"]["w"].any() and not state["v"]["w"].any()


def test_float16_params_take_a_float32_moment_step():
    params = {"w": np.full((2, 2), 1.0, dtype=np.float16)}
    state = adamw_init(params)
    adamw_update(params, {"w": np.full((2, 2), 2.0, dtype=np.float16)}, state, lr=0.25, weight_decay=0.0)
    assert params["w"].dtype == np.float16
    np.testing.assert_allclose(params["w"], 0.75, rtol=1e-3)     # 1 - lr * 2 / (2 + eps)


# ----------------------------------------------------------------------------------------------------------
# norm and clipping


def grads_example(dtype):
    rng = np.random.default_rng(3)
    return {n: rng.standard_normal(s).astype(dtype) for n, s in SHAPES.items()}


@pytest.mark.parametrize("chunk", [optim.SQ_SUM_CHUNK, 1, 7])
def test_global_norm_is_sqrt_of_sum_of_squares(monkeypatch, chunk):
    monkeypatch.setattr(optim, "SQ_SUM_CHUNK", chunk)           # also exercise the chunked float64 loop
    grads = grads_example(np.float32)
    total = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values())
    assert grad_sq_sum(grads) == pytest.approx(total, rel=1e-14)
    assert global_grad_norm(grads) == pytest.approx(math.sqrt(total), rel=1e-14)
    some = ["tok_emb", "cube"]
    assert grad_sq_sum(grads, some) == pytest.approx(sum(float(np.sum(grads[n].astype(np.float64) ** 2))
                                                         for n in some), rel=1e-14)


def test_grad_sq_sum_rejects_unknown_names():
    with pytest.raises(ValueError, match="nope"):
        grad_sq_sum(grads_example(np.float64), ["tok_emb", "nope"])


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
def test_clipping_brings_norm_to_max_norm(dtype, rtol):
    grads = grads_example(dtype)
    before = {n: g.copy() for n, g in grads.items()}
    norm0 = global_grad_norm(grads)
    norm, scale = clip_grad_norm(grads, max_norm=0.5)
    assert norm == pytest.approx(norm0, rel=1e-15) and norm > 0.5
    assert scale == pytest.approx(0.5 / norm0, rel=1e-15)
    assert global_grad_norm(grads) == pytest.approx(0.5, rel=rtol)
    for n, g in grads.items():                                   # same direction: every entry times scale
        np.testing.assert_allclose(g, before[n] * scale, rtol=rtol)


def test_no_clipping_below_max_norm_or_when_disabled():
    grads = grads_example(np.float64)
    before = {n: g.copy() for n, g in grads.items()}
    norm0 = global_grad_norm(grads)
    for max_norm in (norm0 * 2, norm0, 0.0, -1.0):
        assert clip_grad_norm(grads, max_norm) == (norm0, 1.0)
    for n, g in grads.items():
        np.testing.assert_array_equal(g, before[n])


def test_clip_uses_supplied_norm():
    # a parallel layer passes the all-reduced norm; clipping must trust it, not recompute a local one
    grads = grads_example(np.float64)
    local = global_grad_norm(grads)
    norm, scale = clip_grad_norm(grads, max_norm=local, norm=2 * local)
    assert norm == 2 * local and scale == pytest.approx(0.5, rel=1e-15)
    assert global_grad_norm(grads) == pytest.approx(local / 2, rel=1e-12)
    with pytest.raises(ValueError, match="norm="):
        clip_grad_norm(grads, 1.0, norm=-1.0)


def test_non_finite_norm_leaves_grads_alone():
    grads = {"w": np.array([[1.0, np.inf]]), "b": np.array([3.0])}
    norm, scale = clip_grad_norm(grads, max_norm=1.0)
    assert math.isinf(norm) and scale == 1.0
    np.testing.assert_array_equal(grads["b"], [3.0])


# ----------------------------------------------------------------------------------------------------------
# schedule


def test_lr_schedule_boundaries():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr=0.1)
    assert lr_at(0, **kw) == 0.25                                 # lr * 1 / W: never 0
    assert lr_at(1, **kw) == 0.5
    assert lr_at(3, **kw) == 1.0                                  # end of warmup reaches lr
    assert lr_at(4, **kw) == 1.0                                  # cosine starts at lr
    assert lr_at(9, **kw) == pytest.approx(0.55, rel=1e-15)       # half-way: (lr + min_lr) / 2
    assert lr_at(13, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 9 / 10)), rel=1e-15)
    assert lr_at(13, **kw) > 0.1                                  # last decay step is still above min_lr
    assert lr_at(14, **kw) == 0.1 and lr_at(10**6, **kw) == 0.1   # flat at min_lr afterwards
    values = [lr_at(s, **kw) for s in range(20)]
    assert all(a < b for a, b in zip(values[:4], values[1:4]))                 # warmup rises
    assert all(a >= b for a, b in zip(values[4:], values[5:]))                 # then never rises


def test_lr_schedule_without_warmup_or_decay():
    assert lr_at(0, lr=2.0, warmup_steps=0, total_steps=10, min_lr=0.0) == 2.0
    assert lr_at(10, lr=2.0, warmup_steps=0, total_steps=10, min_lr=0.0) == 0.0
    # W == S: warmup, then straight to min_lr
    assert lr_at(2, lr=2.0, warmup_steps=3, total_steps=3, min_lr=0.5) == 2.0
    assert lr_at(3, lr=2.0, warmup_steps=3, total_steps=3, min_lr=0.5) == 0.5
    # constant schedule: min_lr == lr
    assert {lr_at(s, lr=0.3, warmup_steps=0, total_steps=5, min_lr=0.3) for s in range(8)} == {0.3}


# ----------------------------------------------------------------------------------------------------------
# the same code on CuPy


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and an NVIDIA GPU")
def test_adamw_and_clipping_on_cupy_match_numpy():
    import cupy

    hp = dict(lr=3e-2, W=2, S=6, min_lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, wd=0.1, max_norm=1.0)
    params, grad_steps = random_params_and_grads(11, 5, 1.0, np.float64)
    params_gpu = {n: cupy.asarray(p) for n, p in params.items()}
    grads_gpu = [{n: cupy.asarray(g) for n, g in grads.items()} for grads in grad_steps]
    state = run_npllm(params, grad_steps, **hp)
    state_gpu = run_npllm(params_gpu, grads_gpu, **hp)
    for n in params:
        assert isinstance(params_gpu[n], cupy.ndarray) and isinstance(state_gpu["m"][n], cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(params_gpu[n]), params[n], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(cupy.asnumpy(state_gpu["v"][n]), state["v"][n], rtol=1e-12, atol=1e-15)
