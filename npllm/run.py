"""A run's files: its metadata (the one module that reads and writes meta.json), its directory, loading it back.

Two kinds of directory carry a meta.json:

    a checkpoint   RUN/ckpt_XXXXXXXX/meta.json   ``CheckpointRecord``: the step, the parameter order, each file's size
                                                 and sha256, the tensor-parallel layout, and the run's ``RunMeta``
    token data     DATA/meta.json                ``DataMeta``: the tokenizer that made the shards and their counts

Each is a frozen dataclass with ``to_json`` and a validating ``from_json``: a damaged or hand-edited file is one
ValueError naming the file and the field, never a KeyError or TypeError deep inside a command. Writes go through
``npllm.files.atomic_write``. ``load_trained(path)`` is what generate, evaluate and fine-tuning call: the
parameters, model config, tokenizer and metadata of a trained run.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .config import ModelConfig, TrainConfig
from .files import atomic_write

META_FILE = "meta.json"
CHECKPOINT_FORMAT = "npllm-checkpoint"
CHECKPOINT_VERSION = 1
DATA_FORMAT = "npllm-tokens"
DATA_VERSION = 1
SINGLE_LAYOUT = {"tp": 1, "dp": 1, "zero": 0}  # the layout of a checkpoint written by one process


# ----------------------------------------------------------------------------------------------------------
# reading JSON with one-line errors


def read_json(path: Path) -> object:
    """The JSON value in ``path``; ValueError naming the file when it is not UTF-8 JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: damaged metadata, not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


class _Fields:
    """Typed access to a JSON object's fields: every wrong type or missing key is one line naming file and field."""

    def __init__(self, obj, where: str, prefix: str = ""):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: damaged metadata, {prefix or 'the file'} must be a JSON object, got "
                             f"{type(obj).__name__}")
        self.obj, self.where, self.prefix = obj, where, prefix

    def _bad(self, key: str, expected: str) -> ValueError:
        value = self.obj.get(key, "<missing>")
        shown = value if value == "<missing>" else json.dumps(value)[:80]
        return ValueError(f"{self.where}: damaged metadata, field {self.prefix}{key} is {shown}; expected {expected}")

    def get(self, key: str, kind, expected: str, optional: bool = False):
        if key not in self.obj or (optional and self.obj[key] is None):
            if optional:
                return None
            raise self._bad(key, expected)
        value = self.obj[key]
        if kind is int:
            ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise self._bad(key, expected)
        return value

    def int(self, key: str, minimum: int = 0, optional: bool = False):
        value = self.get(key, int, f"an integer >= {minimum}", optional)
        if value is not None and value < minimum:
            raise self._bad(key, f"an integer >= {minimum}")
        return value

    def str(self, key: str, optional: bool = False):
        return self.get(key, str, "a string", optional)

    def dict(self, key: str, optional: bool = False):
        return self.get(key, dict, "a JSON object", optional)

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.dict(key), self.where, f"{self.prefix}{key}.")

    def config(self, key: str, cls):
        """A config dataclass from the object under ``key``: unknown fields and invalid values name the field."""
        values = self.dict(key)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{self.where}: field {self.prefix}{key} has {unknown[0]!r}, which this npllm's "
                             f"{cls.__name__} does not know")
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.where}: field {self.prefix}{key}: {err}") from None


# ----------------------------------------------------------------------------------------------------------
# what a training run records in each checkpoint


@dataclass(frozen=True)
class TokenizerRef:
    dir: str  # the tokenizer's directory (absolute, or relative to the checkpoint directory)
    fingerprint: str  # sha256 of its tokenizer.model: the tokenizer must be exactly this one

    def path(self, ckpt_dir: Path) -> Path:
        return Path(ckpt_dir) / self.dir  # an absolute dir stays as it is


@dataclass(frozen=True)
class RunMeta:
    """What ``npllm.train`` records in every checkpoint, and all that resume, generate, evaluate and fine-tuning
    read back."""

    model_config: ModelConfig  # the model's shape
    train_config: TrainConfig  # every option of the run
    step: int  # optimizer steps completed
    sampler: dict  # the data sampler's position (StepSampler.state_dict): exact resume needs it
    tokenizer: TokenizerRef  # the tokenizer that made the training tokens
    data_dir: str  # where the training data came from (a data directory, or the SFT file)
    sft: dict | None = None  # fine-tuning runs: the SFT file's path, sha256 and record counts

    def to_json(self) -> dict:
        out = dict(model_config=dataclasses.asdict(self.model_config),
                   train_config=dataclasses.asdict(self.train_config), step=self.step, sampler=self.sampler,
                   tokenizer=dataclasses.asdict(self.tokenizer), data_dir=self.data_dir)
        if self.sft is not None:
            out["sft"] = self.sft
        return out

    @classmethod
    def from_json(cls, obj, where: str) -> "RunMeta":
        f = _Fields(obj, where, "meta.")
        sampler = f.sub("sampler")
        for key in ("seed", "step"):
            sampler.int(key)
        tok = f.sub("tokenizer")
        sft = f.dict("sft", optional=True)
        if sft is not None:
            f.sub("sft").str("sha256")
        return cls(model_config=f.config("model_config", ModelConfig),
                   train_config=f.config("train_config", TrainConfig), step=f.int("step"), sampler=f.dict("sampler"),
                   tokenizer=TokenizerRef(tok.str("dir"), tok.str("fingerprint")), data_dir=f.str("data_dir"),
                   sft=sft)


# ----------------------------------------------------------------------------------------------------------
# the checkpoint record


@dataclass(frozen=True)
class CheckpointRecord:
    """A checkpoint directory's meta.json: written last by ``npllm.checkpoint``, so its presence marks the
    checkpoint complete."""

    step: int  # the step the checkpoint holds
    param_names: list  # the parameters in their order
    optim_step: int | None  # AdamW's step count; None when saved without optimizer state
    files: dict  # {file name: {"bytes": int, "sha256": str}}: what a reader must find, exactly
    layout: dict  # {"tp", "dp", "zero"} of the run that wrote it
    meta: dict  # the caller's JSON metadata (a training run's RunMeta.to_json())

    def to_json(self) -> dict:
        return dict(format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION, step=self.step,
                    param_names=list(self.param_names), optim_step=self.optim_step, files=self.files,
                    layout=self.layout, meta=self.meta)

    @classmethod
    def from_json(cls, obj, where: str) -> "CheckpointRecord":
        f = _Fields(obj, where)
        if obj.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where}: not an npllm checkpoint record (field format is "
                             f"{json.dumps(obj.get('format'))[:40]}, expected {CHECKPOINT_FORMAT!r})")
        if f.int("version", 0) != CHECKPOINT_VERSION:
            raise ValueError(f"{where}: checkpoint format version {obj['version']}, this npllm reads "
                             f"{CHECKPOINT_VERSION}")
        names = f.get("param_names", list, "a list of parameter names")
        if not names or not all(isinstance(n, str) for n in names):
            raise f._bad("param_names", "a non-empty list of parameter names")
        layout = f.dict("layout", optional=True) or dict(SINGLE_LAYOUT)
        lf = _Fields(layout, where, "layout.")
        lf.int("tp", 1), lf.int("dp", 1)
        if lf.int("zero") not in (0, 1) or set(layout) != set(SINGLE_LAYOUT):
            raise ValueError(f"{where}: damaged metadata, field layout must be {{'tp': >=1, 'dp': >=1, 'zero': 0 or "
                             f"1}}, got {json.dumps(layout)[:80]}")
        files = f.dict("files")
        for name, entry in files.items():
            ef = _Fields(entry, where, f"files.{name}.")
            ef.int("bytes")
            ef.str("sha256")
            if not is_plain_file_name(name):
                raise ValueError(f"{where}: damaged metadata, field files lists {name!r}, which is not a plain file "
                                 f"name inside the checkpoint directory")
        return cls(step=f.int("step"), param_names=names, optim_step=f.int("optim_step", optional=True), files=files,
                   layout=dict(layout), meta=f.dict("meta"))


def is_plain_file_name(name: str) -> bool:
    """True for a name that stays inside its directory: no separator, not "." or "..", not hidden, not empty."""
    return bool(name) and "/" not in name and "\\" not in name and name not in (".", "..") and not name.startswith(".")


def write_checkpoint_record(ckpt_dir: Path, record: CheckpointRecord) -> None:
    """meta.json into a checkpoint directory that is not yet published (npllm.checkpoint renames the whole
    directory into place afterwards, so this write needs no atomicity of its own), fsync'ed."""
    import os

    with open(Path(ckpt_dir) / META_FILE, "w", encoding="utf-8") as out:
        json.dump(record.to_json(), out, indent=2)
        out.write("\n")
        out.flush()
        os.fsync(out.fileno())


def read_checkpoint_record(ckpt_dir: Path) -> CheckpointRecord:
    """The validated meta.json of a checkpoint directory."""
    path = Path(ckpt_dir) / META_FILE
    return CheckpointRecord.from_json(read_json(path), str(path))


def read_run_meta(path) -> RunMeta:
    """The RunMeta of a checkpoint (a ckpt_XXXXXXXX directory, or a run directory's latest checkpoint), reading
    meta.json only."""
    from .checkpoint import find_checkpoint

    ckpt_dir = find_checkpoint(path)
    return RunMeta.from_json(read_checkpoint_record(ckpt_dir).meta, str(ckpt_dir / META_FILE))


# ----------------------------------------------------------------------------------------------------------
# token data


@dataclass(frozen=True)
class DataMeta:
    """DATA/meta.json of a directory made by ``python -m npllm.data prepare`` (or the default corpus)."""

    tokenizer_dir: str  # the tokenizer that made the shards (absolute, or relative to the data directory)
    tokenizer_fingerprint: str  # its sha256: shards are only meaningful with exactly this tokenizer
    vocab_size: int  # the tokenizer's V: every token id is below it
    eos_id: int  # the id that ends each document in the stream
    dtype: str  # token dtype on disk ("uint16" or "uint32")
    val_fraction: float  # the share of the documents held out for validation (of the tokens, for one document)
    train_tokens: int
    val_tokens: int
    sources: list  # where the text came from
    # Bytes of UTF-8 text each split's tokens stand for: each document's bytes, plus 1 for the EOS that ends it (so
    # val bits/byte = loss_nats_per_token * val_tokens / (val_bytes * ln 2)). None in data prepared before they were
    # recorded.
    train_bytes: int | None = None
    val_bytes: int | None = None
    train_documents: int | None = None
    val_documents: int | None = None
    split: str | None = None  # "documents" (each document whole in one split) or "tokens" (one document, cut)

    def to_json(self) -> dict:
        return dict(format=DATA_FORMAT, version=DATA_VERSION, **dataclasses.asdict(self))

    @classmethod
    def from_json(cls, obj, where: str) -> "DataMeta":
        f = _Fields(obj, where)
        fraction = f.get("val_fraction", (int, float), "a number in (0, 1)")
        if not 0 < fraction < 1:
            raise f._bad("val_fraction", "a number in (0, 1)")
        split = f.str("split", optional=True)
        if split not in (None, "documents", "tokens"):
            raise f._bad("split", '"documents" or "tokens"')
        return cls(tokenizer_dir=f.str("tokenizer_dir"), tokenizer_fingerprint=f.str("tokenizer_fingerprint"),
                   vocab_size=f.int("vocab_size", 1), eos_id=f.int("eos_id"), dtype=f.str("dtype"),
                   val_fraction=float(fraction), train_tokens=f.int("train_tokens"), val_tokens=f.int("val_tokens"),
                   sources=f.get("sources", list, "a list of strings"),
                   train_bytes=f.int("train_bytes", optional=True), val_bytes=f.int("val_bytes", optional=True),
                   train_documents=f.int("train_documents", optional=True),
                   val_documents=f.int("val_documents", optional=True), split=split)

    def tokenizer_path(self, data_dir) -> Path:
        return (Path(data_dir) / self.tokenizer_dir).resolve()


def write_data_meta(data_dir, meta: DataMeta) -> None:
    write_json(Path(data_dir) / META_FILE, meta.to_json())


def read_data_meta(data_dir) -> DataMeta:
    """The validated DATA/meta.json; FileNotFoundError when the directory holds no token data."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no token data in {data_dir}: {path} is missing "
                                f"(make it with `python -m npllm.data prepare`)")
    return DataMeta.from_json(read_json(path), str(path))


# ----------------------------------------------------------------------------------------------------------
# a trained model


class Trained(NamedTuple):
    params: dict  # {name: array} on the requested device, full tensors
    cfg: ModelConfig
    tokenizer: object  # npllm.tokenizer.Tokenizer
    meta: RunMeta | None  # None for a Hugging Face model directory
    path: Path  # the checkpoint directory (or Hugging Face directory) it came from


def load_trained(path, device: str = "cpu", tokenizer_dir=None) -> Trained:
    """The parameters, model config, tokenizer and metadata of a checkpoint written by ``npllm.train`` (a run
    directory, whose latest checkpoint is used, or a ckpt_XXXXXXXX directory), or of a Hugging Face model directory
    (GPT2LMHeadModel, LlamaForCausalLM: ``npllm.hf``; its tokenizer is read from the same directory).

    The tokenizer is the one the run recorded unless ``tokenizer_dir`` is given; either way its fingerprint must
    match the recorded one, and its vocabulary must fit the model (a model may have more rows than the tokenizer
    has tokens: padding rows, which generation never samples).
    """
    from .backend import to_device
    from .checkpoint import find_checkpoint, load_checkpoint
    from .hf import is_hf_dir, load_hf
    from .models import split_axes
    from .tokenizer import load_tokenizer

    if is_hf_dir(path):  # a Hugging Face model directory: its weights, config and tokenizer, no run metadata
        params, cfg = load_hf(path)
        tokenizer = load_tokenizer(path if tokenizer_dir is None else tokenizer_dir)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer of {path} has {tokenizer.vocab_size} tokens but the model only "
                             f"vocab_size={cfg.vocab_size} rows")
        return Trained(to_device(params, device), cfg, tokenizer, None, Path(path))
    ckpt_dir = find_checkpoint(path)
    meta = read_run_meta(ckpt_dir)
    cfg = meta.model_config
    params, _, _ = load_checkpoint(ckpt_dir, split_axes=split_axes(cfg), with_optimizer=False)
    for name, value in params.items():  # a model that would only ever produce NaN: say so here, once
        if not np.isfinite(value).all():
            raise ValueError(f"{ckpt_dir}: parameter {name} holds {int((~np.isfinite(value)).sum())} non-finite "
                             f"values (NaN or inf); this checkpoint cannot be used")
    tokenizer = recorded_tokenizer(meta, ckpt_dir, tokenizer_dir)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer at {tokenizer.model_path} has {tokenizer.vocab_size} tokens but the model in "
                         f"{ckpt_dir} has only vocab_size={cfg.vocab_size} rows")
    return Trained(to_device(params, device), cfg, tokenizer, meta, ckpt_dir)


def recorded_tokenizer(meta: RunMeta, ckpt_dir, tokenizer_dir=None):
    """The tokenizer a run recorded (or the one in ``tokenizer_dir``), checked to be exactly that one."""
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir if tokenizer_dir is not None else meta.tokenizer.path(ckpt_dir))
    check_tokenizer(tokenizer, meta.tokenizer.fingerprint, f"the model in {ckpt_dir}")
    return tokenizer


def check_tokenizer(tokenizer, fingerprint: str, what: str) -> None:
    """ValueError unless ``tokenizer`` is exactly the one recorded (by its model file's sha256)."""
    if tokenizer.fingerprint != fingerprint:
        raise ValueError(f"the tokenizer at {tokenizer.model_path} is not the one {what} was trained with "
                         f"(fingerprint {tokenizer.fingerprint[:12]}, recorded {fingerprint[:12]})")


# ----------------------------------------------------------------------------------------------------------
# a run to continue


class Resumed(NamedTuple):
    params: dict  # this rank's shards, on the host
    opt_state: dict  # AdamW state with moments of every parameter of the shard
    meta: RunMeta
    path: Path  # the checkpoint directory


def load_resumed(path, cfg: ModelConfig, comm) -> Resumed:
    """This rank's shards and AdamW state of the checkpoint ``npllm.train --resume`` continues (re-sharded if it was
    written with another tp); ValueError unless its tensors are those of ``cfg`` and it holds the optimizer state."""
    from .checkpoint import find_checkpoint, load_checkpoint
    from .models import split_axes

    ckpt_dir = find_checkpoint(path)
    params, opt_state, _ = load_checkpoint(ckpt_dir, tp_rank=comm.tp.rank, tp_size=comm.tp.size,
                                           split_axes=split_axes(cfg))
    if opt_state is None:
        raise ValueError(f"{ckpt_dir}: the checkpoint holds no optimizer state, so the run cannot be resumed exactly")
    check_param_shapes(params, cfg, comm.tp.size)
    return Resumed(params, opt_state, read_run_meta(ckpt_dir), ckpt_dir)


def check_param_shapes(saved_params: dict, cfg: ModelConfig, tp_size: int = 1) -> None:
    """ValueError unless a checkpoint's tensors are exactly those of the config (this rank's shards with tp > 1)."""
    from .models import param_shard_shapes

    expected = param_shard_shapes(cfg, tp_size)
    found = {name: tuple(value.shape) for name, value in saved_params.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise ValueError(f"the checkpoint's tensors do not match its model config: {wrong[0]} is "
                         f"{found.get(wrong[0])} in the file but {expected.get(wrong[0])} in the config "
                         f"({len(wrong)} tensor(s) differ)")


def check_same_dp(meta: RunMeta, comm) -> None:
    """ValueError unless the run has the checkpoint's number of data-parallel ranks (another dp would draw other
    windows: no exact resume). Another tp is fine: the checkpoint is re-sharded."""
    saved_dp, saved = meta.sampler.get("world_size", 1), meta.train_config
    if saved_dp != comm.dp.size:
        raise ValueError(f"the checkpoint was written by tp={saved.tp} x dp={saved_dp} ranks (zero={saved.zero}) and "
                         f"this run has tp={comm.tp.size} x dp={comm.dp.size}; resuming needs dp={saved_dp} (another "
                         f"dp draws other data): e.g. mpirun -n {comm.tp.size * saved_dp} with --tp={comm.tp.size}")


# ----------------------------------------------------------------------------------------------------------
# a run directory belongs to one run


LOCK_FILE = ".lock"  # held (flock) by the trainer that owns the directory, for as long as it runs


class RunLock:
    """An advisory lock (fcntl.flock) on RUN/.lock, held for the trainer's lifetime; the file names the holder.
    The kernel drops the lock when the process dies, so a lock file left by a killed trainer is taken over."""

    def __init__(self, run_dir: Path):
        import fcntl
        import os
        import socket

        self.path = Path(run_dir) / LOCK_FILE
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise ValueError(f"{run_dir} is in use by another trainer ({holder}); wait for it to finish or choose "
                             f"another --out_dir") from None
        self.file.seek(0)
        self.stale = self.file.read().strip()  # what a killed trainer left, if anything
        self.holder = f"pid {os.getpid()} on {socket.gethostname()}"
        self.recorded = False

    def record_holder(self) -> None:
        """Write this process into the lock file, once the directory is this run's (a refused trainer leaves the
        file as it found it)."""
        self.file.seek(0)
        self.file.truncate(0)
        self.file.write(self.holder + "\n")
        self.file.flush()
        self.recorded = True

    def release(self) -> None:
        """Drop the lock; a trainer that ends normally also clears its name, so that only a killed trainer's
        name is ever found (and reported) by the next one."""
        if not self.file.closed:
            if self.recorded:
                self.file.seek(0)
                self.file.truncate(0)
            self.file.close()  # closing the descriptor drops the flock


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds (part of) a training run: a checkpoint, the ``latest`` pointer or metrics."""
    run_dir = Path(run_dir)
    return run_dir.is_dir() and any(entry.name in ("latest", "metrics.jsonl") or entry.name.startswith("ckpt_")
                                    for entry in run_dir.iterdir())


def claim_run_dir(run_dir, comm=None, *, resume: bool, overwrite: bool, log=print) -> RunLock | None:
    """Make ``run_dir`` this run's and lock it (world rank 0 does it and holds the lock; every rank gets the same
    ValueError when it cannot). A new run (not ``resume``) refuses a directory that holds a run unless
    ``overwrite``, which renames the old run aside (RUN.replaced-<time>), never deletes it. A second trainer on the
    same directory is refused naming the holder. Returns the lock (None on the other ranks)."""
    from .cli import one_line
    from .parallel.comm import allgather_json, one_process_comm

    comm = one_process_comm() if comm is None else comm
    lock, problem = None, None
    if comm.world.rank == 0:
        try:
            lock = _claim(Path(run_dir), resume, overwrite, log)
        except (ValueError, OSError) as err:
            problem = one_line(err)
    problem = allgather_json(comm.world, problem)[0]  # every rank stops when rank 0 cannot have the directory
    if problem is not None:
        raise ValueError(problem)
    return lock


def _claim(run_dir: Path, resume: bool, overwrite: bool, log) -> RunLock:
    import os
    import time

    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out_dir={run_dir} is a file; give a directory (it is made if missing)")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir)
    if resume or not holds_run(run_dir):
        if lock.stale:
            log(f"note: {run_dir / LOCK_FILE} was left by a trainer that is gone ({lock.stale}); taken over")
        lock.record_holder()
        return lock
    if not overwrite:
        lock.release()
        raise ValueError(f"--out_dir={run_dir} already holds a run; continue it with --resume={run_dir}, start over "
                         f"with --overwrite (the old run is renamed aside, not deleted), or choose another --out_dir")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    os.rename(run_dir, aside)  # one rename(2): the old run keeps every file, under its new name
    run_dir.mkdir()
    new_lock = RunLock(run_dir)
    new_lock.record_holder()
    lock.release()
    log(f"--overwrite: the run that was in {run_dir} is now {aside}")
    return new_lock
