"""Tests for npllm/pairs.py: source/target JSONL records -> the encoder-decoder's padded batches.

Records read with their line numbers (BOM, CRLF, blank lines); every malformed line reported as FILE:LINE in one
error; the encoding (src = source + eos, tokens = bos + target, targets = target + eos); too-long pairs refused by
line with the --seq_len that fits; padding to the batch or to a fixed length (masks False and targets -100 exactly at
the padding); the sampler's (seed, step, rank) rule and resume; validation batches in order; load_pairs_data; and a
batch through the model (the loss counts exactly the target tokens and eos).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from npllm.config import get_preset
from npllm.layers.loss import IGNORE_INDEX
from npllm.models import batch_loss_and_grads, init_params
from npllm.pairs import (
    PairSampler,
    bos_of,
    encode_pair,
    encode_pairs,
    load_pair_records,
    load_pairs_data,
    pair_eval_batches,
)
from npllm.tokenizer import train_tokenizer

SEQ = 18  # the longest digit pair: "seven seven seven" + eos
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A character tokenizer of lowercase words, digits and spaces (eos = bos = 0)."""
    root = tmp_path_factory.mktemp("pairs_tok")
    (root / "text.txt").write_text(" ".join(WORDS) + " 0123456789 abcdefghijklmnopqrstuvwxyz", encoding="utf-8")
    return train_tokenizer([root / "text.txt"], None, root / "tok", kind="char")


def digit_pairs(n):
    """n pairs "seven two" -> "72", in a fixed order."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        digits = rng.integers(0, 10, rng.integers(1, 4))
        out.append({"source": " ".join(WORDS[d] for d in digits), "target": "".join(map(str, digits))})
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# records


def test_records_are_read_with_their_line_numbers_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('\ufeff{"source": "a", "target": "b"}\n\n   \n{"source": "", "target": "", "id": 7}\r\n'
                    '{"target": "e", "source": "d"}', encoding="utf-8")  # BOM, CRLF, no final newline
    assert load_pair_records(path) == [dict(source="a", target="b", line=1), dict(source="", target="", line=4),
                                       dict(source="d", target="e", line=5)]


def test_every_malformed_record_is_reported_with_its_line_in_one_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"source": "a", "target": "b"}\n'
                     b'{"source": "a"\n'  # 2: bad JSON
                     b'[1, 2]\n'  # 3: not an object
                     b'{"source": "a"}\n'  # 4: no target
                     b'{"source": 3, "target": "b"}\n'  # 5: not a string
                     b'\xff\xfe\n')  # 6: not UTF-8
    with pytest.raises(ValueError) as info:
        load_pair_records(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"5 malformed record(s) in {path}: ")
    for line, reason in ((2, "not valid JSON"), (3, "expected a JSON object"), (4, "missing key 'target'"),
                         (5, "'source' must be a string, got int"), (6, "not UTF-8")):
        assert f"{path}:{line}: {reason}" in message
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_pair_records(tmp_path / "nowhere.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="holds no records"):
        load_pair_records(tmp_path / "blank.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# encoding and padding


def test_a_pair_is_source_eos_and_bos_target_shifted_by_one(tok):
    src, tokens, targets = encode_pair(tok, "seven two", "72")
    assert src == tok.encode("seven two") + [tok.eos_id]
    assert tokens == [bos_of(tok)] + tok.encode("72") and targets == tok.encode("72") + [tok.eos_id]
    assert tokens[1:] == targets[:-1]  # teacher forcing: the input at t is the target at t - 1
    assert encode_pair(tok, "", "") == ([tok.eos_id], [bos_of(tok)], [tok.eos_id])

    class NoBos:  # a tokenizer without bos starts the decoder with eos
        bos_id, eos_id = None, 5

        def encode(self, text):
            return [len(text)]

    assert bos_of(NoBos()) == 5 and encode_pair(NoBos(), "ab", "c")[1] == [5, 1]


def test_too_long_pairs_are_refused_naming_their_lines_and_the_seq_len_that_fits(tok):
    records = [dict(r, line=i + 10) for i, r in enumerate([{"source": "one", "target": "1"},
                                                           {"source": "seven seven", "target": "77"},
                                                           {"source": "two", "target": "2222222"}])]
    with pytest.raises(ValueError) as info:
        encode_pairs(records, tok, 7, source="f.jsonl")
    message = str(info.value)
    assert message.startswith("2 pair(s) longer than seq_len=7 tokens (shorten them or train with --seq_len=12 or "
                              "more): f.jsonl:11: source 12 tokens (with eos), target 3 tokens (with bos); "
                              "f.jsonl:12: source 4 tokens (with eos), target 8 tokens (with bos)")
    examples = encode_pairs(records, tok, 12)  # exactly long enough
    assert examples.src.shape == (3, 12) and examples.tokens.shape == (3, 8)
    assert list(examples.lines) == [10, 11, 12]


@pytest.mark.parametrize("length", [None, SEQ])
def test_batches_pad_to_the_longest_pair_or_a_fixed_length(tok, length):
    records = [dict(r, line=i + 1) for i, r in enumerate(digit_pairs(20))]
    examples = encode_pairs(records, tok, SEQ)
    index = np.array([3, 0, 7])
    batch = examples.batch(index, length)
    encoded = [encode_pair(tok, records[i]["source"], records[i]["target"]) for i in index]
    S = length or max(len(s) for s, _, _ in encoded)
    T = length or max(len(x) for _, x, _ in encoded)
    assert batch["src"].shape == batch["src_mask"].shape == (3, S)
    assert batch["tokens"].shape == batch["tgt_mask"].shape == batch["targets"].shape == (3, T)
    assert batch["src"].dtype == batch["tokens"].dtype == batch["targets"].dtype == np.int64
    assert batch["src_mask"].dtype == batch["tgt_mask"].dtype == bool
    for row, (s, x, y) in enumerate(encoded):
        assert batch["src"][row, batch["src_mask"][row]].tolist() == s and batch["src_mask"][row, :len(s)].all()
        assert batch["tokens"][row, batch["tgt_mask"][row]].tolist() == x
        assert batch["targets"][row, :len(y)].tolist() == y
        assert (batch["targets"][row, len(y):] == IGNORE_INDEX).all()  # exactly the padding is ignored
        assert (batch["src"][row, len(s):] == tok.eos_id).all() and not batch["src_mask"][row, len(s):].any()
        assert not batch["tgt_mask"][row, len(x):].any()
    with pytest.raises(ValueError, match="length=3 is shorter than the batch's longest pair"):
        examples.batch(index, 3)


# ----------------------------------------------------------------------------------------------------------------
# the sampler and validation batches


def test_sampler_is_a_function_of_seed_step_and_rank(tok):
    examples = encode_pairs([dict(r, line=i + 1) for i, r in enumerate(digit_pairs(30))], tok, SEQ)
    sampler = PairSampler(examples, batch_size=4, seq_len=SEQ, seed=5)
    batches = [sampler.next_batch() for _ in range(3)]
    assert set(batches[0]) == {"src", "src_mask", "tokens", "tgt_mask", "targets"}
    again = PairSampler(examples, batch_size=4, seq_len=SEQ, seed=5)
    again.load_state_dict(dict(sampler.state_dict(), step=1))  # resume at step 1
    resumed = again.next_batch()
    for key in batches[1]:
        np.testing.assert_array_equal(resumed[key], batches[1][key])
    ranks = [PairSampler(examples, batch_size=4, seq_len=SEQ, seed=5, rank=r, world_size=2).sample(7)
             for r in range(2)]
    rows = [{tuple(b["src"][i][b["src_mask"][i]]) for i in range(4)} for b in ranks]
    assert len(rows[0] | rows[1]) == 8  # data-parallel ranks hold distinct pairs within a step
    fixed = PairSampler(examples, batch_size=4, seq_len=SEQ, seed=5, pad="fixed").next_batch()
    assert fixed["src"].shape == fixed["tokens"].shape == (4, SEQ)
    with pytest.raises(ValueError, match="only 30 training pairs"):
        PairSampler(examples, batch_size=16, seq_len=SEQ, seed=0, world_size=2)
    with pytest.raises(ValueError, match="pad="):
        sampler.load_state_dict(dict(sampler.state_dict(), pad="fixed"))
    with pytest.raises(ValueError, match=f"hold up to {SEQ} tokens a side but seq_len=8"):
        PairSampler(examples, batch_size=4, seq_len=8, seed=0)


def test_validation_batches_cover_the_pairs_in_order(tok):
    examples = encode_pairs([dict(r, line=i + 1) for i, r in enumerate(digit_pairs(10))], tok, SEQ)
    batches = list(pair_eval_batches(examples, 4))
    assert [len(b["src"]) for b in batches] == [4, 4, 2]
    for b, start in zip(batches, (0, 4, 8)):
        np.testing.assert_array_equal(b["targets"], examples.batch(np.arange(start, start + len(b["src"])))["targets"])
    assert len(list(pair_eval_batches(examples, 4, max_batches=2))) == 2


def test_load_pairs_data_splits_a_fixed_tenth_and_records_the_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "pairs.jsonl", digit_pairs(50))
    data = load_pairs_data(path, tok, SEQ)
    assert data.unit == "pairs" and data.dir == str(path.resolve()) and data.tokenizer is tok
    assert (len(data.train), len(data.val)) == (45, 5)
    assert not set(data.train.lines) & set(data.val.lines)
    assert data.sft == dict(path=str(path.resolve()), sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                            records=50, train_records=45, val_records=5)
    assert load_pairs_data(path, tok, SEQ).val.lines.tolist() == data.val.lines.tolist()  # the same split every time


def test_a_batch_through_the_model_counts_exactly_the_target_tokens(tmp_path, tok):
    """The loss of a padded batch equals the mean over its real target tokens (and eos) of the per-pair losses."""
    cfg = get_preset("seq2seq-nano", vocab_size=tok.vocab_size, dim=16, n_heads=2, n_kv_heads=2, ffn_dim=32,
                     n_layers=1, n_decoder_layers=1, max_seq_len=SEQ, dropout=0.0, attn_dropout=0.0)
    params = init_params(cfg, seed=0, dtype=np.float64)
    examples = encode_pairs([dict(r, line=i + 1) for i, r in enumerate(digit_pairs(6))], tok, SEQ)
    batch = examples.batch(np.arange(6))
    loss, grads = batch_loss_and_grads(params, batch, cfg)
    per_pair = [(batch_loss_and_grads(params, examples.batch(np.array([i])), cfg)[0], examples.tgt_len[i])
                for i in range(6)]
    assert abs(loss - sum(l * n for l, n in per_pair) / sum(n for _, n in per_pair)) <= 1e-12 * loss
    assert set(grads) == set(params)
