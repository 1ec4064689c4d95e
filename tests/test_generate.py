"""Tests for npllm/generate.py: the KV cache against the full forward, greedy/sampled/beam decoding.

Models are random-init and small; their matrices are scaled up so that the next-token distributions are peaked
(a plain 0.02-std init gives nearly uniform logits, where every rule would look alike).

Bounds on the cached logits, relative to the largest |logit| of the sequence:
  float64: 1e-10 (the issue's bound; we measure about 2e-15),
  float32: 1e-5 (we measure about 1e-6: the cached step sums its attention over the same keys in a different
           grouping than the full forward, so float32 rounding differs at the 1e-7-per-operation level).
"""

import itertools
import json
import re
import math

import numpy as np
import pytest

from npllm.backend import asnumpy, get_array_module
from npllm.config import get_preset
from npllm.generate import (Hypothesis, beam_search, decode_steps, generate, normalized_score, stream)
from npllm.models import init_params
from npllm.models.decoder import model_forward
from npllm.sampling import SamplingConfig, log_softmax, sampling_distribution

REL_TOL = {np.float64: 1e-10, np.float32: 1e-5}

SMALL = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=40)
MODELS = {  # RoPE with GQA, RoPE with full multi-head attention, GPT-2-style learned positions
    "rope-gqa": get_preset("nano", **SMALL, n_kv_heads=2),
    "rope-mha": get_preset("nano", **SMALL, n_kv_heads=4),
    "learned": get_preset("nano-gpt2", **SMALL, n_kv_heads=4),
}


def peaked_params(cfg, dtype=np.float64, seed=0, scale=6.0, xp=np):
    params = init_params(cfg, seed=seed, dtype=dtype, xp=xp)
    return {name: w * scale if w.ndim == 2 else w for name, w in params.items()}


def full_forward_logits(params, cfg, sequence):
    """Logits (T, V) float64 of one full forward over ``sequence`` (T,)."""
    xp = get_array_module(params["tok_emb"])
    logits, _ = model_forward(params, xp.asarray(np.array([sequence])), cfg)
    return np.asarray(asnumpy(logits[0]), dtype=np.float64)


PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8], [7]]  # two share a length: they decode as one batch


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("model", list(MODELS))
def test_cached_logits_equal_full_forward_at_every_position(backend, model, dtype):
    cfg = MODELS[model]
    params = peaked_params(cfg, dtype, xp=backend)
    steps = list(decode_steps(params, cfg, PROMPTS, 25, SamplingConfig(temperature=1.0), seed=3))
    for i, prompt in enumerate(PROMPTS):
        mine = [s for s in steps if s.prompt_index == i]
        assert len(mine) == 25 and mine[-1].finished and not any(s.finished for s in mine[:-1])
        sequence = prompt + [s.token for s in mine]
        # position t of the full forward predicts token t + 1: the generated tokens sit at len(prompt) ...
        full = full_forward_logits(params, cfg, sequence[:-1])[len(prompt) - 1:]  # (25, V)
        cached = np.stack([s.logits for s in mine])  # (25, V)
        rel = np.abs(cached - full).max() / np.abs(full).max()
        assert rel <= REL_TOL[dtype], f"{model} {dtype.__name__} prompt {i}: relative error {rel:.2e}"


@pytest.mark.parametrize("model", list(MODELS))
def test_uncached_path_gives_the_same_logits_and_tokens(model):
    cfg = MODELS[model]
    params = peaked_params(cfg)
    cached = list(decode_steps(params, cfg, PROMPTS, 20, SamplingConfig(temperature=0.8, top_k=10), seed=5))
    plain = list(decode_steps(params, cfg, PROMPTS, 20, SamplingConfig(temperature=0.8, top_k=10), seed=5,
                              use_kv_cache=False))
    assert [(s.prompt_index, s.token) for s in cached] == [(s.prompt_index, s.token) for s in plain]
    rel = max(np.abs(a.logits - b.logits).max() / np.abs(b.logits).max() for a, b in zip(cached, plain))
    assert rel <= 1e-10


@pytest.mark.parametrize("model", list(MODELS))
def test_greedy_tokens_identical_with_and_without_cache(model):
    cfg = MODELS[model]
    params = peaked_params(cfg, seed=1)
    with_cache = generate(params, cfg, PROMPTS, 30)
    without = generate(params, cfg, PROMPTS, 30, use_kv_cache=False)
    assert with_cache == without
    for prompt, out in zip(PROMPTS, with_cache):  # and each token is the argmax of the full forward's logits
        full = full_forward_logits(params, cfg, prompt + out[:-1])
        assert out == full[len(prompt) - 1:].argmax(axis=-1).tolist()


def test_batched_prompts_get_the_tokens_they_get_alone():
    cfg = MODELS["rope-gqa"]
    params = peaked_params(cfg, seed=2)
    sampling = SamplingConfig(temperature=1.0, top_p=0.9)
    together = generate(params, cfg, PROMPTS, 15, sampling, seed=11)
    # prompt i draws from the i-th child of SeedSequence(seed) whatever else is in the batch
    children = np.random.SeedSequence(11).spawn(len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        alone = []
        rng = np.random.default_rng(children[i])
        for _ in range(15):
            logits = full_forward_logits(params, cfg, prompt + alone)[-1]
            ids, probs = sampling_distribution(logits, 1.0, 0, 0.9)
            cdf = np.cumsum(probs)
            alone.append(int(ids[min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(ids) - 1)]))
        assert together[i] == alone


def test_stops_at_eos_per_sequence():
    cfg = MODELS["learned"]
    params = peaked_params(cfg, seed=4)
    free = generate(params, cfg, PROMPTS, 20)
    eos = free[0][3]  # a token the first prompt emits at step 3 (maybe earlier too)
    stopped = generate(params, cfg, PROMPTS, 20, eos_id=eos)
    for out, ref in zip(stopped, free):
        cut = ref.index(eos) + 1 if eos in ref else len(ref)
        assert out == ref[:cut]  # the EOS ends the output and is part of it; the other rows go on
    assert len(stopped[0]) <= 4


def test_stream_yields_the_tokens_generate_returns():
    cfg = MODELS["rope-gqa"]
    params = peaked_params(cfg)
    seen = []
    out = generate(params, cfg, PROMPTS, 8, SamplingConfig(1.0), seed=2, on_token=lambda i, t: seen.append((i, t)))
    assert [t for i, t in seen if i == 2] == out[2]
    assert list(stream(params, cfg, PROMPTS[0], 8, SamplingConfig(1.0), seed=2)) == \
        generate(params, cfg, [PROMPTS[0]], 8, SamplingConfig(1.0), seed=2)[0]


def test_same_seed_reproduces_and_another_seed_differs():
    cfg = MODELS["rope-mha"]
    params = peaked_params(cfg, scale=2.0)
    sampling = SamplingConfig(temperature=1.5)
    a = generate(params, cfg, PROMPTS, 20, sampling, seed=0)
    assert a == generate(params, cfg, PROMPTS, 20, sampling, seed=0)
    assert a != generate(params, cfg, PROMPTS, 20, sampling, seed=1)


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.6), (5, 0.8)])
def test_generated_tokens_stay_inside_the_top_k_top_p_set(top_k, top_p):
    cfg = MODELS["rope-gqa"]
    params = peaked_params(cfg, scale=2.0)
    for seed in range(12):
        for step in decode_steps(params, cfg, PROMPTS, 10, SamplingConfig(1.0, top_k, top_p), seed=seed):
            probs = np.exp(log_softmax(step.logits))
            order = sorted(range(cfg.vocab_size), key=lambda t: (-probs[t], t))  # most likely first
            allowed = order[:top_k] if top_k else order
            mass = sum(probs[t] for t in allowed)
            allowed = [t for n, t in enumerate(allowed) if sum(probs[u] for u in allowed[:n]) / mass < top_p]
            assert step.token in allowed


def test_context_overflow_is_refused_before_any_work():
    cfg = MODELS["rope-gqa"]  # max_seq_len 40
    params = peaked_params(cfg)
    with pytest.raises(ValueError, match=r"max_seq_len=40.*at most 35"):
        generate(params, cfg, [[1, 2, 3, 4, 5]], 36)
    assert len(generate(params, cfg, [[1, 2, 3, 4, 5]], 35)[0]) == 35  # exactly full is fine


@pytest.mark.parametrize("prompts, max_new, word", [
    ([[]], 5, "at least one token"), ([[1, 99]], 5, "out of range"), ([[1, -1]], 5, "out of range"),
    ([[1, 2]], 0, "max_new_tokens"), ([[1.5]], 3, "integer"),
])
def test_bad_generation_input_raises(prompts, max_new, word):
    cfg = MODELS["rope-gqa"]
    params = peaked_params(cfg)
    with pytest.raises(ValueError, match=word):
        generate(params, cfg, prompts, max_new)


# ---------------------------------------------------------------------------------------------------------
# beam search


@pytest.mark.parametrize("model", list(MODELS))
def test_one_beam_is_greedy(model):
    cfg = MODELS[model]
    params = peaked_params(cfg, seed=3)
    for prompt in PROMPTS:
        greedy = generate(params, cfg, [prompt], 15)[0]
        for eos in (None, greedy[6]):
            hyps = beam_search(params, cfg, prompt, 15, beams=1, eos_id=eos)
            expected = greedy if eos is None else greedy[:greedy.index(eos) + 1]
            assert len(hyps) == 1 and hyps[0].tokens == expected


@pytest.mark.parametrize("model", list(MODELS))
def test_beam_search_cached_equals_uncached_and_scores_are_right(model):
    cfg = MODELS[model]
    params = peaked_params(cfg, seed=5, scale=3.0)
    prompt = PROMPTS[0]
    eos = generate(params, cfg, [prompt], 4)[0][2]
    cached = beam_search(params, cfg, prompt, 12, beams=4, eos_id=eos, length_penalty=0.7)
    plain = beam_search(params, cfg, prompt, 12, beams=4, eos_id=eos, length_penalty=0.7, use_kv_cache=False)
    assert [h.tokens for h in cached] == [h.tokens for h in plain]
    assert len(cached) == 4
    assert [h.score for h in cached] == sorted((h.score for h in cached), reverse=True)
    for h in cached:  # each log-prob recomputed from one full forward over prompt + hypothesis
        logp = log_softmax(full_forward_logits(params, cfg, prompt + h.tokens[:-1])[len(prompt) - 1:])
        expected = sum(logp[t, tok] for t, tok in enumerate(h.tokens))
        assert math.isclose(h.logprob, expected, rel_tol=1e-10)
        assert math.isclose(h.score, expected / len(h.tokens) ** 0.7, rel_tol=1e-10)
        assert h.finished == (h.tokens[-1] == eos) and eos not in h.tokens[:-1]
        assert h.finished or len(h.tokens) == 12


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_best_sequence_by_exhaustive_search(length_penalty):
    # V = 4 and 3 new tokens: 4 ** 3 = 64 beams hold every sequence, so beam search is exhaustive here
    cfg = get_preset("nano", **{**SMALL, "vocab_size": 4}, n_kv_heads=2)
    params = peaked_params(cfg, seed=7, scale=4.0)
    prompt, eos, n_new = [1, 2], 3, 3
    best, best_score = None, -math.inf
    for length in range(1, n_new + 1):
        for seq in itertools.product(range(4), repeat=length):
            if eos in seq[:-1] or (length < n_new and seq[-1] != eos):
                continue  # a sequence ends at its first EOS, and only an EOS ends it early
            logp = log_softmax(full_forward_logits(params, cfg, prompt + list(seq[:-1]))[len(prompt) - 1:])
            score = normalized_score(sum(logp[t, tok] for t, tok in enumerate(seq)), length, length_penalty)
            if score > best_score:
                best, best_score = list(seq), score
    hyps = beam_search(params, cfg, prompt, n_new, beams=64, eos_id=eos, length_penalty=length_penalty)
    assert hyps[0].tokens == best
    assert math.isclose(hyps[0].score, best_score, rel_tol=1e-10)


def test_normalized_score():
    assert normalized_score(-6.0, 3, 1.0) == -2.0
    assert normalized_score(-6.0, 3, 0.0) == -6.0
    assert math.isclose(normalized_score(-8.0, 4, 0.5), -4.0)
    assert Hypothesis([1], -1.0, -1.0, True).finished


@pytest.mark.parametrize("kwargs, word", [(dict(beams=0), "beams"), (dict(beams=2.0), "beams"),
                                          (dict(beams=2, length_penalty=-1.0), "length_penalty")])
def test_bad_beam_input_raises(kwargs, word):
    cfg = MODELS["rope-gqa"]
    with pytest.raises(ValueError, match=word):
        beam_search(peaked_params(cfg), cfg, [1, 2], 5, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# command line, on a checkpoint saved the way npllm.train saves one


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tests.tiny_run import make_run

    return make_run(tmp_path_factory.mktemp("run"))


def cli(argv, capsys):
    from npllm.generate import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_streams_one_prompt_and_matches_the_python_api(run_dir, capsys):
    from npllm.generate import prompt_ids
    from npllm.run import load_trained

    code, out, err = cli([f"--ckpt={run_dir}", "--prompt=The value", "--max_new_tokens=8", "--temperature=0.9",
                          "--top_k=20", "--seed=4"], capsys)
    assert code == 0 and re.fullmatch(r"npllm.generate: 8 new tokens in [\d.]+ s \([\d,.]+ tok/s\)\n", err), err
    params, cfg, tok = load_trained(run_dir)[:3]
    ids = prompt_ids(tok, "The value")
    assert ids[0] == tok.eos_id
    new = generate(params, cfg, [ids], 8, SamplingConfig(0.9, 20), seed=4, eos_id=tok.eos_id)[0]
    assert out == tok.decode(ids + new) + "\n"


def test_cli_several_prompts_each_printed_when_done(run_dir, capsys):
    from npllm.generate import prompt_ids
    from npllm.run import load_trained

    prompts = ["a", "The value of", "def"]
    code, out, _ = cli([f"--ckpt={run_dir}"] + [f"--prompt={p}" for p in prompts] +
                       ["--max_new_tokens=5", "--temperature=0"], capsys)
    assert code == 0
    params, cfg, tok = load_trained(run_dir)[:3]
    ids = [prompt_ids(tok, p) for p in prompts]
    expected = generate(params, cfg, ids, 5, eos_id=tok.eos_id)
    lines = sorted(out.splitlines())
    assert len(lines) == 3
    for i in range(3):
        assert f"[{i}] {tok.decode(ids[i] + expected[i])}" in lines


def test_cli_beams_and_no_kv_cache(run_dir, capsys):
    from npllm.generate import prompt_ids
    from npllm.run import load_trained

    args = [f"--ckpt={run_dir}", "--prompt=x = ", "--max_new_tokens=6", "--beams=3"]
    code, cached, _ = cli(args, capsys)
    code2, plain, _ = cli(args + ["--no_kv_cache"], capsys)
    assert code == code2 == 0 and cached == plain
    params, cfg, tok = load_trained(run_dir)[:3]
    ids = prompt_ids(tok, "x = ")
    best = beam_search(params, cfg, ids, 6, 3, eos_id=tok.eos_id)[0]
    assert cached == tok.decode(ids + best.tokens) + "\n"


@pytest.mark.parametrize("extra, word", [
    (["--top_p=0"], "top_p"), (["--top_p=1.5"], "top_p"), (["--temperature=-1"], "temperature"),
    (["--beams=0"], "beams"), (["--top_k=-3"], "top_k"), (["--max_new_tokens=0"], "max_new_tokens"),
    (["--max_new_tokens=20"], "max_seq_len=16"), (["--beams=2", "--top_k=5"], "beam search"),
    (["--top_k=abc"], "--top_k='abc' is not an integer"), (["--device=tpu"], "device='tpu' is not allowed"),
    (["--bogus=1"], "unknown option --bogus"), (["--stop="], "--stop= is empty"),
])
def test_cli_bad_input_is_one_clear_line(run_dir, capsys, extra, word):
    code, out, err = cli([f"--ckpt={run_dir}", "--prompt=hi"] + extra, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


def test_cli_missing_checkpoint_and_missing_option(tmp_path, capsys):
    code, _, err = cli([f"--ckpt={tmp_path / 'nope'}", "--prompt=hi"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no checkpoint" in err
    code, _, err = cli(["--prompt=hi"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--ckpt" in err


def test_cli_runs_as_a_module(run_dir):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "npllm.generate", f"--ckpt={run_dir}", "--prompt=hi",
                           "--top_p=2"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("npllm.generate: error: top_p=2.0")
    assert done.stderr.count("\n") == 1


def test_text_stream_holds_back_partial_characters(run_dir):
    from npllm.generate import TextStream
    from npllm.run import load_trained

    _, _, tok = load_trained(run_dir)[:3]
    ids = tok.encode("naïve café ☕ done")
    stream_ = TextStream(tok, [tok.eos_id])
    pieces = [stream_.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_cli_on_a_run_written_by_the_trainer(tmp_path, capsys):
    """npllm.train -> npllm.generate and npllm.evaluate: the checkpoint's real meta is all they need."""
    from npllm.corpus import default_corpus_text
    from npllm.data import prepare_data
    from npllm.evaluate import main as evaluate_main
    from npllm.tokenizer import train_tokenizer
    from npllm.train import main as train_main

    (tmp_path / "text.txt").write_text(default_corpus_text()[:30_000], encoding="utf-8")
    train_tokenizer([tmp_path / "text.txt"], 400, tmp_path / "data" / "tokenizer")
    prepare_data([tmp_path / "text.txt"], tmp_path / "data" / "tokenizer", tmp_path / "data")
    run = tmp_path / "run"
    assert train_main(["--preset=nano", "--n_layers=1", "--dim=32", "--n_heads=2", "--n_kv_heads=1", "--ffn_dim=64",
                       "--vocab_size=400", "--max_seq_len=32", "--seq_len=16", "--batch_size=4", "--peak_tflops=1",
                       "--steps=2", f"--data={tmp_path / 'data'}", f"--out_dir={run}"]) == 0
    capsys.readouterr()
    code, out, err = cli([f"--ckpt={run}", "--prompt=The", "--max_new_tokens=10", "--temperature=0"], capsys)
    assert code == 0 and err.startswith("npllm.generate: ") and err.count("\n") == 1 and out.startswith("The")
    assert evaluate_main([f"--ckpt={run}", f"--data={tmp_path / 'data'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["seq_len"] == 32 and result["stride"] == 16 and result["n_tokens"] > 100
    assert math.isclose(result["ppl"], math.exp(result["loss"]), rel_tol=1e-12)


def test_cli_stop_strings_json_and_prompt_files(run_dir, capsys, tmp_path, monkeypatch):
    """--stop ends a prompt's text right before the stop string; --json gives one object per prompt in prompt order;
    --prompt_file and stdin add prompts; the streamed text equals the Python API's."""
    from npllm.generate import prompt_ids
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run_dir)[:3]
    prompts = ["a", "The value of", "def"]
    ids = [prompt_ids(tok, p) for p in prompts]
    new = generate(params, cfg, ids, 6, eos_id=tok.eos_id)
    full = [tok.decode(i + g)[len(tok.decode(i)):] for i, g in zip(ids, new)]
    stop = next(c for c in full[1][1:] if c.isalnum())  # a character the greedy text of prompt 1 holds
    (tmp_path / "prompts.txt").write_text("The value of\n\ndef\n")
    code, out, err = cli([f"--ckpt={run_dir}", "--prompt=a", f"--prompt_file={tmp_path / 'prompts.txt'}",
                          "--max_new_tokens=6", "--temperature=0", "--json", f"--stop={stop}"], capsys)
    assert code == 0 and err == "", err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["prompt"] for r in rows] == prompts
    for row, text in zip(rows, full):
        cut = text.find(stop)
        assert row["completion"] == (text if cut < 0 else text[:cut])
        assert row["finish_reason"] == ("stop" if cut >= 0 else "eos" if row["new_tokens"] < 6 else "length")
    assert rows[1]["finish_reason"] == "stop"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("a\nThe value of\n"))
    code, out, _ = cli([f"--ckpt={run_dir}", "--prompt_file=-", "--max_new_tokens=6", "--temperature=0"], capsys)
    assert code == 0
    assert out.splitlines() == [f"[0] {tok.decode(ids[0])}{full[0]}", f"[1] {tok.decode(ids[1])}{full[1]}"]


# ---------------------------------------------------------------------------------------------------------
# an encoder (BERT): --fill_mask


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tests.arch_runs import bert_run

    return bert_run(tmp_path_factory)


def mlm_guesses(run, text, top_k):
    """Independently of npllm.generate: the softmax of bert.mlm_logits at every [MASK] of ``text``, ranked."""
    from npllm.mlm import encode_masked_text, mlm_spec
    from npllm.models.bert import mlm_logits
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run)[:3]
    ids = encode_masked_text(tok, text, mlm_spec(cfg, tok))  # (T,)
    logits = np.asarray(mlm_logits(params, {"tokens": ids[None]}, cfg)[0], dtype=np.float64)  # (T, V) every position
    probs = np.exp(log_softmax(logits))  # (T, V)
    positions = np.flatnonzero(ids == cfg.mask_id)
    return tok, ids, [(int(t), np.argsort(-probs[t], kind="stable")[:top_k], probs[t]) for t in positions]


def test_fill_mask_json_is_the_softmax_of_the_mlm_logits(bert_dir, capsys):
    texts = ["The [MASK] statement is used for [MASK] execution.", "A [MASK] definition"]
    code, out, err = cli([f"--ckpt={bert_dir}", *[f"--fill_mask={t}" for t in texts], "--top_k=4", "--json"], capsys)
    assert code == 0 and err == "", err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and [r["text"] for r in rows] == texts
    for row, text in zip(rows, texts):
        tok, ids, expected = mlm_guesses(bert_dir, text, 4)
        assert [m["position"] for m in row["masks"]] == [t for t, _, _ in expected]
        filled = ids.copy()
        for mask, (t, best, probs) in zip(row["masks"], expected):
            assert [g["id"] for g in mask["guesses"]] == best.tolist()  # top-1 is the argmax of the logits
            got = np.array([g["probability"] for g in mask["guesses"]])
            np.testing.assert_allclose(got, probs[best], rtol=1e-5)
            assert all(np.diff(got) <= 0) and [g["token"] for g in mask["guesses"]] == [tok.decode([v]) for v in best]
            filled[t] = best[0]
        assert row["filled"] == tok.decode(filled[1:-1].tolist())


def test_fill_mask_text_output(bert_dir, capsys):
    code, out, _ = cli([f"--ckpt={bert_dir}", "--fill_mask=The [MASK] statement"], capsys)
    assert code == 0
    tok, ids, [(t, best, probs)] = mlm_guesses(bert_dir, "The [MASK] statement", 5)  # --top_k defaults to 5
    shown = ", ".join(f"{tok.decode([v])!r} {probs[v]:.4f}" for v in best)
    filled = ids.copy()
    filled[t] = best[0]
    assert out.splitlines() == ["The [MASK] statement", f"  [MASK] 1 (token {t}): {shown}",
                                f"  filled: {tok.decode(filled[1:-1].tolist())}"]


def test_fill_mask_on_a_hugging_face_directory(bert_dir, tmp_path, capsys):
    """The run exported as a BertForMaskedLM directory (its tokenizer beside it) fills in the same guesses."""
    from npllm.convert import to_hf

    hf_dir = to_hf(bert_dir, tmp_path / "hf")
    args = ["--fill_mask=The [MASK] statement is [MASK].", "--json"]
    from_run = json.loads(cli([f"--ckpt={bert_dir}", *args], capsys)[1])
    code, out, err = cli([f"--ckpt={hf_dir}", *args], capsys)
    assert code == 0, err
    from_hf = json.loads(out)
    assert [[g["id"] for g in m["guesses"]] for m in from_hf["masks"]] == \
        [[g["id"] for g in m["guesses"]] for m in from_run["masks"]]
    assert from_hf["filled"] == from_run["filled"]


@pytest.mark.parametrize("extra, words", [
    (["--prompt=The"], ["holds an encoder (BERT", "--fill_mask="]),
    (["--fill_mask=no mask here"], ["has no [MASK]"]),
    (["--fill_mask=a [MASK]", "--beams=2"], ["--beams=2 does not apply to --fill_mask"]),
    (["--fill_mask=a [MASK]", "--temperature=0.5"], ["--temperature=0.5 does not apply to --fill_mask"]),
    (["--fill_mask=a [MASK]", "--prompt=x"], ["--prompt=('x',) does not apply to --fill_mask"]),
    (["--fill_mask=a [MASK]", "--top_k=0"], ["top_k=0 is not allowed"]),
    (["--fill_mask=a [MASK]", "--top_k=401"], ["top_k=401 is not allowed", "vocab_size=400"]),
    (["--fill_mask=" + "word " * 40 + "[MASK]"], ["--fill_mask number 1", "max_seq_len=32"]),
])
def test_fill_mask_bad_input_is_one_clear_line(bert_dir, capsys, extra, words):
    code, out, err = cli([f"--ckpt={bert_dir}", *extra], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("npllm.generate: error: "), err
    assert all(w in err for w in words), err


def test_fill_mask_on_other_architectures_is_one_clear_line(run_dir, seq2seq_dir, capsys):
    for run, arch in ((run_dir, "decoder"), (seq2seq_dir, "encoder-decoder")):
        code, out, err = cli([f"--ckpt={run}", "--fill_mask=a [MASK]"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "--fill_mask is for an encoder (BERT) checkpoint" in err and f"arch='{arch}'" in err


# ---------------------------------------------------------------------------------------------------------
# an encoder-decoder: each prompt is a source


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    from tests.arch_runs import seq2seq_run

    return seq2seq_run(tmp_path_factory)


SOURCES = ["abc", "fed", "ab", "cafe", "b"]


def translate_directly(run, sources, beams=1, max_new_tokens=8, length_penalty=1.0):
    """Independently of npllm.generate: seq2seq.greedy / translate on the checkpoint's full parameters."""
    from npllm.models.seq2seq import greedy, translate
    from npllm.pairs import bos_of
    from npllm.run import load_trained

    params, cfg, tok = load_trained(run)[:3]
    src = [tok.encode(s) + [tok.eos_id] for s in sources]
    if beams == 1:
        outs = greedy(params, cfg, src, max_new_tokens, bos_id=bos_of(tok), eos_id=tok.eos_id)
    else:
        outs = [h[0].tokens for h in translate(params, cfg, src, max_new_tokens, beams, length_penalty,
                                               bos_id=bos_of(tok), eos_id=tok.eos_id)]
    assert all(0 <= t < tok.vocab_size for out in outs for t in out)  # the padding rows are never chosen
    return tok, outs


@pytest.mark.parametrize("extra, beams", [([], 1), (["--beams=3", "--length_penalty=0.5"], 3)])
def test_seq2seq_cli_equals_greedy_and_translate(seq2seq_dir, capsys, extra, beams):
    code, out, err = cli([f"--ckpt={seq2seq_dir}", *[f"--prompt={s}" for s in SOURCES], "--json", *extra], capsys)
    assert code == 0 and err == "", err
    rows = [json.loads(line) for line in out.splitlines()]
    tok, outs = translate_directly(seq2seq_dir, SOURCES, beams, length_penalty=0.5)
    assert [r["prompt"] for r in rows] == SOURCES
    for row, tokens in zip(rows, outs):
        assert row["completion"] == tok.decode(tokens) and row["new_tokens"] == len(tokens)
        assert row["finish_reason"] == ("eos" if tokens[-1] == tok.eos_id else "length")
    assert sum(r["completion"] == s[::-1] for r, s in zip(rows, SOURCES)) >= 3  # it learned to reverse


def test_seq2seq_cli_text_output_and_stop(seq2seq_dir, capsys):
    tok, outs = translate_directly(seq2seq_dir, SOURCES)
    code, out, err = cli([f"--ckpt={seq2seq_dir}", *[f"--prompt={s}" for s in SOURCES]], capsys)
    assert code == 0 and re.fullmatch(r"npllm.generate: \d+ new tokens in [\d.]+ s \([\d,.]+ tok/s\)\n", err)
    assert out.splitlines() == [f"[{i}] {tok.decode(t)}" for i, t in enumerate(outs)]
    code, out, _ = cli([f"--ckpt={seq2seq_dir}", "--prompt=abc", "--stop=b"], capsys)
    assert code == 0 and out == tok.decode(outs[0]).split("b")[0] + "\n"


def test_seq2seq_max_new_tokens_cuts_outputs(seq2seq_dir, capsys):
    tok, outs = translate_directly(seq2seq_dir, SOURCES, max_new_tokens=3)
    code, out, _ = cli([f"--ckpt={seq2seq_dir}", *[f"--prompt={s}" for s in SOURCES], "--max_new_tokens=3", "--json"],
                       capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["completion"] for r in rows] == [tok.decode(t) for t in outs]
    assert [r["finish_reason"] for r in rows] == ["eos" if t[-1] == tok.eos_id else "length" for t in outs]
    assert {"eos", "length"} == {r["finish_reason"] for r in rows}


def test_seq2seq_sampling(seq2seq_dir, capsys, monkeypatch):
    """--top_k=1 samples the argmax (greedy's tokens); a source's sample depends on (seed, its index) only, not on
    the batch it is decoded in; another seed draws other tokens."""
    tok, greedy_outs = translate_directly(seq2seq_dir, SOURCES)

    def completions(*extra):
        code, out, err = cli([f"--ckpt={seq2seq_dir}", "--json", *extra], capsys)
        assert code == 0, err
        return [json.loads(line)["completion"] for line in out.splitlines()]

    prompts = [f"--prompt={s}" for s in SOURCES]
    assert completions(*prompts, "--top_k=1") == [tok.decode(t) for t in greedy_outs]
    hot = completions(*prompts * 8, "--temperature=3", "--seed=2")  # 40 sources: more than one SOURCES_PER_CALL
    assert hot == completions(*prompts * 8, "--temperature=3", "--seed=2")
    assert hot[:1] == completions(prompts[0], "--temperature=3", "--seed=2")
    monkeypatch.setattr("npllm.generate_encoders.SOURCES_PER_CALL", 7)
    assert hot == completions(*prompts * 8, "--temperature=3", "--seed=2")  # other batches, the same tokens
    monkeypatch.undo()
    assert hot != completions(*prompts * 8, "--temperature=3", "--seed=3")
    assert len(set(hot)) > len(SOURCES)  # hot sampling does not repeat greedy's one output per source


def test_tokenizer_vocabulary_keeps_the_logits_of_the_kept_ids(seq2seq_dir):
    from npllm.generate_encoders import tokenizer_vocabulary
    from npllm.models.seq2seq import forward
    from npllm.pairs import encode_pairs
    from npllm.run import load_trained

    params, cfg, tok = load_trained(seq2seq_dir)[:3]
    kept, small = tokenizer_vocabulary(params, cfg, tok.vocab_size)
    assert small.vocab_size == tok.vocab_size == 8 < cfg.vocab_size
    batch = encode_pairs([dict(source="abc", target="cba", line=1), dict(source="f", target="f", line=2)], tok,
                         8).batch(np.arange(2))
    full, part = forward(params, batch, cfg), forward(kept, batch, small)  # (B, T, 16), (B, T, 8)
    np.testing.assert_array_equal(part, full[..., :tok.vocab_size])


@pytest.mark.parametrize("extra, words", [
    (["--prompt=abc", "--no_kv_cache"], ["--no_kv_cache is for decoder checkpoints"]),
    (["--prompt=abc", "--max_new_tokens=9"], ["--max_new_tokens=9 is not allowed", "max_seq_len=8"]),
    (["--prompt=abcdefabc"], ["source number 1", "10 tokens with its eos", "max_seq_len=8"]),
    (["--prompt=abc", "--beams=2", "--temperature=1"], ["beam search"]),
])
def test_seq2seq_bad_input_is_one_clear_line(seq2seq_dir, capsys, extra, words):
    code, out, err = cli([f"--ckpt={seq2seq_dir}", *extra], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("npllm.generate: error: "), err
    assert all(w in err for w in words), err
