"""Atomic checkpoints over a communicator: one save path, one load path, for one process and for mpirun alike.

A run directory holds one directory per saved step and a pointer to the newest one:

    run_dir/
      ckpt_00000100/
        model.safetensors     parameters, one tensor per name ("tok_emb", "layers.0.attn.wq", ...)
        optim.safetensors     AdamW moments, "m.<name>" and "v.<name>" (absent when saved without optimizer state)
        meta.json             npllm.run.CheckpointRecord: step, parameter order, size + sha256 of each file, the
                              layout {"tp", "dp", "zero"} and the caller's meta
      ckpt_00000200/ ...
      latest                  one line: "ckpt_00000200"

A parallel run (docs/parallelism.md) writes one checkpoint directory from many ranks; each tensor-parallel rank r
has its own files (data-parallel replicas write nothing twice):

    model.tp{r}.safetensors          tp rank r's parameter shards, written by its dp rank 0
    optim.tp{r}.safetensors          their AdamW moments (zero=0), written by the same rank
    optim.tp{r}.dp{d}.safetensors    zero=1: the moments dp rank d owns (whole tensors), written by that rank
With tp=1 the ``.tp{r}`` part is left out, so one process's checkpoint and a data-parallel one look alike. One
process is the size-1 case of the same code: its communicator's collectives are identities.

Crash safety comes from the order of the writes in ``save_checkpoint``:
  1. world rank 0 makes ``run_dir/.tmp_ckpt_<step>_<pid>/``; every rank writes its files into it and fsyncs them;
  2. after the ranks have reported their files, rank 0 writes meta.json last and renames the directory to
     ``ckpt_<step>`` (one rename(2): the checkpoint appears complete or not at all);
  3. ``latest`` is rewritten with ``npllm.files.atomic_write`` (again all or nothing);
  4. checkpoints beyond the newest ``keep`` are renamed to ``.trash_*`` and only then deleted.
A kill at any point therefore leaves every ``ckpt_*`` directory complete and ``latest`` naming one of them.
Leftover ``.tmp_ckpt_*`` / ``.trash_*`` entries are ignored by loading and removed by the next save.

``load_checkpoint`` reads what one tensor-parallel rank needs (full tensors for one process), re-sharding when the
checkpoint was written with another tp. No pickle anywhere: tensors go through safetensors, the rest through JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from .backend import asnumpy
from .checks import check_int
from .files import atomic_write, fsync_path, sha256_file
from .parallel.comm import allgather_json, one_process_comm
from .parallel.tensor import shard_array, unshard_params
from .run import META_FILE, CheckpointRecord, read_checkpoint_record, write_checkpoint_record

LATEST_FILE = "latest"
CKPT_NAME = re.compile(r"ckpt_(\d{8,})")  # ckpt_{step:08d}; more digits past step 99,999,999


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint for ``step``: ``ckpt_{step:08d}``."""
    return f"ckpt_{step:08d}"


def model_file_name(tp_rank: int, tp: int) -> str:
    """The parameter file of tensor-parallel rank ``tp_rank``: model.safetensors (tp=1) or model.tp{r}.safetensors."""
    return "model.safetensors" if tp == 1 else f"model.tp{tp_rank}.safetensors"


def optim_file_names(tp_rank: int, layout: dict) -> list[str]:
    """The AdamW-moment files of tensor-parallel rank ``tp_rank``: one, or one per dp rank when ZeRO-1 sharded the
    moments over dp > 1 ranks."""
    base = "optim" if layout["tp"] == 1 else f"optim.tp{tp_rank}"
    if layout["zero"] == 1 and layout["dp"] > 1:
        return [f"{base}.dp{d}.safetensors" for d in range(layout["dp"])]
    return [f"{base}.safetensors"]


# ----------------------------------------------------------------------------------------------------------
# directory bookkeeping


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint directory: first rename it out of the ``ckpt_*`` namespace, then delete it.

    A kill during the slow rmtree then leaves a ``.trash_*`` directory, never a half-deleted ``ckpt_*``.
    """
    trash = path.parent / f".trash_{path.name}_{os.getpid()}"
    os.replace(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash)


def _remove_leftovers(run_dir: Path) -> None:
    """Remove temp directories and files that a killed save left behind (one writer per run_dir)."""
    for entry in run_dir.iterdir():
        if entry.name.startswith((".tmp_ckpt_", ".trash_")) and entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name.startswith(f".{LATEST_FILE}.") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink()


def _list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the complete checkpoints in ``run_dir`` (those with a meta.json), oldest first."""
    found = []
    for entry in run_dir.iterdir():
        match = CKPT_NAME.fullmatch(entry.name)
        if match and (entry / META_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _publish(run_dir: Path, tmp_dir: Path, name: str, step: int, keep: int | None, record: CheckpointRecord) -> Path:
    """Steps 2-4 of a save: meta.json last, one rename into place (replacing an older save of the same step), the
    ``latest`` pointer, then the checkpoints beyond the newest ``keep`` out."""
    write_checkpoint_record(tmp_dir, record)
    fsync_path(tmp_dir)
    final_dir = run_dir / name
    if final_dir.exists():
        _remove_dir(final_dir)
    os.replace(tmp_dir, final_dir)
    fsync_path(run_dir)
    atomic_write(run_dir / LATEST_FILE, name + "\n")
    if keep is not None:
        older = [path for s, path in _list_checkpoints(run_dir) if s != step]
        for path in older[: max(0, len(older) - (keep - 1))]:
            _remove_dir(path)
    return final_dir


# ----------------------------------------------------------------------------------------------------------
# save


def _to_numpy(tensors: dict, what: str) -> dict:
    """``{name: contiguous NumPy array}`` from a dict of NumPy or CuPy arrays (CuPy is copied to the host)."""
    out = {}
    for name, x in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} key {name!r} is not a string; tensor names must be strings")
        out[name] = np.ascontiguousarray(asnumpy(x))
    return out


def _write_safetensors(path: Path, tensors: dict) -> None:
    """``tensors`` (contiguous NumPy arrays) as a safetensors file at ``path``, fsync'ed (its directory is not yet
    published, so the file needs no atomic rename of its own)."""
    save_file(tensors, str(path))
    fsync_path(path)


def _moments(optim_state: dict) -> dict:
    """AdamW's m and v as one flat dict of tensors named m.<name> and v.<name>."""
    flat = {}
    for name in optim_state["m"]:
        flat[f"m.{name}"] = optim_state["m"][name]
        flat[f"v.{name}"] = optim_state["v"][name]
    return flat


def _check_save_args(step, keep, params, optim_state, meta, every_moment: bool) -> dict:
    """meta ({} for None) once the arguments are checked; every_moment: optim_state must hold the moments of every
    parameter (all but ZeRO-1 over several dp ranks)."""
    check_int("step", step, 0)
    check_int("keep", keep, 1, optional=True)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict {name: array}")
    if optim_state is not None:
        if not isinstance(optim_state, dict) or set(optim_state) != {"step", "m", "v"}:
            raise ValueError("optim_state must be None or the dict made by optim.adamw_init (keys 'step', 'm', 'v')")
        check_int("optim_state['step']", optim_state["step"], 0)
        for key in ("m", "v"):
            keys = set(optim_state[key])
            if keys != set(optim_state["m"]) or (every_moment and keys != set(params)):
                missing, extra = sorted(set(params) - keys), sorted(keys - set(params))
                raise ValueError(f"optim_state['{key}'] keys differ from params keys: missing {missing}, "
                                 f"unexpected {extra}")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise ValueError(f"meta must be a dict (JSON object), got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta is not JSON-serializable: {err}") from None
    return meta


def save_checkpoint(run_dir, step: int, params: dict, optim_state=None, meta=None, *, keep: int | None = 3,
                    comm=None, zero: int = 0) -> Path:
    """Save ``params`` (and AdamW ``optim_state``, and the caller's JSON ``meta``) as ``run_dir/ckpt_{step:08d}``.

    params:      this rank's parameters, ordered ``{name: array}`` (NumPy or CuPy, copied to the host): all of them
                 for one process, this rank's tensor-parallel shards under mpirun. The order is kept.
    optim_state: None, or this rank's AdamW state (``npllm.parallel.data.init_optimizer``): moments of every
                 parameter (zero=0), or of those its dp rank owns (zero=1).
    meta:        any JSON-serializable dict (a training run's ``RunMeta.to_json()``); world rank 0's is written.
    keep:        how many checkpoints to keep, newest first (the one just written always stays); None keeps all.
    comm:        the run's ParallelComm; None is one process. Every rank calls this with its own tensors and one
                 checkpoint results; who writes what is in the module docstring.
    Writes atomically and returns the new checkpoint directory; a checkpoint of the same step is replaced.
    """
    comm = one_process_comm() if comm is None else comm
    run_dir = Path(run_dir)
    meta = _check_save_args(step, keep, params, optim_state, meta, every_moment=zero == 0 or comm.dp.size == 1)
    step = int(step)
    layout = {"tp": comm.tp.size, "dp": comm.dp.size, "zero": int(zero)}
    name = checkpoint_name(step)

    # 1. world rank 0 makes the temp directory; its name (rank 0's pid) goes to everyone
    pid = np.array([os.getpid()], dtype=np.int64)
    if comm.world.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_leftovers(run_dir)
        (run_dir / f".tmp_{name}_{os.getpid()}").mkdir()
    pid = comm.world.broadcast(pid, root=0)  # also: nobody writes before the directory exists
    tmp_dir = run_dir / f".tmp_{name}_{int(pid[0])}"

    try:
        # every rank writes its own files, fsync'ed, and notes their size and hash
        files = {}
        if comm.dp.rank == 0:
            files[model_file_name(comm.tp.rank, layout["tp"])] = _to_numpy(params, "params")
        if optim_state is not None and (zero == 1 or comm.dp.rank == 0):
            optim_files = optim_file_names(comm.tp.rank, layout)
            files[optim_files[comm.dp.rank if len(optim_files) > 1 else 0]] = _to_numpy(_moments(optim_state),
                                                                                        "optim_state")
        manifest = {}
        for file_name, tensors in files.items():
            path = tmp_dir / file_name
            _write_safetensors(path, tensors)
            manifest[file_name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}

        # the manifests meet on every rank (also: every file is written before rank 0 goes on)
        every = {}
        for part in allgather_json(comm.world, manifest):
            every.update(part)
        optim_steps = {int(s) for s in allgather_json(comm.world, None if optim_state is None
                                                      else int(optim_state["step"])) if s is not None}
        if len(optim_steps) > 1:
            raise ValueError(f"the ranks' optimizer states are at different steps {sorted(optim_steps)}")

        # world rank 0 publishes: meta.json, one rename, latest, old checkpoints out
        final_dir = run_dir / name
        if comm.world.rank == 0:
            record = CheckpointRecord(step=step, param_names=list(params), optim_step=next(iter(optim_steps), None),
                                      files=dict(sorted(every.items())), layout=layout, meta=meta)
            _publish(run_dir, tmp_dir, name, step, keep, record)
    except BaseException:
        if comm.world.rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    comm.world.barrier()  # nobody goes on (to a next save, or to exit) before the checkpoint is published
    return final_dir


# ----------------------------------------------------------------------------------------------------------
# find and load


def latest_checkpoint(run_dir) -> Path | None:
    """The checkpoint directory to resume ``run_dir`` from, or None when it holds none.

    That is the directory named in ``run_dir/latest`` if it exists and is complete, otherwise the complete
    ``ckpt_*`` with the highest step (covers a missing ``latest``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    pointer = run_dir / LATEST_FILE
    if pointer.exists() and not pointer.is_file():
        raise ValueError(f"{pointer} is not a file; it should be the one-line pointer to the newest checkpoint "
                         f"(remove or rename it)")
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not CKPT_NAME.fullmatch(name):
            raise ValueError(f"{pointer}: holds {name[:80]!r}, expected a checkpoint name like 'ckpt_00000100'")
        if (run_dir / name / META_FILE).is_file():
            return run_dir / name
    found = _list_checkpoints(run_dir)
    return found[-1][1] if found else None


def last_good_checkpoint(run_dir) -> str:
    """A clause naming where ``run_dir`` can go on from, for the line that reports an interrupt or a failed write."""
    try:
        ckpt = None if run_dir is None else latest_checkpoint(run_dir)
    except (ValueError, OSError):
        ckpt = None
    return "no checkpoint was written" if ckpt is None else f"the last checkpoint {ckpt} and latest are intact"


def find_checkpoint(path) -> Path:
    """The checkpoint directory that ``path`` (a checkpoint or a run directory) names.
    FileNotFoundError when there is none, ValueError when ``path`` is something else."""
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
            f"no checkpoint in {path}: no '{LATEST_FILE}' pointer to a complete checkpoint and no ckpt_*/{META_FILE}")
    return ckpt_dir


def _check_file(path: Path, expected: dict, verify: bool) -> None:
    """Compare a file with its manifest entry: size always, sha256 when ``verify``. ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing from checkpoint (listed in {META_FILE})")
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise ValueError(f"{path}: corrupt or truncated, {size} bytes where {expected['bytes']} were written")
    if verify and sha256_file(path) != expected["sha256"]:
        raise ValueError(f"{path}: corrupt, sha256 differs from the one recorded at save time")


def _read_safetensors(path: Path) -> dict:
    """Load a safetensors file into ``{name: np.ndarray}``; any failure becomes one ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types (SafetensorError, ...) on bad bytes
        raise ValueError(f"{path}: corrupt safetensors file ({type(err).__name__}: {err})") from None


def _read_tp_rank(ckpt_dir: Path, record: CheckpointRecord, tp_rank: int, with_optimizer: bool):
    """(params, {"m": ..., "v": ...} or None) of one tensor-parallel rank, as stored (shards when tp > 1)."""
    layout, names = record.layout, record.param_names
    model_path = ckpt_dir / model_file_name(tp_rank, layout["tp"])
    stored = _read_safetensors(model_path)
    if set(stored) != set(names):
        raise ValueError(f"{model_path}: tensor names differ from param_names in {META_FILE}")
    params = {name: stored[name] for name in names}
    if record.optim_step is None or not with_optimizer:
        return params, None
    moments = {}
    for file_name in optim_file_names(tp_rank, layout):
        if file_name not in record.files:
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


def load_checkpoint(path, *, tp_rank: int = 0, tp_size: int = 1, split_axes: dict | None = None,
                    with_optimizer: bool = True, verify: bool = True):
    """Load a checkpoint: ``(params, optim_state, meta)``, on the host (NumPy).

    path:        a checkpoint directory ``ckpt_XXXXXXXX``, or a run directory (then ``latest_checkpoint``).
    tp_rank, tp_size: which tensor-parallel rank's shards to return; the default (0, 1) gives full tensors.
                 When the checkpoint has tp_size ranks' files, only this rank's are read (and verified); when it
                 has another tp, every file is read, the full tensors re-assembled and this rank's slice cut.
    split_axes:  ``{name: axis or None}`` of the model (``npllm.models.decoder.split_axes(cfg)``); needed only to
                 re-assemble or re-cut tensor-parallel shards.
    with_optimizer: False skips the AdamW moments (generation and evaluation need only the parameters).
    verify:      check each read file's sha256 against meta.json (reads every byte once more); sizes are always
                 checked.
    params:      ``{name: np.ndarray}`` in the order they were saved.
    optim_state: ``{"step": int, "m": {name: array}, "v": {name: array}}`` with moments of every parameter of the
                 shard, whatever zero and dp wrote them; None when saved without one or not asked for.
    meta:        the caller's meta dict as saved.
    Raises FileNotFoundError when there is no checkpoint at ``path``, ValueError when one is damaged.
    """
    ckpt_dir = find_checkpoint(path)
    record = read_checkpoint_record(ckpt_dir)
    layout = record.layout
    known = {name for r in range(layout["tp"]) for name in [model_file_name(r, layout["tp"]),
                                                             *optim_file_names(r, layout)]}
    strange = sorted(set(record.files) - known)
    if strange:  # only the files a checkpoint of this layout has: a record cannot point anywhere else
        raise ValueError(f"{ckpt_dir / META_FILE}: damaged record, field files lists {strange[0]!r}, which is not "
                         f"a file of a tp={layout['tp']} dp={layout['dp']} zero={layout['zero']} checkpoint")
    if layout["tp"] == tp_size:
        ranks = [tp_rank]
    else:
        if split_axes is None:
            raise ValueError(f"{ckpt_dir} was written by tp={layout['tp']} ranks; reading it for tp={tp_size} needs "
                             f"the model's split_axes")
        ranks = list(range(layout["tp"]))
    wanted = set()
    for r in ranks:
        wanted.add(model_file_name(r, layout["tp"]))
        if record.optim_step is not None and with_optimizer:
            wanted.update(n for n in optim_file_names(r, layout) if n in record.files)
    for file_name in sorted(wanted):
        if file_name not in record.files:
            raise ValueError(f"{ckpt_dir / META_FILE}: damaged record, field files does not list {file_name}")
        _check_file(ckpt_dir / file_name, record.files[file_name], verify)
    shards = [_read_tp_rank(ckpt_dir, record, r, with_optimizer) for r in ranks]  # [(params, moments or None)]
    params, moments = shards[0]
    if layout["tp"] != tp_size:  # re-assemble full tensors, then cut this rank's slice
        def recut(dicts):
            full = unshard_params(dicts, split_axes) if len(dicts) > 1 else dicts[0]
            return {n: shard_array(x, split_axes[n], tp_rank, tp_size) for n, x in full.items()}

        params = recut([p for p, _ in shards])
        if moments is not None:
            moments = {kind: recut([m[kind] for _, m in shards]) for kind in ("m", "v")}
    optim_state = None if moments is None else {"step": int(record.optim_step), **moments}
    return params, optim_state, record.meta
