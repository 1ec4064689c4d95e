"""npllm.parallel.tensor in one process: the split rule of every parameter, shard shapes and their errors,
shard/unshard, and the algebra that tensor parallelism rests on, checked without MPI: the ranks' partial attention
and MLP outputs sum to the full layer (and their gradients are the shards of the full gradients), the vocabulary
slices of the embedding sum to the full lookup, and with one rank the vocabulary-parallel cross-entropy is the
fused cross-entropy bit for bit. The multi-rank model itself is tested under mpirun in
test_parallel_equivalence.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from npllm.config import PRESETS, ModelConfig, get_preset
from npllm.layers.attention import attention_backward, attention_forward
from npllm.layers.loss import cross_entropy_backward, cross_entropy_forward
from npllm.layers.mlp import mlp_backward, mlp_forward
from npllm.models import init_params, num_params, param_shapes, param_shard_shapes, split_axes, tp_split_sizes
from npllm.models.decoder import model_forward
from npllm.parallel.comm import LocalComm
from npllm.parallel.tensor import (
    check_tp_divides, shard_array, shard_params, unshard_params, vocab_parallel_cross_entropy_backward,
    vocab_parallel_cross_entropy_forward, vocab_parallel_embedding_backward,
    vocab_parallel_embedding_forward,
)

FAST = settings(max_examples=20, deadline=None)


class RankView:
    """Rank ``rank`` of ``size`` whose all-reduce is left to the test (identity here, summed by the test)."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size

    def allreduce(self, x, op="sum"):
        return x


def all_variants():
    """Every preset, plus the bias / norm / MLP combinations the presets do not cover."""
    cfgs = [get_preset(name) for name in PRESETS]
    cfgs += [get_preset("nano", bias=True), get_preset("nano", bias=True, tie_embeddings=True),
             get_preset("nano-gpt2", bias=False, norm="rmsnorm", tie_embeddings=False)]
    return cfgs


# ----------------------------------------------------------------------------------------------------------
# the layout


def test_every_parameter_of_every_variant_has_a_split_axis_within_its_shape():
    for cfg in all_variants():
        shapes, axes = param_shapes(cfg), split_axes(cfg)
        assert list(axes) == list(shapes)
        for name, shape in shapes.items():
            assert axes[name] is None or 0 <= axes[name] < len(shape), (name, axes[name], shape)


def test_split_axes_follow_megatron():
    cfg = get_preset("nano", bias=True, n_layers=1)
    split = {k.replace("layers.0.", ""): v for k, v in split_axes(cfg).items() if v is not None}
    assert split == {"tok_emb": 0, "attn.wq": 1, "attn.wk": 1, "attn.wv": 1, "attn.bq": 0, "attn.bk": 0,
                     "attn.bv": 0, "attn.wo": 0, "mlp.w1": 1, "mlp.w3": 1, "mlp.b1": 0, "mlp.b3": 0, "mlp.w2": 0,
                     "lm_head": 1}
    replicated = {k for k, v in split_axes(cfg).items() if v is None}
    assert {"layers.0.attn.bo", "layers.0.mlp.b2", "norm.w", "layers.0.attn_norm.w"} <= replicated


def test_7b_shards_over_8_ranks():
    cfg = get_preset("7b")
    shards = param_shard_shapes(cfg, 8)
    assert shards["tok_emb"] == (4000, 4096) and shards["lm_head"] == (4096, 4000)
    assert shards["layers.0.attn.wq"] == (4096, 512) and shards["layers.0.attn.wo"] == (512, 4096)
    assert shards["layers.0.mlp.w1"] == (4096, 1376) and shards["layers.0.mlp.w2"] == (1376, 4096)
    assert shards["layers.0.attn_norm.w"] == (4096,)
    axes = split_axes(cfg)
    per_rank_split = sum(math.prod(s) for n, s in shards.items() if axes[n] is not None)
    replicated = sum(math.prod(s) for n, s in shards.items() if axes[n] is None)
    assert 8 * per_rank_split + replicated == num_params(cfg) == 6_738_415_616


@pytest.mark.parametrize("overrides, tp, named", [
    (dict(), 3, ["n_heads=4", "n_kv_heads=2", "ffn_dim=352", "vocab_size=2048"]),
    (dict(), 4, ["n_kv_heads=2"]),
    (dict(vocab_size=2051), 2, ["vocab_size=2051"]),
    (dict(ffn_dim=350, n_kv_heads=4), 4, ["ffn_dim=350"]),
])
def test_tp_that_does_not_divide_is_named(overrides, tp, named):
    cfg = get_preset("nano", **overrides)
    with pytest.raises(ValueError) as info:
        param_shard_shapes(cfg, tp)
    message = str(info.value)
    assert message.startswith(f"tp={tp} does not divide ")
    for item in named:
        assert item in message
    for item in {"n_heads", "n_kv_heads", "ffn_dim", "vocab_size"} - {n.split("=")[0] for n in named}:
        assert f"{item}=" not in message.split(":")[0]
    with pytest.raises(ValueError, match="tp=0 is not allowed; use a positive integer"):
        check_tp_divides(tp_split_sizes(cfg), 0)


@settings(max_examples=10, deadline=None)
@given(tp=st.sampled_from([1, 2, 4]), variant=st.integers(0, 2), seed=st.integers(0, 1000))
def test_shard_then_unshard_is_the_identity(tp, variant, seed):
    small = dict(vocab_size=64, dim=32, n_layers=2, ffn_dim=48)
    cfg = [get_preset("nano", n_kv_heads=4, **small), get_preset("nano-gpt2", **small),
           get_preset("nano", bias=True, tie_embeddings=True, n_kv_heads=4, **small)][variant]
    full = init_params(cfg, seed=seed, dtype=np.float64)
    axes = split_axes(cfg)
    shards = [shard_params(full, axes, r, tp) for r in range(tp)]
    for r, shard in enumerate(shards):
        assert {n: s.shape for n, s in shard.items()} == param_shard_shapes(cfg, tp)
        # init_params of one rank draws the same numbers as slicing the full initialization
        direct = init_params(cfg, seed=seed, dtype=np.float64, tp_rank=r, tp_size=tp)
        assert all(np.array_equal(direct[n], shard[n]) for n in shard)
    back = unshard_params(shards, axes)
    assert list(back) == list(full) and all(np.array_equal(back[n], full[n]) for n in full)
    shards[0]["norm.w"][0] = 5.0  # shards are copies, never views of the full arrays
    assert full["norm.w"][0] == 1.0


def test_full_parameters_with_tp_2_are_refused():
    cfg = get_preset("nano", n_layers=1)
    with pytest.raises(ValueError, match=r"params\['tok_emb'\] has shape \(2048, 128\); with tp=2 this rank's shard "
                                         r"has shape \(1024, 128\)"):
        model_forward(init_params(cfg), np.zeros((1, 2), dtype=int), cfg, tp=RankView(0, 2))
    with pytest.raises(ValueError, match=r"tp_rank=2 is not allowed; use an integer in \[0, tp_size=2\)"):
        shard_params(init_params(cfg), split_axes(cfg), 2, 2)


# ----------------------------------------------------------------------------------------------------------
# the algebra: the ranks' parts add up to the full layer


@st.composite
def head_layout(draw):
    """(NH, NKV, tp) with tp dividing NKV, hs even, bias on or off."""
    tp = draw(st.sampled_from([1, 2, 4]))
    n_kv = tp * draw(st.integers(1, 2))
    n_heads = n_kv * draw(st.integers(1, 3))
    hs = 2 * draw(st.integers(1, 2))
    return n_heads, n_kv, hs, tp, draw(st.booleans()), draw(st.integers(0, 10_000))


def sum_atol(a):
    """The absolute allowance for ``a`` computed as float64 sums of the same terms in another order (the ranks' sum,
    a shard's products): the rounding, ~1e-16 of the terms, is relative to the largest terms (hundreds in these
    layers), not to each element, some of which cancel to near 1; 1e-12 of the array's largest magnitude, and at
    least 1e-12 (a key bias's gradient is 0 in exact arithmetic, as softmax ignores a shift of a row's scores, and
    comes out as ~1e-13 of rounding)."""
    return 1e-12 * max(1.0, float(np.abs(a).max()))


@FAST
@given(layout=head_layout())
@example(layout=(24, 8, 2, 4, False, 0))  # found in CI: an element of -1.65 among terms of ~500, 2.7e-12 apart
@example(layout=(24, 8, 2, 4, True, 6093))  # a weight gradient's -0.034 among terms of ~75, 1.2e-12 apart
def test_attention_split_by_heads_sums_to_the_full_layer(layout):
    """GQA: rank r's query heads read exactly rank r's key/value heads, so each rank's attention is complete and the
    row-parallel wo turns the ranks' outputs into a sum."""
    n_heads, n_kv, hs, tp, bias, seed = layout
    cfg = ModelConfig(vocab_size=8 * tp, dim=n_heads * hs, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv,
                      ffn_dim=4 * tp, max_seq_len=8, bias=bias)
    rng = np.random.default_rng(seed)
    full = {n.split("attn.")[1]: rng.standard_normal(s) for n, s in param_shapes(cfg).items() if ".attn." in n}
    x = rng.standard_normal((2, 5, cfg.dim))  # (B, T, C)
    dy = rng.standard_normal((2, 5, cfg.dim))  # (B, T, C)
    y_full, cache = attention_forward(full, x, n_heads, n_kv)
    dx_full, g_full = attention_backward(dy, cache)
    y_sum, dx_sum, grads = 0.0, 0.0, []
    for r in range(tp):
        shard = shard_params({f"layers.0.attn.{k}": v for k, v in full.items()}, split_axes(cfg), r, tp)
        local = {n.split("attn.")[1]: w for n, w in shard.items() if not n.endswith("bo")}
        y_r, c_r = attention_forward(local, x, n_heads // tp, n_kv // tp)  # (B, T, C) rank r's partial sum
        dx_r, g_r = attention_backward(dy, c_r)
        y_sum, dx_sum = y_sum + y_r, dx_sum + dx_r
        grads.append({f"layers.0.attn.{n}": g for n, g in g_r.items()})
    if bias:
        y_sum = y_sum + full["bo"]  # added once, after the reduce
    np.testing.assert_allclose(y_sum, y_full, rtol=1e-12, atol=sum_atol(y_full))
    np.testing.assert_allclose(dx_sum, dx_full, rtol=1e-12, atol=sum_atol(dx_full))  # copy_to_tp's backward: the sum
    for name, g in g_full.items():
        if name == "bo":
            continue
        for r in range(tp):
            expected = shard_array(g, split_axes(cfg)[f"layers.0.attn.{name}"], r, tp)
            # a shard's matrix products sum the same terms in another blocking than the full layer's
            np.testing.assert_allclose(grads[r][f"layers.0.attn.{name}"], expected, rtol=1e-12, atol=sum_atol(g))


@FAST
@given(kind=st.sampled_from(["swiglu", "gelu"]), tp=st.sampled_from([1, 2, 4]), f_tp=st.integers(1, 4),
       bias=st.booleans(), seed=st.integers(0, 10_000))
def test_mlp_split_by_hidden_units_sums_to_the_full_layer(kind, tp, f_tp, bias, seed):
    cfg = ModelConfig(vocab_size=8 * tp, dim=8, n_layers=1, n_heads=tp, n_kv_heads=tp, ffn_dim=f_tp * tp,
                      max_seq_len=8, mlp=kind, bias=bias)
    rng = np.random.default_rng(seed)
    full = {n: rng.standard_normal(s) for n, s in param_shapes(cfg).items() if ".mlp." in n}
    x = rng.standard_normal((3, cfg.dim))  # (N, C)
    dy = rng.standard_normal((3, cfg.dim))  # (N, C)
    y_full, cache = mlp_forward(kind, {n.split("mlp.")[1]: w for n, w in full.items()}, x)
    dx_full, g_full = mlp_backward(kind, dy, cache)
    y_sum, dx_sum = 0.0, 0.0
    for r in range(tp):
        shard = shard_params(full, split_axes(cfg), r, tp)
        local = {n.split("mlp.")[1]: w for n, w in shard.items() if not n.endswith("b2")}
        y_r, c_r = mlp_forward(kind, local, x)  # (N, C) rank r's partial sum
        dx_r, g_r = mlp_backward(kind, dy, c_r)
        y_sum, dx_sum = y_sum + y_r, dx_sum + dx_r
        for name, g in g_r.items():
            expected = shard_array(g_full[name], split_axes(cfg)[f"layers.0.mlp.{name}"], r, tp)
            np.testing.assert_allclose(g, expected, rtol=1e-12, atol=1e-12)
    if bias:
        y_sum = y_sum + full["layers.0.mlp.b2"]
    np.testing.assert_allclose(y_sum, y_full, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx_sum, dx_full, rtol=1e-12, atol=1e-12)


@FAST
@given(tp=st.sampled_from([1, 2, 4]), v_tp=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_vocab_parallel_embedding_slices_sum_to_the_full_lookup(tp, v_tp, seed):
    rng = np.random.default_rng(seed)
    V, C = v_tp * tp, 3
    w = rng.standard_normal((V, C))  # (V, C)
    tokens = rng.integers(0, V, size=(2, 6))  # (B, T), repeated tokens likely
    dy = rng.standard_normal((2, 6, C))  # (B, T, C)
    y_sum = 0.0
    for r in range(tp):
        w_r = w[r * v_tp:(r + 1) * v_tp]  # (V_tp, C)
        y_r, cache = vocab_parallel_embedding_forward(w_r, tokens, RankView(r, tp))
        y_sum = y_sum + y_r
        _, g = vocab_parallel_embedding_backward(dy, cache, RankView(r, tp))
        expected = np.zeros((V, C))
        np.add.at(expected, tokens.reshape(-1), dy.reshape(-1, C))
        np.testing.assert_allclose(g["w"], expected[r * v_tp:(r + 1) * v_tp], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(y_sum, w[tokens])  # exactly one rank adds a non-zero row per token


@FAST
@given(dtype=st.sampled_from([np.float32, np.float64]), V=st.integers(2, 9), seed=st.integers(0, 10_000),
       p_ignore=st.sampled_from([0.0, 0.3, 1.0]))
def test_vocab_parallel_cross_entropy_on_one_rank_is_the_fused_one_bit_for_bit(dtype, V, seed, p_ignore):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((2, 5, V)) * 3).astype(dtype)  # (B, T, V)
    targets = rng.integers(0, V, size=(2, 5))  # (B, T)
    targets[rng.random((2, 5)) < p_ignore] = -100
    loss, cache = vocab_parallel_cross_entropy_forward(logits, targets, LocalComm())
    dz, _ = vocab_parallel_cross_entropy_backward(0.7, cache)
    loss_ref, cache_ref = cross_entropy_forward(logits, targets)
    dz_ref, _ = cross_entropy_backward(0.7, cache_ref)
    assert loss == loss_ref
    assert dz.dtype == dz_ref.dtype and np.array_equal(dz, dz_ref)
