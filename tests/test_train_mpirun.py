"""``python -m npllm.train`` under mpirun: every layout equals one process, resume is exact, failures end the job,
the checkpoint layout loads and re-shards, the 7B shapes split exactly. (The --dry_run memory model: test_memory.py.)

The trainer runs (mpirun jobs, marked ``mpi``) train a small LLaMA-like model (2 layers, GQA, V=400) on 50 KB of
text, 2 rows per dp rank, for 4 steps, and compare with one process on the same global batch: data-parallel rank d
draws rows d*B ... (d+1)*B - 1 of the dp*B windows that one process with batch_size = dp*B draws at the same step
(``BatchSampler``), so the two see the same data in the same order. Bounds (relative): float64 1e-10 (measured:
losses, gradient norms and validation losses <= 1.2e-16, parameters <= 5e-15); float32 1e-5 on
the losses and norms (measured <= 5e-8; the layouts add in different orders).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_scripts.mpi_common import (
    BLAS_THREAD_VARS, NO_MPIRUN, REPO, SEVEN_B_SHAPES, find_mpirun, load_npz, run_mpi, seven_b_batch, seven_b_params,
    seven_b_probe_dot,
)

from npllm.checkpoint import load_checkpoint, optim_file_names
from npllm.config import ModelConfig, get_preset
from npllm.corpus import default_corpus_text
from npllm.data import prepare_data
from npllm.metrics import read_metrics
from npllm.models import init_params, param_shapes, split_axes
from npllm.models.decoder import loss_and_grads
from npllm.parallel.data import dp_count_weight
from npllm.parallel.tensor import shard_array
from npllm.run import load_trained, read_checkpoint_record, read_run_meta
from npllm.tokenizer import train_tokenizer
from npllm.train import main

needs_mpirun = pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
VOCAB = 400
MODEL = ["--preset=nano", "--n_layers=2", "--dim=32", "--n_heads=4", "--n_kv_heads=2", "--ffn_dim=64",
         f"--vocab_size={VOCAB}"]
RUN = ["--seq_len=16", "--peak_tflops=1", "--eval_interval=2", "--eval_batches=3", "--lr=3e-3"]
STEPS = 4
TIMING = ("tokens_per_s", "mfu")
BOUND = {"float64": 1e-10, "float32": 1e-5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Tokenizer (V=400) and shards of 50 KB of text: tinyshakespeare when present, else the default corpus."""
    root = tmp_path_factory.mktemp("parallel_train_data")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000] if SHAKESPEARE.is_file() else default_corpus_text()[:50_000]
    (root / "text.txt").write_text(text, encoding="utf-8")
    train_tokenizer([root / "text.txt"], VOCAB, root / "data" / "tokenizer")
    prepare_data([root / "text.txt"], root / "data" / "tokenizer", root / "data")
    return root / "data"


def args(data_dir, out_dir, batch_size, *extra, dtype="float64") -> list[str]:
    return [*MODEL, *RUN, f"--data={data_dir}", f"--out_dir={out_dir}", f"--batch_size={batch_size}",
            f"--dtype={dtype}", *extra]


def train_mpi(n: int, argv: list[str], timeout: float = 120, check: bool = True):
    """``mpirun -n n python -m npllm.train argv`` from the repository root, the BLAS thread variables left to the
    ranks. Returns (CompletedProcess, seconds); with check, a non-zero exit fails with the output's tail."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [find_mpirun(), "-n", str(n), sys.executable, "-m", "npllm.train", *argv]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode} after {seconds:.1f} s\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc, seconds


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def assert_metrics_close(got: list[dict], ref: list[dict], bound: float, where: str) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(STEPS + 1)), where
    for key in ("loss", "grad_norm", "val_loss"):
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in ref if key in r]
        assert len(a) == len(b) > 0 and rel_err(a, b) <= bound, (where, key, a, b)
    assert [r.get("lr") for r in got] == [r.get("lr") for r in ref], where


# ----------------------------------------------------------------------------------------------------------
# every layout equals one process on the same global batch

# name -> (ranks, trainer options); every dp rank takes B=2 rows
LAYOUTS = {
    "dp=2": (2, ["--tp=1"]),
    "tp=2": (2, ["--tp=2"]),
    "tp=2 x dp=2": (4, ["--tp=2"]),
    "dp=2 zero=1": (2, ["--tp=1", "--zero=1"]),
    "tp=2 x dp=2 zero=1": (4, ["--tp=2", "--zero=1"]),
}
B = 2


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """One process, batch_size = dp * B: {(dp, dtype): run directory}."""
    runs = {}

    def get(dp: int, dtype: str = "float64") -> Path:
        if (dp, dtype) not in runs:
            out = tmp_path_factory.mktemp(f"reference_dp{dp}_{dtype}") / "run"
            assert main(args(data_dir, out, dp * B, f"--steps={STEPS}", dtype=dtype)) == 0
            runs[dp, dtype] = out
        return runs[dp, dtype]

    return get


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_run(request, data_dir, tmp_path_factory):
    """(layout name, run directory, seconds, stdout) of one mpirun job of STEPS steps."""
    n, options = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp("layout") / "run"
    proc, seconds = train_mpi(n, args(data_dir, out, B, f"--steps={STEPS}", *options))
    return request.param, out, seconds, proc.stdout


@pytest.mark.mpi
@needs_mpirun
def test_every_layout_equals_one_process(layout_run, reference):
    layout, run, seconds, _ = layout_run
    n, options = LAYOUTS[layout]
    tp = int(options[0].split("=")[1])
    dp = n // tp
    ref = reference(dp)
    assert_metrics_close(read_metrics(run), read_metrics(ref), BOUND["float64"], layout)

    # the checkpoint: one file per tp rank (and per dp rank for ZeRO-1 moments), re-assembled to full tensors
    ckpt = run / "ckpt_00000004"
    zero = 1 if "--zero=1" in options else 0
    layout_record = read_checkpoint_record(ckpt).layout
    assert layout_record == {"tp": tp, "dp": dp, "zero": zero}
    expected = {"model.safetensors"} if tp == 1 else {f"model.tp{r}.safetensors" for r in range(tp)}
    expected |= {name for r in range(tp) for name in optim_file_names(r, layout_record)}
    assert {p.name for p in ckpt.iterdir()} == expected | {"meta.json"}, layout
    axes = split_axes(read_run_meta(run).model_config)
    params, opt, meta = load_checkpoint(run, split_axes=axes)
    ref_params, ref_opt, _ = load_checkpoint(ref)
    assert list(params) == list(ref_params) and opt["step"] == ref_opt["step"] == STEPS
    for name in ref_params:
        assert params[name].shape == ref_params[name].shape
        assert rel_err(params[name], ref_params[name]) <= BOUND["float64"], (layout, name)
        for kind in ("m", "v"):
            assert rel_err(opt[kind][name], ref_opt[kind][name]) <= BOUND["float64"], (layout, kind, name)
    assert meta["train_config"]["tp"] == tp and meta["train_config"]["zero"] == zero
    gen_params, gen_cfg, _ = load_trained(run)[:3]  # generation and evaluation read any layout as full tensors
    assert gen_cfg.vocab_size == VOCAB and all(np.array_equal(gen_params[n], params[n]) for n in params)
    assert seconds < 60, f"{layout}: {seconds:.1f} s"


@pytest.mark.mpi
@needs_mpirun
def test_float32_tp_x_dp_matches_one_process(data_dir, reference, tmp_path):
    out = tmp_path / "run"
    train_mpi(4, args(data_dir, out, B, f"--steps={STEPS}", "--tp=2", "--zero=1", dtype="float32"))
    assert_metrics_close(read_metrics(out), read_metrics(reference(2, "float32")), BOUND["float32"], "float32")


@pytest.mark.mpi
@needs_mpirun
def test_only_world_rank_0_logs(layout_run):
    """One header, one line per logged step and one summary for the whole job (not one per rank); tokens/s counts
    every dp rank's rows; the summary gives the peak memory of the busiest rank."""
    layout, run, _, stdout = layout_run
    n, options = LAYOUTS[layout]
    lines = stdout.splitlines()
    assert sum(line.startswith("model: ") for line in lines) == 1, stdout
    assert sum(line.startswith(f"step {STEPS}/{STEPS} |") for line in lines) == 1, stdout
    assert f"parallel: {n} ranks = tp {options[0][5:]} x dp {n // int(options[0][5:])}" in stdout
    assert lines[-1].startswith("done: checkpoint ") and re.search(r"peak memory [\d.]+ GiB per rank", lines[-1])
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))  # one writer


# ----------------------------------------------------------------------------------------------------------
# resume under mpirun, and resuming with another tp


@pytest.mark.mpi
@needs_mpirun
def test_resume_under_mpirun_is_bit_identical(data_dir, tmp_path):
    options = ["--tp=2", "--zero=1"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train_mpi(4, args(data_dir, straight, B, f"--steps={STEPS}", *options))
    train_mpi(4, args(data_dir, halves, B, f"--steps={STEPS // 2}", f"--lr_decay_steps={STEPS}", *options))
    proc, _ = train_mpi(4, [f"--resume={halves}", f"--steps={STEPS}", "--tp=1"], check=False)  # dp 2 -> 4
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "npllm.train: error: the checkpoint was written by tp=2 x dp=2 ranks (zero=1) and this run has tp=1 x dp=4; "
        "resuming needs dp=2 (another dp draws other data): e.g. mpirun -n 2 with --tp=1"), proc.stderr
    proc, _ = train_mpi(4, [f"--resume={halves}", f"--steps={STEPS}", "--peak_tflops=1"])
    assert f"resumed from step {STEPS // 2}" in proc.stdout
    assert without_timing(read_metrics(halves)) == without_timing(read_metrics(straight))  # every bit
    for ckpt in ("ckpt_00000004",):
        axes = split_axes(read_run_meta(straight).model_config)
        a, b = (load_checkpoint(run / ckpt, split_axes=axes) for run in (straight, halves))
        for name in a[0]:
            assert np.array_equal(a[0][name], b[0][name]), name
            assert np.array_equal(a[1]["m"][name], b[1]["m"][name]) and np.array_equal(a[1]["v"][name], b[1]["v"][name])


@pytest.mark.mpi
@needs_mpirun
def test_a_tp2_checkpoint_resumes_on_one_process_and_reshards(data_dir, reference, tmp_path):
    """Steps 1-2 with tp=2 on 2 ranks, steps 3-4 on one process: the run of one process, to rounding."""
    run = tmp_path / "run"
    train_mpi(2, args(data_dir, run, B, f"--steps={STEPS // 2}", f"--lr_decay_steps={STEPS}", "--tp=2"))
    assert main([f"--resume={run}", f"--steps={STEPS}", "--tp=1", "--peak_tflops=1"]) == 0
    ref = reference(1)
    assert_metrics_close(read_metrics(run), read_metrics(ref), BOUND["float64"], "tp=2 then tp=1")
    # the tp=2 checkpoint itself: any rank of any tp gets its slice of the full tensors
    axes = split_axes(read_run_meta(run).model_config)
    full, full_opt, _ = load_checkpoint(run / "ckpt_00000002", split_axes=axes)
    assert read_checkpoint_record(run / "ckpt_00000002").layout == {"tp": 2, "dp": 1, "zero": 0}
    for tp in (1, 2, 4):
        for rank in range(tp):
            shard, opt, meta = load_checkpoint(run / "ckpt_00000002", tp_rank=rank, tp_size=tp, split_axes=axes)
            assert meta["step"] == 2
            for name, value in full.items():
                np.testing.assert_array_equal(shard[name], shard_array(value, axes[name], rank, tp))
                np.testing.assert_array_equal(opt["v"][name], shard_array(full_opt["v"][name], axes[name], rank, tp))
    assert read_run_meta(run).train_config.tp == 1  # the newest checkpoint is the one-process one

    # --init_from a one-process checkpoint under tp=2: each rank takes its slices of the weights
    new = tmp_path / "from_init"
    train_mpi(2, [*MODEL[1:], *RUN, f"--out_dir={new}", f"--batch_size={B}", "--dtype=float64", "--steps=1",
                  "--tp=2", f"--init_from={run}", f"--data={data_dir}"])
    before = read_metrics(new)[0]["val_loss"]  # the untrained step-0 evaluation: the checkpoint's weights
    assert abs(before - read_metrics(run)[-1]["val_loss"]) <= 1e-10 * before


# ----------------------------------------------------------------------------------------------------------
# failures


@pytest.mark.mpi
@needs_mpirun
def test_an_exception_on_one_rank_ends_the_job(data_dir, tmp_path):
    start = time.perf_counter()
    proc, _ = run_mpi(2, "train_fail_on_one_rank.py", "RuntimeError", "1", "2", "--",
                      *args(data_dir, tmp_path / "run", B, "--steps=4", "--tp=2"), timeout=60, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and seconds < 30, (proc.returncode, seconds)
    assert "[rank 1] uncaught RuntimeError" in proc.stderr and "planted failure on rank 1" in proc.stderr
    assert "Traceback" in proc.stderr
    assert not (tmp_path / "run" / "ckpt_00000004").exists()


@pytest.mark.mpi
@needs_mpirun
def test_bad_input_seen_by_one_rank_is_one_line_from_that_rank(data_dir, tmp_path):
    """Rank 1 alone hits a ValueError while rank 0 waits for it in a collective: rank 1 says its one line (no
    traceback of its own) and aborts the job, about 5 s later (ErrorVote's wait)."""
    start = time.perf_counter()
    proc, _ = run_mpi(2, "train_fail_on_one_rank.py", "ValueError", "1", "1", "--",
                      *args(data_dir, tmp_path / "run", B, "--steps=4", "--tp=1"), timeout=60, check=False)
    seconds = time.perf_counter() - start
    assert proc.returncode != 0 and seconds < 30, (proc.returncode, seconds, proc.stderr)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("npllm.train")]
    assert ours == ["npllm.train: error: [rank 1] planted failure on rank 1 at step 1"], proc.stderr
    assert "uncaught ValueError" not in proc.stderr and "[rank 1] uncaught" not in proc.stderr, proc.stderr


@pytest.mark.mpi
@needs_mpirun
def test_bad_input_seen_by_every_rank_is_said_once(data_dir, tmp_path):
    proc, seconds = train_mpi(2, args(data_dir, tmp_path / "run", B, "--steps=2", "--tp=3"), check=False)
    assert proc.returncode == 2 and seconds < 30, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npllm.train: error: tp=3 does not divide n_heads=4"), proc.stderr
    proc, _ = train_mpi(3, args(data_dir, tmp_path / "run", B, "--steps=2", "--tp=2"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["npllm.train: error: tp=2 does not divide the number of ranks 3; allowed: 1, 3"], proc.stderr


def test_tp_without_mpirun_is_one_clear_line(data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path / "run", B, "--steps=2", "--tp=2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("npllm.train: error: --tp=2 needs 2 ranks") and "mpirun -n 2" in err and "\n" not in err


# ----------------------------------------------------------------------------------------------------------
# the 7B shapes: tp=4 equals one process


@pytest.mark.mpi
@needs_mpirun
def test_seven_b_shapes_tp4_equal_one_process(tmp_path):
    """The real 7B block, embedding and head (vocab 32000) split over 4 ranks: loss, global gradient norm and the
    projection p^T g q of every gradient on a random rank-one direction equal one process's (float32: 1e-5 of the
    loss, the norm, and |g|; one process's float32 gradients are themselves 1e-6 from float64 ones here)."""
    _, seconds = run_mpi(4, "seven_b_shapes.py", f"--out={tmp_path}", timeout=180)
    ranks = [load_npz(tmp_path / f"rank{r}.npz") for r in range(4)]
    cfg = get_preset("7b", **SEVEN_B_SHAPES)
    params = seven_b_params(cfg, 0, 1)
    tokens, targets = seven_b_batch(cfg)
    loss, grads = loss_and_grads(params, tokens, targets, cfg)
    del params
    norm = math.sqrt(sum(float(np.vdot(g.astype(np.float64), g.astype(np.float64))) for g in grads.values()))
    for r in ranks:
        assert abs(float(r["loss"]) - loss) <= 1e-5 * abs(loss)
        assert abs(float(r["norm"]) - norm) <= 1e-5 * norm
    shapes, axes = param_shapes(cfg), split_axes(cfg)
    for name, g in grads.items():
        want = seven_b_probe_dot(axes[name], g, shapes[name], 0, 1)
        shards = [float(r[f"dot:{name}"]) for r in ranks]
        got = sum(shards) if axes[name] is not None else shards[0]  # a replicated gradient: every rank holds it all
        scale = float(np.linalg.norm(g))  # a random direction: an error e moves p^T g q by about |e|
        assert shards[0] != 0 and abs(got - want) <= 1e-5 * scale, (name, got, want, scale)
    assert seconds < 60, f"{seconds:.1f} s"


# ----------------------------------------------------------------------------------------------------------
# padded vocabularies, uneven targets


def test_a_model_vocabulary_larger_than_the_tokenizer_is_padding(data_dir, tmp_path, capsys):
    assert main(args(data_dir, tmp_path / "run", B, "--steps=2", "--vocab_size=512")) == 0
    out = capsys.readouterr().out
    assert "tokenizer has 400 tokens and the model vocab_size=512" in out and "400..511 are padding" in out
    params, _, _ = load_checkpoint(tmp_path / "run")
    assert params["tok_emb"].shape == (512, 32)


class FakeDP:
    """One rank's view of a data-parallel group whose ranks count ``total`` targets together."""

    def __init__(self, size: int, total: float):
        self.size, self.total = size, total

    def allreduce_scalar(self, value, op="sum"):
        return self.total


def test_uneven_targets_over_dp_ranks_give_the_global_batch_mean():
    """With -100 targets spread unevenly (fine-tuning), averaging the dp ranks' weighted means (dp_count_weight)
    gives the loss and gradients of the whole global batch, as one process computes them."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16)
    params = init_params(cfg, seed=1, dtype=np.float64)
    rng = np.random.default_rng(3)
    tokens, targets = rng.integers(0, 64, (4, 8)), rng.integers(0, 64, (4, 8))
    targets[0, :6] = -100  # rank 0 (rows 0-1) counts 10 targets, rank 1 (rows 2-3) counts 16
    loss, grads = loss_and_grads(params, tokens, targets, cfg)
    n_total = int((targets != -100).sum())
    parts = []
    for rows in (slice(0, 2), slice(2, 4)):
        part_loss, part_grads = loss_and_grads(params, tokens[rows], targets[rows], cfg)
        weight = dp_count_weight(int((targets[rows] != -100).sum()), FakeDP(2, n_total))
        assert weight != 1.0
        parts.append((weight * part_loss, {n: weight * g for n, g in part_grads.items()}))
    assert abs((parts[0][0] + parts[1][0]) / 2 - loss) <= 1e-12 * loss
    for name, g in grads.items():
        np.testing.assert_allclose((parts[0][1][name] + parts[1][1][name]) / 2, g, rtol=0, atol=1e-12 * abs(g).max())
    assert dp_count_weight(13, FakeDP(2, 26.0)) == 1.0  # equal counts: exactly 1, so pretraining is untouched
