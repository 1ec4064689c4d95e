"""Tests for npllm/mlm.py: the masked-language-model objective and its batches.

- Statistics over 4096 x 64 positions: the chosen share is 0.15 and, within the chosen, [MASK] / random / unchanged
  are 0.8 / 0.1 / 0.1, each within 5 binomial standard deviations (a false failure has probability < 1e-6 per
  check); random replacements cover the ordinary range [random_low, random_high) uniformly (every id appears, the
  counts pass a chi-square bound at 5 sigma); specials and padding are never chosen; targets are the originals.
- Determinism: the draws are a pure function of (seed, step, global row, position): row chunks with their row offsets,
  data-parallel samplers (rank r of 4 with batch B == rows r*B ... of one process with batch 4B), and a resumed
  sampler give exactly one process's masks; validation batches are the same at every call and for any batch size.
- load_mlm_data, mlm_spec and encode_masked_text on a real BPE tokenizer (the session's data_dir), and their errors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from npllm.config import get_preset
from npllm.layers.loss import IGNORE_INDEX
from npllm.mlm import (
    MASK_SHARE, RANDOM_SHARE, MLMSampler, MLMSpec, encode_masked_text, load_mlm_data, mask_tokens, mlm_eval_batches,
    mlm_key, mlm_spec,
)
from npllm.models import bert
from npllm.models import init_params

SPEC = MLMSpec(cls_id=1, sep_id=2, mask_id=0, special_ids=(0, 1, 2), random_low=3, random_high=40)


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """count is within ``sigmas`` binomial standard deviations of n * p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def random_rows(B, T, seed=0):
    """Token rows [CLS] ordinary ids [SEP] with an inner EOS (a document boundary) here and there."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(SPEC.random_low, SPEC.random_high, (B, T))  # (B, T)
    tokens[:, 0], tokens[:, -1] = SPEC.cls_id, SPEC.sep_id
    tokens[rng.random((B, T)) < 0.02] = SPEC.sep_id
    return tokens


def test_masking_statistics_are_15_percent_then_80_10_10():
    tokens = random_rows(4096, 64)
    key_mask = np.ones(tokens.shape, bool)
    key_mask[::3, 50:] = False  # padded rows: never chosen
    inputs, targets = mask_tokens(tokens, key_mask, SPEC, mlm_key(seed=3, step=11))
    candidate = key_mask & ~np.isin(tokens, SPEC.special_ids)
    chosen = targets != IGNORE_INDEX
    assert not (chosen & ~candidate).any()  # specials and padding never
    np.testing.assert_array_equal(targets[chosen], tokens[chosen])
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # nothing else changes
    n_cand, n_chosen = int(candidate.sum()), int(chosen.sum())
    assert within(n_chosen, n_cand, 0.15), n_chosen / n_cand

    masked = chosen & (inputs == SPEC.mask_id)
    unchanged = chosen & (inputs == tokens)
    replaced = chosen & ~masked & ~unchanged  # a random replacement that drew the original id counts as unchanged
    n_range = SPEC.random_high - SPEC.random_low
    p_same = RANDOM_SHARE / n_range  # a random draw equal to the original
    assert within(int(masked.sum()), n_chosen, MASK_SHARE)
    assert within(int(replaced.sum()), n_chosen, RANDOM_SHARE - p_same)
    assert within(int(unchanged.sum()), n_chosen, 1 - MASK_SHARE - RANDOM_SHARE + p_same)

    new_ids = inputs[replaced]
    assert new_ids.min() >= SPEC.random_low and new_ids.max() < SPEC.random_high
    counts = np.bincount(new_ids - SPEC.random_low, minlength=n_range)  # (n_range,)
    assert (counts > 0).all()
    expected = counts.sum() / n_range
    chi2 = ((counts - expected) ** 2 / expected).sum()  # ~ chi-square with n_range - 1 degrees of freedom
    assert chi2 <= (n_range - 1) + 5 * math.sqrt(2 * (n_range - 1)), chi2


def test_every_draw_depends_on_seed_step_global_row_and_position_only():
    tokens = random_rows(12, 20, seed=1)
    key = mlm_key(seed=5, step=2)
    inputs, targets = mask_tokens(tokens, None, SPEC, key, row_offset=40)
    for start, stop in [(0, 5), (5, 6), (6, 12)]:  # chunks at their global rows: the same draws
        part = mask_tokens(tokens[start:stop], None, SPEC, key, row_offset=40 + start)
        np.testing.assert_array_equal(part[0], inputs[start:stop])
        np.testing.assert_array_equal(part[1], targets[start:stop])
    again = mask_tokens(tokens, None, SPEC, key, row_offset=40)
    assert all(np.array_equal(a, b) for a, b in zip(again, (inputs, targets)))
    for other in (mlm_key(seed=5, step=3), mlm_key(seed=6, step=2)):  # another step or seed: other draws
        assert not np.array_equal(mask_tokens(tokens, None, SPEC, other, row_offset=40)[1], targets)
    assert not np.array_equal(mask_tokens(tokens, None, SPEC, key, row_offset=41)[1], targets)


def test_data_parallel_and_resumed_samplers_mask_exactly_as_one_process():
    stream = np.random.default_rng(0).integers(3, 40, 5000).astype(np.uint16)
    B, T, world = 3, 16, 4
    one = MLMSampler(stream, world * B, T, seed=9, spec=SPEC)
    ranks = [MLMSampler(stream, B, T, seed=9, spec=SPEC, rank=r, world_size=world) for r in range(world)]
    for step in range(3):
        whole = one.next_batch()
        parts = [s.next_batch() for s in ranks]
        for name in ("tokens", "segments", "key_mask", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), whole[name], err_msg=name)
    batch = whole
    assert set(batch) == {"tokens", "segments", "key_mask", "targets"}
    assert batch["tokens"].shape == (world * B, T) and batch["tokens"].dtype == np.int64
    assert (batch["tokens"][:, 0] == SPEC.cls_id).all() and (batch["tokens"][:, -1] == SPEC.sep_id).all()
    assert not batch["segments"].any() and batch["key_mask"].all()
    originals = np.where(batch["targets"] != IGNORE_INDEX, batch["targets"], batch["tokens"])
    starts = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, T - 2) == row, axis=1))[0])
              for row in originals[:, 1:-1]]  # every row is a window of the stream (masked positions restored)
    assert len(starts) == world * B

    resumed = MLMSampler(stream, world * B, T, seed=9, spec=SPEC)
    resumed.load_state_dict(one.state_dict())
    following, resumed_batch = one.next_batch(), resumed.next_batch()
    for name in following:
        np.testing.assert_array_equal(resumed_batch[name], following[name])


def test_validation_batches_are_fixed():
    stream = np.random.default_rng(1).integers(3, 40, 1000).astype(np.uint16)
    first = list(mlm_eval_batches(stream, 4, 12, SPEC))
    assert len(first) == math.ceil((1000 // 10) / 4) and first[-1]["tokens"].shape == (100 - 24 * 4, 12)
    again = list(mlm_eval_batches(stream, 4, 12, SPEC))
    by_7 = {k: np.concatenate([b[k] for b in mlm_eval_batches(stream, 7, 12, SPEC)]) for k in first[0]}
    for name in first[0]:
        whole = np.concatenate([b[name] for b in first])
        np.testing.assert_array_equal(np.concatenate([b[name] for b in again]), whole)
        np.testing.assert_array_equal(by_7[name], whole)  # the rows and masks do not depend on the batch size
    originals = np.where(by_7["targets"] != IGNORE_INDEX, by_7["targets"], by_7["tokens"])
    np.testing.assert_array_equal(originals[:, 1:-1].reshape(-1), stream[:1000])  # the rows tile the stream
    assert len(list(mlm_eval_batches(stream, 4, 12, SPEC, max_batches=2))) == 2
    other = np.concatenate([b["targets"] for b in mlm_eval_batches(stream, 4, 12, SPEC, seed=1)])
    assert not np.array_equal(other, by_7["targets"])


def test_a_row_with_nothing_chosen_adds_no_target():
    # the draws are not forced: a row of specials only gets no target, and a batch without any has loss 0
    cfg = get_preset("bert-nano", vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16,
                     max_seq_len=8)
    tokens = np.array([[1, 2, 2, 2, 2, 2, 2, 2]])
    inputs, targets = mask_tokens(tokens, None, SPEC, mlm_key(0, 0))
    assert (targets == IGNORE_INDEX).all() and np.array_equal(inputs, tokens)
    params = init_params(cfg, seed=0, dtype=np.float64)
    loss, grads = bert.batch_loss_and_grads(params, {"tokens": inputs, "targets": targets}, cfg)
    assert loss == 0.0 and not any(g.any() for g in grads.values())


def test_load_mlm_data_and_the_spec_of_a_bpe_tokenizer(data_dir):
    cfg = get_preset("bert-nano", vocab_size=416, max_seq_len=32)
    data = load_mlm_data(data_dir, cfg, 32)
    assert data.unit == "tokens" and len(data.train) > len(data.val) > 0
    tok = data.tokenizer
    spec = mlm_spec(cfg, tok)
    assert (spec.cls_id, spec.sep_id, spec.mask_id) == (tok.bos_id, tok.eos_id, 0) == (1, 2, 0)
    assert (spec.random_low, spec.random_high) == (3, tok.vocab_size) == (3, 400)  # not the model's padding rows
    batch = MLMSampler(data.train, 4, 32, seed=0, spec=spec).next_batch()
    assert batch["tokens"].max() < 400 and (batch["targets"] != IGNORE_INDEX).any()

    ids = encode_masked_text(tok, "The [MASK] statement is [MASK].", spec)
    assert ids[0] == 1 and ids[-1] == 2 and list(ids).count(0) == 2
    assert tok.decode([i for i in ids if i != 0]) == tok.decode(tok.encode("The statement is."))
    with pytest.raises(ValueError, match=r"has no \[MASK\]"):
        encode_masked_text(tok, "no mask here", spec)

    for bad, text in [(dict(mask_id=1), "mask_id=1 is an id the tokenizer uses"),
                      (dict(mask_id=7), "mask_id=7 is an id the tokenizer uses")]:
        with pytest.raises(ValueError) as err:
            load_mlm_data(data_dir, get_preset("bert-nano", vocab_size=416, **bad), 32)
        assert text in str(err.value) and "\n" not in str(err.value)
    assert mlm_spec(get_preset("bert-nano", vocab_size=416, mask_id=405), tok).mask_id == 405  # a padding row
    with pytest.raises(ValueError, match="max_seq_len=32"):
        load_mlm_data(data_dir, cfg, 33)
    with pytest.raises(ValueError, match="arch='encoder'"):
        load_mlm_data(data_dir, get_preset("nano", vocab_size=416), 32)


def test_bad_specs_are_refused_in_one_line():
    for fields, text in [(dict(random_low=0), "mask_id=0 lies in the random range"),
                         (dict(special_ids=(1, 2)), "must hold"), (dict(random_high=3), "random_high=3")]:
        with pytest.raises(ValueError) as err:
            MLMSpec(**{**SPEC.__dict__, **fields})
        assert text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="seq_len=2"):
        MLMSampler(np.arange(100), 2, 2, seed=0, spec=SPEC)
