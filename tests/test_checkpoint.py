"""Tests for npllm/checkpoint.py: roundtrip, rotation, the latest pointer, corruption, and a kill during save."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npllm.backend import cupy_available
from npllm.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from npllm.optim import adamw_init, adamw_update

REPO = Path(__file__).resolve().parents[1]


def make_params(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = {"tok_emb": (7, 4), "layers.0.attn.wq": (4, 4), "layers.0.attn_norm.w": (4,), "norm.w": (4,),
              "lm_head": (4, 7)}
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


def trained_state(params, steps=2):
    """Non-zero AdamW moments (and a step count) for params, without touching the caller's params."""
    params = {n: p.copy() for n, p in params.items()}
    state = adamw_init(params)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        adamw_update(params, {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()},
                     state, lr=1e-2)
    return state


def assert_same_tensors(got, expected):
    assert list(got) == list(expected)                           # names, in the saved order
    for n in expected:
        assert isinstance(got[n], np.ndarray) and got[n].dtype == expected[n].dtype, n
        np.testing.assert_array_equal(got[n], expected[n], err_msg=n)


META = {"config": {"C": 4, "V": 7, "tied": False}, "step": 5, "rng": {"bit_generator": "PCG64", "state": 2**100},
        "sampler": [1, 2, 3], "tokenizer": "tok/model.model", "loss": 2.5}


# ----------------------------------------------------------------------------------------------------------
# roundtrip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roundtrip(tmp_path, dtype):
    params = make_params(dtype=dtype)
    # mixed dtypes in one checkpoint: a float64 tensor beside the others
    params["extra64"] = np.arange(6, dtype=np.float64).reshape(2, 3)
    state = trained_state(params)
    path = save_checkpoint(tmp_path / "run", 5, params, state, META)
    assert path == tmp_path / "run" / "ckpt_00000005"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optim.safetensors"]

    for where in (tmp_path / "run", path):                       # a run dir or the ckpt dir itself
        got_params, got_state, got_meta = load_checkpoint(where)
        assert_same_tensors(got_params, params)
        assert got_state["step"] == 2
        assert_same_tensors(got_state["m"], state["m"])
        assert_same_tensors(got_state["v"], state["v"])
        assert got_meta == META


def test_loaded_state_resumes_the_same_trajectory(tmp_path):
    # save after 2 steps, load, take a 3rd step: identical to taking 3 steps without the save
    params = make_params(dtype=np.float64)
    state = adamw_init(params)
    grads = [{n: np.full(p.shape, 0.1 * (k + 1)) for n, p in params.items()} for k in range(3)]
    for g in grads[:2]:
        adamw_update(params, g, state, lr=0.01)
    save_checkpoint(tmp_path, 2, params, state)
    loaded_params, loaded_state, _ = load_checkpoint(tmp_path)
    adamw_update(params, grads[2], state, lr=0.01)
    adamw_update(loaded_params, grads[2], loaded_state, lr=0.01)
    assert loaded_state["step"] == 3
    assert_same_tensors(loaded_params, params)


def test_without_optimizer_state(tmp_path):
    params = make_params()
    path = save_checkpoint(tmp_path, 0, params)
    assert not (path / "optim.safetensors").exists()
    got_params, got_state, got_meta = load_checkpoint(path)
    assert_same_tensors(got_params, params)
    assert got_state is None and got_meta == {}


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 3, make_params(seed=1))
    save_checkpoint(tmp_path, 3, make_params(seed=2))
    assert_same_tensors(load_checkpoint(tmp_path)[0], make_params(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000003", "latest"]


# ----------------------------------------------------------------------------------------------------------
# rotation and the latest pointer


def test_keep_deletes_old_checkpoints_and_latest_points_to_newest(tmp_path):
    for step in range(1, 6):
        save_checkpoint(tmp_path, step * 10, make_params(seed=step), keep=2)
        assert (tmp_path / "latest").read_text() == f"ckpt_{step * 10:08d}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000040", "ckpt_00000050", "latest"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000050"
    assert_same_tensors(load_checkpoint(tmp_path)[0], make_params(seed=5))
    assert_same_tensors(load_checkpoint(tmp_path / "ckpt_00000040")[0], make_params(seed=4))


def test_keep_none_keeps_everything_and_keep_one_only_the_new(tmp_path):
    for step in range(4):
        save_checkpoint(tmp_path / "all", step, make_params(), keep=None)
        save_checkpoint(tmp_path / "one", step, make_params(), keep=1)
    assert len(list((tmp_path / "all").glob("ckpt_*"))) == 4
    assert [p.name for p in (tmp_path / "one").glob("ckpt_*")] == ["ckpt_00000003"]


def test_latest_pointer_fallbacks(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, make_params(seed=step), keep=None)
    (tmp_path / "latest").write_text("ckpt_00000002\n")          # the pointer wins over the highest step
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000002"
    (tmp_path / "latest").unlink()                               # no pointer: newest complete checkpoint
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000003"
    (tmp_path / "latest").write_text("ckpt_00000009\n")          # dangling pointer: same fallback
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000003"
    (tmp_path / "ckpt_00000003" / "meta.json").unlink()          # incomplete dirs are never picked
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_00000002"
    assert_same_tensors(load_checkpoint(tmp_path)[0], make_params(seed=2))
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(ValueError, match="latest: holds '../../etc'"):
        latest_checkpoint(tmp_path)


def test_steps_past_eight_digits_sort_numerically(tmp_path):
    save_checkpoint(tmp_path, 99_999_999, make_params(), keep=None)
    save_checkpoint(tmp_path, 100_000_000, make_params(), keep=None)
    (tmp_path / "latest").unlink()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_100000000"


# ----------------------------------------------------------------------------------------------------------
# bad input, missing and damaged checkpoints


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("args,match", [
    (dict(step=-1), "step=-1"),
    (dict(step=1.0), "step=1.0"),
    (dict(keep=0), "keep=0"),
    (dict(params={}), "params must be a non-empty dict"),
    (dict(meta={"x": np.zeros(2)}), "meta is not JSON-serializable"),
    (dict(meta=[1, 2]), "meta must be a dict"),
    (dict(optim_state={"step": 0, "m": {}, "v": {}}), r"optim_state\['m'\] keys differ"),
])
def test_save_rejects_bad_arguments_and_writes_nothing(tmp_path, args, match):
    kwargs = dict(step=1, params=make_params(), meta={}, keep=3)
    kwargs.update(args)
    with pytest.raises(ValueError, match=match):
        save_checkpoint(tmp_path / "run", kwargs.pop("step"), kwargs.pop("params"), **kwargs)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.fixture
def saved(tmp_path):
    params = make_params()
    path = save_checkpoint(tmp_path, 7, params, trained_state(params), META)
    return path


@pytest.mark.parametrize("file_name", ["model.safetensors", "optim.safetensors"])
def test_flipped_byte_is_caught_by_sha256(saved, file_name):
    target = saved / file_name
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF                                             # inside the last tensor's bytes; same size
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{file_name}: corrupt, sha256 differs"):
        load_checkpoint(saved.parent)


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_file_is_caught_by_size(saved, verify):
    target = saved / "model.safetensors"
    os.truncate(target, target.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt or truncated, \d+ bytes where \d+"):
        load_checkpoint(saved, verify=verify)


def test_unreadable_safetensors_becomes_one_value_error(saved):
    # bytes that match the manifest but are not safetensors: the parser's own error, named and on one line
    target = saved / "model.safetensors"
    target.write_bytes(b"\xff" * 64)
    record = json.loads((saved / "meta.json").read_text())
    record["files"]["model.safetensors"]["bytes"] = 64
    (saved / "meta.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"model.safetensors: corrupt safetensors file") as info:
        load_checkpoint(saved, verify=False)
    assert "\n" not in str(info.value)


def test_missing_or_garbled_files(saved):
    (saved / "optim.safetensors").unlink()
    with pytest.raises(ValueError, match="optim.safetensors: missing from checkpoint"):
        load_checkpoint(saved)
    (saved / "meta.json").write_text('{"format": "npllm-checkpoint", "step": ')
    with pytest.raises(ValueError, match="meta.json: damaged metadata, not valid JSON"):
        load_checkpoint(saved)
    (saved / "meta.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="meta.json: not an npllm checkpoint"):
        load_checkpoint(saved)
    (saved / "meta.json").unlink()
    with pytest.raises(ValueError, match="incomplete checkpoint, meta.json is missing"):
        load_checkpoint(saved)
    with pytest.raises(ValueError, match="is a file"):
        load_checkpoint(saved / "model.safetensors")


# ----------------------------------------------------------------------------------------------------------
# a save killed part-way


# One source for the tensors, used by the child process and by the test that checks what it left behind.
MAKE_TENSORS = """
def make_tensors(step, rows):
    rng = np.random.default_rng(step)
    params = {"tok_emb": rng.standard_normal((rows, 64)).astype(np.float32), "norm.w": rng.standard_normal(64)}
    state = {"step": step, "m": {n: rng.standard_normal(p.shape).astype(p.dtype) for n, p in params.items()},
             "v": {n: rng.random(p.shape).astype(p.dtype) for n, p in params.items()}}
    return params, state
"""

CHILD = """
import os, signal, sys
import numpy as np
from npllm import checkpoint
""" + MAKE_TENSORS + """
run_dir, mode, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
params, state = make_tensors(1, 8)
checkpoint.save_checkpoint(run_dir, 1, params, state, {"step": 1}, keep=keep)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "mid_write":                     # the second checkpoint's model file is half on disk
    def half_written(path, tensors):
        checkpoint.save_file(tensors, str(path))
        os.truncate(path, os.path.getsize(path) // 2)
        die()
    checkpoint._write_safetensors = half_written
elif mode == "during_rmtree":               # the old checkpoint is being deleted
    checkpoint.shutil.rmtree = die
else:                                       # killed at the n-th os.replace: 1 publish dir, 2 latest, 3 rotation
    kill_at = {"before_publish": 1, "before_latest": 2, "before_rotation": 3}[mode]
    real_replace, calls = os.replace, []
    def replace(src, dst):
        calls.append(src)
        if len(calls) == kill_at:
            die()
        real_replace(src, dst)
    os.replace = replace
params, state = make_tensors(2, 20000)      # ~5 MB: a real write, not a toy one
checkpoint.save_checkpoint(run_dir, 2, params, state, {"step": 2}, keep=keep)
print("save finished without being killed")
"""


@pytest.mark.parametrize("mode,keep,expected_step", [
    ("mid_write", 3, 1),
    ("before_publish", 3, 1),
    ("before_latest", 3, 1),         # ckpt 2 is complete on disk, but latest still says 1: both are fine
    ("before_rotation", 1, 2),       # latest already says 2; ckpt 1 not yet deleted
    ("during_rmtree", 1, 2),         # ckpt 1 renamed to .trash_* and half deleted
])
def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path, mode, keep, expected_step):
    run_dir = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), mode, str(keep)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr

    namespace = {"np": np}
    exec(MAKE_TENSORS, namespace)
    params, state = namespace["make_tensors"](expected_step, 8 if expected_step == 1 else 20000)
    got_params, got_state, got_meta = load_checkpoint(run_dir)
    assert_same_tensors(got_params, params)
    assert_same_tensors(got_state["m"], state["m"]) and got_state["step"] == expected_step
    assert got_meta == {"step": expected_step}
    # `latest` names a complete checkpoint (not merely one that the fallback can find)
    pointed = run_dir / (run_dir / "latest").read_text().strip()
    assert pointed.name == f"ckpt_{expected_step:08d}" and (pointed / "meta.json").is_file()
    # every ckpt_* directory left on disk is complete and loads
    for ckpt in run_dir.glob("ckpt_*"):
        load_checkpoint(ckpt)

    # the next save removes the leftovers of the killed one and carries on
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    if mode in ("mid_write", "before_publish"):
        assert any(name.startswith(".tmp_ckpt_00000002_") for name in leftovers)
    save_checkpoint(run_dir, 3, *namespace["make_tensors"](3, 8), {"step": 3}, keep=keep)
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(run_dir)[2] == {"step": 3}


# ----------------------------------------------------------------------------------------------------------
# CuPy arrays are saved from the host copy


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and an NVIDIA GPU")
def test_cupy_arrays_roundtrip(tmp_path):
    import cupy

    params = make_params()
    state = trained_state(params)
    gpu = lambda d: {n: cupy.asarray(x) for n, x in d.items()}  # noqa: E731
    save_checkpoint(tmp_path, 1, gpu(params), {"step": state["step"], "m": gpu(state["m"]), "v": gpu(state["v"])})
    got_params, got_state, _ = load_checkpoint(tmp_path)
    assert_same_tensors(got_params, params)
    assert_same_tensors(got_state["v"], state["v"])
