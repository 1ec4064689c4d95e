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
