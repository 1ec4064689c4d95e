"""Tests for npllm/models/bert.py: BERT with Hugging Face BertForMaskedLM's math.

- Oracle: transformers' BertForMaskedLM (5.x), a tiny random config built here, every parameter moved by 0.3 N(0, 1),
  in float64 with the same weights (through npllm.hf.load_hf): the logits at every position, HF's own masked-LM
  loss and EVERY parameter's gradient agree to <= 1e-9 relative (max |ours - HF| / max |HF| per tensor; measured
  ~1e-14, float64 rounding), with padded rows, three segment types and a pad_token_id (HF's padding_idx: the
  lookup never trains that row), under both of HF's attention implementations, "eager" and "sdpa": both compute
  in float64 (a forward hook asserts that every module's output is float64, and 1e-9 is far below a float32
  rounding); npllm on its fast paths (the default) and on the reference layers (cfg.impl). The key bias's gradient
  is 0 in exact arithmetic (adding q . bk to a whole row of scores leaves its softmax unchanged): both sides give
  rounding noise, checked to be below 1e-12 of the largest gradient.
- Finite differences (the grad_check fixture: five-point stencil, h = 3e-4, bound 1e-6) of every parameter, along
  random directions, of tiny models drawn by hypothesis: padding patterns, segments, a pad_id (in padded slots
  only: at a real position its lookup gradient is dropped on purpose, as HF's padding_idx does, which the oracle
  checks), dropout on (rates drawn) under the fixed masks of one Dropout in f and in the backward.
- The fast paths (cfg.impl = "fast", the default, which every other test here runs: flash attention bidirectional with
  the key padding mask) against the reference layers, float64: loss, logits and every gradient within 1e-10 of each
  tensor's largest entry plus 1e-14 of the model's largest gradient, T = 1, 7, 33, 70 (across the flash tiles'
  edges), padding with a row all padding, GQA, under one fixed Dropout (the reference attention where attention
  dropout is on).
- Padding invariance (bit for bit), dropout rate 0 == no dropout (bit for bit), a batch split into row chunks under
  dropout == the whole batch (each row's masks follow its global row), tensor parallelism over two threads == one
  process, fill_mask, parameter counts (bert-base == BertForMaskedLM's own count, built on torch's meta device),
  flops, a tiny model overfitting one batch, one-line errors.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.config import get_preset
from npllm.layers.dropout import Dropout
from npllm.layers.loss import IGNORE_INDEX
from npllm.models import accumulate_loss_and_grads, flops_per_token, init_params, num_params, split_axes
from npllm.models import bert
from npllm.optim import adamw_init, adamw_update
from npllm.parallel.tensor import shard_params, unshard_params, vocab_parallel_cross_entropy_forward

from tests.helpers import assert_fast_matches_reference, on_thread_ranks

ORACLE_TOL = 1e-9


def tiny_config(**overrides):
    """A small bert-nano without dropout."""
    fields = dict(vocab_size=29, dim=16, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=24, max_seq_len=12,
                  type_vocab_size=3, dropout=0.0, attn_dropout=0.0, mask_id=0)
    fields.update(overrides)
    return get_preset("bert-nano", **fields)


def perturbed_params(cfg, seed):
    """init_params + 0.3 N(0, 1), float64: at init the norms are exactly 1 and the biases 0, which would let a
    misplaced gain or bias pass."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, seed=seed % 1000, dtype=np.float64)
    return {name: value + 0.3 * rng.standard_normal(value.shape) for name, value in params.items()}


def make_batch(cfg, lengths, seed, T=None, pad_token=None):
    """Rows with lengths[b] real positions (the rest padding, holding random ids or ``pad_token``, which no real
    position holds), random segments, and targets at about 40% of the real positions (at least one per row)."""
    rng = np.random.default_rng(seed + 11)
    B, T = len(lengths), T or max(lengths)
    key_mask = np.arange(T)[None, :] < np.array(lengths)[:, None]  # (B, T)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))  # (B, T)
    if pad_token is not None:
        tokens[tokens == pad_token] = (pad_token + 1) % cfg.vocab_size
        tokens[~key_mask] = pad_token
    chosen = key_mask & (rng.random((B, T)) < 0.4)  # (B, T)
    chosen[np.arange(B), rng.integers(0, np.array(lengths))] = True
    targets = np.where(chosen, rng.integers(0, cfg.vocab_size, (B, T)), IGNORE_INDEX)  # (B, T)
    return dict(tokens=tokens, segments=rng.integers(0, cfg.type_vocab_size, (B, T)), key_mask=key_mask,
                targets=targets)


def loss_with_dropout(params, batch, cfg, dropout):
    """The training loss (forward only) under ``dropout``: what batch_loss_and_grads differentiates."""
    rows = bert.masked_positions(batch["targets"])
    logits, cache = bert.model_forward(params, batch, cfg, dropout=dropout, head_rows=rows)  # (N, V)
    return vocab_parallel_cross_entropy_forward(logits, batch["targets"][rows], cache["tp"])[0]


def rel_max(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def assert_grads_close(got: dict, want: dict, tol: float) -> None:
    """rel_max(got, want) <= tol for every gradient but the key biases', which are 0 in exact arithmetic (q . bk is
    the same for every key of a softmax row): there both are rounding noise, <= tol times the largest gradient."""
    scale = max(np.abs(g).max() for g in want.values())
    for name in want:
        if name.endswith(".attn.bk"):
            assert np.abs(got[name] - want[name]).max() <= tol * scale, name
        else:
            assert rel_max(got[name], want[name]) <= tol, (name, rel_max(got[name], want[name]))


# ----------------------------------------------------------------------------------------------------------------
# the Hugging Face BertForMaskedLM oracle


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_logits_loss_and_every_gradient_match_hf_bert_for_masked_lm(attn, impl, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from npllm.hf import load_hf, to_hf_state

    hf_cfg = transformers.BertConfig(
        vocab_size=37, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24,
        max_position_embeddings=12, type_vocab_size=3, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=1, mask_token_id=4, attn_implementation=attn)
    torch.manual_seed(3)
    model = transformers.BertForMaskedLM(hf_cfg).double().eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=torch.float64))
    model.save_pretrained(tmp_path / "hf")
    params, cfg = load_hf(tmp_path / "hf", dtype=np.float64)
    assert (cfg.pad_id, cfg.mask_id, cfg.type_vocab_size, cfg.norm_eps) == (1, 4, 3, 1e-12)
    cfg = dataclasses.replace(cfg, impl=impl)  # npllm's fast paths (the default) or its reference layers
    batch = make_batch(cfg, [10, 7, 3, 10], seed=1, T=10, pad_token=1)
    batch["tokens"][0, 2] = 1  # the pad id at a real position too: its lookup gradient is dropped all the same

    not_float64 = []
    for name, module in model.named_modules():
        def hook(module, args, output, name=name):
            for out in (output if isinstance(output, tuple) else (output,)):
                if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != torch.float64:
                    not_float64.append((name, out.dtype))
        module.register_forward_hook(hook)
    model.zero_grad()
    out = model(input_ids=torch.tensor(batch["tokens"]), token_type_ids=torch.tensor(batch["segments"]),
                attention_mask=torch.tensor(batch["key_mask"].astype(np.int64)), labels=torch.tensor(batch["targets"]))
    out.loss.backward()
    assert not not_float64, not_float64

    assert rel_max(bert.mlm_logits(params, batch, cfg), out.logits.detach().numpy()) <= ORACLE_TOL
    loss, grads = bert.batch_loss_and_grads(params, batch, cfg)
    assert abs(loss - out.loss.item()) <= ORACLE_TOL * out.loss.item()
    assert bert.batch_loss(params, batch, cfg) == loss

    ours = to_hf_state(grads, cfg)  # our gradients under HF's names and layouts
    ref = {name: p.grad.numpy() for name, p in model.named_parameters()}
    assert set(ours) == set(ref)  # every HF parameter; the tied decoder and its bias appear once
    scale = max(np.abs(g).max() for g in ref.values())
    errors = {}
    for name in ref:
        if name.endswith("attention.self.key.bias"):  # 0 in exact arithmetic: both sides are rounding noise
            assert np.abs(ours[name]).max() <= 1e-12 * scale and np.abs(ref[name]).max() <= 1e-12 * scale, name
        else:
            errors[name] = rel_max(ours[name], ref[name])
    assert max(errors.values()) <= ORACLE_TOL, {n: e for n, e in errors.items() if e > ORACLE_TOL}


def test_bert_base_has_bert_for_masked_lm_parameter_count():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = transformers.BertForMaskedLM(transformers.BertConfig())  # transformers' default is bert-base
    hf_count = sum(p.numel() for p in model.parameters())  # the tied decoder weight and bias counted once
    cfg = get_preset("bert-base")
    assert num_params(cfg) == hf_count == 109_514_298
    assert abs(num_params(cfg) - 110e6) / 110e6 < 0.01  # the paper's "110M"
    assert num_params(get_preset("bert-nano")) == 1_090_944
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.max_seq_len, cfg.pad_id,
            cfg.mask_id) == (30522, 768, 12, 12, 3072, 512, 0, 103)


# ----------------------------------------------------------------------------------------------------------------
# finite differences


@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_every_gradient_matches_finite_differences(data, grad_check):
    n_heads = data.draw(st.sampled_from([1, 2]), label="n_heads")
    cfg = tiny_config(vocab_size=11, dim=8, n_layers=data.draw(st.integers(1, 2), label="n_layers"), n_heads=n_heads,
                      n_kv_heads=data.draw(st.sampled_from([1, n_heads]), label="n_kv_heads"), ffn_dim=12,
                      max_seq_len=7, type_vocab_size=2, pad_id=data.draw(st.sampled_from([None, 3]), label="pad_id"))
    lengths = data.draw(st.lists(st.integers(1, 6), min_size=1, max_size=3), label="lengths")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    params = perturbed_params(cfg, seed)
    batch = make_batch(cfg, lengths, seed, pad_token=3)
    dropout = None
    if data.draw(st.booleans(), label="dropout on"):
        dropout = Dropout(data.draw(st.sampled_from([0.1, 0.4])), data.draw(st.sampled_from([0.0, 0.3])),
                          seed=seed, step=7, row_offset=data.draw(st.integers(0, 5)))
    _, grads = bert.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    # every parameter along 4 random directions (each forward costs ~10 ms; entry by entry would take minutes)
    grad_check.function("bert model", lambda: loss_with_dropout(params, batch, cfg, dropout), params, grads,
                        max_elementwise=0, n_directions=4, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# the fast paths against the reference layers


DROPOUTS = {"none": None, "hidden": Dropout(0.2, 0.0, seed=3, step=2, row_offset=1),
            "hidden+attention": Dropout(0.2, 0.3, seed=3, step=2, row_offset=1)}


@pytest.mark.parametrize("dropout", list(DROPOUTS))
@pytest.mark.parametrize("T", [1, 7, 33, 70])
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_fast_paths_are_the_reference_model_in_float64(T, dropout, data):
    """Loss and every gradient of the fast paths (flash attention, norms, the exact-GELU FFN, loss) against the
    reference layers; the bound as test_model.py's (the same sums in other orders: ~1e-15
    relative; a key bias's gradient, zero in exact math, is rounding on both sides, hence the absolute floor)."""
    NH = data.draw(st.sampled_from([2, 4]), label="n_heads")
    cfg = tiny_config(vocab_size=13, dim=16, n_layers=data.draw(st.integers(1, 2), label="L"), n_heads=NH,
                      n_kv_heads=data.draw(st.sampled_from([1, NH]), label="n_kv_heads"), ffn_dim=12, max_seq_len=T,
                      type_vocab_size=2, pad_id=3, impl="fast")
    B = data.draw(st.integers(1, 3), label="B")
    lengths = [T] + data.draw(st.lists(st.integers(0, T), min_size=B - 1, max_size=B - 1), label="lengths")
    seed = data.draw(st.integers(0, 10_000), label="seed")
    params = perturbed_params(cfg, seed)
    batch = make_batch(cfg, [max(n, 1) for n in lengths], seed, T=T, pad_token=3)
    batch["key_mask"] = np.arange(T)[None, :] < np.array(lengths)[:, None]  # (B, T), a row may be all padding
    batch["targets"][~batch["key_mask"]] = IGNORE_INDEX
    reference = assert_fast_matches_reference(
        lambda c: bert.batch_loss_and_grads(params, batch, c, dropout=DROPOUTS[dropout]), cfg, params)
    if dropout == "none":
        logits, logits_ref = bert.mlm_logits(params, batch, cfg), bert.mlm_logits(params, batch, reference)
        assert np.abs(logits - logits_ref).max() <= 1e-10 * np.abs(logits_ref).max()


# ----------------------------------------------------------------------------------------------------------------
# padding, dropout, splits


def test_padded_positions_change_nothing_else():
    cfg = tiny_config(dropout=0.2, attn_dropout=0.3)
    params = perturbed_params(cfg, 5)
    batch = make_batch(cfg, [9, 4, 6], seed=5, T=9)
    changed = {k: v.copy() for k, v in batch.items()}
    pad = ~batch["key_mask"]
    rng = np.random.default_rng(0)
    changed["tokens"][pad] = rng.integers(0, cfg.vocab_size, pad.sum())
    changed["segments"][pad] = rng.integers(0, cfg.type_vocab_size, pad.sum())
    assert (changed["tokens"] != batch["tokens"]).any()
    dropout = Dropout(0.2, 0.3, seed=1, step=3)
    logits = bert.mlm_logits(params, batch, cfg)
    np.testing.assert_array_equal(bert.mlm_logits(params, changed, cfg)[~pad], logits[~pad])
    loss, grads = bert.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    loss2, grads2 = bert.batch_loss_and_grads(params, changed, cfg, dropout=dropout)
    assert loss == loss2
    for name in grads:
        np.testing.assert_array_equal(grads2[name], grads[name], err_msg=name)


def test_dropout_rate_zero_is_no_dropout_bit_for_bit():
    cfg = tiny_config()
    params = perturbed_params(cfg, 2)
    batch = make_batch(cfg, [8, 5], seed=2)
    loss, grads = bert.batch_loss_and_grads(params, batch, cfg)
    loss0, grads0 = bert.batch_loss_and_grads(params, batch, cfg, dropout=Dropout(0.0, 0.0, seed=4, step=9))
    assert loss0 == loss
    for name in grads:
        np.testing.assert_array_equal(grads0[name], grads[name], err_msg=name)
    loss1, _ = bert.batch_loss_and_grads(params, batch, cfg, dropout=Dropout(0.1, 0.1, seed=4, step=9))
    assert loss1 != loss  # and a non-zero rate does drop something


def test_row_chunks_under_dropout_equal_the_whole_batch():
    # micro-batches (and data-parallel ranks) give each row its global row offset, so every row draws the masks it
    # draws in the whole batch: the chunks' weighted losses and gradients add up to the whole batch's
    cfg = tiny_config(dropout=0.3, attn_dropout=0.2)
    params = perturbed_params(cfg, 8)
    batch = make_batch(cfg, [8, 3, 6, 8, 5], seed=8)
    dropout = Dropout(0.3, 0.2, seed=6, step=2, row_offset=4)
    loss, grads = bert.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    loss3, grads3 = accumulate_loss_and_grads(params, batch, cfg, micro_batches=3, dropout=dropout)
    assert abs(loss3 - loss) <= 1e-13 * loss
    assert_grads_close(grads3, grads, 1e-12)
    # row groups side by side (threads) take their rows' offsets the same way
    loss2, grads2 = accumulate_loss_and_grads(params, batch, cfg, micro_batches=1, row_groups=2, dropout=dropout)
    assert abs(loss2 - loss) <= 1e-13 * loss
    assert_grads_close(grads2, grads, 1e-12)
    logits_rows, _ = bert.model_forward(params, {k: v[2:] for k, v in batch.items()}, cfg, dropout=dropout.rows(2))
    logits_all, _ = bert.model_forward(params, batch, cfg, dropout=dropout)
    assert rel_max(logits_rows, logits_all[2:]) <= 1e-13


def test_two_tensor_parallel_ranks_give_one_process_loss_and_gradients():
    cfg = tiny_config(vocab_size=30, pad_id=3, dropout=0.2, attn_dropout=0.3)
    params = perturbed_params(cfg, 4)
    batch = make_batch(cfg, [9, 4, 7], seed=4, T=9, pad_token=3)
    dropout = Dropout(0.2, 0.3, seed=2, step=5)
    want_loss, want_grads = bert.batch_loss_and_grads(params, batch, cfg, dropout=dropout)
    axes = split_axes(cfg)

    def rank(r, comm):
        return bert.batch_loss_and_grads(shard_params(params, axes, r, 2), batch, cfg, tp=comm, dropout=dropout)

    results = on_thread_ranks(2, rank)
    assert results[0][0] == results[1][0] and abs(results[0][0] - want_loss) <= 1e-12 * want_loss
    grads = unshard_params([results[0][1], results[1][1]], axes)
    assert_grads_close(grads, want_grads, 1e-12)
    for name in params:
        if axes[name] is None:  # replicated parameters get the same gradient on every rank
            np.testing.assert_array_equal(results[0][1][name], results[1][1][name])


# ----------------------------------------------------------------------------------------------------------------
# fill_mask, counts, training


def test_fill_mask_returns_each_masks_top_k_by_probability():
    cfg = tiny_config()
    params = perturbed_params(cfg, 6)
    tokens = np.array([[1, 5, 0, 7, 0, 2], [1, 9, 9, 0, 2, 2]])
    key_mask = np.array([[True] * 6, [True] * 5 + [False]])
    out = bert.fill_mask(params, cfg, tokens, key_mask=key_mask, top_k=3)
    assert [[t for t, _ in row] for row in out] == [[2, 4], [3]]
    logits = bert.mlm_logits(params, {"tokens": tokens, "key_mask": key_mask}, cfg)
    for b, row in enumerate(out):
        for t, guesses in row:
            z = logits[b, t] - logits[b, t].max()
            probs = np.exp(z) / np.exp(z).sum()
            assert [v for v, _ in guesses] == list(np.argsort(-probs, kind="stable")[:3])
            assert all(abs(p - probs[v]) <= 1e-12 for v, p in guesses)
    assert bert.fill_mask(params, cfg, tokens[0], top_k=1) == [(2, out[0][0][1][:1]), (4, out[0][1][1][:1])]
    with pytest.raises(ValueError, match="top_k=0"):
        bert.fill_mask(params, cfg, tokens, top_k=0)


def test_flops_per_token_counts_the_encoder_and_the_head_at_the_masked_share():
    cfg = get_preset("bert-base")
    C, F, V, L, T = 768, 3072, 30522, 12, 512
    forward = 2 * L * (4 * C * C + 2 * C * F) + L * 4 * C * T + 2 * 0.15 * (C * C + C * V)
    assert flops_per_token(cfg, T) == round(3 * forward)


def test_a_tiny_model_overfits_one_batch():
    cfg = tiny_config()
    params = init_params(cfg, seed=0, dtype=np.float64)
    batch = make_batch(cfg, [12, 12, 10, 12], seed=0)
    state = adamw_init(params)
    first, _ = bert.batch_loss_and_grads(params, batch, cfg)
    for _ in range(150):
        loss, grads = bert.batch_loss_and_grads(params, batch, cfg)
        adamw_update(params, grads, state, lr=1e-2, weight_decay=0.0)
    assert first > 3.0 and loss < 0.05 * first, (first, loss)


# ----------------------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("override,text", [
    ({"norm_first": True}, "norm_first=True"), ({"mlp": "gelu"}, "mlp='gelu'"), ({"type_vocab_size": 0},
     "type_vocab_size=0"), ({"tie_embeddings": False}, "tie_embeddings=False"), ({"norm": "rmsnorm"}, "norm="),
])
def test_configs_bert_does_not_compute_are_refused_in_one_line(override, text):
    with pytest.raises(ValueError) as err:
        bert.param_specs(tiny_config(**override))
    assert text in str(err.value) and "\n" not in str(err.value)


def test_bad_batches_are_refused_in_one_line():
    cfg = tiny_config()
    params = perturbed_params(cfg, 1)
    good = make_batch(cfg, [5, 3], seed=1)
    cases = [({"segments": good["segments"] + 3}, "segment ids"), ({"key_mask": good["key_mask"].astype(int)},
             "key_mask"), ({"tokens": good["tokens"] + cfg.vocab_size}, "token ids"),
             ({"targets": good["targets"][:, :2]}, "targets")]
    for change, text in cases:
        with pytest.raises(ValueError) as err:
            bert.batch_loss_and_grads(params, {**good, **change}, cfg)
        assert text in str(err.value) and "\n" not in str(err.value)
    long = make_batch(cfg, [13], seed=1)
    with pytest.raises(ValueError, match="max_seq_len=12"):
        bert.batch_loss(params, long, cfg)


def test_the_fill_mask_example_trains_and_fills_in_blanks(tmp_path, monkeypatch, capsys):
    """examples/bert_fill_mask.py on the default corpus (built in a fresh cache), 40 steps: the validation MLM loss
    falls below its untrained value, and fill_mask prints five ranked guesses for each sentence."""
    import importlib.util

    monkeypatch.setenv("NPLLM_CACHE", str(tmp_path / "cache"))
    path = Path(__file__).resolve().parents[1] / "examples" / "bert_fill_mask.py"
    spec = importlib.util.spec_from_file_location("bert_fill_mask", path)
    example = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bert_fill_mask", example)  # its dataclass looks its module up there
    spec.loader.exec_module(example)
    assert example.main(["--steps=40", "--warmup_steps=10"]) == 0
    out = capsys.readouterr().out
    before = float(re.search(r"before training: validation MLM loss ([\d.]+)", out).group(1))
    after = float(re.search(r"after 40 steps .*validation MLM loss ([\d.]+)", out).group(1))
    assert after < before - 0.5, out
    guesses = [line for line in out.splitlines() if line.strip().startswith("->")]
    assert len(guesses) == len(example.SENTENCES) and all(line.count(",") >= 4 for line in guesses), out
