"""Tests for npllm/train.py: exact resume, micro-batches, a kill during a checkpoint save, NaN stops, every bad
input as one line, metrics.jsonl and the log lines, and the loss going down.

Every run uses one tiny model (1 layer, C=32, V=400, T=16, B=4, ~35k parameters) on a few tens of KB of text
tokenized once per session, so a run of a dozen steps takes a fraction of a second. In-process runs call
``npllm.train.main``; the "one line on stderr, no traceback" checks run ``python -m npllm.train`` in a child.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npllm.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint
from npllm.config import ModelConfig, TrainConfig, get_preset
from npllm.data import BatchSampler, load_tokens
from npllm.models import accumulate_loss_and_grads, flops_per_token, init_params
from npllm.config import parse_options
from npllm.metrics import read_metrics, validation_loss
from npllm.train import main

from tests.helpers import (
    MODEL_ARGS, RUN_ARGS, VOCAB, assert_one_line_error, assert_same_checkpoints, run_cli, run_main,
    tiny, without_timing,
)


# ----------------------------------------------------------------------------------------------------------
# exact resume


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_resume_is_bit_identical_to_a_straight_run(data_dir, tmp_path, micro_batches):
    N = 6  # a multiple of eval_interval, so the straight run also evaluates at step N
    common = [f"--micro_batches={micro_batches}", "--eval_interval=3", "--eval_batches=2"]
    run_main(*tiny(data_dir, tmp_path / "straight", *common, f"--steps={2 * N}"))
    # first half: the schedule of a 2N-step run (lr_decay_steps=2N), stopped after N steps; then resumed to 2N
    run_main(*tiny(data_dir, tmp_path / "halves", *common, f"--steps={N}", f"--lr_decay_steps={2 * N}"))
    assert main([f"--resume={tmp_path / 'halves'}", f"--steps={2 * N}", "--peak_tflops=1"]) == 0

    straight, halves = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "halves")
    assert [r["step"] for r in straight] == list(range(2 * N + 1))
    assert len({r["lr"] for r in straight[1:]}) > N, "the schedule should change the lr from step to step"
    assert without_timing(halves) == without_timing(straight)  # loss, lr, grad_norm, val_loss: every bit
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "halves")


def test_recompute_trains_bit_identically_and_may_change_on_resume(data_dir, tmp_path):
    """--recompute only changes what the backward keeps: a run with --recompute=block, resumed with
    --recompute=attention (an execution choice a resume may change, like --impl), makes every metric, parameter and
    AdamW moment of a straight run with none (test_a_bad_checkpoint_or_resume_exits_with_one_clear_line: a resume
    still may not change the model itself)."""
    N, common = 4, ["--eval_interval=2", "--eval_batches=2", "--dropout=0.1"]
    run_main(*tiny(data_dir, tmp_path / "straight", *common, f"--steps={2 * N}"))
    run_main(*tiny(data_dir, tmp_path / "halves", *common, f"--steps={N}", f"--lr_decay_steps={2 * N}",
                   "--recompute=block"))
    assert main([f"--resume={tmp_path / 'halves'}", f"--steps={2 * N}", "--peak_tflops=1",
                 "--recompute=attention"]) == 0
    assert without_timing(read_metrics(tmp_path / "halves")) == without_timing(read_metrics(tmp_path / "straight"))
    assert_same_checkpoints(tmp_path / "straight", tmp_path / "halves")


def test_resume_drops_the_metrics_of_steps_after_its_checkpoint(data_dir, tmp_path):
    run_main(*tiny(data_dir, tmp_path / "straight", "--steps=10", "--eval_interval=5"))
    run = tmp_path / "crashed"
    run_main(*tiny(data_dir, run, "--steps=10", "--eval_interval=5", "--ckpt_interval=4", "--keep_checkpoints=5"))
    assert [r["step"] for r in read_metrics(run)] == list(range(11))
    # as if the process had died after logging step 10 but before checkpointing it: the newest checkpoint is step 8
    shutil.rmtree(run / checkpoint_name(10))
    assert latest_checkpoint(run).name == checkpoint_name(8)

    assert main([f"--resume={run}", "--peak_tflops=1"]) == 0
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(11)), f"duplicate or missing steps in metrics.jsonl: {steps}"
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(tmp_path / "straight"))
    assert_same_checkpoints(tmp_path / "straight", run)


# ----------------------------------------------------------------------------------------------------------
# micro-batches


def test_micro_batches_give_the_loss_and_grads_of_the_whole_batch(data_dir):
    cfg = get_preset("nano", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=VOCAB)
    params = init_params(cfg, seed=3, dtype=np.float64)
    x, y = BatchSampler(load_tokens(data_dir / "train.bin"), batch_size=8, seq_len=16, seed=1).next()  # (B, T)
    loss_1, grads_1 = accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, 1)
    for micro_batches in (2, 4):
        loss_k, grads_k = accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, micro_batches)
        assert abs(loss_k - loss_1) <= 1e-12 * abs(loss_1)
        assert list(grads_k) == list(grads_1)
        for name, g in grads_1.items():
            err = np.max(np.abs(grads_k[name] - g)) / np.max(np.abs(g))
            assert err <= 1e-12, f"micro_batches={micro_batches}: {name} relative error {err:.2e}"


def test_row_groups_give_the_loss_and_grads_of_the_whole_batch(data_dir):
    # groups of rows side by side (each on one core), alone and inside micro-batches, in float64: the sum of the
    # groups' weighted means is the batch's mean up to rounding (a row with no counted target included)
    cfg = get_preset("nano", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=VOCAB)
    params = init_params(cfg, seed=3, dtype=np.float64)
    x, y = BatchSampler(load_tokens(data_dir / "train.bin"), batch_size=7, seq_len=16, seed=1).next()  # (B, T)
    y[2] = -100  # IGNORE_INDEX: this row counts nothing
    loss_1, grads_1 = accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, 1)
    for micro_batches, row_groups in ((1, 2), (1, 3), (1, 7), (2, 2), (3, 2)):
        loss_k, grads_k = accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, micro_batches,
                                                    row_groups=row_groups)
        assert abs(loss_k - loss_1) <= 1e-12 * abs(loss_1), (micro_batches, row_groups)
        assert list(grads_k) == list(grads_1)
        for name, g in grads_1.items():
            err = np.max(np.abs(grads_k[name] - g)) / np.max(np.abs(g))
            assert err <= 1e-12, f"micro_batches={micro_batches} row_groups={row_groups}: {name} error {err:.2e}"
    # validation scores a batch's rows in the same groups side by side: the same mean (and a row of no target counts
    # nothing, in a group of its own too)
    batches = [{"tokens": x, "targets": y}, {"tokens": x[::-1].copy(), "targets": y[::-1].copy()}]
    tc = TrainConfig(batch_size=7, dtype="float64")
    val_1 = validation_loss(params, cfg, batches, tc, np)
    for row_groups in (2, 3, 7):
        assert abs(validation_loss(params, cfg, batches, tc, np, row_groups=row_groups) - val_1) <= 1e-12 * val_1


def test_row_groups_side_by_side_give_the_bits_of_one_after_the_other(data_dir, monkeypatch):
    # float32. Groups run side by side on 2 threads (BLAS on one thread each) must give the bits of the same groups
    # run one after the other with BLAS on one thread: no thread reads what another writes. (With BLAS on more
    # threads its sums may round differently, as anywhere in npllm: OpenBLAS splits some products by thread.)
    import npllm.parallel.cores as cores

    cfg = get_preset("nano", n_layers=2, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=VOCAB)
    params = init_params(cfg, seed=4)
    x, y = BatchSampler(load_tokens(data_dir / "train.bin"), batch_size=6, seq_len=32, seed=2).next()  # (B, T)
    batch = {"tokens": x, "targets": y}
    runs = []
    for threads in (2, 1, 2):
        monkeypatch.setattr(cores, "default_threads", lambda threads=threads: threads)
        with cores.blas_on_one_thread():
            runs.append(accumulate_loss_and_grads(params, batch, cfg, 1, row_groups=3))
    for loss, grads in runs[1:]:
        assert loss == runs[0][0]
        for name, g in grads.items():
            np.testing.assert_array_equal(g, runs[0][1][name], err_msg=name)
    whole_loss, whole_grads = accumulate_loss_and_grads(params, batch, cfg, 1)
    assert abs(whole_loss - runs[0][0]) <= 1e-6 * whole_loss  # and they are the batch's, up to float32 rounding
    for name, g in whole_grads.items():
        assert np.max(np.abs(runs[0][1][name] - g)) <= 1e-4 * np.max(np.abs(g)), name


def test_trainer_with_micro_batches_or_row_groups_matches_one_batch_in_float64(data_dir, tmp_path):
    runs = {"mb1": ("--micro_batches=1", "--row_groups=1"), "mb2": ("--micro_batches=2", "--row_groups=1"),
            "rg2": ("--micro_batches=1", "--row_groups=2"), "mb2rg2": ("--micro_batches=2", "--row_groups=2")}
    for name, options in runs.items():
        run_main(*tiny(data_dir, tmp_path / name, "--dtype=float64", *options, "--steps=4", "--eval_interval=2"))
    one = read_metrics(tmp_path / "mb1")
    params_1, _, _ = load_checkpoint(tmp_path / "mb1")
    for name in ("mb2", "rg2", "mb2rg2"):
        other = read_metrics(tmp_path / name)
        assert [r["step"] for r in one] == [r["step"] for r in other] == list(range(5))
        for a, b in zip(one, other):
            for key in ("loss", "grad_norm", "val_loss"):
                if key in a:
                    assert abs(a[key] - b[key]) <= 1e-12 * abs(a[key]), (name, a["step"], key, a[key], b[key])
            assert a.get("lr") == b.get("lr")
        params_k, _, _ = load_checkpoint(tmp_path / name)
        for key, p in params_1.items():
            assert p.dtype == np.float64
            np.testing.assert_allclose(params_k[key], p, rtol=0, atol=1e-12, err_msg=f"{name} {key}")


# ----------------------------------------------------------------------------------------------------------
# a kill while the second checkpoint is being saved

KILL_DURING_SAVE = r"""
import os, signal, sys
from pathlib import Path

import npllm.checkpoint
from npllm.train import main

# npllm.checkpoint publishes with os.replace: the checkpoint directory's rename, then the 'latest' pointer's.
target, seen = sys.argv[1], []
real_replace = npllm.checkpoint.os.replace

def replace(src, dst, *args, **kwargs):
    if Path(dst).name == target:
        seen.append(dst)
        if target != "latest" or len(seen) == 2:  # 'latest' is written once per checkpoint: die at the second
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)

npllm.checkpoint.os.replace = replace
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("killed_at", ["directory rename", "latest pointer"])
def test_a_kill_while_saving_the_second_checkpoint_leaves_the_first_and_resume_works(data_dir, tmp_path, killed_at):
    args = ["--steps=8", "--ckpt_interval=4", "--eval_interval=4"]
    run_main(*tiny(data_dir, tmp_path / "straight", *args))
    run = tmp_path / "killed"
    target = checkpoint_name(8) if killed_at == "directory rename" else "latest"
    proc = run_cli(target, *tiny(data_dir, run, *args), script=KILL_DURING_SAVE)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)

    first = latest_checkpoint(run)
    assert first.name == checkpoint_name(4)
    params, opt_state, meta = load_checkpoint(first)
    assert meta["step"] == 4 and opt_state["step"] == 4
    if killed_at == "directory rename":
        assert not (run / checkpoint_name(8)).exists()
        assert any(p.name.startswith(".tmp_ckpt_") for p in run.iterdir()), "the killed save's temp dir is gone?"

    assert main([f"--resume={run}", "--peak_tflops=1"]) == 0
    assert latest_checkpoint(run).name == checkpoint_name(8)
    assert not any(p.name.startswith((".tmp_", ".trash_")) for p in run.iterdir() if p.is_dir())
    assert without_timing(read_metrics(run)) == without_timing(read_metrics(tmp_path / "straight"))
    assert_same_checkpoints(tmp_path / "straight", run)


# ----------------------------------------------------------------------------------------------------------
# NaN / inf


@pytest.mark.parametrize("lr, what", [("1e30", "is not finite"),  # params ~1e30: the next forward overflows
                                      ("1e39", "parameters are not finite")])  # lr/bias1 is inf in float32
def test_an_overflowing_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, lr, what):
    run = tmp_path / "run"
    run_main(*tiny(data_dir, run, "--steps=4", "--ckpt_interval=2"))
    proc = run_cli(f"--resume={run}", "--steps=20", f"--lr={lr}", "--min_lr=0", "--grad_clip=0",
                   "--warmup_steps=0", "--ckpt_interval=1", "--peak_tflops=1")
    line = assert_one_line_error(proc, what)
    assert proc.returncode == 1
    bad_step = int(re.search(r"step (\d+)", line).group(1))
    assert 5 <= bad_step < 20
    good = latest_checkpoint(run)
    assert str(good) in line, "the message should name the last good checkpoint"
    params, _, meta = load_checkpoint(good)
    assert meta["step"] == bad_step - 1  # a checkpoint at every step up to the bad one, none of the bad one
    assert all(np.isfinite(p).all() for p in params.values())
    records = read_metrics(run)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records if "loss" in r)


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, no traceback


def _write_shard_header(path: Path, magic: bytes, count: int) -> None:
    path.write_bytes(struct.pack("<8sIIQI", magic, 1, 2, count, VOCAB).ljust(64, b"\0"))


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step run with one checkpoint (ckpt_00000004); tests copy it before damaging it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_main(*tiny(data_dir, run, "--steps=4"))
    return run


@pytest.mark.parametrize("case", ["unknown preset", "unknown option", "wrong type", "bare word", "seq_len",
                                  "row_groups", "vocab mismatch", "missing data dir", "no meta.json", "bad magic",
                                  "zero tokens", "truncated shard", "corrupt meta.json", "corrupt tokenizer"])
def test_bad_input_exits_with_one_clear_line(data_dir, tmp_path, case):
    data = data_dir
    extra, fragments = [], []
    if case not in ("unknown preset", "unknown option", "wrong type", "bare word", "seq_len", "row_groups",
                    "vocab mismatch", "missing data dir"):  # the cases that damage a copy of the data
        data = tmp_path / "data"
        shutil.copytree(data_dir, data)
    if case == "unknown preset":
        extra, fragments = ["--preset=nope"], ["'nope'", "nano"]
    elif case == "unknown option":
        extra, fragments = ["--stepz=3"], ["--stepz", "did you mean --steps", "--help lists every option"]
    elif case == "wrong type":
        extra, fragments = ["--steps=abc"], ["--steps='abc'", "integer"]
    elif case == "bare word":
        extra, fragments = ["steps=3"], ["'steps=3'", "--name=value"]
    elif case == "seq_len":
        extra, fragments = ["--seq_len=300"], ["seq_len=300", "max_seq_len=256"]
    elif case == "row_groups":  # more groups than a micro-batch has rows (B=4 in 2 micro-batches: 2 rows)
        extra, fragments = ["--micro_batches=2", "--row_groups=3"], ["row_groups=3", "2 rows of a micro-batch"]
    elif case == "vocab mismatch":  # fewer rows than tokens (a larger model vocabulary is padding: allowed)
        extra, fragments = ["--vocab_size=300"], ["300", str(VOCAB), "too few rows"]
    elif case == "missing data dir":
        data, fragments = tmp_path / "nowhere", [str(tmp_path / "nowhere")]
    elif case == "no meta.json":
        (data / "meta.json").unlink()
        fragments = ["meta.json"]
    elif case == "bad magic":
        raw = bytearray((data / "train.bin").read_bytes())
        raw[:8] = b"NOTTOKEN"
        (data / "train.bin").write_bytes(bytes(raw))
        fragments = ["train.bin", "NOTTOKEN"]
    elif case == "zero tokens":
        _write_shard_header(data / "train.bin", b"NPLLMTOK", 0)
        fragments = ["train.bin", "0 tokens"]
    elif case == "truncated shard":
        raw = (data / "val.bin").read_bytes()
        (data / "val.bin").write_bytes(raw[: len(raw) // 2])
        fragments = ["val.bin", "truncated"]
    elif case == "corrupt meta.json":
        (data / "meta.json").write_text('{"format": "npllm-tokens", ')
        fragments = ["meta.json", "JSON"]
    elif case == "corrupt tokenizer":  # tokenizer.json gone too, else its fingerprint check would catch it first
        (data / "tokenizer" / "tokenizer.json").unlink()
        model = data / "tokenizer" / "tokenizer.model"
        model.write_bytes(model.read_bytes()[:100])
        fragments = ["tokenizer.model", "not a sentencepiece model"]
    proc = run_cli(*tiny(data, tmp_path / "out", "--steps=2", *extra))
    assert_one_line_error(proc, *fragments)
    assert not list((tmp_path / "out").glob("ckpt_*"))


def _edit_json(path: Path, edit) -> None:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("case", ["truncated model", "flipped bytes", "meta not json", "no checkpoint",
                                  "not written by the trainer", "config disagrees with tensors", "changed model"])
def test_a_bad_checkpoint_or_resume_exits_with_one_clear_line(trained_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / checkpoint_name(4)
    extra = []
    if case == "truncated model":
        raw = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(raw[: len(raw) - 100])
        fragments = ["model.safetensors", "truncated"]
    elif case == "flipped bytes":
        raw = bytearray((ckpt / "model.safetensors").read_bytes())
        raw[-50] ^= 0xFF
        (ckpt / "model.safetensors").write_bytes(bytes(raw))
        fragments = ["model.safetensors", "sha256"]
    elif case == "meta not json":
        (ckpt / "meta.json").write_text('{"format": "npllm-checkpoint", "step": ')
        fragments = ["meta.json", "JSON"]
    elif case == "no checkpoint":
        shutil.rmtree(ckpt)
        fragments = ["no checkpoint", str(run)]
    elif case == "not written by the trainer":
        _edit_json(ckpt / "meta.json", lambda r: r["meta"].pop("model_config"))
        fragments = ["model_config", "npllm.train"]
    elif case == "config disagrees with tensors":
        _edit_json(ckpt / "meta.json", lambda r: r["meta"]["model_config"].update(ffn_dim=128))
        fragments = ["do not match", "mlp.w1"]
    elif case == "changed model":
        extra, fragments = ["--dim=64"], ["cannot change the model", "'dim': 64"]
    proc = run_cli(f"--resume={run}", "--steps=6", "--peak_tflops=1", *extra)
    assert_one_line_error(proc, *fragments)
    assert not (run / checkpoint_name(6)).exists()


def test_resume_refuses_other_data_shapes(trained_run, tmp_path):
    """A different batch size would be a different data order: a one-line error, not a silent change."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    proc = run_cli(f"--resume={run}", "--steps=6", "--peak_tflops=1", "--batch_size=8")
    assert_one_line_error(proc, "batch_size")


# ----------------------------------------------------------------------------------------------------------
# what a run writes and prints


def test_metrics_log_lines_and_plot(data_dir, tmp_path):
    run = tmp_path / "run"
    argv = [a for a in tiny(data_dir, run, "--steps=6", "--eval_interval=3", "--log_interval=2")
            if not a.startswith("--peak_tflops")]  # this run measures its peak with the start-up matmul
    proc = run_cli(*argv)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "%|" not in proc.stderr, "no progress bar off a terminal"
    assert "Traceback" not in proc.stderr

    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(7))
    assert set(records[0]) == {"step", "val_loss", "val_ppl", "val_bpb"}  # the untrained model's validation
    for r in records[1:]:
        for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (r["step"], key)
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0  # (a peak measured on a busy machine can make MFU > 1)
        assert ("val_loss" in r) == (r["step"] in (3, 6)), r
        if "val_loss" in r:
            assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
            assert 0 < r["val_bpb"] < r["val_loss"] / math.log(2)  # a BPE token stands for more than one byte

    lines = proc.stdout.splitlines()
    assert "(measured)" in lines[0] and "TFLOP/s" in lines[0]
    pattern = re.compile(r"^step +(\d+)/6 \| loss \d+\.\d+ \| lr \d\.\d\de[-+]\d+ \| grad norm \d+\.\d+ \| "
                         r"[\d,]+ tok/s \| MFU \d+\.\d%"
                         r"( \| val loss \d+\.\d+ \| val ppl \d+\.\d+ \| val bpb \d+\.\d+)?$")
    logged = {int(m.group(1)): m.group(2) is not None for m in map(pattern.match, lines) if m}
    assert logged == {1: False, 2: False, 3: True, 4: False, 6: True}, proc.stdout  # first, every 2nd, evals
    assert any(line.startswith("step 0/6 | val loss") for line in lines)
    assert lines[-1].startswith("done: checkpoint ") and str(run / checkpoint_name(6)) in lines[-1]

    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed: everything but loss.png was checked")
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mfu_is_the_model_flops_rate_over_the_peak(data_dir, tmp_path):
    run = tmp_path / "run"
    run_main(*tiny(data_dir, run, "--steps=3", "--peak_tflops=0.5", "--seq_len=8"))
    cfg = get_preset("nano", n_layers=1, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=VOCAB)
    # 6 N + 12 L C T, with N the matmul weights: attention (4 C^2 with GQA's smaller wk, wv), MLP (3 C F), lm_head
    C, F, T, kv = 32, 64, 8, 16
    n_matmul = (C * C + 2 * C * kv + C * C) + 3 * C * F + C * VOCAB
    assert flops_per_token(cfg, T) == 6 * n_matmul + 12 * 1 * C * T
    for r in read_metrics(run)[1:]:
        assert r["mfu"] == pytest.approx(flops_per_token(cfg, T) * r["tokens_per_s"] / 0.5e12, rel=1e-12)


def test_loss_goes_down(data_dir, tmp_path):
    """60 steps at lr 3e-3: the val loss ends at least 0.8 nats below the untrained model's (it drops ~1.25)."""
    run = tmp_path / "run"
    run_main(*tiny(data_dir, run, "--steps=60", "--lr=3e-3", "--eval_interval=30"))
    val = {r["step"]: r["val_loss"] for r in read_metrics(run) if "val_loss" in r}
    assert sorted(val) == [0, 30, 60]
    assert abs(val[0] - math.log(VOCAB)) < 0.1, "an untrained model should be near the uniform loss ln V"
    assert val[60] < val[30] < val[0]
    assert val[60] <= val[0] - 0.8, val


# ----------------------------------------------------------------------------------------------------------
# options and the default corpus


def test_parse_options():
    model_opts, train_opts = parse_options(["--preset", "nano-gpt2", "--bias", "--dim=64", "--lr=3e-4",
                                            "--lr_decay_steps=None", "--data=d"], ModelConfig, TrainConfig)
    assert model_opts == {"bias": True, "dim": 64}
    assert train_opts == {"preset": "nano-gpt2", "lr": 3e-4, "lr_decay_steps": None, "data": "d"}
    with pytest.raises(ValueError, match="--steps needs a value"):
        parse_options(["--steps"], ModelConfig, TrainConfig)
    with pytest.raises(ValueError, match="not a boolean"):
        parse_options(["--bias=maybe"], ModelConfig, TrainConfig)


def test_runs_on_the_default_corpus_when_no_data_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("NPLLM_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run_main(*MODEL_ARGS, *RUN_ARGS, f"--out_dir={run}", "--steps=2")
    _, _, meta = load_checkpoint(run)
    assert Path(meta["data_dir"]).parent == tmp_path / "cache"
    assert (Path(meta["data_dir"]) / "train.bin").is_file()


def test_help_lists_every_option_with_its_meaning(capsys):
    from npllm.config import ModelConfig, TrainConfig, field_types

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in list(field_types(ModelConfig)) + list(field_types(TrainConfig)):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{name}="))
        assert len(line.split(None, 1)) == 2, f"--{name} has no description: {line!r}"


def test_cuda_without_cupy_is_one_clear_line(data_dir, tmp_path):
    """Where CuPy is missing (CI, a laptop), --device=cuda says how to get it instead of a traceback."""
    script = ("import sys; sys.modules['cupy'] = None; from npllm.train import main; "
              "sys.exit(main(sys.argv[1:]))")
    proc = run_cli(*tiny(data_dir, tmp_path / "run", "--steps=2"), "--device=cuda", script=script)
    assert_one_line_error(proc, "device 'cuda' needs CuPy", "pip install -e '.[gpu]'")


def test_every_run_writes_its_resolved_config_and_config_reruns_it(data_dir, tmp_path):
    run_main(*tiny(data_dir, tmp_path / "first", "--steps=3", "--eval_interval=3", "--eval_batches=1"))
    written = (tmp_path / "first" / "config.toml").read_text()
    assert "[model]" in written and "dim = 32" in written and "steps = 3" in written
    run_main(f"--config={tmp_path / 'first' / 'config.toml'}", f"--out_dir={tmp_path / 'again'}")
    assert without_timing(read_metrics(tmp_path / "again")) == without_timing(read_metrics(tmp_path / "first"))


def test_console_scripts_run_the_same_commands(tmp_path):
    bin_dir = Path(sys.executable).parent
    for script in ("npllm-train", "npllm-generate", "npllm-evaluate"):
        done = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "--" in done.stdout, (script, done.stderr)
    done = subprocess.run([str(bin_dir / "npllm-train"), "--stepz=3"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.strip() == ("npllm.train: error: unknown option --stepz; did you mean "
                                                            "--steps? (--help lists every option)")
