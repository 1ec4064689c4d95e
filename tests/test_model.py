"""Tests for npllm/models/decoder.py: parameter layout and counts, the full-model gradient, causality, cached decoding,
and a small model overfitting one batch.

The full-model check perturbs every parameter of the initialised model by 0.3 N(0, 1): at init the norms are
exactly 1, the biases 0 and the weights tiny, which leaves most nonlinearities in their linear range, where a
wrong second-order term of a backward could hide.
"""

import dataclasses
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.backend import asnumpy
from npllm.config import get_preset
from npllm.layers.loss import IGNORE_INDEX, cross_entropy_forward
from npllm.models import flops_per_token, init_params, num_params, param_shapes, split_axes
from npllm.models.decoder import forward, loss_and_grads, model_forward, param_specs
from npllm.models.spec import initial_value
from tests.helpers import assert_fast_matches_reference

# (preset, fixed overrides): the two presets and the mixes between them
VARIANTS = {
    "llama (rmsnorm, swiglu, rope, untied)": ("nano", {}),
    "gpt2 (layernorm, gelu, learned, bias, tied)": ("nano-gpt2", {}),
    "rmsnorm + gelu": ("nano", {"mlp": "gelu"}),
    "layernorm + swiglu": ("nano-gpt2", {"mlp": "swiglu"}),
    "swiglu + bias": ("nano", {"bias": True}),
    "rope + tied": ("nano", {"tie_embeddings": True}),
}


@st.composite
def small_model(draw, preset, fixed):
    """A tiny config of ``preset``: GQA ratio NH/NKV in {1, 2, 4}, 1-2 layers, and a batch for it."""
    NKV = draw(st.sampled_from([1, 2]), label="n_kv_heads")
    G = draw(st.sampled_from([1, 2, 4] if NKV == 1 else [1, 2]), label="NH/NKV")
    # C >= 4: a LayerNorm over C = 2 channels outputs +-w + b whatever its input (the two centred values are +-d/2,
    # so xhat = +-1 up to eps), every gradient through it is ~eps/var ~ 1e-6 of the loss, and central differences
    # cannot resolve it (their rounding noise is ~1e-11 / h = 1e-6). The layer test covers C = 2 on its own.
    hs = draw(st.sampled_from([2, 4] if NKV * G > 1 else [4]), label="head size")
    T = draw(st.integers(1, 5), label="T")
    cfg = get_preset(preset, **{
        "vocab_size": draw(st.integers(3, 12), label="vocab_size"),
        "dim": NKV * G * hs,
        "n_layers": draw(st.integers(1, 2), label="n_layers"),
        "n_heads": NKV * G,
        "n_kv_heads": NKV,
        "ffn_dim": draw(st.integers(2, 10), label="ffn_dim"),
        "max_seq_len": T + draw(st.integers(0, 2), label="unused positions"),
        **fixed,
    })
    B = draw(st.integers(1, 2), label="B")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    return cfg, B, T, seed


def perturbed_params(cfg, seed, xp=np):
    """init_params + 0.3 N(0, 1), and + N(0, 1) for the embeddings (see below)."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed % 1000, dtype=np.float64)
    out = {}
    for name, value in params.items():
        # The first norm bends on the scale of an embedding row, rms(tok_emb[t] + pos_emb[t]). With C = 4 channels and
        # std 0.3 that row is sometimes ~0.03 long, and then the step h = 1e-5 is no longer small against it: the
        # O((h / 0.03)^2) truncation error of the central difference reaches 1e-6 (seen, and shrinking 100x for each
        # 10x smaller h, i.e. the check's error, not the backward's). Unit-scale rows keep it below ~1e-8.
        scale = 1.0 if name in ("tok_emb", "pos_emb") else 0.3
        out[name] = xp.asarray(value + scale * rng.standard_normal(value.shape))
    return out


def batch(cfg, B, T, seed, p_ignore=0.2):
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, cfg.vocab_size, size=(B, T))  # (B, T)
    targets = rng.integers(0, cfg.vocab_size, size=(B, T))  # (B, T)
    targets[rng.random((B, T)) < p_ignore] = IGNORE_INDEX
    if (targets == IGNORE_INDEX).all():
        targets[0, 0] = 0  # keep at least one target so the loss depends on the parameters
    return tokens, targets


# ----------------------------------------------------------------------------------------------------------------
# the full-model gradient


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_full_model_gradient(backend, grad_check, variant, data):
    preset, fixed = VARIANTS[variant]
    cfg, B, T, seed = data.draw(small_model(preset, fixed), label="model")
    params = perturbed_params(cfg, seed, xp=backend)
    tokens, targets = (backend.asarray(a) for a in batch(cfg, B, T, seed))

    loss, grads = loss_and_grads(params, tokens, targets, cfg)
    assert list(grads) == list(params) == list(param_shapes(cfg))
    assert all(grads[n].shape == params[n].shape for n in params)
    assert math.isfinite(loss)

    def f():
        logits, _ = model_forward(params, tokens, cfg)
        return cross_entropy_forward(logits, targets)[0]

    # five-point stencil, h = 3e-4 (tests/conftest.py). With the plain central difference at h = 1e-5, parameters
    # whose gradient is ~1e-5 of the loss (a query bias behind a near one-hot softmax) reached 5e-7 in 400 random
    # draws, all of it the loss's own rounding (it grew 10x for each 10x smaller h); these settings gave <= 2e-8.
    errors = grad_check.function(f"model: {variant}", f, params, grads, seed=seed)
    assert set(errors) == set(params)  # every parameter is checked


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=6, deadline=None)
@given(data=st.data(), T=st.sampled_from([1, 7, 33, 70]))
def test_fast_paths_are_the_reference_model_in_float64(variant, data, T):
    """ModelConfig.impl: the whole model on npllm/fast (flash attention, fused MLP/norm, in-place loss) against the
    reference layers, loss and every gradient, in float64. T crosses the flash tiles' edges (32-query tiles from
    T = 33 on; 70 leaves a ragged last tile). Bound 1e-10 relative to each tensor's largest entry: the two
    compute the same sums in different orders (tiles, online softmax), which in float64 differ by ~1e-15 per
    operation; measured <= 1e-12. A gradient that is zero in exact math (the key bias, which shifts a query's scores
    all alike; the queries' and keys' at T = 1, a softmax over one key) is rounding, ~1e-17, on both sides, hence
    the absolute floor of 1e-14 of the model's largest gradient."""
    preset, fixed = VARIANTS[variant]
    cfg, B, _, seed = data.draw(small_model(preset, fixed), label="model")
    cfg = dataclasses.replace(cfg, max_seq_len=T, impl="fast")
    params = perturbed_params(cfg, seed)
    tokens, targets = batch(cfg, B, T, seed)
    assert_fast_matches_reference(lambda c: loss_and_grads(params, tokens, targets, c), cfg, params)


# ----------------------------------------------------------------------------------------------------------------
# causality and cached decoding


@pytest.mark.parametrize("preset", ["nano", "nano-gpt2"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_later_tokens_never_change_earlier_logits(preset, data):
    cfg, B, T, seed = data.draw(small_model(preset, {}), label="model")
    T = cfg.max_seq_len
    t = data.draw(st.integers(0, T - 1), label="t")
    params = perturbed_params(cfg, seed)
    tokens, _ = batch(cfg, B, T, seed)
    changed = tokens.copy()
    changed[:, t + 1:] = (tokens[:, t + 1:] + 1) % cfg.vocab_size  # every later token is different
    logits = forward(params, tokens, cfg)  # (B, T, V)
    logits_changed = forward(params, changed, cfg)
    np.testing.assert_allclose(logits_changed[:, :t + 1], logits[:, :t + 1], rtol=0, atol=1e-12)
    if t + 1 < T:
        assert not np.allclose(logits_changed[:, t + 1:], logits[:, t + 1:])


@pytest.mark.parametrize("preset", ["nano", "nano-gpt2"])
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_past_kv_gives_the_same_logits_as_the_full_forward(preset, data):
    cfg, B, _, seed = data.draw(small_model(preset, {}), label="model")
    T = cfg.max_seq_len
    split = data.draw(st.integers(0, T - 1), label="prefix length")
    params = perturbed_params(cfg, seed)
    tokens, _ = batch(cfg, B, T, seed)
    full = forward(params, tokens, cfg)  # (B, T, V)

    # prefix, then the suffix at once
    past = None
    if split:
        prefix_logits, cache = model_forward(params, tokens[:, :split], cfg)
        np.testing.assert_allclose(prefix_logits, full[:, :split], rtol=0, atol=1e-10)
        past = cache["present_kv"]
    suffix_logits, cache = model_forward(params, tokens[:, split:], cfg, past_kv=past)
    np.testing.assert_allclose(suffix_logits, full[:, split:], rtol=0, atol=1e-10)
    assert len(cache["present_kv"]) == cfg.n_layers
    assert cache["present_kv"][0][0].shape == (B, cfg.n_kv_heads, T, cfg.head_dim)

    # one token at a time, as generation does
    past = None
    for t in range(T):
        step_logits, cache = model_forward(params, tokens[:, t:t + 1], cfg, past_kv=past)
        np.testing.assert_allclose(step_logits[:, 0], full[:, t], rtol=0, atol=1e-10)
        past = cache["present_kv"]


def test_sequence_longer_than_max_seq_len_is_refused():
    cfg = get_preset("nano", vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, max_seq_len=4)
    params = init_params(cfg)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        forward(params, np.zeros((1, 5), dtype=np.int64), cfg)
    _, cache = model_forward(params, np.zeros((1, 3), dtype=np.int64), cfg)
    with pytest.raises(ValueError, match="sequence length 5"):
        model_forward(params, np.zeros((1, 2), dtype=np.int64), cfg, past_kv=cache["present_kv"])


# ----------------------------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("preset", ["nano", "nano-gpt2"])
def test_plain_gradient_descent_overfits_one_batch(preset):
    # float32, the training dtype. 150 steps of p -= 1.0 * grad take ~0.3 s and bring the loss from ln(64) ~ 4.16
    # to ~0.01 (0.006 for nano, 0.011 for nano-gpt2 when written); the bound 0.05 is ~1% of the start.
    cfg = get_preset(preset, vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                     max_seq_len=16)
    params = init_params(cfg, seed=0)
    data = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(4, 17))
    tokens, targets = data[:, :-1], data[:, 1:]  # (4, 16) each: predict the next token
    losses = []
    for _ in range(150):
        loss, grads = loss_and_grads(params, tokens, targets, cfg)
        losses.append(loss)
        for name in params:
            params[name] -= 1.0 * grads[name]
    assert all(g.dtype == np.float32 for g in grads.values())
    assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.05  # a small init predicts ~uniformly
    assert losses[-1] < 0.05, f"loss went from {losses[0]:.3f} to {losses[-1]:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# parameters: layout, counts, init


def test_param_shapes_llama_layout():
    cfg = get_preset("nano", vocab_size=10, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
    layer = lambda l: [  # noqa: E731
        (f"layers.{l}.attn_norm.w", (8,)),
        (f"layers.{l}.attn.wq", (8, 8)), (f"layers.{l}.attn.wk", (8, 4)), (f"layers.{l}.attn.wv", (8, 4)),
        (f"layers.{l}.attn.wo", (8, 8)),
        (f"layers.{l}.mlp_norm.w", (8,)),
        (f"layers.{l}.mlp.w1", (8, 12)), (f"layers.{l}.mlp.w3", (8, 12)), (f"layers.{l}.mlp.w2", (12, 8)),
    ]
    expected = [("tok_emb", (10, 8)), *layer(0), *layer(1), ("norm.w", (8,)), ("lm_head", (8, 10))]
    assert list(param_shapes(cfg).items()) == expected


def test_param_shapes_gpt2_layout():
    cfg = get_preset("nano-gpt2", vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=12,
                     max_seq_len=6)
    expected = [
        ("tok_emb", (10, 8)), ("pos_emb", (6, 8)),
        ("layers.0.attn_norm.w", (8,)), ("layers.0.attn_norm.b", (8,)),
        ("layers.0.attn.wq", (8, 8)), ("layers.0.attn.wk", (8, 8)), ("layers.0.attn.wv", (8, 8)),
        ("layers.0.attn.wo", (8, 8)),
        ("layers.0.attn.bq", (8,)), ("layers.0.attn.bk", (8,)), ("layers.0.attn.bv", (8,)), ("layers.0.attn.bo", (8,)),
        ("layers.0.mlp_norm.w", (8,)), ("layers.0.mlp_norm.b", (8,)),
        ("layers.0.mlp.w1", (8, 12)), ("layers.0.mlp.w2", (12, 8)),
        ("layers.0.mlp.b1", (12,)), ("layers.0.mlp.b2", (8,)),
        ("norm.w", (8,)), ("norm.b", (8,)),
    ]  # tied: no lm_head
    assert list(param_shapes(cfg).items()) == expected


def test_param_shapes_swiglu_with_bias_and_gqa_biases():
    cfg = get_preset("nano", vocab_size=10, dim=8, n_layers=1, n_heads=4, n_kv_heads=1, ffn_dim=12, bias=True)
    shapes = param_shapes(cfg)
    assert [(n, shapes[n]) for n in shapes if n.startswith("layers.0.mlp.")] == [
        ("layers.0.mlp.w1", (8, 12)), ("layers.0.mlp.w3", (8, 12)), ("layers.0.mlp.w2", (12, 8)),
        ("layers.0.mlp.b1", (12,)), ("layers.0.mlp.b3", (12,)), ("layers.0.mlp.b2", (8,)),
    ]
    assert [(n, shapes[n]) for n in shapes if n.startswith("layers.0.attn.b")] == [
        ("layers.0.attn.bq", (8,)), ("layers.0.attn.bk", (2,)), ("layers.0.attn.bv", (2,)), ("layers.0.attn.bo", (8,)),
    ]


def test_parameter_counts_of_the_real_shapes():
    assert num_params(get_preset("gpt2-124m")) == 124_439_808
    assert num_params(get_preset("7b")) == 6_738_415_616
    # the 7b count by hand: untied embedding and head, per layer 4 C^2 (attention) + 3 C F (SwiGLU) + 2 C (norms)
    V, C, L, F = 32000, 4096, 32, 11008
    assert num_params(get_preset("7b")) == 2 * V * C + L * (4 * C * C + 3 * C * F + 2 * C) + C


def test_counting_parameters_allocates_nothing():
    tracemalloc.start()
    num_params(get_preset("7b"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000  # bytes; the parameters themselves would be 27 GB in float32


def test_flops_per_token_by_hand():
    cfg = get_preset("nano", vocab_size=10, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 12  # wq, wk, wv, wo, w1, w3, w2
    matmul_weights = 2 * per_layer + 8 * 10  # + lm_head
    attention = 2 * 2 * 2 * 4 * 2 * 16  # L * (q k^T and P v) * 2 FLOPs * NH * hs * T
    assert flops_per_token(cfg, 16) == 3 * (2 * matmul_weights + attention)
    tied = get_preset("nano-gpt2", vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=12,
                      max_seq_len=6)
    assert flops_per_token(tied, 4) == 3 * (2 * (4 * 64 + 2 * 8 * 12 + 10 * 8) + 2 * 2 * 2 * 4 * 4)


def test_init_values():
    cfg = get_preset("nano-gpt2", vocab_size=50, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=16)
    params = init_params(cfg, seed=3)
    assert list(params) == list(param_shapes(cfg))
    assert all(v.dtype == np.float32 and v.shape == param_shapes(cfg)[n] for n, v in params.items())
    for name, value in params.items():
        if name.endswith("norm.w"):
            assert (value == 1).all(), name
        elif name.endswith(".b") or name.split(".")[-1] in ("bq", "bk", "bv", "bo", "b1", "b2"):
            assert (value == 0).all(), name
        else:
            expected_std = 0.02 / (math.sqrt(2 * cfg.n_layers) if name.endswith(("attn.wo", "mlp.w2")) else 1)
            assert abs(value.std() / expected_std - 1) < 0.2, name
    # deterministic per (seed, name); another seed gives other weights
    again = init_params(cfg, seed=3, dtype=np.float64)
    for index, spec in enumerate(param_specs(cfg)):
        np.testing.assert_array_equal(again[spec.name], initial_value(spec, seed=3, index=index))
        np.testing.assert_array_equal(params[spec.name], again[spec.name].astype(np.float32))
    assert not np.array_equal(init_params(cfg, seed=4)["tok_emb"], params["tok_emb"])


def test_forward_shapes_and_loss_at_init():
    cfg = get_preset("nano", vocab_size=40, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=8)
    params = init_params(cfg, dtype=np.float64)
    tokens, targets = batch(cfg, 3, 8, seed=0)
    assert forward(params, tokens, cfg).shape == (3, 8, 40)
    loss, grads = loss_and_grads(params, tokens, targets, cfg)
    assert abs(loss - math.log(40)) < 0.01
    assert all(asnumpy(g).dtype == np.float64 for g in grads.values())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_specs_are_the_one_list_everything_reads(variant):
    preset, overrides = VARIANTS[variant]
    cfg = get_preset(preset, **overrides)
    specs = param_specs(cfg)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))  # each parameter once
    assert param_shapes(cfg) == {s.name: s.shape for s in specs}
    assert split_axes(cfg) == {s.name: s.split_axis for s in specs}
    assert list(init_params(cfg)) == names
    for s in specs:  # 1-D tensors are norm gains (ones) or biases (zeros); weights are drawn
        assert s.init == ("ones" if s.name.endswith("norm.w") else "zeros" if len(s.shape) == 1 else "normal"), s
        assert s.split_axis is None or s.split_axis < len(s.shape)


# ----------------------------------------------------------------------------------------------------------------
# dropout (GPT-2's three places: embeddings, attention probabilities, each block's output branches)


@pytest.mark.parametrize("preset", ["nano", "nano-gpt2"])
def test_dropout_gradient_under_a_fixed_mask(grad_check, preset):
    """The same Dropout (seed, step, rows) in f and in the backward: the masks are fixed, so f is differentiable and
    the backward through every dropout site is checked by finite differences (float64)."""
    from npllm.layers.dropout import Dropout

    cfg = get_preset(preset, vocab_size=16, dim=8, n_layers=1, n_heads=4, n_kv_heads=2 if preset == "nano" else 4,
                     ffn_dim=12, max_seq_len=6, dropout=0.2, attn_dropout=0.3)
    params = perturbed_params(cfg, 5)
    tokens, targets = batch(cfg, 2, 6, seed=5)
    dropout = Dropout(cfg.dropout, cfg.attn_dropout, seed=7, step=2, row_offset=4)
    loss, grads = loss_and_grads(params, tokens, targets, cfg, dropout=dropout)
    no_dropout, _ = loss_and_grads(params, tokens, targets, cfg)
    assert loss != no_dropout  # something was dropped

    def f():
        logits, _ = model_forward(params, tokens, cfg, dropout=dropout)
        return cross_entropy_forward(logits, targets)[0]

    grad_check.function(f"model with dropout: {preset}", f, params, grads, seed=5)


def test_dropout_rate_zero_is_no_dropout_bit_for_bit_and_rows_split_like_one_process():
    from npllm.layers.dropout import Dropout
    from npllm.models import accumulate_loss_and_grads

    cfg = get_preset("nano-gpt2", vocab_size=32, dim=16, n_layers=2, n_heads=4, ffn_dim=24, max_seq_len=8)
    params = perturbed_params(cfg, 3)
    tokens, targets = batch(cfg, 4, 8, seed=3)
    plain = loss_and_grads(params, tokens, targets, cfg)
    zero = loss_and_grads(params, tokens, targets, cfg, dropout=Dropout(0.0, 0.0, seed=1, step=1))
    assert plain[0] == zero[0] and all(np.array_equal(plain[1][n], zero[1][n]) for n in params)
    # rows 2..3 of a batch drop exactly what a data-parallel rank holding global rows 2..3 drops, and two
    # micro-batches of the batch drop what the whole batch drops
    drop = get_preset("nano-gpt2", vocab_size=32, dim=16, n_layers=2, n_heads=4, ffn_dim=24, max_seq_len=8,
                      dropout=0.3, attn_dropout=0.3)
    whole, _ = model_forward(params, tokens, drop, dropout=Dropout(0.3, 0.3, seed=1, step=1))
    part, _ = model_forward(params, tokens[2:], drop, dropout=Dropout(0.3, 0.3, seed=1, step=1, row_offset=2))
    np.testing.assert_array_equal(whole[2:], part)
    batch_ = {"tokens": tokens, "targets": targets}
    one = accumulate_loss_and_grads(params, batch_, drop, 1, dropout=Dropout(0.3, 0.3, seed=1, step=1))
    two = accumulate_loss_and_grads(params, batch_, drop, 2, dropout=Dropout(0.3, 0.3, seed=1, step=1))
    assert abs(one[0] - two[0]) <= 1e-12 * abs(one[0])
    assert all(np.allclose(one[1][n], two[1][n], rtol=1e-10, atol=1e-14) for n in params)


def test_attention_dropout_acts_on_the_reference_layers_too():
    """cfg.impl='reference' drops the attention probabilities exactly as the fast paths do (both then run the
    reference attention): the same loss and gradients up to the fused layers' rounding (float64, 1e-10), and not the
    loss without attention dropout (the reference path once passed the mask's key without its rate)."""
    from npllm.layers.dropout import Dropout

    cfg = get_preset("nano", vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=8,
                     attn_dropout=0.3)
    params = perturbed_params(cfg, 8)
    tokens, targets = batch(cfg, 3, 8, seed=8)
    dropout = Dropout(0.0, 0.3, seed=4, step=1)
    loss_fast, grads_fast = loss_and_grads(params, tokens, targets, cfg, dropout=dropout)
    reference = dataclasses.replace(cfg, impl="reference")
    loss_ref, grads_ref = loss_and_grads(params, tokens, targets, reference, dropout=dropout)
    assert loss_ref != loss_and_grads(params, tokens, targets, reference)[0]
    assert abs(loss_fast - loss_ref) <= 1e-10 * abs(loss_ref)
    for name in params:
        assert np.abs(grads_fast[name] - grads_ref[name]).max() <= 1e-10 * np.abs(grads_ref[name]).max() + 1e-14, name
