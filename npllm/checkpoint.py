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

A parallel run (``save_checkpoint_sharded``, docs/parallelism.md) writes one checkpoint directory from many ranks.
Each tensor-parallel rank r has its own files (data-parallel replicas write nothing twice):

    model.tp{r}.safetensors          tp rank r's parameter shards, written by its dp rank 0
    optim.tp{r}.safetensors          their AdamW moments (zero=0), written by the same rank
    optim.tp{r}.dp{d}.safetensors    zero=1: the moments dp rank d owns (whole tensors), written by that rank
    meta.json                        "layout": {"tp", "dp", "zero"}, and every rank's files in the manifest
With tp=1 the ``.tp{r}`` part is left out (``model.safetensors``), so a data-parallel checkpoint is an ordinary
one. The ranks write into the temp directory that world rank 0 made; after they all report their files, rank 0
alone writes meta.json, renames and moves ``latest``, exactly steps 2-4 above. ``load_checkpoint`` re-assembles
full tensors from any layout; ``load_checkpoint_shard`` reads one tensor-parallel rank's shards (re-sharding when
the checkpoint was written with another tp).

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
from npllm.parallel.comm import allgather_json
from npllm.parallel.tensor import shard_array, unshard_params

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


SINGLE_LAYOUT = {"tp": 1, "dp": 1, "zero": 0}  # the layout of a checkpoint written by one process


def model_file_name(tp_rank, tp):
    """The parameter file of tensor-parallel rank ``tp_rank``: model.safetensors (tp=1) or model.tp{r}.safetensors."""
    return MODEL_FILE if tp == 1 else f"model.tp{tp_rank}.safetensors"


def optim_file_names(tp_rank, layout):
    """The AdamW-moment files of tensor-parallel rank ``tp_rank``: one, or one per dp rank when ZeRO-1 sharded the
    moments over dp > 1 ranks."""
    base = "optim" if layout["tp"] == 1 else f"optim.tp{tp_rank}"
    if layout["zero"] == 1 and layout["dp"] > 1:
        return [f"{base}.dp{d}.safetensors" for d in range(layout["dp"])]
    return [f"{base}.safetensors"]


def checkpoint_layout(record):
    """{"tp", "dp", "zero"} of a checkpoint record (one process's layout when the record has none)."""
    return dict(record.get("layout") or SINGLE_LAYOUT)


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


def _record(step: int, params: dict, optim_state, files: dict, meta: dict, layout: dict | None = None) -> dict:
    """What meta.json holds: the format, the step, the parameter order, the optimizer's step, each file's size and
    sha256, the tensor-parallel layout (sharded saves only) and the caller's meta."""
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "step": step,
        "param_names": list(params),
        "optim_step": None if optim_state is None else int(optim_state["step"]),
        "files": files,
    }
    if layout is not None:
        record["layout"] = layout
    record["meta"] = meta
    return record


def _finish_and_rename(tmp_dir: Path, final_dir: Path, record: dict) -> None:
    """Write meta.json last into the complete temp directory, fsync it, and rename it to ``final_dir`` in one
    rename(2) (replacing an older save of the same step); then fsync the run directory so the rename is durable."""
    _write_json(tmp_dir / META_FILE, record)
    _fsync_path(tmp_dir)
    if final_dir.exists():
        _remove_dir(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_path(final_dir.parent)


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
    step = _check_step_and_keep(step, keep)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: array}")
    if optim_state is not None:
        _check_optim_state(params, optim_state)
    meta = _check_meta(meta)

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
        record = _record(step, params, optim_state, manifest, meta)
        # 2. publish the directory with one rename (replacing an older save of the same step)
        final_dir = run_dir / name
        _finish_and_rename(tmp_dir, final_dir, record)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise

    _publish(run_dir, name, step, keep)
    return final_dir


def _publish(run_dir, name, step, keep):
    """Steps 3 and 4 of a save: move the pointer to ``name``, then drop checkpoints beyond the newest ``keep``."""
    _write_latest(run_dir, name)
    if keep is not None:
        older = [path for s, path in _list_checkpoints(run_dir) if s != step]
        for path in older[: max(0, len(older) - (keep - 1))]:
            _remove_dir(path)


def _check_step_and_keep(step, keep):
    """step as an int; ValueError unless step is an integer >= 0 and keep an integer >= 1 or None."""
    if isinstance(step, bool) or not hasattr(step, "__index__") or step < 0:
        raise ValueError(f"step={step!r}: must be an integer >= 0")
    if keep is not None and (isinstance(keep, bool) or not hasattr(keep, "__index__") or keep < 1):
        raise ValueError(f"keep={keep!r}: must be an integer >= 1, or None to keep every checkpoint")
    return int(step)


def _check_meta(meta):
    """meta ({} for None); ValueError unless it is a JSON-serializable dict."""
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict (JSON object), got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serializable: {err}") from None
    return meta


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
    layout = record.get("layout") or SINGLE_LAYOUT
    if (not isinstance(layout, dict) or set(layout) != set(SINGLE_LAYOUT)
            or not all(isinstance(v, int) and v >= 0 for v in layout.values()) or layout["tp"] < 1 or layout["dp"] < 1):
        raise ValueError(f"{path}: damaged record, 'layout' must be {{'tp': >=1, 'dp': >=1, 'zero': 0 or 1}}, "
                         f"got {layout!r}")
    model_files = [model_file_name(r, layout["tp"]) for r in range(layout["tp"])]
    if not isinstance(record["files"], dict) or not all(name in record["files"] for name in model_files):
        raise ValueError(f"{path}: damaged record, 'files' must list {', '.join(model_files)}")
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
    params:      ``{name: np.ndarray}`` in the order they were saved; full tensors, re-assembled from the
                 tensor-parallel shards of a parallel run's checkpoint.
    optim_state: ``{"step": int, "m": {name: array}, "v": {name: array}}``, ready for ``adamw_update``,
                 or None when the checkpoint was saved without one.
    meta:        the caller's meta dict as saved.
    Raises FileNotFoundError when there is no checkpoint at ``path``, ValueError when one is damaged.
    """
    ckpt_dir = _find_checkpoint_dir(path)
    record = _read_record(ckpt_dir)
    for file_name, expected in record["files"].items():
        _check_file(ckpt_dir / file_name, expected, verify)
    layout = checkpoint_layout(record)
    shards = [_read_tp_rank(ckpt_dir, record, r) for r in range(layout["tp"])]  # [(params, moments or None)]
    if layout["tp"] == 1:
        params, moments = shards[0]
    else:  # re-assemble full tensors: concatenate the ranks' shards along each tensor's split axis
        params = unshard_params([p for p, _ in shards])
        moments = None if shards[0][1] is None else {
            kind: unshard_params([m[kind] for _, m in shards]) for kind in ("m", "v")}
    optim_state = None if moments is None else {"step": int(record["optim_step"]), **moments}
    return params, optim_state, record["meta"]


def _find_checkpoint_dir(path):
    """The checkpoint directory that ``path`` (a checkpoint or a run directory) names; the errors of load_checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: the path does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is a file; pass a run directory or a checkpoint directory (ckpt_XXXXXXXX)")
    if (path / META_FILE).is_file():
        return path
    if CKPT_NAME.fullmatch(path.name):
        raise ValueError(f"{path}: incomplete checkpoint, {META_FILE} is missing")
    ckpt_dir = latest_checkpoint(path)
    if ckpt_dir is None:
        raise FileNotFoundError(
            f"no checkpoint in {path}: no '{LATEST_FILE}' pointer to a complete checkpoint and no ckpt_*/{META_FILE}"
        )
    return ckpt_dir


def _read_tp_rank(ckpt_dir, record, tp_rank):
    """(params, {"m": ..., "v": ...} or None) of one tensor-parallel rank, as stored (shards when tp > 1)."""
    layout = checkpoint_layout(record)
    names = record["param_names"]
    model_path = ckpt_dir / model_file_name(tp_rank, layout["tp"])
    stored = _read_safetensors(model_path)
    if set(stored) != set(names):
        raise ValueError(f"{model_path}: tensor names differ from param_names in {META_FILE}")
    params = {name: stored[name] for name in names}
    if record["optim_step"] is None:
        return params, None
    moments = {}
    for file_name in optim_file_names(tp_rank, layout):
        if file_name not in record["files"]:
            raise ValueError(f"{ckpt_dir / META_FILE}: records an optimizer step but no {file_name}")
        part = _read_safetensors(ckpt_dir / file_name)
        if set(part) & set(moments):  # ZeRO-1 files hold disjoint tensors
            raise ValueError(f"{ckpt_dir / file_name}: holds moments that another optimizer file holds too")
        moments.update(part)
    expected_keys = {f"{kind}.{name}" for kind in ("m", "v") for name in names}
    if set(moments) != expected_keys:
        where = ", ".join(optim_file_names(tp_rank, layout))
        raise ValueError(f"{ckpt_dir}/{where}: expected the keys m.<name> and v.<name> for every parameter")
    return params, {kind: {name: moments[f"{kind}.{name}"] for name in names} for kind in ("m", "v")}


def read_checkpoint_meta(path):
    """The caller's meta dict of a checkpoint (or of a run directory's latest one), reading meta.json only."""
    return _read_record(_find_checkpoint_dir(path))["meta"]


def load_checkpoint_shard(path, tp_rank, tp_size, *, verify=True):
    """One tensor-parallel rank's part of a checkpoint: ``(params, optim_state, meta, layout)`` on the host.

    params and the moments of optim_state are rank ``tp_rank``'s shards for ``tp_size`` ranks (full tensors when
    tp_size is 1), whatever the layout the checkpoint was written with:
      same tp:       only this rank's files are read (and verified);
      another tp:    every file is read, the full tensors re-assembled and this rank's slice cut from them
                     (correct for any tp that divides the split sizes, but each rank holds the full model for a
                     moment);
    and with ZeRO-1 files the moments of all dp ranks are merged: optim_state holds moments for every parameter of
    the shard, whatever zero and dp the checkpoint had. layout: the checkpoint's {"tp", "dp", "zero"}.
    """
    ckpt_dir = _find_checkpoint_dir(path)
    record = _read_record(ckpt_dir)
    layout = checkpoint_layout(record)
    if layout["tp"] != tp_size:
        params, optim_state, meta = load_checkpoint(ckpt_dir, verify=verify)
        params = {name: shard_array(name, x, tp_rank, tp_size) for name, x in params.items()}
        if optim_state is not None:
            for kind in ("m", "v"):
                optim_state[kind] = {name: shard_array(name, x, tp_rank, tp_size)
                                     for name, x in optim_state[kind].items()}
        return params, optim_state, meta, layout
    mine = [model_file_name(tp_rank, tp_size)]
    if record["optim_step"] is not None:
        mine += [name for name in optim_file_names(tp_rank, layout) if name in record["files"]]
    for file_name in mine:
        _check_file(ckpt_dir / file_name, record["files"][file_name], verify)
    params, moments = _read_tp_rank(ckpt_dir, record, tp_rank)
    optim_state = None if moments is None else {"step": int(record["optim_step"]), **moments}
    return params, optim_state, record["meta"], layout


# ----------------------------------------------------------------------------------------------------------
# save from many ranks


def save_checkpoint_sharded(run_dir, step, params, optim_state, meta, comm, *, zero=0, keep=3):
    """``save_checkpoint`` for a parallel run: every rank calls it with its own tensors; one checkpoint results.

    params:      this rank's parameter shards, ordered as param_shapes.
    optim_state: this rank's AdamW state: moments of every parameter (zero=0), or of the ones its dp rank owns
                 (zero=1, from ``npllm.parallel.data.init_optimizer``).
    meta:        the caller's JSON meta (world rank 0's is written).
    comm:        the run's ParallelComm. With one rank in all this is ``save_checkpoint``.
    Who writes what is in the module docstring. A kill at any point leaves the previous checkpoint and ``latest``
    intact, as for one process: nothing is visible before rank 0's single rename. Returns the new directory.
    """
    if comm.world.size == 1:
        return save_checkpoint(run_dir, step, params, optim_state, meta, keep=keep)
    run_dir = Path(run_dir)
    step = _check_step_and_keep(step, keep)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: array}")
    layout = {"tp": comm.tp.size, "dp": comm.dp.size, "zero": int(zero)}
    name = checkpoint_name(step)

    # 1. world rank 0 makes the temp directory; its name (rank 0's pid) goes to everyone
    pid = np.array([os.getpid()], dtype=np.int64)
    if comm.world.rank == 0:
        _check_meta(meta)
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(run_dir)
        (run_dir / f".tmp_{name}_{os.getpid()}").mkdir()
    pid = comm.world.broadcast(pid, root=0)  # also: nobody writes before the directory exists
    tmp_dir = run_dir / f".tmp_{name}_{int(pid[0])}"

    # 2. every rank writes its own files, fsync'ed, and notes their size and hash
    files = {}
    if comm.dp.rank == 0:
        files[model_file_name(comm.tp.rank, layout["tp"])] = _to_numpy(params, "params")
    if optim_state is not None and (zero == 1 or comm.dp.rank == 0):
        moments = {}
        for param_name in optim_state["m"]:
            moments[f"m.{param_name}"] = optim_state["m"][param_name]
            moments[f"v.{param_name}"] = optim_state["v"][param_name]
        optim_files = optim_file_names(comm.tp.rank, layout)
        files[optim_files[comm.dp.rank if len(optim_files) > 1 else 0]] = _to_numpy(moments, "optim_state")
    manifest = {}
    for file_name, tensors in files.items():
        _write_safetensors(tmp_dir / file_name, tensors)
        manifest[file_name] = {"bytes": (tmp_dir / file_name).stat().st_size, "sha256": _sha256(tmp_dir / file_name)}

    # 3. the manifests meet on every rank (also: every file is written before rank 0 goes on)
    every = {}
    for part in allgather_json(comm.world, manifest):
        every.update(part)
    optim_steps = {int(s) for s in allgather_json(comm.world, None if optim_state is None else optim_state["step"])
                   if s is not None}
    if len(optim_steps) > 1:
        raise ValueError(f"the ranks' optimizer states are at different steps {sorted(optim_steps)}")

    # 4. world rank 0 publishes: meta.json, one rename, latest, old checkpoints out (save_checkpoint's steps 2-4)
    final_dir = run_dir / name
    if comm.world.rank == 0:
        record = _record(step, params, optim_state, dict(sorted(every.items())), meta, layout)
        try:
            _finish_and_rename(tmp_dir, final_dir, record)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        _publish(run_dir, name, step, keep)
    comm.world.barrier()  # nobody goes on (to a next save, or to exit) before the checkpoint is published
    return final_dir
