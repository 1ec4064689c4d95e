"""Activation recomputation (ModelConfig.recompute, ``--recompute``; npllm/models/decoder.py).

"attention" and "block" drop caches in the forward and redo the same calls in the backward, so the loss and every
gradient must equal recompute="none" bit for bit (np.array_equal, not a tolerance): in float64 and float32, on the
fast paths and the reference layers, with dropout on the embeddings, the attention probabilities and the block
outputs, over micro-batches, and with two tensor-parallel ranks (threads). Also: what the forward keeps, that
decoding (model_forward with past_kv, whose default is recompute="none") is untouched, and the option's checks.
The memory these choices save is proven in tests/test_memory.py (the caches to the byte, a real step's peak).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npllm.config import ModelConfig, TrainConfig, get_preset, parse_options
from npllm.layers.dropout import Dropout
from npllm.layers.loss import IGNORE_INDEX
from npllm.models import accumulate_loss_and_grads, init_params, split_axes
from npllm.models.decoder import Redo, forward, loss_and_grads, model_forward
from npllm.parallel.tensor import shard_params, unshard_params

from tests.helpers import on_thread_ranks

RECOMPUTE = ["attention", "block"]
# T = 40: two of the flash attention's 32-query tiles, the second ragged
CONFIGS = {
    "llama": get_preset("nano", vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                        max_seq_len=40),
    "gpt2": get_preset("nano-gpt2", vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=24,
                       max_seq_len=40),
}


def perturbed_params(cfg, seed, dtype):
    """init_params + 0.3 N(0, 1): norms, biases and weights away from their special initial values."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed, dtype=np.float64)
    return {name: (value + 0.3 * rng.standard_normal(value.shape)).astype(dtype) for name, value in params.items()}


def make_batch(cfg, B, T, seed):
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    targets = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    targets[rng.random((B, T)) < 0.2] = IGNORE_INDEX
    return tokens, targets


def assert_bit_identical(got, want, what):
    loss, grads = got
    loss_none, grads_none = want
    assert loss == loss_none, what
    assert list(grads) == list(grads_none), what
    for name in grads_none:
        assert grads[name].dtype == grads_none[name].dtype, (what, name)
        assert np.array_equal(grads[name], grads_none[name]), (what, name)


def dropout_for(cfg, rows=0):
    return Dropout(cfg.dropout, cfg.attn_dropout, seed=11, step=3, row_offset=rows) if cfg.dropout else None


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "dropout"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_recompute_gives_the_loss_and_gradients_of_none_bit_for_bit(config, impl, dtype, dropout):
    cfg = dataclasses.replace(CONFIGS[config], impl=impl, dropout=dropout, attn_dropout=dropout)
    params = perturbed_params(cfg, 1, dtype)
    tokens, targets = make_batch(cfg, 3, cfg.max_seq_len, 1)
    want = loss_and_grads(params, tokens, targets, cfg, dropout=dropout_for(cfg))
    for recompute in RECOMPUTE:
        got = loss_and_grads(params, tokens, targets, dataclasses.replace(cfg, recompute=recompute),
                             dropout=dropout_for(cfg))
        assert_bit_identical(got, want, recompute)
    if dropout:  # the masks did act: without them the loss differs
        assert loss_and_grads(params, tokens, targets, cfg)[0] != want[0]


def test_recompute_at_a_size_that_runs_the_thread_pools():
    """One nano block at B=4, T=128: big enough that the flash attention (B NKV T G T = 2^18 scores) and the fused
    elementwise work (B T F > 2^17) split over the thread pool and BLAS runs its own threads (no attention dropout,
    which would run the reference attention); the recomputed forward still makes the same bits."""
    cfg = get_preset("nano", n_layers=1, max_seq_len=128, dropout=0.1)
    params = init_params(cfg, seed=6)
    tokens, targets = make_batch(cfg, 4, 128, 6)
    want = loss_and_grads(params, tokens, targets, cfg, dropout=dropout_for(cfg))
    for recompute in RECOMPUTE:
        got = loss_and_grads(params, tokens, targets, dataclasses.replace(cfg, recompute=recompute),
                             dropout=dropout_for(cfg))
        assert_bit_identical(got, want, recompute)


@pytest.mark.parametrize("recompute", RECOMPUTE)
def test_recompute_over_micro_batches(recompute):
    """accumulate_loss_and_grads: each micro-batch's forward keeps and its backward rebuilds its own blocks (its
    dropout masks by its global rows); the sum is the one of recompute="none"."""
    cfg = dataclasses.replace(CONFIGS["gpt2"], dropout=0.1, attn_dropout=0.1)
    params = perturbed_params(cfg, 2, np.float32)
    tokens, targets = make_batch(cfg, 5, 24, 2)
    batch = {"tokens": tokens, "targets": targets}
    want = accumulate_loss_and_grads(params, batch, cfg, 3, dropout=dropout_for(cfg))
    got = accumulate_loss_and_grads(params, batch, dataclasses.replace(cfg, recompute=recompute), 3,
                                    dropout=dropout_for(cfg))
    assert_bit_identical(got, want, recompute)


def tensor_parallel_loss_and_grads(cfg, full, tokens, targets, tp=2):
    """Each of ``tp`` threads runs loss_and_grads on its shards (with dropout): [(loss, grads)] in rank order."""

    def rank(r, comm):
        shard = shard_params(full, split_axes(cfg), r, tp)
        return loss_and_grads(shard, tokens, targets, cfg, tp=comm, dropout=dropout_for(cfg))

    return on_thread_ranks(tp, rank)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_recompute_with_two_tensor_parallel_ranks(config):
    """A recomputed block redoes its all-reduces (g's forward) on every rank in the same order: each rank's loss and
    gradient shards equal recompute="none"'s bit for bit, and the gathered gradients one process's (1e-10, float64:
    the ranks sum their heads' partial results in another order than one process does)."""
    cfg = dataclasses.replace(CONFIGS[config], dropout=0.2, attn_dropout=0.2)
    full = perturbed_params(cfg, 3, np.float64)
    tokens, targets = make_batch(cfg, 2, 16, 3)
    want = tensor_parallel_loss_and_grads(cfg, full, tokens, targets)
    for recompute in RECOMPUTE:
        got = tensor_parallel_loss_and_grads(dataclasses.replace(cfg, recompute=recompute), full, tokens, targets)
        for r in range(2):
            assert_bit_identical(got[r], want[r], f"{recompute}, rank {r}")
    one_loss, one_grads = loss_and_grads(full, tokens, targets, cfg, dropout=dropout_for(cfg))
    assert abs(want[0][0] - one_loss) <= 1e-10 * abs(one_loss)
    gathered = unshard_params([grads for _, grads in want], split_axes(cfg))
    for name, g in one_grads.items():
        assert np.abs(gathered[name] - g).max() <= 1e-10 * np.abs(g).max() + 1e-14, name


def test_what_the_forward_keeps():
    """"block": each block's input x (B, T, C) and nothing else of the block; "attention": the BlockCache with the
    attention's cache swapped for its input; neither keeps keys/values for decoding."""
    cfg = CONFIGS["llama"]
    params = perturbed_params(cfg, 4, np.float32)
    tokens, _ = make_batch(cfg, 2, 8, 4)
    _, full = model_forward(params, tokens, cfg)
    _, block = model_forward(params, tokens, cfg, recompute="block")
    _, attention = model_forward(params, tokens, cfg, recompute="attention")
    assert len(full["present_kv"]) == cfg.n_layers and block["present_kv"] == attention["present_kv"] == []
    for l in range(cfg.n_layers):
        kept = block["layers"][l]
        assert isinstance(kept, Redo) and kept.what == "block" and kept.x.shape == (2, 8, cfg.dim)
        kept = attention["layers"][l]
        assert isinstance(kept.attn, Redo) and kept.attn.what == "attention"
        assert np.array_equal(kept.attn.x, full["layers"][l].attn["x"])  # the attention's input, its norm's output
        assert np.array_equal(kept.mlp[2], full["layers"][l].mlp[2])  # everything else kept as with "none"
    # block 0's kept input is the embedding (no positions to add with RoPE, no dropout)
    assert np.array_equal(block["layers"][0].x, params["tok_emb"][tokens])


def test_decoding_is_unaffected():
    """model_forward's recompute defaults to "none" whatever cfg.recompute says (only training's loss_and_grads
    passes cfg.recompute): a recompute run's prefill keeps present_kv and cached decoding equals the full forward;
    past_kv with a recompute choice is refused."""
    cfg = dataclasses.replace(CONFIGS["llama"], recompute="block")
    params = perturbed_params(cfg, 5, np.float64)
    tokens, _ = make_batch(cfg, 2, 10, 5)
    full = forward(params, tokens, cfg)  # (B, T, V)
    _, cache = model_forward(params, tokens[:, :6], cfg)
    step, _ = model_forward(params, tokens[:, 6:], cfg, past_kv=cache["present_kv"])
    np.testing.assert_allclose(step, full[:, 6:], rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="recompute='block' is for training; cached decoding"):
        model_forward(params, tokens[:, 6:], cfg, past_kv=cache["present_kv"], recompute="block")


def test_the_option_and_its_checks():
    assert ModelConfig().recompute == "none"
    model_opts, _ = parse_options(["--recompute=block"], ModelConfig, TrainConfig)
    assert get_preset("nano", **model_opts).recompute == "block"
    with pytest.raises(ValueError, match="recompute='full' is not allowed; choose one of: none, attention, block"):
        ModelConfig(recompute="full")
    with pytest.raises(ValueError, match="recompute='block' is for arch='decoder' only"):
        get_preset("bert-nano", recompute="block")
    params = init_params(CONFIGS["llama"])
    with pytest.raises(ValueError, match="recompute='all' is not allowed"):
        model_forward(params, np.zeros((1, 2), dtype=np.int64), CONFIGS["llama"], recompute="all")
