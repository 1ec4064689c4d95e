"""``python -m npllm.train`` for the encoder (BERT, --preset=bert-*) and the encoder-decoder (--preset=seq2seq-*,
--pairs): the batches npllm/batches.py chooses, exact resume, the run's tokenizer, one-line errors, and tp=2 / dp=2
under mpirun equal to one process with dropout on.

Bounds for the parallel runs as in test_train_mpirun.py: float64, 1e-10 relative on losses, gradient norms,
validation losses and parameters (the layouts add the same numbers in other orders; dropout masks are keyed by the
global row, so every layout drops the same units).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import assert_one_line_error, assert_same_checkpoints, run_cli, run_main, without_timing
from tests.test_train_mpirun import needs_mpirun, rel_err, train_mpi

from npllm.batches import training_sampler, validation_batches
from npllm.checkpoint import load_checkpoint
from npllm.layers.loss import IGNORE_INDEX
from npllm.metrics import read_metrics
from npllm.run import read_run_meta
from npllm.tokenizer import CHAR_FIRST_ID, load_tokenizer
from npllm.train import main

BERT = ["--preset=bert-nano", "--n_layers=1", "--dim=32", "--n_heads=2", "--n_kv_heads=2", "--ffn_dim=64",
        "--vocab_size=400", "--max_seq_len=16", "--seq_len=16"]
SEQ2SEQ = ["--preset=seq2seq-nano", "--n_layers=1", "--n_decoder_layers=1", "--dim=32", "--n_heads=2",
           "--n_kv_heads=2", "--ffn_dim=64", "--vocab_size=64", "--max_seq_len=32", "--seq_len=32"]
COMMON = ["--batch_size=4", "--peak_tflops=1", "--eval_interval=2", "--eval_batches=2", "--dtype=float64",
          "--lr=3e-3"]
UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def number_words(n: int) -> str:
    """0..99 as words digit by digit ("4 2" style): enough structure for a loss to fall in a few steps."""
    return " ".join(UNITS[int(d)] for d in str(n))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"source": number_words(n), "target": str(n)}) + "\n" for n in range(100)),
                    encoding="utf-8")
    return path


def bert(data_dir, out, *extra):
    return [*BERT, *COMMON, f"--data={data_dir}", f"--out_dir={out}", *extra]


def seq2seq(pairs, out, *extra):
    return [*SEQ2SEQ, *COMMON, f"--pairs={pairs}", f"--out_dir={out}", *extra]


# ----------------------------------------------------------------------------------------------------------
# what each architecture trains on


def test_bert_trains_on_masked_windows_and_resumes_exactly(data_dir, tmp_path):
    run_main(*bert(data_dir, tmp_path / "straight", "--steps=6"))
    run_main(*bert(data_dir, tmp_path / "halves", "--steps=4", "--lr_decay_steps=6"))
    assert main([f"--resume={tmp_path / 'halves'}", "--steps=6", "--peak_tflops=1"]) == 0
    straight, halves = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "halves")
    assert [r["step"] for r in straight] == list(range(7))
    assert straight[-1]["val_loss"] < straight[0]["val_loss"]
    assert all("val_bpb" not in r for r in straight)  # BERT's targets are scattered masked tokens: no bits per byte
    assert without_timing(halves) == without_timing(straight)
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "halves")
    meta = read_run_meta(tmp_path / "straight")
    assert meta.model_config.arch == "encoder" and meta.model_config.dropout > 0


def test_bert_batches_are_the_mlm_objective(data_dir, tmp_path):
    """The sampler the trainer builds for an encoder: [CLS] window [SEP] rows, about 15% of positions as targets,
    the inputs there [MASK] ~80% of the time; validation batches are the same at every call."""
    from npllm.batches import load_data
    from npllm.config import TrainConfig, get_preset
    from npllm.parallel.comm import LocalComm

    cfg = get_preset("bert-nano", vocab_size=400, max_seq_len=64)
    tc = TrainConfig(preset="bert-nano", data=str(data_dir), batch_size=32, seq_len=64)
    data = load_data(tc, cfg, None, LocalComm())
    batch = training_sampler(data, cfg, tc, 0, 1).next_batch()
    tokens, targets = batch["tokens"], batch["targets"]  # (B, T) each
    assert tokens.shape == targets.shape == (32, 64)
    assert (tokens[:, 0] == data.tokenizer.bos_id).all() and (tokens[:, -1] == data.tokenizer.eos_id).all()
    chosen = targets != IGNORE_INDEX
    assert 0.10 < chosen.mean() < 0.20
    assert 0.70 < (tokens[chosen] == cfg.mask_id).mean() < 0.90
    first, again = validation_batches(data, cfg, 8, tc), validation_batches(data, cfg, 8, tc)
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)


def test_seq2seq_trains_on_pairs_with_its_own_tokenizer_and_resumes_exactly(pairs_file, tmp_path):
    run_main(*seq2seq(pairs_file, tmp_path / "straight", "--steps=6"))
    run_main(*seq2seq(pairs_file, tmp_path / "halves", "--steps=4", "--lr_decay_steps=6"))
    assert main([f"--resume={tmp_path / 'halves'}", "--steps=6", "--peak_tflops=1"]) == 0
    straight, halves = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "halves")
    assert straight[-1]["val_loss"] < straight[0]["val_loss"] and "val_bpb" in straight[-1]
    assert without_timing(halves) == without_timing(straight)
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "halves")
    tokenizer = load_tokenizer(tmp_path / "straight" / "tokenizer")  # one id per character of the pairs
    text = pairs_file.read_text(encoding="utf-8")
    chars = {c for line in text.splitlines() for r in [json.loads(line)] for c in r["source"] + r["target"]}
    assert tokenizer.kind == "char" and tokenizer.vocab_size == CHAR_FIRST_ID + len(chars)
    assert tokenizer.decode(tokenizer.encode("seven 42")) == "seven 42"
    params, _, _ = load_checkpoint(tmp_path / "straight")
    assert "enc.0.attn.wq" in params and "dec.0.cross.wq" in params


def test_resume_refuses_other_pairs(pairs_file, tmp_path):
    run_main(*seq2seq(pairs_file, tmp_path / "run", "--steps=2"))
    other = tmp_path / "other.jsonl"
    other.write_text(pairs_file.read_text(encoding="utf-8").replace('"0"', '"00"'), encoding="utf-8")
    proc = run_cli(f"--resume={tmp_path / 'run'}", "--steps=4", f"--pairs={other}")
    assert_one_line_error(proc, "cannot change", "pairs")
    pairs_copy = tmp_path / "copy.jsonl"  # then the same path with other bytes: the recorded sha256 tells
    pairs_copy.write_bytes(pairs_file.read_bytes())
    run_main(*seq2seq(pairs_copy, tmp_path / "run2", "--steps=2"))
    pairs_copy.write_text(other.read_text(encoding="utf-8"), encoding="utf-8")
    proc = run_cli(f"--resume={tmp_path / 'run2'}", "--steps=4")
    assert_one_line_error(proc, str(pairs_copy), "sha256")


@pytest.mark.parametrize("options, fragments", [
    (["--preset=nano", "--pairs=P"], ["--pairs=P", "arch='decoder'", "--data or --sft"]),
    (["--preset=seq2seq-nano"], ["--pairs=FILE.jsonl"]),
    (["--preset=seq2seq-nano", "--pairs=P", "--data=D"], ["--data=D", "arch='encoder-decoder'", "--pairs"]),
    (["--preset=bert-nano", "--tokenizer=T"], ["--tokenizer=T", "--pairs"]),
    (["--preset=bert-base", "--dry_run"], ["--dry_run", "decoder", "arch='encoder'"]),
])
def test_each_architecture_names_its_data(tmp_path, options, fragments):
    proc = run_cli(*options, "--steps=1", f"--out_dir={tmp_path / 'run'}", "--peak_tflops=1")
    assert proc.returncode == 2
    assert_one_line_error(proc, *fragments)


def test_seq_len_defaults_to_the_models_max_seq_len_when_shorter(pairs_file, tmp_path):
    """seq2seq-nano's max_seq_len is 64, below the default seq_len of 128: the default follows the model."""
    run_main(*[a for a in seq2seq(pairs_file, tmp_path / "run", "--steps=1") if not a.startswith("--seq_len")])
    assert read_run_meta(tmp_path / "run").train_config.seq_len == 32  # this test's --max_seq_len


# ----------------------------------------------------------------------------------------------------------
# tensor and data parallel equal one process, dropout on


LAYOUTS = {"dp=2": (2, "--tp=1", 2), "tp=2": (2, "--tp=2", 1)}  # name -> (ranks, option, dp)


@pytest.mark.mpi
@needs_mpirun
@pytest.mark.parametrize("arch", ["bert", "seq2seq"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_layouts_equal_one_process_with_dropout(arch, layout, data_dir, pairs_file, tmp_path):
    n, option, dp = LAYOUTS[layout]
    make = (lambda out, *extra: bert(data_dir, out, *extra)) if arch == "bert" else \
        (lambda out, *extra: seq2seq(pairs_file, out, *extra))
    one = [a if a != "--batch_size=4" else f"--batch_size={4 * dp}" for a in make(tmp_path / "one", "--steps=4")]
    run_main(*one)
    train_mpi(n, make(tmp_path / "par", "--steps=4", option))
    got, ref = read_metrics(tmp_path / "par"), read_metrics(tmp_path / "one")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(5))
    for key in ("loss", "grad_norm", "val_loss"):
        a, b = [r[key] for r in got if key in r], [r[key] for r in ref if key in r]
        assert len(a) == len(b) > 0 and rel_err(a, b) <= 1e-10, (arch, layout, key, a, b)
    cfg = read_run_meta(tmp_path / "par").model_config
    assert cfg.dropout > 0 and cfg.attn_dropout > 0
    from npllm.models import split_axes

    params, _, _ = load_checkpoint(tmp_path / "par", split_axes=split_axes(cfg))
    ref_params, _, _ = load_checkpoint(tmp_path / "one")
    for name in ref_params:
        if name.endswith(".bk"):
            # a key bias shifts all of a query's scores alike: its gradient is zero in exact math, rounding noise
            # in practice, which AdamW's normalised steps turn into moves of ~lr in any layout
            continue
        assert rel_err(params[name], ref_params[name]) <= 1e-10, (arch, layout, name)
