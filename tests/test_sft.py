"""Tests for npllm/sft.py and the fine-tuning path of npllm/train.py (--init_from, --sft).

Masked prompt targets: the cross-entropy's gradient rows at -100 targets are exactly zero and the loss is bitwise
unchanged by any change of the logits there; a batch's loss and gradients equal those of the response-only loss
computed directly (positions taken from the record lengths, not from the mask). Records: every kind of malformed
line reported with its line number in one error; too-long records refused by line. The sampler, the split, and
runs through main(): an SFT run from a pretrained checkpoint lowers its loss and resumes exactly (2N vs N + N).

One tiny model (1 layer, C=32, V=400) and one tokenizer trained on 40 kB of the default corpus, once per session.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.checkpoint import load_checkpoint
from npllm.config import ModelConfig, TrainConfig, get_preset
from npllm.corpus import default_corpus_text
from npllm.data import prepare_data
from npllm.generate import prompt_ids
from npllm.layers.loss import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from npllm.models import accumulate_loss_and_grads, init_params
from npllm.models.decoder import loss_and_grads, model_backward, model_forward
from npllm.sft import (SFTBatchSampler, encode_sft_example, encode_sft_records, load_sft_data, load_sft_records,
                       sft_eval_batches, sft_segments, split_records)
from npllm.tokenizer import Tokenizer, train_tokenizer
from npllm.batches import validation_batches
from npllm.metrics import read_metrics, validation_loss
from npllm.train import main

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400
MODEL_ARGS = ["--n_layers=1", "--dim=32", "--n_heads=2", "--n_kv_heads=1", "--ffn_dim=64", f"--vocab_size={VOCAB}",
              "--max_seq_len=32"]
RUN_ARGS = ["--batch_size=4", "--peak_tflops=1", "--log_interval=1000"]
SFT_SEQ_LEN = 24
TIMING_FIELDS = ("tokens_per_s", "mfu")


# ----------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A tokenizer (V=400) and train/val token shards of 40 kB of the default corpus."""
    root = tmp_path_factory.mktemp("sft_data")
    (root / "text.txt").write_text(default_corpus_text()[:40_000], encoding="utf-8")
    train_tokenizer([root / "text.txt"], VOCAB, root / "data" / "tokenizer")
    prepare_data([root / "text.txt"], root / "data" / "tokenizer", root / "data")
    return root / "data"


@pytest.fixture(scope="session")
def tok(data_dir) -> Tokenizer:
    return Tokenizer.load(data_dir / "tokenizer")


@pytest.fixture(scope="session")
def pretrained(data_dir, tmp_path_factory) -> Path:
    """A run directory of 20 pretraining steps written by npllm.train (the checkpoint SFT starts from)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    assert main([*MODEL_ARGS, *RUN_ARGS, "--seq_len=16", "--steps=20", "--lr=3e-3", "--eval_interval=20",
                 "--eval_batches=2", f"--data={data_dir}", f"--out_dir={run}"]) == 0
    return run


def copy_records(n: int, seed: int = 0) -> list[dict]:
    """n records "Copy 4721:" -> " 4721" with random numbers of 1 to 4 digits (varied prompt and response lengths)."""
    rng = np.random.default_rng(seed)
    numbers = [str(rng.integers(0, 10 ** rng.integers(1, 5))) for _ in range(n)]
    return [dict(prompt=f"Copy {k}:", response=f" {k}") for k in numbers]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("sft_file") / "copy.jsonl", copy_records(40))


def sft_args(pretrained, sft_file, out_dir, *extra) -> list[str]:
    return [f"--init_from={pretrained}", f"--sft={sft_file}", f"--out_dir={out_dir}", f"--seq_len={SFT_SEQ_LEN}",
            *RUN_ARGS, *extra]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def run_cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npllm.train", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, f"expected a failure, got exit 0; stdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("npllm.train: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# ----------------------------------------------------------------------------------------------------------
# one example: the token layout


def test_example_layout_masks_the_prompt_and_pads(tok):
    prompt, response, T = "Copy 4721:", " 4721", 20
    p, r = tok.encode(prompt), tok.encode(response)
    P, R = len(p), len(r)
    tokens, targets = encode_sft_example(tok, prompt, response, T)
    assert tokens.shape == targets.shape == (T,) and tokens.dtype == targets.dtype == np.int64
    n = P + R + 2
    assert tokens[:n - 1].tolist() == [tok.eos_id] + p + r  # the whole sequence but its last token
    assert tokens[n - 1:].tolist() == [tok.eos_id] * (T - n + 1)  # padding: eos
    assert targets[:P].tolist() == [IGNORE_INDEX] * P  # the positions that would predict prompt tokens
    assert targets[P:P + R + 1].tolist() == r + [tok.eos_id]  # the response, then the eos that ends it
    assert targets[P + R + 1:].tolist() == [IGNORE_INDEX] * (T - P - R - 1)  # padding: ignored
    # npllm.generate's prompt is exactly the prefix the model saw before the response
    assert tokens[:P + 1].tolist() == prompt_ids(tok, prompt)


def test_a_record_of_exactly_seq_len_plus_one_fits_and_a_longer_one_is_refused_by_line(tok, tmp_path):
    prompt, response = "Copy 12:", " 12"
    n = len(tok.encode(prompt)) + len(tok.encode(response)) + 2
    tokens, targets = encode_sft_example(tok, prompt, response, n - 1)  # no padding at all
    assert targets[-1] == tok.eos_id and (targets != IGNORE_INDEX).sum() == len(tok.encode(response)) + 1
    with pytest.raises(ValueError, match=rf"is {n} tokens .* more than seq_len\+1={n - 1}"):
        encode_sft_example(tok, prompt, response, n - 2)
    with pytest.raises(ValueError, match="response is empty"):
        encode_sft_example(tok, prompt, "", 20)

    records = [dict(prompt="a", response="b"), dict(prompt=prompt, response=response), dict(prompt="c", response="d"),
               dict(prompt=prompt + prompt, response=response)]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    with pytest.raises(ValueError) as err:
        load_sft_data(path, tok, n - 2)
    message = str(err.value)
    assert "2 record(s)" in message and f"{path.resolve()}:2:" in message and f"{path.resolve()}:4:" in message
    assert ":1:" not in message and ":3:" not in message and "\n" not in message


# ----------------------------------------------------------------------------------------------------------
# masked prompt targets: exactly zero gradient


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_ignored_targets_get_exactly_zero_logit_gradient_and_leave_the_loss_bitwise_unchanged(seed, scale):
    rng = np.random.default_rng(seed)
    B, T, V = 3, 7, 11
    logits = rng.standard_normal((B, T, V)) * scale  # (B, T, V)
    targets = rng.integers(0, V, (B, T))  # (B, T)
    masked = rng.random((B, T)) < 0.5
    masked[0, 0] = False  # at least one counted target
    targets[masked] = IGNORE_INDEX
    loss, cache = cross_entropy_forward(logits, targets)
    dlogits, _ = cross_entropy_backward(1.0, cache)  # (B, T, V)
    assert np.all(dlogits[masked] == 0.0), "a -100 target must give an exactly zero gradient row"

    other = logits.copy()
    other[masked] = rng.standard_normal((int(masked.sum()), V)) * scale  # anything at all at the ignored rows
    loss_other, cache_other = cross_entropy_forward(other, targets)
    dlogits_other, _ = cross_entropy_backward(1.0, cache_other)
    assert loss_other == loss  # bitwise: an ignored row adds exactly 0.0
    assert np.array_equal(dlogits_other[~masked], dlogits[~masked])


def sft_batch(tok, records, T):
    x, y = zip(*(encode_sft_example(tok, r["prompt"], r["response"], T) for r in records))
    return np.stack(x), np.stack(y)  # (B, T) each


def response_only_reference(params, cfg, x, tok, records):
    """Loss and grads of the mean over response tokens + final eos, built by hand from the record lengths."""
    logits, cache = model_forward(params, x, cfg)  # (B, T, V)
    dlogits = np.zeros_like(logits)  # (B, T, V)
    terms = []
    for b, r in enumerate(records):
        P, resp = len(tok.encode(r["prompt"])), tok.encode(r["response"]) + [tok.eos_id]
        for i, target in enumerate(resp):
            t = P + i  # position t predicts token t + 1 of [eos] + prompt + response + [eos]
            z = logits[b, t] - logits[b, t].max()
            p = np.exp(z) / np.exp(z).sum()  # (V,)
            terms.append(-np.log(p[target]))
            dlogits[b, t] = p
            dlogits[b, t, target] -= 1.0
    n = len(terms)
    return sum(terms) / n, model_backward(dlogits / n, cache, cfg)


def test_sft_loss_and_grads_equal_the_response_only_loss_computed_directly(tok):
    cfg = get_preset("nano", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                     max_seq_len=32)
    params = init_params(cfg, seed=1, dtype=np.float64)
    records = [dict(prompt="Copy 7:", response=" 7"), dict(prompt="What is the for statement?", response=" A loop."),
               dict(prompt="", response="def f(x):\n    return x"), dict(prompt="Copy 4721:", response=" 4721")]
    x, y = sft_batch(tok, records, 24)
    loss, grads = loss_and_grads(params, x, y, cfg)
    ref_loss, ref_grads = response_only_reference(params, cfg, x, tok, records)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert list(grads) == list(ref_grads)
    for name, g in ref_grads.items():
        err = np.max(np.abs(grads[name] - g)) / np.max(np.abs(g))
        assert err <= 1e-12, f"{name}: relative error {err:.2e}"
    # records have different numbers of counted targets (3, 5, ...): micro-batches must weight by them
    for micro_batches, row_groups in ((2, 1), (4, 1), (1, 2), (2, 2)):  # and so must row groups
        loss_k, grads_k = accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, micro_batches,
                                                    row_groups=row_groups)
        assert abs(loss_k - loss) <= 1e-12 * abs(loss)
        for name, g in grads.items():
            assert np.max(np.abs(grads_k[name] - g)) <= 1e-12 * np.max(np.abs(g)), (micro_batches, row_groups, name)


# ----------------------------------------------------------------------------------------------------------
# records


def test_records_are_read_with_their_line_numbers_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text('\ufeff{"prompt": "a", "response": "b"}\n\n   \n{"prompt": "", "response": "c", "id": 7}\r\n'
                    '{"response": "e", "prompt": "d"}', encoding="utf-8")  # BOM, CRLF, no final newline
    assert load_sft_records(path) == [dict(segments=sft_segments(dict(prompt=p, response=r)), line=n)
                                      for p, r, n in (("a", "b", 1), ("", "c", 4), ("d", "e", 5))]


def test_every_malformed_record_is_reported_with_its_line_in_one_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [b'{"prompt": "a", "response": "b"}',          # 1 fine
             b'',                                            # 2 blank: fine
             b'{"prompt": "a", "response": "b"',            # 3 bad JSON
             b'["a", "b"]',                                  # 4 not an object
             b'{"prompt": "a"}',                             # 5 missing key
             b'{"prompt": 3, "response": "b"}',              # 6 not a string
             b'{"prompt": "a", "response": ""}',             # 7 empty response
             b'{"prompt": "a", "response": "b"}',            # 8 fine
             b'{"prompt": "\xff", "response": "b"}',         # 9 not UTF-8
             b'{"prompt": "a", "response": null}']           # 10 not a string
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError) as err:
        load_sft_records(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"7 malformed record(s) in {path}: ")
    for line, reason in [(3, "not valid JSON"), (4, "expected a JSON object"), (5, "missing key 'response'"),
                         (6, "'prompt' must be a string, got int"), (7, "'response' is empty")]:
        assert f"{path}:{line}: {reason}" in message, (line, message)
    assert ":9:" not in message and "and 2 more" in message  # the first five are named, the rest counted
    assert f"{path}:1:" not in message and f"{path}:8:" not in message

    path.write_bytes(b"\n".join(lines[8:]) + b"\n")
    with pytest.raises(ValueError, match=rf"2 malformed .*{path}:1: not UTF-8 .*{path}:2: 'response' must be a str"):
        load_sft_records(path)


def test_an_empty_or_missing_file_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no records"):
        load_sft_records(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_sft_records(tmp_path / "nowhere.jsonl")


# ----------------------------------------------------------------------------------------------------------
# split and sampler


def test_split_holds_out_a_fixed_tenth_and_at_least_one():
    for n in [2, 3, 9, 10, 11, 40, 199]:
        train, val = split_records(n)
        assert len(val) == max(1, n // 10) and len(train) == n - len(val)
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
        assert np.array_equal(val, split_records(n)[1]) and list(val) == sorted(val)
    assert not np.array_equal(split_records(200)[1], np.arange(180, 200)), "not simply the last 10%"
    with pytest.raises(ValueError, match="at least 2 records"):
        split_records(1)


def test_sampler_is_a_function_of_seed_step_and_rank(tok):
    examples = encode_sft_records([dict(segments=sft_segments(r), line=i + 1) for i, r in enumerate(copy_records(30))],
                                  tok, 16)
    sampler = SFTBatchSampler(examples, batch_size=4, seq_len=16, seed=5)
    batches = [sampler.next() for _ in range(3)]
    for step, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == np.int64
        assert all(np.array_equal(a, b) for a, b in zip((x, y), sampler.sample(step)))
    assert not np.array_equal(batches[0][0], batches[1][0])

    resumed = SFTBatchSampler(examples, batch_size=4, seq_len=16, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))  # as a checkpoint stores it
    assert all(np.array_equal(a, b) for a, b in zip(resumed.next(), sampler.next()))

    def rows(batch):  # which records a batch holds (x rows are distinct for distinct numbers, mostly)
        return {tuple(r) for r in batch[0]}

    ranks = [SFTBatchSampler(examples, 4, 16, seed=5, rank=k, world_size=3).sample(7) for k in range(3)]
    chosen = np.random.default_rng([5, 7]).choice(30, size=12, replace=False)
    for k in range(3):
        assert np.array_equal(ranks[k][0], examples.rows(chosen[4 * k:4 * k + 4])[0])
    assert not rows(ranks[0]) & rows(ranks[1]) and not rows(ranks[1]) & rows(ranks[2])

    with pytest.raises(ValueError, match="only 30 training records"):
        SFTBatchSampler(examples, batch_size=16, seq_len=16, seed=0, world_size=2)
    other = SFTBatchSampler(examples.subset(np.arange(20)), batch_size=4, seq_len=16, seed=5)
    with pytest.raises(ValueError, match="num_records"):
        other.load_state_dict(sampler.state_dict())


def test_eval_batches_cover_the_val_records_in_order(tok):
    examples = encode_sft_records([dict(segments=sft_segments(r), line=i + 1) for i, r in enumerate(copy_records(10))],
                                  tok, 16)
    batches = list(sft_eval_batches(examples, 4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert np.array_equal(np.concatenate([x for x, _ in batches]), examples.tokens)
    assert len(list(sft_eval_batches(examples, 4, max_batches=2))) == 2


# ----------------------------------------------------------------------------------------------------------
# runs through npllm.train


def test_sft_run_from_a_pretrained_checkpoint_learns_and_resumes_exactly(pretrained, sft_file, tmp_path):
    N = 15
    common = ["--lr=3e-3", "--eval_interval=5", "--eval_batches=2", "--micro_batches=2"]
    assert main(sft_args(pretrained, sft_file, tmp_path / "straight", *common, f"--steps={2 * N}")) == 0
    assert main(sft_args(pretrained, sft_file, tmp_path / "halves", *common, f"--steps={N}",
                         f"--lr_decay_steps={2 * N}")) == 0
    assert main([f"--resume={tmp_path / 'halves'}", f"--steps={2 * N}", "--peak_tflops=1"]) == 0

    straight, halves = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "halves")
    assert [r["step"] for r in straight] == list(range(2 * N + 1))
    assert without_timing(halves) == without_timing(straight)  # every loss, lr, grad norm and val loss, bitwise
    params_a, opt_a, meta_a = load_checkpoint(tmp_path / "straight")
    params_b, opt_b, meta_b = load_checkpoint(tmp_path / "halves")
    assert opt_a["step"] == opt_b["step"] == 2 * N  # a fresh optimizer at the start: its step counts this run only
    for name in params_a:
        assert np.array_equal(params_a[name], params_b[name]) and np.array_equal(opt_a["m"][name], opt_b["m"][name])

    # the run starts from the pretrained weights, and it learns the records
    pre_params, _, pre_meta = load_checkpoint(pretrained)
    assert meta_a["model_config"] == pre_meta["model_config"] and meta_a["tokenizer"] == pre_meta["tokenizer"]
    assert meta_a["train_config"]["init_from"] == str(pretrained) and meta_a["train_config"]["sft"] == str(sft_file)
    assert meta_a["sft"]["records"] == 40 and meta_a["sft"]["val_records"] == 4 and len(meta_a["sft"]["sha256"]) == 64
    val = {r["step"]: r["val_loss"] for r in straight if "val_loss" in r}
    train = [r["loss"] for r in straight if "loss" in r]
    assert val[2 * N] < val[0] - 1.0, val  # the copy task: ~6.0 -> ~3.5 nats per response token
    assert np.mean(train[-5:]) < np.mean(train[:5]) - 1.0, train


def test_sft_val_loss_is_the_mean_over_every_counted_target_of_the_held_out_records(pretrained, sft_file, tok):
    params, _, meta = load_checkpoint(pretrained)
    cfg = ModelConfig(**meta["model_config"])
    data = load_sft_data(sft_file, tok, SFT_SEQ_LEN)
    val = data.val
    counts = (val.targets != IGNORE_INDEX).sum(axis=1)
    assert len(val) == 4 and len(set(counts.tolist())) > 1, "records with different response lengths"
    tc = TrainConfig(init_from=str(pretrained), sft=str(sft_file), seq_len=SFT_SEQ_LEN, batch_size=1)
    got = validation_loss(params, cfg, validation_batches(data, cfg, 1, tc), tc, np)  # four batches of one record each

    logits, _ = model_forward(params, val.tokens.astype(np.int64), cfg)  # (4, T, V) in one forward
    nll = []
    for b, t in zip(*np.nonzero(val.targets != IGNORE_INDEX)):
        z = logits[b, t].astype(np.float64)
        nll.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[val.targets[b, t]])
    assert abs(got - np.mean(nll)) <= 1e-5 * np.mean(nll), (got, np.mean(nll))


def test_init_from_without_sft_continues_pretraining_from_the_weights(pretrained, data_dir, tmp_path):
    run = tmp_path / "continued"
    assert main([f"--init_from={pretrained}", f"--data={data_dir}", f"--out_dir={run}", "--seq_len=16", *RUN_ARGS,
                 "--steps=3", "--eval_interval=3", "--eval_batches=2"]) == 0
    pre_val = [r["val_loss"] for r in read_metrics(pretrained) if "val_loss" in r][-1]
    records = read_metrics(run)
    assert records[0]["val_loss"] == pre_val  # the same weights, bitwise
    _, opt, meta = load_checkpoint(run)
    assert opt["step"] == meta["step"] == 3 and meta["train_config"]["sft"] is None


def test_a_resume_must_keep_the_sft_file(pretrained, sft_file, tmp_path):
    run = tmp_path / "run"
    assert main(sft_args(pretrained, sft_file, run, "--steps=2")) == 0
    changed = write_jsonl(tmp_path / "changed.jsonl", copy_records(40, seed=1))
    assert main([f"--resume={run}", "--steps=4", f"--sft={changed}"]) == 2  # another file: refused
    edited = tmp_path / "edited.jsonl"
    shutil.copy(sft_file, edited)
    run2 = tmp_path / "run2"
    assert main(sft_args(pretrained, edited, run2, "--steps=2")) == 0
    with open(edited, "a") as f:
        f.write(json.dumps(dict(prompt="Copy 1:", response=" 1")) + "\n")
    assert main([f"--resume={run2}", "--steps=4", "--peak_tflops=1"]) == 2  # the same file, edited: refused
    assert not (run2 / "ckpt_00000004").exists()


@pytest.mark.parametrize("case", ["other dim", "bad sft path", "sft without init_from", "malformed file",
                                  "preset with init_from"])
def test_bad_fine_tuning_input_is_one_line(pretrained, sft_file, tmp_path, case):
    if case == "other dim":
        argv, fragments = [*sft_args(pretrained, sft_file, tmp_path / "out"), "--dim=64"], \
            ["cannot change the model", "'dim': 64", "{'dim': 32}"]
    elif case == "bad sft path":
        argv, fragments = sft_args(pretrained, tmp_path / "nowhere.jsonl", tmp_path / "out"), \
            ["SFT file not found", str(tmp_path / "nowhere.jsonl")]
    elif case == "sft without init_from":
        argv, fragments = [f"--sft={sft_file}", f"--out_dir={tmp_path / 'out'}"], ["needs --init_from"]
    elif case == "malformed file":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n{"prompt": "a", "response": 1}\n')
        argv, fragments = sft_args(pretrained, bad, tmp_path / "out"), [f"{bad}:2: missing key", f"{bad}:3:"]
    else:
        argv = [*sft_args(pretrained, sft_file, tmp_path / "out"), "--preset=nano"]
        fragments = ["--preset", "cannot be combined with --init_from"]
    proc = run_cli(*argv)
    assert_one_line_error(proc, *fragments)
    assert proc.returncode == 2
    assert not list((tmp_path / "out").glob("ckpt_*"))


def test_alpaca_and_chat_records_learn_exactly_the_response_and_each_assistant_turn(tok, tmp_path):
    from npllm.sft import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, chat_prompt, encode_segments

    path = tmp_path / "mixed.jsonl"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}]
    lines = [{"instruction": "Add.", "input": "2 2", "output": "4"}, {"instruction": "Say hi.", "output": "hi"},
             {"messages": chat}, {"prompt": "p", "response": "r"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    records = load_sft_records(path)
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    alpaca = records[0]["segments"]
    assert alpaca[0].text == ALPACA_PROMPT.format(instruction="Add.", input="2 2") and not alpaca[0].learned
    assert records[1]["segments"][0].text == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    # the chat row: the learned targets are exactly the two assistant answers, each followed by eos
    x, y = encode_segments(tok, records[2]["segments"], 128)
    learned = y[y != IGNORE_INDEX].tolist()
    assert learned == tok.encode("4") + [tok.eos_id] + tok.encode("6") + [tok.eos_id]
    rendered = tok.decode(x[:len(tok.encode(chat_prompt(chat[:2]))) + 1])
    assert rendered.startswith("<|system|>\nBe brief.\n<|user|>\n2+2?\n<|assistant|>\n")
    # malformed forms are named per line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "bot", "content": "x"}, '
                   '{"role": "assistant", "content": "y"}]}\n{"instruction": "x"}\n')
    with pytest.raises(ValueError, match=r"3 malformed record\(s\).*bad.jsonl:1: the last message must be the "
                                         r"assistant's.*bad.jsonl:2: messages\[0\] has role 'bot'.*bad.jsonl:3: "
                                         r"missing key 'output'"):
        load_sft_records(bad)
