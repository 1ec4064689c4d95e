"""Atomic checkpoints: save, find the latest, load.

A run directory holds one directory per saved step and a pointer to the newest one:

    run_dir/
      ckpt_00000100/
        model.safetensors     parameters, one tensor per name ("tok_emb", "layers.0.attn.wq", ...)
        optim.safetensors     AdamW moments, "m.<name>" and "v.<name>" (absent when saved without optimizer state)
        meta.json             step, parameter order, size + sha256 of each file, and the caller's meta
      ckpt_00000200/ ...
      latest                  one line: "ckpt_00000200"

Crash safety comes from the order of the writes in ``save_checkpoint``:
  1. everything is written into ``run_dir/.tmp_ckpt_<step>_<pid>/`` and fsync'ed;
  2. that directory is renamed to ``ckpt_<step>`` (one rename(2): the checkpoint appears complete or not at all);
  3. ``latest`` is rewritten through a temp file + fsync + os.replace (again all or nothing);
  4. checkpoints beyond the newest ``keep`` are renamed to ``.trash_*`` and only then deleted.
A kill at any point therefore leaves every ``ckpt_*`` directory complete and ``latest`` naming one of them.
Leftover ``.tmp_ckpt_*`` / ``.trash_*`` entries are ignored by loading and removed by the next save.
One process writes to a run directory at a time (rank 0 in a data-parallel run).

No pickle anywhere: tensors go through safetensors, everything else through JSON.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from npllm.backend import asnumpy

FORMAT = "npllm-checkpoint"
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
META_FILE = "meta.json"
LATEST_FILE = "latest"
CKPT_NAME = re.compile(r"ckpt_(\d{8,})")           # ckpt_{step:08d}; more digits past step 99,999,999
_HASH_BLOCK = 1 << 24                               # read files 16 MiB at a time when hashing


def checkpoint_name(step):
    """The directory name of the checkpoint for ``step``: ``ckpt_{step:08d}``."""
    return f"ckpt_{step:08d}"


# ----------------------------------------------------------------------------------------------------------
# small durable-write helpers


def _fsync_path(path):
    """fsync a file or a directory by path (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path):
    """Hex sha256 of a file's bytes, read in blocks so a 28 GB file needs no 28 GB buffer."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_safetensors(path, tensors):
    """Write ``tensors`` (dict of contiguous NumPy arrays) to ``path`` in safetensors format, then fsync."""
    save_file(tensors, str(path))
    _fsync_path(path)


def _write_json(path, obj):
    """Write ``obj`` as indented JSON to ``path``, then flush and fsync."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_latest(run_dir, name):
    """Point ``run_dir/latest`` at the checkpoint directory ``name``, atomically (temp + fsync + replace)."""
    tmp = run_dir / f".{LATEST_FILE}.tmp_{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / LATEST_FILE)
    _fsync_path(run_dir)


def _remove_dir(path):
    """Delete a checkpoint directory: first rename it out of the ``ckpt_*`` namespace, then delete it.

    A kill during the slow rmtree then leaves a ``.trash_*`` directory, never a half-deleted ``ckpt_*``.
    """
    trash = path.parent / f".trash_{path.name}_{os.getpid()}"
    os.replace(path, trash)
    _fsync_path(path.parent)
    shutil.rmtree(trash)


def _remove_leftovers(run_dir):
    """Remove temp directories and files that a killed save left behind (one writer per run_dir)."""
    for entry in run_dir.iterdir():
        if entry.name.startswith((".tmp_ckpt_", ".trash_")) and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith(f".{LATEST_FILE}.tmp_") and entry.is_file():
            entry.unlink()


def _list_checkpoints(run_dir):
    """``[(step, path)]`` of the complete checkpoints in ``run_dir`` (those with a meta.json), oldest first."""
    found = []
    for entry in run_dir.iterdir():
        match = CKPT_NAME.fullmatch(entry.name)
        if match and (entry / META_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------
# save


def _to_numpy(tensors, what):
    """``{name: contiguous NumPy array}`` from a dict of NumPy or CuPy arrays (CuPy is copied to the host)."""
    out = {}
    for name, x in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} key {name!r} is not a string; tensor names must be strings")
        out[name] = np.ascontiguousarray(asnumpy(x))
    return out


def _check_optim_state(params, optim_state):
    """Raise ValueError unless ``optim_state`` is an AdamW state (adamw_init's layout) matching ``params``."""
    if not isinstance(optim_state, dict) or set(optim_state) != {"step", "m", "v"}:
        raise ValueError("optim_state must be None or the dict made by optim.adamw_init (keys 'step', 'm', 'v')")
    step = optim_state["step"]
    if isinstance(step, bool) or not hasattr(step, "__index__") or step < 0:
        raise ValueError(f"optim_state['step']={step!r}: must be an integer >= 0")
    for key in ("m", "v"):
        if set(optim_state[key]) != set(params):
            missing = sorted(set(params) - set(optim_state[key]))
            extra = sorted(set(optim_state[key]) - set(params))
            raise ValueError(
                f"optim_state['{key}'] keys differ from params keys: missing {missing}, unexpected {extra}"
            )


def save_checkpoint(run_dir, step, params, optim_state=None, meta=None, *, keep=3):
    """Save ``params`` (and AdamW ``optim_state``, and the caller's JSON ``meta``) as ``run_dir/ckpt_{step:08d}``.

    params:      ordered ``{name: array}``, NumPy or CuPy (copied to the host); the order is kept.
    optim_state: ``None`` or the state from ``optim.adamw_init`` / ``adamw_update``.
    meta:        any JSON-serializable dict: model config, data sampler position, RNG state, tokenizer
                 path... It comes back from ``load_checkpoint`` as JSON gives it (tuples become lists).
    keep:        how many checkpoints to keep, newest steps first (the one just written always stays);
                 ``None`` keeps all.
    Writes atomically (see the module docstring) and returns the path of the new checkpoint directory.
    If ``ckpt_{step:08d}`` already exists it is replaced.
    """
    run_dir = Path(run_dir)
    if isinstance(step, bool) or not hasattr(step, "__index__") or step < 0:
        raise ValueError(f"step={step!r}: must be an integer >= 0")
    step = int(step)
    if keep is not None and (isinstance(keep, bool) or not hasattr(keep, "__index__") or keep < 1):
        raise ValueError(f"keep={keep!r}: must be an integer >= 1, or None to keep every checkpoint")
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: array}")
    if optim_state is not None:
        _check_optim_state(params, optim_state)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict (JSON object), got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serializable: {err}") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(run_dir)
    name = checkpoint_name(step)
    tmp_dir = run_dir / f".tmp_{name}_{os.getpid()}"
    tmp_dir.mkdir()
    try:
        # 1. every file into the temp directory, fsync'ed; the manifest records what a reader must find
        files = {MODEL_FILE: _to_numpy(params, "params")}
        if optim_state is not None:
            moments = {}
            for param_name in params:
                moments[f"m.{param_name}"] = optim_state["m"][param_name]
                moments[f"v.{param_name}"] = optim_state["v"][param_name]
            files[OPTIM_FILE] = _to_numpy(moments, "optim_state")
        manifest = {}
        for file_name, tensors in files.items():
            _write_safetensors(tmp_dir / file_name, tensors)
            written = tmp_dir / file_name
            manifest[file_name] = {"bytes": written.stat().st_size, "sha256": _sha256(written)}
        record = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "param_names": list(params),
            "optim_step": None if optim_state is None else int(optim_state["step"]),
            "files": manifest,
            "meta": meta,
        }
        _write_json(tmp_dir / META_FILE, record)
        _fsync_path(tmp_dir)

        # 2. publish the directory with one rename (replacing an older save of the same step)
        final_dir = run_dir / name
        if final_dir.exists():
            _remove_dir(final_dir)
        os.replace(tmp_dir, final_dir)
        _fsync_path(run_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    # 3. move the pointer, 4. drop old checkpoints
    _write_latest(run_dir, name)
    if keep is not None:
        older = [path for s, path in _list_checkpoints(run_dir) if s != step]
        for path in older[: max(0, len(older) - (keep - 1))]:
            _remove_dir(path)
    return final_dir


# ----------------------------------------------------------------------------------------------------------
# find and load


def latest_checkpoint(run_dir):
    """The checkpoint directory to resume ``run_dir`` from, or None when it holds none.

    That is the directory named in ``run_dir/latest`` if it exists and is complete, otherwise the complete
    ``ckpt_*`` with the highest step (covers a missing ``latest``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    pointer = run_dir / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if not CKPT_NAME.fullmatch(name):
            raise ValueError(f"{pointer}: holds {name[:80]!r}, expected a checkpoint name like 'ckpt_00000100'")
        if (run_dir / name / META_FILE).is_file():
            return run_dir / name
    found = _list_checkpoints(run_dir)
    return found[-1][1] if found else None


def _read_record(ckpt_dir):
    """Read and check ``ckpt_dir/meta.json``; ValueError naming the file when it is not ours or is damaged."""
    path = ckpt_dir / META_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: corrupt checkpoint metadata, not valid JSON ({err})") from None
    needed = {"format", "version", "step", "param_names", "optim_step", "files", "meta"}
    if not isinstance(record, dict) or record.get("format") != FORMAT or not needed <= set(record):
        raise ValueError(f"{path}: not an npllm checkpoint record (needs format={FORMAT!r} and keys {sorted(needed)})")
    if not isinstance(record["files"], dict) or MODEL_FILE not in record["files"]:
        raise ValueError(f"{path}: damaged record, 'files' must list {MODEL_FILE}")
    if record["version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format version {record['version']!r}, this npllm reads {FORMAT_VERSION}")
    return record


def _check_file(path, expected, verify):
    """Compare a file with its manifest entry: size always, sha256 when ``verify``. ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing from checkpoint (listed in {META_FILE})")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"{path}: corrupt or truncated, {size} bytes where {expected['bytes']} were written")
    if verify and _sha256(path) != expected["sha256"]:
        raise ValueError(f"{path}: corrupt, sha256 differs from the one recorded at save time")


def _read_safetensors(path):
    """Load a safetensors file into ``{name: np.ndarray}``; any failure becomes one ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types (SafetensorError, ...) on bad bytes
        raise ValueError(f"{path}: corrupt safetensors file ({type(err).__name__}: {err})") from None


def load_checkpoint(path, *, verify=True):
    """Load a checkpoint: ``(params, optim_state, meta)``, all on the host (NumPy).

    path:        a checkpoint directory ``ckpt_XXXXXXXX``, or a run directory (then ``latest_checkpoint``).
    verify:      check each file's sha256 against meta.json (reads every byte once more); sizes are
                 always checked.
    params:      ``{name: np.ndarray}`` in the order they were saved.
    optim_state: ``{"step": int, "m": {name: array}, "v": {name: array}}``, ready for ``adamw_update``,
                 or None when the checkpoint was saved without one.
    meta:        the caller's meta dict as saved.
    Raises FileNotFoundError when there is no checkpoint at ``path``, ValueError when one is damaged.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; pass a run directory or a checkpoint directory (ckpt_XXXXXXXX)")
    if (path / META_FILE).is_file():
        ckpt_dir = path
    elif CKPT_NAME.fullmatch(path.name):
        raise ValueError(f"{path}: incomplete checkpoint, {META_FILE} is missing")
    else:
        ckpt_dir = latest_checkpoint(path)
        if ckpt_dir is None:
            raise FileNotFoundError(
                f"no checkpoint in {path}: no '{LATEST_FILE}' pointer to a complete checkpoint"
                f" and no ckpt_*/{META_FILE}"
            )

    record = _read_record(ckpt_dir)
    for file_name, expected in record["files"].items():
        _check_file(ckpt_dir / file_name, expected, verify)

    names = record["param_names"]
    stored = _read_safetensors(ckpt_dir / MODEL_FILE)
    if set(stored) != set(names):
        raise ValueError(f"{ckpt_dir / MODEL_FILE}: tensor names differ from param_names in {META_FILE}")
    params = {name: stored[name] for name in names}

    optim_state = None
    if record["optim_step"] is not None:
        if OPTIM_FILE not in record["files"]:
            raise ValueError(f"{ckpt_dir / META_FILE}: records an optimizer step but no {OPTIM_FILE}")
        moments = _read_safetensors(ckpt_dir / OPTIM_FILE)
        expected_keys = {f"{kind}.{name}" for kind in ("m", "v") for name in names}
        if set(moments) != expected_keys:
            raise ValueError(f"{ckpt_dir / OPTIM_FILE}: expected the keys m.<name> and v.<name> for every parameter")
        optim_state = {
            "step": int(record["optim_step"]),
            "m": {name: moments[f"m.{name}"] for name in names},
            "v": {name: moments[f"v.{name}"] for name in names},
        }
    return params, optim_state, record["meta"]
