"""Tests for npllm/evaluate.py: the sliding-window plan, the loss against a direct per-token computation, the CLI.

The direct computation scores target t with an explicitly built context (one forward per target), from the
plan's definition rather than its code:
  stride = 1:        context of target t = tokens[max(0, t - seq_len) : t]
  stride = seq_len:  disjoint windows, context of target t = tokens[((t - 1) // seq_len) * seq_len : t]
"""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.config import get_preset
from npllm.data import write_tokens
from npllm.evaluate import evaluate_tokens, main, sliding_windows
from npllm.models import init_params
from npllm.models.decoder import model_forward
from npllm.sampling import log_softmax

CFG = get_preset("nano", vocab_size=400, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)


def params64(cfg=CFG, seed=0, scale=5.0):
    p = init_params(cfg, seed=seed, dtype=np.float64)
    return {n: w * scale if w.ndim == 2 else w for n, w in p.items()}


@settings(max_examples=25, deadline=None)
@given(n_tokens=st.integers(2, 200), seq_len=st.integers(1, 40), data=st.data())
def test_every_target_is_scored_exactly_once_with_the_context_promised(n_tokens, seq_len, data):
    stride = data.draw(st.integers(1, seq_len), label="stride")
    windows = sliding_windows(n_tokens, seq_len, stride)
    scored = []
    for w in windows:
        assert 0 <= w.start < w.end <= n_tokens - 1 and w.end - w.start <= seq_len
        assert 1 <= w.n_scored <= w.end - w.start
        targets = list(range(w.start + 1, w.end + 1))  # positions of the window's targets
        for t in targets[-w.n_scored:]:
            scored.append(t)
            context = t - w.start  # tokens the window shows before target t
            if t > seq_len:  # outside the first window, at least seq_len - stride + 1 tokens of context
                assert context >= seq_len - stride + 1
                assert w.end - w.start == seq_len  # later windows are always full length
            else:
                assert context == t  # the first window starts at token 0
    assert sorted(scored) == list(range(1, n_tokens))  # each target once, none missing


def direct_nll(params, cfg, tokens, context_start):
    """Per-target -log p, target t scored from tokens[context_start(t) : t] by its own forward."""
    out = []
    for t in range(1, len(tokens)):
        ctx = np.array([tokens[context_start(t):t]])
        logits, _ = model_forward(params, ctx, cfg)
        out.append(-log_softmax(logits[0, -1])[tokens[t]])
    return np.array(out)


@pytest.mark.parametrize("n_tokens, seq_len, stride, start_rule", [
    (17, 6, 1, lambda t, L=6: max(0, t - L)),
    (19, 6, 6, lambda t, L=6: ((t - 1) // L) * L),  # 18 targets: three disjoint windows of 6
    (17, 6, 6, lambda t, L=6: min(((t - 1) // L) * L, 16 - L)),  # 16 targets: the last window ends at the end
    (17, 16, 16, lambda t: 0),  # everything fits in one window
])
def test_loss_is_the_mean_over_exactly_the_reported_tokens(n_tokens, seq_len, stride, start_rule):
    params = params64()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, n_tokens)
    nll = direct_nll(params, CFG, tokens, start_rule)
    result = evaluate_tokens(params, CFG, tokens, seq_len=seq_len, stride=stride, batch_size=3)
    assert result["n_tokens"] == len(tokens) - 1 == len(nll)
    assert math.isclose(result["loss"], nll.mean(), rel_tol=1e-12)
    assert math.isclose(result["ppl"], math.exp(nll.mean()), rel_tol=1e-12)


def test_overlapping_windows_match_a_direct_computation_with_the_plans_context():
    params = params64(seed=1)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 40)
    seq_len, stride = 8, 3
    # chunk rule from the docs: targets 1..8 from position 0, then chunks of 3 whose window ends at the chunk's end
    def start(t):
        if t <= seq_len:
            return 0
        chunk_end = min(seq_len + ((t - seq_len - 1) // stride + 1) * stride, len(tokens) - 1)
        return chunk_end - seq_len
    nll = direct_nll(params, CFG, tokens, start)
    result = evaluate_tokens(params, CFG, tokens, seq_len=seq_len, stride=stride)
    assert result["n_tokens"] == 39
    assert math.isclose(result["loss"], nll.mean(), rel_tol=1e-12)


def test_batch_size_does_not_change_the_result():
    params = params64(seed=2)
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, 100)
    a = evaluate_tokens(params, CFG, tokens, seq_len=16, stride=5, batch_size=1)
    b = evaluate_tokens(params, CFG, tokens, seq_len=16, stride=5, batch_size=7)
    assert a["n_tokens"] == b["n_tokens"] == 99
    assert math.isclose(a["loss"], b["loss"], rel_tol=1e-12)


@pytest.mark.parametrize("kwargs, word", [
    (dict(seq_len=17), "max_seq_len"), (dict(seq_len=8, stride=9), "stride"), (dict(seq_len=0), "seq_len"),
    (dict(stride=0), "stride"), (dict(batch_size=0), "batch_size"),
])
def test_bad_window_options_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        evaluate_tokens(params64(), CFG, np.arange(30), **kwargs)


def test_too_few_tokens_raise():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate_tokens(params64(), CFG, np.array([5]))


# ---------------------------------------------------------------------------------------------------------
# command line, on a checkpoint saved the way npllm.train saves one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.tiny_run import make_run

    return make_run(tmp_path_factory.mktemp("run"))


def test_cli_text_file_matches_the_python_function(run_dir, tmp_path, capsys):
    from npllm.run import load_trained

    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox.\n", encoding="utf-8")
    assert main([f"--ckpt={run_dir}", f"--data={text}", "--json", "--seq_len=8", "--stride=4"]) == 0
    got = json.loads(capsys.readouterr().out)
    params, cfg, tok = load_trained(run_dir)[:3]
    tokens = [tok.eos_id] + tok.encode(text.read_text()) + [tok.eos_id]
    expected = evaluate_tokens(params, cfg, np.array(tokens), seq_len=8, stride=4)
    assert got["n_tokens"] == len(tokens) - 1 == expected["n_tokens"]
    assert math.isclose(got["loss"], expected["loss"], rel_tol=1e-12)
    assert math.isclose(got["ppl"], math.exp(got["loss"]), rel_tol=1e-12)


def test_cli_shard_dir_and_max_tokens(run_dir, tmp_path, capsys):
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run_dir)[:3]
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, 70)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_tokens(data_dir / "val.bin", tokens, cfg.vocab_size)
    assert main([f"--ckpt={run_dir}", f"--data={data_dir}", "--max_tokens=50", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    expected = evaluate_tokens(params, cfg, tokens[:50])
    assert got["n_tokens"] == 49 and math.isclose(got["loss"], expected["loss"], rel_tol=1e-12)
    assert main([f"--ckpt={run_dir}", f"--data={data_dir / 'val.bin'}"]) == 0
    assert "69 tokens scored" in capsys.readouterr().out


@pytest.mark.parametrize("extra, word", [
    (["--data=/no/such/file"], "no such file"), (["--data=DATA", "--stride=0"], "stride"),
    (["--data=DATA", "--seq_len=99"], "max_seq_len"), (["--data=DATA", "--max_tokens=1"], "max_tokens"),
    (["--data=DATA", "--batch_size=x"], "is not an integer"), ([], "--data"),
])
def test_cli_bad_input_is_one_clear_line(run_dir, tmp_path, capsys, extra, word):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 20)
    argv = [f"--ckpt={run_dir}"] + [a.replace("DATA", str(text)) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main([f"--ckpt={tmp_path / 'nope'}", f"--data={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no checkpoint" in err


# ---------------------------------------------------------------------------------------------------------
# an encoder (BERT): the MLM loss and accuracy on fixed masked rows


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tests.arch_runs import bert_run

    return bert_run(tmp_path_factory)


def mlm_directly(run, text_file, seq_len, seed, batch_size=8):
    """Independently of npllm.evaluate: the MLM loss and accuracy from bert.mlm_logits at every position of the
    rows mlm_eval_batches masks, the text tokenized as one document ([eos] + text + [eos])."""
    from npllm.layers.loss import IGNORE_INDEX
    from npllm.mlm import mlm_eval_batches, mlm_spec
    from npllm.models.bert import mlm_logits
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run)[:3]
    tokens = np.array([tok.eos_id] + tok.encode(text_file.read_text(encoding="utf-8")) + [tok.eos_id])
    nll, correct, n = 0.0, 0, 0
    for batch in mlm_eval_batches(tokens, batch_size, seq_len, mlm_spec(cfg, tok), seed=seed):
        logp = log_softmax(np.asarray(mlm_logits(params, batch, cfg), dtype=np.float64))  # (B, T, V)
        masked = batch["targets"] != IGNORE_INDEX  # (B, T)
        y = batch["targets"][masked]  # (N,)
        nll -= logp[masked][np.arange(len(y)), y].sum()
        correct += int((logp[masked].argmax(axis=-1) == y).sum())
        n += len(y)
    return nll / n, correct, n


def test_mlm_evaluation_equals_a_direct_count(bert_dir, tmp_path, capsys):
    """The run's own seq_len (12) and seed (5) by default; loss, perplexity and accuracy as counted directly."""
    corpus = tmp_path / "eval.txt"
    corpus.write_text((bert_dir.parent / "corpus.txt").read_text(encoding="utf-8")[-4000:], encoding="utf-8")
    assert main([f"--ckpt={bert_dir}", f"--data={corpus}", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["seq_len"] == 12 and got["seed"] == 5
    loss, correct, n = mlm_directly(bert_dir, corpus, 12, 5)
    assert got["n_masked"] == n and got["accuracy"] == correct / n and 0 < correct < n
    assert math.isclose(got["loss"], loss, rel_tol=1e-6) and math.isclose(got["ppl"], math.exp(got["loss"]))
    assert main([f"--ckpt={bert_dir}", f"--data={corpus}", "--seq_len=20", "--seed=0", "--batch_size=3",
                 "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    loss, correct, n = mlm_directly(bert_dir, corpus, 20, 0)
    assert other["n_masked"] == n != got["n_masked"] and other["accuracy"] == correct / n
    assert math.isclose(other["loss"], loss, rel_tol=1e-6)
    assert main([f"--ckpt={bert_dir}", f"--data={corpus}"]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"MLM loss {got['loss']:.4f} | perplexity {got['ppl']:.3f} | accuracy "
                           f"{got['accuracy']:.2%} | {got['n_masked']:,} masked tokens in ") and "(mask seed 5)" in line


def test_mlm_evaluation_of_a_hugging_face_directory(bert_dir, tmp_path, capsys):
    """Without a run's meta: rows of max_seq_len, mask seed 0; the same numbers as the run with those options."""
    from npllm.convert import to_hf

    hf_dir = to_hf(bert_dir, tmp_path / "hf")
    corpus = bert_dir.parent / "corpus.txt"
    assert main([f"--ckpt={hf_dir}", f"--data={corpus}", "--max_tokens=2000", "--json"]) == 0
    from_hf = json.loads(capsys.readouterr().out)
    assert main([f"--ckpt={bert_dir}", f"--data={corpus}", "--max_tokens=2000", "--seq_len=32", "--seed=0",
                 "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_hf["seq_len"] == 32 and from_hf["seed"] == 0 and from_hf["n_masked"] == from_run["n_masked"]
    assert math.isclose(from_hf["loss"], from_run["loss"], rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# an encoder-decoder: teacher-forced loss and exact match on --pairs


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    from tests.arch_runs import seq2seq_run

    return seq2seq_run(tmp_path_factory)


@pytest.fixture(scope="module")
def test_pairs(seq2seq_dir):
    """30 held-out-style pairs: 20 reversals (the task; most come out right) and 10 wrong targets (never right)."""
    from tests.arch_runs import reverse_words, write_pairs

    words = reverse_words(30, seed=7)
    targets = [w[::-1] for w in words[:20]] + [w + "a" for w in words[20:]]
    return write_pairs(seq2seq_dir.parent / "test_pairs.jsonl", words, targets), words, targets


def pairs_directly(run, words, targets, beams=1, max_new_tokens=5):
    """Independently of npllm.evaluate: the loss of one padded batch of every pair (seq2seq.forward, float64 log-
    softmax on the host), and the exact match of seq2seq.greedy / translate on the full parameters."""
    from npllm.models.seq2seq import forward, greedy, translate
    from npllm.pairs import bos_of, encode_pair
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run)[:3]
    encoded = [encode_pair(tok, w, t) for w, t in zip(words, targets)]
    S, T = max(len(s) for s, _, _ in encoded), max(len(x) for _, x, _ in encoded)
    batch = dict(src=np.zeros((len(words), S), np.int64), src_mask=np.zeros((len(words), S), bool),
                 tokens=np.zeros((len(words), T), np.int64), tgt_mask=np.zeros((len(words), T), bool))
    for i, (s, x, _) in enumerate(encoded):
        batch["src"][i, :len(s)], batch["src_mask"][i, :len(s)] = s, True
        batch["tokens"][i, :len(x)], batch["tgt_mask"][i, :len(x)] = x, True
    batch["targets"] = np.where(batch["tgt_mask"], 0, -100)
    logp = log_softmax(np.asarray(forward(params, batch, cfg), dtype=np.float64))  # (B, T, V)
    nll = -sum(logp[i, np.arange(len(y)), y].sum() for i, (_, _, y) in enumerate(encoded))
    n_tokens = sum(len(y) for _, _, y in encoded)
    sources = [s for s, _, _ in encoded]
    if beams == 1:
        outs = greedy(params, cfg, sources, max_new_tokens, bos_id=bos_of(tok), eos_id=tok.eos_id)
    else:
        outs = [h[0].tokens for h in translate(params, cfg, sources, max_new_tokens, beams, bos_id=bos_of(tok),
                                               eos_id=tok.eos_id)]
    exact = sum(o[-1] == tok.eos_id and tok.decode(o[:-1]) == t for o, t in zip(outs, targets))
    return nll / n_tokens, n_tokens, exact


@pytest.mark.parametrize("beams", [1, 3])
def test_pairs_evaluation_equals_a_direct_count(seq2seq_dir, test_pairs, capsys, beams):
    path, words, targets = test_pairs
    assert main([f"--ckpt={seq2seq_dir}", f"--pairs={path}", f"--beams={beams}", "--batch_size=7", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    longest = max(len(t) for t in targets) + 1  # the default max_new_tokens: the longest target and its eos
    loss, n_tokens, exact = pairs_directly(seq2seq_dir, words, targets, beams, longest)
    assert got["max_new_tokens"] == longest and got["n_pairs"] == 30 and got["n_tokens"] == n_tokens
    assert got["n_exact"] == exact and got["exact_match"] == exact / 30 and 10 <= exact <= 20
    assert math.isclose(got["loss"], loss, rel_tol=1e-5) and math.isclose(got["ppl"], math.exp(got["loss"]))
    assert got["decoding"] == ("greedy" if beams == 1 else "3 beams")


def test_pairs_text_line_split_and_max_new_tokens(seq2seq_dir, test_pairs, capsys):
    from npllm.sft import split_records

    path, words, targets = test_pairs
    assert main([f"--ckpt={seq2seq_dir}", f"--pairs={path}", "--split=val", "--max_new_tokens=2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    val = split_records(30)[1]
    loss, n_tokens, exact = pairs_directly(seq2seq_dir, [words[i] for i in val], [targets[i] for i in val],
                                           max_new_tokens=2)
    assert got["n_pairs"] == len(val) == 3 and got["n_tokens"] == n_tokens and got["n_exact"] == exact
    assert "(--split=val: 3 of 30)" in got["source"]
    assert main([f"--ckpt={seq2seq_dir}", f"--pairs={path}", "--max_new_tokens=2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_exact"] == 0  # 2-4 letters and an eos do not fit in 2 tokens
    assert main([f"--ckpt={seq2seq_dir}", f"--pairs={path}"]) == 0
    line = capsys.readouterr().out
    longest = max(len(t) for t in targets) + 1
    loss, n_tokens, exact = pairs_directly(seq2seq_dir, words, targets, max_new_tokens=longest)
    assert line == (f"loss {loss:.4f} | perplexity {math.exp(loss):.3f} | exact match {exact / 30:.1%} ({exact}/30, "
                    f"greedy, at most {longest} new tokens) | {n_tokens} target tokens | pairs {path}\n")


@pytest.mark.parametrize("extra, words", [
    (["--data=DIR/pairs.jsonl"], ["--data=", "holds an encoder-decoder", "--pairs=FILE.jsonl"]),
    (["--pairs=DIR/pairs.jsonl", "--seq_len=4"], ["--seq_len=4 does not apply to --pairs"]),
    (["--pairs=DIR/pairs.jsonl", "--data=x"], ["not both"]),
    (["--pairs=DIR/long.jsonl"], ["1 pair(s) longer than the model's max_seq_len=8", "long.jsonl:2"]),
    (["--pairs=DIR/bad.jsonl"], ["malformed", "bad.jsonl:1"]),
    (["--pairs=DIR/nope.jsonl"], ["not found"]),
    (["--pairs=DIR/pairs.jsonl", "--max_new_tokens=9"], ["max_new_tokens=9 is not allowed", "max_seq_len=8"]),
    (["--pairs=DIR/pairs.jsonl", "--split=test"], ["split='test' is not allowed"]),
])
def test_pairs_bad_input_is_one_clear_line(seq2seq_dir, capsys, extra, words):
    from tests.arch_runs import write_pairs

    d = seq2seq_dir.parent
    write_pairs(d / "long.jsonl", ["ab", "abcdefabcdef"], ["ba", "x"])
    (d / "bad.jsonl").write_text('{"source": "ab"}\n')
    assert main([f"--ckpt={seq2seq_dir}", *[a.replace("DIR", str(d)) for a in extra]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npllm.evaluate: error: ") and "Traceback" not in err, err
    assert all(w in err for w in words), err


@pytest.mark.parametrize("which, extra, words", [
    ("bert", ["--data=CORPUS", "--stride=4"], ["--stride=4 is for a decoder's sliding windows"]),
    ("bert", ["--data=CORPUS", "--seq_len=2"], ["--seq_len=2 is not allowed for an encoder"]),
    ("bert", ["--pairs=CORPUS"], ["--pairs=", "is for an encoder-decoder checkpoint", "arch='encoder'"]),
    ("bert", ["--data=CORPUS", "--beams=2"], ["--beams=2 does not apply to --data"]),
    ("decoder", ["--data=CORPUS", "--seed=1"], ["--seed=1 seeds an encoder's masks"]),
    ("decoder", ["--pairs=CORPUS"], ["arch='decoder'", "--data=FILE_OR_DIR"]),
])
def test_options_of_another_architecture_are_one_clear_line(bert_dir, run_dir, capsys, which, extra, words):
    corpus = bert_dir.parent / "corpus.txt"
    run = bert_dir if which == "bert" else run_dir
    assert main([f"--ckpt={run}", *[a.replace("CORPUS", str(corpus)) for a in extra]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("npllm.evaluate: error: ") and all(w in err for w in words), err


# ---------------------------------------------------------------------------------------------------------
# runs written by npllm.train: evaluate repeats the trainer's own validation loss; generate reads them


TINY_BERT = ["--preset=bert-nano", "--n_layers=1", "--dim=32", "--n_heads=2", "--n_kv_heads=2", "--ffn_dim=64",
             "--vocab_size=400", "--max_seq_len=16", "--seq_len=16"]
TINY_SEQ2SEQ = ["--preset=seq2seq-nano", "--n_layers=1", "--n_decoder_layers=1", "--dim=32", "--n_heads=2",
                "--n_kv_heads=2", "--ffn_dim=64", "--vocab_size=64", "--max_seq_len=16", "--seq_len=16"]
TRAIN = ["--batch_size=4", "--peak_tflops=1", "--steps=2", "--eval_interval=2", "--dtype=float64", "--seed=3"]


def last_val_loss(run) -> float:
    from npllm.metrics import read_metrics

    return [r for r in read_metrics(run) if "val_loss" in r][-1]["val_loss"]


def test_runs_written_by_the_trainer(data_dir, tmp_path, capsys):
    from npllm.generate import main as generate_main
    from npllm.train import main as train_main
    from tests.arch_runs import write_pairs

    bert, s2s = tmp_path / "bert", tmp_path / "s2s"
    assert train_main([*TINY_BERT, *TRAIN, "--eval_batches=2", f"--data={data_dir}", f"--out_dir={bert}"]) == 0
    words = [" ".join("zero one two three four five six seven eight nine".split()[int(d)] for d in str(n))
             for n in range(100)]
    pairs = write_pairs(tmp_path / "pairs.jsonl", words, [str(n) for n in range(100)])
    assert train_main([*TINY_SEQ2SEQ, *TRAIN, "--eval_batches=3", f"--pairs={pairs}", f"--out_dir={s2s}"]) == 0
    capsys.readouterr()

    # the trainer's validation: 2 batches of 4 rows of 16 tokens ([CLS] 14 tokens [SEP]), masked with the run's seed
    assert main([f"--ckpt={bert}", f"--data={data_dir}", "--max_tokens=112", "--batch_size=4", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_rows"] == 8 and got["seq_len"] == 16 and got["seed"] == 3
    assert math.isclose(got["loss"], last_val_loss(bert), rel_tol=1e-10)
    # its held-out 10 of the 100 pairs (3 batches of 4 hold them all)
    assert main([f"--ckpt={s2s}", f"--pairs={pairs}", "--split=val", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["n_pairs"] == 10 and math.isclose(got["loss"], last_val_loss(s2s), rel_tol=1e-10)

    assert generate_main([f"--ckpt={bert}", "--fill_mask=The [MASK] of", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["masks"][0]["guesses"]) == 5
    assert generate_main([f"--ckpt={s2s}", "--prompt=four two", "--prompt=seven", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["four two", "seven"] and all(r["new_tokens"] >= 1 for r in rows)
