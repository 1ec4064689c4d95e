"""Nothing lost, nothing silent: each hostile case of the reliability review, run as a user would run it.

    1  Ctrl-C / SIGTERM under mpirun (tp=2, dp=2): every rank ends within seconds, exit 130 / 143, checkpoint intact
    2  a new run into a directory that holds one: refused (nothing touched) unless --overwrite (old run renamed aside)
    3  two trainers on one --out_dir: the second is refused naming the first's pid; a dead trainer's lock is taken over
    4  token ids >= vocab_size in train.bin / val.bin: refused naming the file and position
    5  shards made by another tokenizer than the one now in the tokenizer directory: refused
    6  every OSError and damaged file is one line: a full disk or a permission error during a save (the previous
       checkpoint and latest intact, and said so), --out_dir / --out that is a file, damaged data and checkpoint
       meta.json, a non-UTF-8 prompt, a checkpoint holding NaN, deeply nested JSON in an SFT file, latest a directory
    7  file names in a checkpoint record cannot point outside the checkpoint directory
    8  --resume with fewer steps than done, --data= empty, --grad_clip=nan, evaluate on an empty file, leftovers of
       killed runs cleaned, generate --seed=-1

Disk-full and permission errors are simulated by a writer that raises them (this sandbox runs as root, for whom a
read-only directory is writable); everything else is the real thing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from npllm.checkpoint import checkpoint_name, latest_checkpoint, load_checkpoint
from npllm.data import write_tokens
from npllm.metrics import read_metrics
from npllm.models import split_axes
from npllm.run import read_run_meta
from npllm.tokenizer import train_tokenizer
from npllm.train import main
from tests.helpers import REPO, VOCAB, assert_one_line_error, run_cli, run_main, tiny
from tests.mpi_scripts.mpi_common import BLAS_THREAD_VARS, NO_MPIRUN, find_mpirun


def snapshot(run: Path) -> dict:
    """Every file under ``run`` with its bytes: what must be unchanged after a refused command."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_line(proc, prog="npllm.train") -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


def run_module(module: str, *argv, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("failures") / "run"
    run_main(*tiny(data_dir, run, "--steps=4", "--ckpt_interval=2", "--eval_interval=2", "--eval_batches=1"))
    return run


# ----------------------------------------------------------------------------------------------------------
# 1. interrupts end the whole job


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def rank_pids(out_dir: Path) -> list[int]:
    """The pids of the python ranks of a job writing to out_dir (children of hydra's proxy, found by command line)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"npllm.train" in cmd and f"--out_dir={out_dir}".encode() in cmd and b"mpirun" not in cmd[0]:
                if cmd[0].endswith((b"python", b"python3")) or b"python" in cmd[0]:
                    pids.append(int(entry.name))
    return pids


@pytest.mark.mpi
@pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)
@pytest.mark.parametrize("layout, target, sig, code", [
    ("--tp=2", "mpirun", signal.SIGINT, 130),  # Ctrl-C in the terminal: hydra forwards SIGINT to every rank
    ("--tp=2", "rank 1", signal.SIGTERM, 143),  # a kill of one rank, which may sit inside a collective
    ("--tp=1", "mpirun", signal.SIGINT, 130),  # dp=2
    ("--tp=1", "rank 0", signal.SIGTERM, 143),
])
def test_an_interrupt_ends_every_rank_and_names_the_intact_checkpoint(data_dir, tmp_path, layout, target, sig,
                                                                       code):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    command = [find_mpirun(), "-n", "2", sys.executable, "-m", "npllm.train",
               *tiny(data_dir, run, "--steps=100000", "--ckpt_interval=2", "--eval_interval=1000", "--n_kv_heads=2",
                     layout)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "latest").is_file() or proc.poll() is not None, 120, "the first checkpoint")
        assert proc.poll() is None, proc.communicate()
        if target == "mpirun":
            os.kill(proc.pid, sig)
        else:
            pids = sorted(rank_pids(run))
            assert len(pids) == 2, pids
            os.kill(pids[int(target.split()[1])], sig)
        start = time.monotonic()
        _, stderr = proc.communicate(timeout=60)
        seconds = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, (proc.returncode, stderr)
    assert seconds < 20, f"the job took {seconds:.1f} s to end"
    assert "npllm.train: interrupted; the last checkpoint" in stderr and "and latest are intact" in stderr, stderr
    assert "Traceback" not in stderr
    wait_for(lambda: rank_pids(run) == [], 10, "every rank to be gone")  # no rank left behind
    axes = split_axes(read_run_meta(run).model_config)
    _, opt, meta = load_checkpoint(latest_checkpoint(run), split_axes=axes)  # complete, sha256-checked
    assert meta["step"] >= 2 and opt["step"] == meta["step"]


def test_sigterm_of_one_process_is_one_line_with_exit_143(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "npllm.train", *tiny(data_dir, run, "--steps=100000",
                                                                         "--ckpt_interval=2", "--eval_interval=1000")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "latest").is_file() or proc.poll() is not None, 120, "the first checkpoint")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("npllm.train: interrupted; the last checkpoint"), stderr
    assert load_checkpoint(run)[2]["step"] >= 2


# ----------------------------------------------------------------------------------------------------------
# 2 and 3. a run directory belongs to one run


def test_a_new_run_into_a_run_directory_is_refused_and_touches_nothing(data_dir, trained):
    before = snapshot(trained)
    proc = run_cli(*tiny(data_dir, trained, "--steps=2"))
    line = assert_one_line_error(proc, f"--out_dir={trained} already holds a run", f"--resume={trained}",
                                 "--overwrite")
    assert "renamed aside, not deleted" in line
    assert snapshot(trained) == before


def test_overwrite_renames_the_old_run_aside_and_deletes_nothing(data_dir, trained, tmp_path):
    run = tmp_path / "run"
    run_main(*tiny(data_dir, run, "--steps=2", "--eval_interval=2", "--eval_batches=1"))
    before = snapshot(run)
    proc = run_cli(*tiny(data_dir, run, "--steps=1", "--eval_batches=1", "--overwrite"))
    assert proc.returncode == 0, proc.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and f"is now {aside[0]}" in proc.stdout
    assert snapshot(aside[0]) == before  # the old run, every byte, under its new name
    assert [m["step"] for m in read_metrics(run)] == [0, 1] and latest_checkpoint(run).name == checkpoint_name(1)


def test_a_second_trainer_is_refused_naming_the_first(data_dir, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "npllm.train", *tiny(data_dir, run, "--steps=100000",
                                                                          "--eval_interval=1000", "--ckpt_interval=2")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run / "latest").is_file() or first.poll() is not None, 120, "the first trainer's checkpoint")
        second = run_cli(*tiny(data_dir, run, "--steps=3"))
        second_resume = run_cli(f"--resume={run}", "--steps=200000")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=30)
    for proc in (second, second_resume):
        assert_one_line_error(proc, f"{run} is in use by another trainer (pid {first.pid} on ")
    steps = [m["step"] for m in read_metrics(run)]
    assert steps == list(range(len(steps)))  # only the first trainer's lines, in order


def test_a_lock_left_by_a_killed_trainer_is_taken_over(data_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("pid 999999 on somewhere\n")  # the file remains; no process holds its lock
    proc = run_cli(*tiny(data_dir, run, "--steps=1", "--eval_batches=1"))
    assert proc.returncode == 0, proc.stderr
    assert "was left by a trainer that is gone (pid 999999 on somewhere); taken over" in proc.stdout
    assert (run / ".lock").read_text() == ""  # a trainer that ends normally leaves no name behind
    proc = run_cli(f"--resume={run}", "--steps=2", "--peak_tflops=1")
    assert proc.returncode == 0 and "taken over" not in proc.stdout, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------
# 4 and 5. inputs checked where they enter


@pytest.mark.parametrize("split", ["train", "val"])
def test_token_ids_beyond_the_vocabulary_are_refused(data_dir, tmp_path, split):
    bad = tmp_path / "data"
    bad.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (bad / name).write_bytes((data_dir / name).read_bytes())
    meta = json.loads((bad / "meta.json").read_text())
    meta["tokenizer_dir"] = str(data_dir / "tokenizer")
    (bad / "meta.json").write_text(json.dumps(meta))
    tokens = np.array(np.memmap(bad / f"{split}.bin", dtype="<u2", mode="r", offset=64))
    tokens[17] = VOCAB + 5  # an id the model has no embedding row for
    write_tokens(bad / f"{split}.bin", tokens, 1 << 16)
    proc = run_cli(*tiny(bad, tmp_path / "run", "--steps=1"))
    assert_one_line_error(proc, f"{split}.bin: token id {VOCAB + 5} at position 17 is out of range",
                          f"vocab_size={VOCAB}")


def test_shards_of_another_tokenizer_are_refused(data_dir, tmp_path):
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (copy / name).write_bytes((data_dir / name).read_bytes())
    text = tmp_path / "other.txt"  # the same characters, other frequencies: another tokenizer, the same vocab_size
    text.write_text((data_dir.parent / "text.txt").read_text().lower())
    train_tokenizer([text], VOCAB, copy / "tokenizer")  # "retrained" in place, same vocab_size
    meta = json.loads((copy / "meta.json").read_text())
    meta["tokenizer_dir"] = "tokenizer"
    (copy / "meta.json").write_text(json.dumps(meta))
    proc = run_cli(*tiny(copy, tmp_path / "run", "--steps=1"))
    assert_one_line_error(proc, "the shards were made with tokenizer fingerprint", "(retrained?)")


# ----------------------------------------------------------------------------------------------------------
# 6. every OSError and every damaged file is one line


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_failed_write_during_a_save_keeps_the_previous_checkpoint_and_says_so(data_dir, tmp_path, monkeypatch,
                                                                                 capsys, error):
    import npllm.checkpoint

    run = tmp_path / "run"
    real, calls = npllm.checkpoint.save_file, []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) > 2:  # the first checkpoint's two files are written; the second checkpoint's are not
            raise OSError(error, os.strerror(error), path)
        real(tensors, path)

    monkeypatch.setattr(npllm.checkpoint, "save_file", failing)
    code = main(tiny(data_dir, run, "--steps=4", "--ckpt_interval=2", "--eval_interval=1000"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err, err
    assert err.startswith("npllm.train: error: ") and os.strerror(error) in err and ".tmp_ckpt_00000004" in err
    assert f"the last checkpoint {run / checkpoint_name(2)} and latest are intact" in err
    assert latest_checkpoint(run).name == checkpoint_name(2) and load_checkpoint(run)[2]["step"] == 2
    assert not any(p.name.startswith(".tmp_") for p in run.iterdir())  # the half-written save is gone


def test_out_dir_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    assert_one_line_error(run_cli(*tiny(data_dir, tmp_path / "afile", "--steps=1")), "is a file")
    assert (tmp_path / "afile").read_text() == "mine\n"


def test_data_prepare_out_that_is_a_file(data_dir, tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    proc = run_module("npllm.data", "prepare", "--input", str(data_dir.parent / "text.txt"), "--tokenizer",
                      str(data_dir / "tokenizer"), "--out", str(tmp_path / "afile"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert (tmp_path / "afile").read_text() == "mine\n"


@pytest.mark.parametrize("content, fragment", [
    ("[]", "the file must be a JSON object, got list"),
    ("{}", "is <missing>; expected"),
    (None, "field tokenizer_dir is null; expected a string"),
    ("{not json", "damaged metadata, not valid JSON"),
])
def test_a_damaged_data_meta_json_is_one_line(data_dir, tmp_path, content, fragment):
    copy = tmp_path / "data"
    copy.mkdir()
    for name in ("train.bin", "val.bin"):
        (copy / name).write_bytes((data_dir / name).read_bytes())
    if content is None:
        meta = json.loads((data_dir / "meta.json").read_text())
        meta["tokenizer_dir"] = None
        content = json.dumps(meta)
    (copy / "meta.json").write_text(content)
    assert_one_line_error(run_cli(*tiny(copy, tmp_path / "run", "--steps=1")), f"{copy / 'meta.json'}", fragment)


@pytest.mark.parametrize("edit, fragment", [
    (lambda m: m["meta"].update(sampler=None), "field meta.sampler is null; expected a JSON object"),
    (lambda m: m["meta"].update(step="four"), 'field meta.step is "four"; expected an integer >= 0'),
    (lambda m: m["meta"]["model_config"].update(dim="wide"), "field meta.model_config: dim='wide' is not allowed"),
    (lambda m: m.update(layout=[1]), "field layout is [1]"),
])
def test_a_hand_edited_checkpoint_meta_json_is_one_line(trained, tmp_path, edit, fragment):
    run = tmp_path / "run"
    (run / checkpoint_name(4)).mkdir(parents=True)
    for f in (trained / checkpoint_name(4)).iterdir():
        (run / checkpoint_name(4) / f.name).write_bytes(f.read_bytes())
    record = json.loads((run / checkpoint_name(4) / "meta.json").read_text())
    edit(record)
    (run / checkpoint_name(4) / "meta.json").write_text(json.dumps(record))
    proc = run_cli(f"--resume={run}", "--steps=6")
    assert_one_line_error(proc, "meta.json: ", fragment)
    assert one_line(run_module("npllm.generate", f"--ckpt={run}", "--max_new_tokens=2"), "npllm.generate")


def test_a_non_utf8_prompt_is_one_line(trained):
    proc = subprocess.run([sys.executable, "-m", "npllm.generate", f"--ckpt={trained}",
                           b"--prompt=caf\xe9 latin-1".decode("utf-8", "surrogateescape")],
                          cwd=REPO, capture_output=True, timeout=120)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert err.strip().startswith("npllm.generate: error: --prompt number 1 is not valid UTF-8"), err


def test_a_checkpoint_holding_nan_is_refused_before_sampling(trained, tmp_path):
    from safetensors.numpy import load_file, save_file

    from npllm.files import sha256_file

    run = tmp_path / "run"
    ckpt = run / checkpoint_name(4)
    ckpt.mkdir(parents=True)
    for f in (trained / checkpoint_name(4)).iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["norm.w"][3] = np.nan
    save_file(tensors, str(ckpt / "model.safetensors"))
    record = json.loads((ckpt / "meta.json").read_text())
    record["files"]["model.safetensors"] = {"bytes": (ckpt / "model.safetensors").stat().st_size,
                                            "sha256": sha256_file(ckpt / "model.safetensors")}
    (ckpt / "meta.json").write_text(json.dumps(record))
    line = one_line(run_module("npllm.generate", f"--ckpt={run}", "--prompt=x", "--max_new_tokens=2"),
                    "npllm.generate")
    assert "parameter norm.w holds 1 non-finite values" in line


def test_deeply_nested_json_in_an_sft_file_is_a_malformed_record(trained, tmp_path):
    sft = tmp_path / "deep.jsonl"
    sft.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    proc = run_cli(f"--init_from={trained}", f"--sft={sft}", f"--out_dir={tmp_path / 'sft'}", "--steps=1")
    assert_one_line_error(proc, f"{sft}:2: JSON nested too deeply to read")


def test_latest_that_is_a_directory(trained, tmp_path):
    run = tmp_path / "run"
    (run / checkpoint_name(4)).mkdir(parents=True)
    for f in (trained / checkpoint_name(4)).iterdir():
        (run / checkpoint_name(4) / f.name).write_bytes(f.read_bytes())
    (run / "latest").mkdir()
    proc = run_cli(f"--resume={run}", "--steps=6")
    assert_one_line_error(proc, f"{run / 'latest'} is not a file")


# ----------------------------------------------------------------------------------------------------------
# 7. a checkpoint record cannot point outside its directory


@pytest.mark.parametrize("name", ["../../../etc/passwd", "/etc/passwd", "model.tp7.safetensors", ".hidden"])
def test_file_names_in_a_checkpoint_record_stay_inside_it(trained, tmp_path, name):
    run = tmp_path / "run"
    ckpt = run / checkpoint_name(4)
    ckpt.mkdir(parents=True)
    for f in (trained / checkpoint_name(4)).iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    record = json.loads((ckpt / "meta.json").read_text())
    record["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    (ckpt / "meta.json").write_text(json.dumps(record))
    for proc, prog in ((run_module("npllm.generate", f"--ckpt={run}", "--max_new_tokens=2"), "npllm.generate"),
                       (run_cli(f"--init_from={run}", f"--out_dir={tmp_path / 'new'}", "--steps=1"), "npllm.train")):
        line = one_line(proc, prog)
        assert f"field files lists {name!r}" in line, line
        assert "bytes" not in line.split("lists")[1]  # nothing was read or measured at that path


# ----------------------------------------------------------------------------------------------------------
# 8. the smaller ones


def test_resume_with_no_steps_left_is_refused(trained):
    assert_one_line_error(run_cli(f"--resume={trained}", "--steps=3"),
                          "the run is already at step 4, so --steps=3 leaves nothing to do")


@pytest.mark.parametrize("option, fragment", [
    ("--data=", "--data= is empty; give a value (or none) or leave the option out"),
    ("--grad_clip=nan", "grad_clip=nan is not allowed; use a finite number in [0, inf]"),
])
def test_empty_or_nan_options_are_refused(data_dir, tmp_path, option, fragment):
    argv = [a for a in tiny(data_dir, tmp_path / "run", "--steps=1") if not a.startswith("--data=")] + [option]
    assert_one_line_error(run_cli(*argv), fragment)


def test_evaluate_on_an_empty_file_is_refused(trained, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    line = one_line(run_module("npllm.evaluate", f"--ckpt={trained}", f"--data={tmp_path / 'empty.txt'}"),
                    "npllm.evaluate")
    assert "holds no text to score" in line


def test_generate_seed_names_the_option(trained):
    line = one_line(run_module("npllm.generate", f"--ckpt={trained}", "--seed=-1"), "npllm.generate")
    assert "seed=-1 is not allowed; use an integer >= 0" in line


def test_leftovers_of_killed_runs_are_cleaned_on_the_next_start(trained, tmp_path):
    run = tmp_path / "run"
    (run / checkpoint_name(4)).mkdir(parents=True)
    for f in (trained / checkpoint_name(4)).iterdir():
        (run / checkpoint_name(4) / f.name).write_bytes(f.read_bytes())
    shutil.copytree(trained / "tokenizer", run / "tokenizer")  # the run's own copy of its tokenizer
    (run / "metrics.jsonl").write_text((trained / "metrics.jsonl").read_text() + '{"step": 5, "lo')  # a torn line
    leftovers = [run / ".metrics.jsonl.123.abcd1234.tmp", run / ".loss.png.123.abcd1234.tmp"]
    for path in leftovers:
        path.write_text("half")
    (run / ".tmp_ckpt_00000006_123").mkdir()
    assert main([f"--resume={run}", "--steps=5", "--eval_batches=1"]) == 0
    assert not any(path.exists() for path in leftovers) and not (run / ".tmp_ckpt_00000006_123").exists()
    assert [m["step"] for m in read_metrics(run)][-2:] == [4, 5]  # the torn line belonged to a step never saved


def test_a_tokenizer_trains_on_text_whose_only_line_is_longer_than_64_kib(tmp_path):
    from npllm.tokenizer import train_tokenizer

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    line = " ".join(words[i % 8] + str(i % 97) for i in range(20_000))  # ~190 KB on one line
    (tmp_path / "one_line.txt").write_text(line)
    tok = train_tokenizer([tmp_path / "one_line.txt"], 300, tmp_path / "tok")  # before: "every line is blank"
    assert tok.decode(tok.encode(line[:500])) == line[:500] and len(tok.encode("alpha12 beta13")) < 14


def test_build_directories_of_killed_processes_are_removed(tmp_path):
    from npllm.corpus import remove_dead_builds

    target = tmp_path / "default-corpus-v2048-abc"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".{target.name}.building.{int(dead.stdout)}.x1y2"
    live = tmp_path / f".{target.name}.building.{os.getpid()}.z3"
    for d in (stale, live):
        (d / "tokenizer").mkdir(parents=True)
    remove_dead_builds(target)
    assert not stale.exists() and live.exists()
