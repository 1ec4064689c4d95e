"""Shared by the trainer's tests (test_train.py, test_train_failures.py): the tiny model's options, running the
trainer in this process or as ``python -m npllm.train``, and the checks of its outputs. The session fixture that
tokenizes the text once (``data_dir``) is in conftest.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
import sys
from pathlib import Path

import numpy as np

from npllm.checkpoint import load_checkpoint
from npllm.corpus import default_corpus_text
from npllm.data import prepare_data
from npllm.tokenizer import train_tokenizer
from npllm.train import main

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 400
MODEL_ARGS = ["--preset=nano", "--n_layers=1", "--dim=32", "--n_heads=2", "--n_kv_heads=1", "--ffn_dim=64",
              f"--vocab_size={VOCAB}"]
RUN_ARGS = ["--seq_len=16", "--batch_size=4", "--peak_tflops=1"]  # a given peak skips the start-up matmul timing
TIMING_FIELDS = ("tokens_per_s", "mfu")  # the only fields of a metrics record allowed to differ between runs


def make_data_dir(root: Path) -> Path:
    """Tokenizer (V=400) + train/val shards of 50 KB of text: tinyshakespeare when present, else the default corpus."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000] if SHAKESPEARE.is_file() else default_corpus_text()[:50_000]
    (root / "text.txt").write_text(text, encoding="utf-8")
    train_tokenizer([root / "text.txt"], VOCAB, root / "data" / "tokenizer")
    prepare_data([root / "text.txt"], root / "data" / "tokenizer", root / "data")
    return root / "data"


def tiny(data_dir, out_dir, *extra) -> list[str]:
    return [*MODEL_ARGS, *RUN_ARGS, f"--data={data_dir}", f"--out_dir={out_dir}", *extra]


def run_main(*argv) -> None:
    """Run the trainer in this process; it must succeed."""
    assert main(list(argv)) == 0, f"npllm.train failed for {argv}"


def run_cli(*argv, script=None, timeout=120) -> subprocess.CompletedProcess:
    """``python -m npllm.train ARGV`` (or ``python -c SCRIPT ARGV``) in a child process, output captured."""
    command = [sys.executable, "-m", "npllm.train"] if script is None else [sys.executable, "-c", script]
    return subprocess.run([*command, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Non-zero exit, exactly one non-empty line on stderr, no traceback; the line holds every fragment."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, f"expected a failure, got exit 0; stdout:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert lines[0].startswith("npllm.train: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """Bit-identical parameters and AdamW moments, and the same optimizer step."""
    params_a, opt_a, meta_a = load_checkpoint(a)
    params_b, opt_b, meta_b = load_checkpoint(b)
    assert meta_a["step"] == meta_b["step"] and opt_a["step"] == opt_b["step"]
    assert list(params_a) == list(params_b)
    for name in params_a:
        assert np.array_equal(params_a[name], params_b[name]), f"parameter {name} differs"
        assert np.array_equal(opt_a["m"][name], opt_b["m"][name]), f"AdamW m of {name} differs"
        assert np.array_equal(opt_a["v"][name], opt_b["v"][name]), f"AdamW v of {name} differs"


def llama_style_sentencepiece(text_file: Path, directory: Path) -> Path:
    """A small sentencepiece BPE with LLaMA's options (dummy prefix, byte fallback, no normalization), saved as an HF
    model directory holds it, with special ids other than ours so that reading them from the model is tested."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(directory / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=5, bos_id=3, eos_id=4, pad_id=-1, num_threads=1, minloglevel=2)
    (directory / "tokenizer.vocab").unlink()
    (directory / "config.json").write_text("{}")  # an HF model directory holds other files too
    return directory


def gpt2_style(text: str, directory: Path, files: str) -> Path:
    """A small byte-level BPE trained with the tokenizers library, <|endoftext|> as its last id as in GPT-2, saved
    as tokenizer.json or as vocab.json + merges.txt."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=500, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>"])
    directory.mkdir(parents=True, exist_ok=True)
    if files == "tokenizer.json":
        tok.save(str(directory / "tokenizer.json"))
    else:
        tok.model.save(str(directory))
        vocab = json.loads((directory / "vocab.json").read_text())
        vocab["<|endoftext|>"] = len(vocab)  # GPT-2's vocab.json lists it, as 50256
        (directory / "vocab.json").write_text(json.dumps(vocab))
    return directory


class _ThreadGroup:
    """The shared state of ``size`` thread ranks: one slot per rank and a barrier."""

    def __init__(self, size: int):
        self.size, self.slots, self.barrier = size, [None] * size, threading.Barrier(size, timeout=60)


class ThreadComm:
    """Rank ``rank`` of a tensor-parallel group made of threads (the tests' stand-in for MPI): all-reduce adds (or,
    op="max", maxes) the ranks' arrays in rank order, so every rank, and every repetition of the same all-reduce,
    gets the same bits."""

    def __init__(self, group: _ThreadGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def allreduce(self, x, op="sum"):
        g = self.group
        g.slots[self.rank] = np.array(x, copy=True)
        g.barrier.wait()
        out = g.slots[0]
        for part in g.slots[1:]:
            out = out + part if op == "sum" else np.maximum(out, part)
        g.barrier.wait()  # every rank has read the slots before any writes its next contribution
        return out


def on_thread_ranks(size: int, fn) -> list:
    """Run fn(rank, comm) on ``size`` threads, comm a ThreadComm of one group; their results in rank order. A rank
    that raises fails the test (its barrier partners then time out or break, never hang)."""
    group, results, errors = _ThreadGroup(size), [None] * size, []

    def run(r):
        try:
            results[r] = fn(r, ThreadComm(group, r))
        except BaseException as err:  # re-raised in the main thread below
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results



def assert_fast_matches_reference(loss_and_grads, cfg, params):
    """Run ``loss_and_grads(c)`` (a model's loss and gradients under the config c) with cfg's fast paths and with the
    reference layers, in float64, and compare: a gradient for each of ``params`` on both sides, the loss to 1e-10
    relative and each gradient to 1e-10 of its own largest entry, plus an absolute floor of 1e-14 of the model's
    largest gradient. The two compute the same sums in different orders (tiles, online softmax, fused products: ~1e-15
    per operation in float64); a gradient that is zero in exact math (e.g. the key bias, which shifts a query's scores
    all alike) is rounding, ~1e-17, on both sides, hence the floor. Returns the reference config (for further
    comparisons)."""
    fast, reference = dataclasses.replace(cfg, impl="fast"), dataclasses.replace(cfg, impl="reference")
    loss, grads = loss_and_grads(fast)
    loss_ref, grads_ref = loss_and_grads(reference)
    assert set(grads) == set(grads_ref) == set(params)
    assert abs(loss - loss_ref) <= 1e-10 * abs(loss_ref)
    largest = max(np.abs(g).max() for g in grads_ref.values())
    for name in grads_ref:
        bound = 1e-10 * np.abs(grads_ref[name]).max() + 1e-14 * largest
        assert np.abs(grads[name] - grads_ref[name]).max() <= bound, name
    return reference
