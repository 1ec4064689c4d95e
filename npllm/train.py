"""python -m npllm.train: train a model, log honestly, checkpoint atomically, resume exactly.

    python -m npllm.train --preset nano                          # the built-in default corpus
    python -m npllm.train --preset nano --data=DIR --steps=1000 --lr=3e-4 --out_dir=runs/x
    python -m npllm.train --resume=runs/x --steps=2000           # continue runs/x up to step 2000
    python -m npllm.train --init_from=runs/x --sft=qa.jsonl --out_dir=runs/x-sft  # fine-tune on prompt/response pairs
    mpirun -n 4 python -m npllm.train --preset nano --tp=2 --zero=1  # 2 tensor-parallel x 2 data-parallel ranks
    python -m npllm.train --preset 7b --tp=8 --dry_run           # bytes per rank, FLOPs, the fit; allocates nothing

Every field of ModelConfig and TrainConfig (npllm/config.py) is an option ``--name=value``. One step:

    x, y = sampler.next()                                          # (B, T) token windows
    loss, grads = accumulate_loss_and_grads(params, x, y, cfg, micro_batches, tp=comm.tp)  # forward + backward
    grads, norm, _ = reduce_and_clip(grads, comm, zero=zero, max_norm=grad_clip)  # one global norm, clipped
    apply_update(params, grads, opt_state, comm, zero=zero, lr=lr_at(step), ...)   # AdamW, in place

With one process ``comm`` is a size-1 communicator: reduce_and_clip is clip_grad_norm and apply_update is
adamw_update, the same arithmetic. The loop is explained in docs/training.md, fine-tuning (--init_from, --sft) in
docs/finetuning.md, runs under mpirun (--tp, --zero, the checkpoint layout, --dry_run) in docs/parallelism.md:
there every rank runs this same loop on its shards and its rows of the global batch, reduce_and_clip also averages
the gradients over the data-parallel ranks, and world rank 0 alone logs and writes metrics.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

from .parallel.threads import limit_blas_threads

limit_blas_threads()  # under mpirun, this rank's share of the cores for BLAS: it must run before NumPy loads

import numpy as np  # noqa: E402

from .backend import asnumpy, to_device, xp_for_device  # noqa: E402
from .checkpoint import (  # noqa: E402
    load_checkpoint, load_checkpoint_shard, read_checkpoint_meta, save_checkpoint_sharded,
)
from .config import (  # noqa: E402
    PRESETS, ModelConfig, TrainConfig, describe_fields, field_types, get_preset, parse_value,
)
from .data import BatchSampler, eval_batches, load_tokens, read_meta  # noqa: E402
from .layers.loss import IGNORE_INDEX  # noqa: E402
from .memory import default_device_memory_gib, format_plan, plan_memory  # noqa: E402
from .model import (  # noqa: E402
    accumulate_loss_and_grads, flops_per_token, init_params, model_forward, num_params, param_shard_shapes,
)
from .optim import lr_at  # noqa: E402
from .parallel.comm import ErrorVote, LocalComm, abort_job, launched_by_mpirun, make_comm, run_main  # noqa: E402
from .parallel.data import (  # noqa: E402
    apply_update, dp_count_weight, dp_mean, init_optimizer, optimizer_names, reduce_and_clip,
)
from .parallel.tensor import check_tp_divides, shard_params, vocab_parallel_cross_entropy_forward  # noqa: E402
from .sft import SFTBatchSampler, checkpoint_tokenizer, load_sft_data, sft_eval_batches  # noqa: E402
from .tokenizer import Tokenizer  # noqa: E402

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss, say): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------------------
# options


def parse_options(argv: list[str]) -> tuple[dict, dict]:
    """``--name=value`` words -> (model overrides, train overrides), each value converted to its field's type.

    ``--preset nano`` (a space instead of ``=``) is accepted for the preset; a bare ``--flag`` means true for a
    boolean field.
    """
    model_types, train_types = field_types(ModelConfig), field_types(TrainConfig)
    model_opts, train_opts = {}, {}
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if not word.startswith("--"):
            raise ValueError(f"unexpected argument {word!r}; options look like --name=value")
        name, has_value, text = word[2:].partition("=")
        if not has_value and name == "preset" and i + 1 < len(words):
            text, i = words[i + 1], i + 1
        elif not has_value:
            annotation = model_types.get(name, train_types.get(name))
            if annotation != "bool":
                allowed = "" if annotation is not None else _allowed_names()
                raise ValueError(f"option --{name} needs a value (--{name}=VALUE){allowed}")
            text = "true"
        if name in model_types:
            model_opts[name] = parse_value(name, model_types[name], text)
        elif name in train_types:
            train_opts[name] = parse_value(name, train_types[name], text)
        else:
            raise ValueError(f"unknown option --{name}{_allowed_names()}")
        i += 1
    return model_opts, train_opts


def _allowed_names() -> str:
    names = sorted(set(field_types(ModelConfig)) | set(field_types(TrainConfig)))
    return "; allowed: " + ", ".join("--" + n for n in names)


def check_resumable(saved_params: dict, saved_opt, meta: dict, cfg: ModelConfig, tp_size: int = 1) -> None:
    """ValueError unless a loaded checkpoint has what an exact resume needs and tensors of its config's shapes
    (this rank's shards of them, with tp_size > 1)."""
    missing = [key for key in ("step", "sampler", "tokenizer") if key not in meta]
    if missing:
        raise ValueError(f"the checkpoint's meta lacks {missing}; only checkpoints written by npllm.train "
                         f"can be resumed")
    if saved_opt is None:
        raise ValueError("the checkpoint holds no optimizer state, so the run cannot be resumed exactly")
    check_param_shapes(saved_params, cfg, tp_size)


def initial_weights(initial, cfg: ModelConfig, tokenizer: Tokenizer, dtype, xp) -> dict:
    """The --init_from checkpoint's parameters on the run's device and dtype, after checking that its tensors fit
    cfg and that it was trained with the run's tokenizer."""
    saved_params, _, meta = initial
    check_param_shapes(saved_params, cfg)
    recorded = meta.get("tokenizer", {}).get("fingerprint")
    if recorded != tokenizer.fingerprint:
        raise ValueError(f"the data's tokenizer ({tokenizer.model_path}) is not the one the --init_from checkpoint "
                         f"was trained with (fingerprint {str(recorded)[:12]})")
    return {name: xp.asarray(value, dtype=dtype) for name, value in saved_params.items()}


def check_param_shapes(saved_params: dict, cfg: ModelConfig, tp_size: int = 1) -> None:
    """ValueError unless a checkpoint's tensors are exactly those of param_shapes(cfg) (or, with tp_size > 1, of
    one tensor-parallel rank's shards: param_shard_shapes)."""
    expected = {name: tuple(shape) for name, shape in param_shard_shapes(cfg, tp_size).items()}
    found = {name: tuple(value.shape) for name, value in saved_params.items()}
    if found != expected:
        wrong = sorted(n for n in expected.keys() | found.keys() if expected.get(n) != found.get(n))
        raise ValueError(f"the checkpoint's tensors do not match its model config: {wrong[0]} is "
                         f"{found.get(wrong[0])} in the file but {expected.get(wrong[0])} in the config "
                         f"({len(wrong)} tensor(s) differ)")


def build_configs(model_opts: dict, train_opts: dict, resumed_meta: dict | None = None,
                  init_meta: dict | None = None):
    """The run's (ModelConfig, TrainConfig): a preset plus overrides, or a checkpoint's configs plus overrides.

    With init_meta (the meta of an --init_from checkpoint) the model is that checkpoint's; the run is new.
    """
    if resumed_meta is None:
        tc = TrainConfig(**train_opts)
        if init_meta is None:
            cfg = get_preset(tc.preset, **model_opts)
        else:
            cfg = init_model_config(init_meta, model_opts, train_opts)
    else:
        try:
            cfg = ModelConfig(**resumed_meta["model_config"])
            saved = dict(resumed_meta["train_config"])
            tc = TrainConfig(**{**saved, **train_opts, "out_dir": train_opts.get("out_dir", saved["out_dir"])})
        except (KeyError, TypeError) as err:  # a missing config, or a field this npllm does not know
            raise ValueError(f"the checkpoint's meta has no usable model_config/train_config ({type(err).__name__}: "
                             f"{err}); only checkpoints written by npllm.train can be resumed") from None
        changed = {k: v for k, v in model_opts.items() if getattr(cfg, k) != v}
        if changed:
            raise ValueError(f"cannot change the model when resuming: {changed} differs from the checkpoint's config")
        moved = {k: v for k, v in train_opts.items() if k in ("init_from", "sft") and v != saved.get(k)}
        if moved:
            raise ValueError(f"cannot change the starting point or the SFT data when resuming: {moved} differs from "
                             f"the run's {({k: saved.get(k) for k in moved})}")
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} is above the model's max_seq_len={cfg.max_seq_len}")
    return cfg, tc


def init_model_config(init_meta: dict, model_opts: dict, train_opts: dict) -> ModelConfig:
    """The --init_from checkpoint's ModelConfig; a --preset, or a model option that differs from it, is refused."""
    source = f"--init_from={train_opts['init_from']}"
    if "preset" in train_opts:
        raise ValueError(f"--preset={train_opts['preset']} cannot be combined with {source}: the model is the "
                         f"checkpoint's")
    try:
        cfg = ModelConfig(**init_meta["model_config"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{source}: the checkpoint's meta has no usable model_config ({type(err).__name__}: "
                         f"{err}); only checkpoints written by npllm.train can be used") from None
    changed = {k: v for k, v in model_opts.items() if getattr(cfg, k) != v}
    if changed:
        raise ValueError(f"cannot change the model of {source}: {changed} differs from the checkpoint's config "
                         f"{({k: getattr(cfg, k) for k in changed})}")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# data


def load_data(tc: TrainConfig, cfg: ModelConfig, model_meta: dict | None = None, world=None) -> dict:
    """Train/val token shards and the tokenizer that made them, checked against the model's vocabulary.

    The model's vocab_size may exceed the tokenizer's: the extra embedding rows and logits are padding that no
    token uses (how Megatron pads a vocabulary so that tp splits it evenly, and how the 32000-token 7b preset
    trains on the default corpus, whose text is too small for a tokenizer of more than ~15k tokens).
    world: under mpirun, world rank 0 builds the default corpus first and the others then find it built.

    With --sft: the JSONL records instead (npllm/sft.py), tokenized with the tokenizer that model_meta (the meta of
    the checkpoint the weights come from) names.
    """
    if tc.sft is not None:
        tokenizer = checkpoint_tokenizer(model_meta, "the checkpoint")
        if tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"the checkpoint's tokenizer has {tokenizer.vocab_size} tokens but its model has "
                             f"vocab_size={cfg.vocab_size}")
        return load_sft_data(tc.sft, tokenizer, tc.seq_len)
    if tc.data is None:
        from .corpus import ensure_default_data

        vocab = cfg.vocab_size if cfg.vocab_size <= DEFAULT_CORPUS_MAX_VOCAB else DEFAULT_CORPUS_PADDED_VOCAB
        if world is not None and world.size > 1:
            if world.rank == 0:
                ensure_default_data(vocab_size=vocab)
            world.barrier()  # one rank trains the tokenizer; the others wait, then read its cache
        data_dir = ensure_default_data(vocab_size=vocab)
    else:
        data_dir = Path(tc.data)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data={tc.data}: no such directory (make one with `python -m npllm.data prepare`)")
    meta = read_meta(data_dir)
    tokenizer = Tokenizer.load(meta["tokenizer_dir"])
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer in {meta['tokenizer_dir']} has {tokenizer.vocab_size} tokens but the model "
                         f"has vocab_size={cfg.vocab_size}, too few rows for them; pass --vocab_size="
                         f"{tokenizer.vocab_size} or use matching data")
    train_tokens, val_tokens = load_tokens(Path(data_dir) / "train.bin"), load_tokens(Path(data_dir) / "val.bin")
    if len(val_tokens) < tc.seq_len + 1:
        raise ValueError(f"the validation split in {data_dir} has {len(val_tokens)} tokens, fewer than "
                         f"seq_len+1={tc.seq_len + 1}")
    return dict(dir=str(Path(data_dir).resolve()), train=train_tokens, val=val_tokens, tokenizer=tokenizer,
                unit="tokens")


# ----------------------------------------------------------------------------------------------------------
# measuring


def measure_peak_flops(xp, dtype) -> float:
    """FLOP/s of a large square matmul on this device and dtype, the best of a few runs.

    This is the ceiling our own matmuls could reach here, so MFU = achieved / this is an honest utilisation figure
    for the machine at hand (a vendor's datasheet peak can be given instead with --peak_tflops).
    """
    n = 1024 if xp is np else 8192
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype=dtype)  # (n, n)
    best = math.inf
    for _ in range(8):  # the first runs warm up threads and caches
        start = time.perf_counter()
        c = a @ a
        float(c[0, 0])  # waits for a GPU to finish
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def evaluate(params: dict, cfg: ModelConfig, val_tokens, tc: TrainConfig, xp, comm=None) -> float:
    """Mean loss over the first ``eval_batches`` fixed, non-overlapping validation windows (forward only), or,
    with --sft, over the counted (response) targets of the first ``eval_batches`` batches of held-out records.

    comm: a parallel run's ParallelComm. An evaluation batch is then a global batch of dp * batch_size rows, the
    one that one process with batch_size = dp * batch_size evaluates: each dp rank computes its batch_size rows
    (the tp ranks together, with the vocabulary-parallel loss), and each batch's sum of losses is all-reduced over
    the dp ranks before the batches are added up in order. So every layout gives one process's number (to rounding;
    bit for bit with one dp rank).
    """
    tp, dp = (LocalComm(), LocalComm()) if comm is None else (comm.tp, comm.dp)
    rows = tc.batch_size * dp.size  # one global batch
    batches = list(sft_eval_batches(val_tokens, rows, tc.eval_batches) if tc.sft is not None
                   else eval_batches(val_tokens, rows, tc.seq_len, tc.eval_batches))
    mine = slice(dp.rank * tc.batch_size, (dp.rank + 1) * tc.batch_size)  # this dp rank's rows of each batch
    sums, counts = np.zeros(len(batches)), np.zeros(len(batches))  # (n_batches,) loss * n and n of this rank's rows
    for i, (x, y) in enumerate(batches):
        x, y = x[mine], y[mine]  # (B, T) each; a short last batch may leave a rank no rows
        if len(x) == 0:
            continue
        logits, _ = model_forward(params, xp.asarray(x), cfg, tp=tp)  # (B, T, V_tp)
        loss, _ = vocab_parallel_cross_entropy_forward(logits, xp.asarray(y), tp)
        n = int((y != IGNORE_INDEX).sum())  # weight each batch by its counted targets (all of them for token data)
        sums[i], counts[i] = loss * n, n
    sums, counts = dp.allreduce(sums), dp.allreduce(counts)  # (n_batches,) each: the whole global batches
    total, count = 0.0, 0
    for batch_sum, batch_count in zip(sums, counts):
        total += float(batch_sum)
        count += int(batch_count)
    return total / count


# ----------------------------------------------------------------------------------------------------------
# files


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(out_dir: Path) -> Path | None:
    """loss.png from metrics.jsonl when matplotlib is installed (it is optional: `pip install npllm[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(out_dir)
    train_rows = [r for r in rows if "loss" in r]  # the step-0 record holds only the untrained val loss
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", linewidth=1)
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / PLOT_FILE
    tmp = out_dir / f".{PLOT_FILE}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_line(m: dict, total_steps: int) -> str:
    line = (f"step {m['step']:>{len(str(total_steps))}}/{total_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
            f"grad norm {m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | MFU {100 * m['mfu']:.1f}%")
    if "val_loss" in m:
        line += f" | val loss {m['val_loss']:.4f} | val ppl {m['val_ppl']:.2f}"
    return line


# ----------------------------------------------------------------------------------------------------------
# the run


def train(cfg: ModelConfig, tc: TrainConfig, resumed=None, log=print, initial=None, comm=None) -> list[dict]:
    """Run (or continue) training; returns this invocation's metrics, one dict per step.

    resumed / initial: (params, opt_state, meta) of the checkpoint to continue (--resume; with tp > 1 this rank's
    shards, from ``load_checkpoint_shard``) or to start from (--init_from: its weights, a fresh AdamW state, step 0).
    comm: the run's ParallelComm (``run_comm``; default: one process). Every rank runs this function on its own
    shards (tp) and rows (dp); world rank 0 alone logs, writes metrics.jsonl and plots.
    """
    comm = make_comm(1, use_mpi=False) if comm is None else comm
    check_tp_divides(cfg, comm.tp.size)
    main_rank = comm.world.rank == 0
    if not main_rank:
        log = _silent
    xp = xp_for_device(tc.device)
    dtype = np.dtype(tc.dtype)
    out_dir = Path(tc.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_from = resumed if resumed is not None else initial  # the checkpoint the weights come from, if any
    data = load_data(tc, cfg, model_meta=None if weights_from is None else weights_from[2], world=comm.world)
    sampler_class = SFTBatchSampler if tc.sft is not None else BatchSampler
    sampler = sampler_class(data["train"], tc.batch_size, tc.seq_len, seed=tc.seed, rank=comm.dp.rank,
                            world_size=comm.dp.size)  # this dp rank's rows of the global batch

    if resumed is None:
        if initial is None:  # this rank's shards (all of the model with tp=1)
            params = init_params(cfg, seed=tc.seed, dtype=dtype, xp=xp, tp_rank=comm.tp.rank, tp_size=comm.tp.size)
        else:  # --init_from: the checkpoint's weights; nothing else of its run (a fresh AdamW state, step 0)
            params = initial_weights(initial, cfg, data["tokenizer"], dtype, xp)
            if comm.tp.size > 1:
                params = shard_params(params, cfg, comm.tp.rank, comm.tp.size)
        opt_state = init_optimizer(params, comm, tc.zero)  # zero=1: moments of this dp rank's tensors only
        start_step = 0
        if main_rank:
            _write_atomic(out_dir / METRICS_FILE, "")
    else:
        saved_params, saved_opt, meta = resumed
        check_resumable(saved_params, saved_opt, meta, cfg, comm.tp.size)
        params = {name: xp.asarray(value, dtype=dtype) for name, value in saved_params.items()}
        kept = optimizer_names(params, comm, tc.zero)  # the saved moments are complete; keep this rank's
        opt_state = {"step": saved_opt["step"], "m": to_device({n: saved_opt["m"][n] for n in kept}, tc.device),
                     "v": to_device({n: saved_opt["v"][n] for n in kept}, tc.device)}
        check_same_dp(meta, comm)
        sampler.load_state_dict(meta["sampler"])
        start_step = meta["step"]
        if meta["tokenizer"]["fingerprint"] != data["tokenizer"].fingerprint:
            raise ValueError(f"the data's tokenizer ({data['tokenizer'].model_path}) is not the one this checkpoint "
                             f"was trained with (fingerprint {meta['tokenizer']['fingerprint'][:12]})")
        if tc.sft is not None and meta.get("sft", {}).get("sha256") != data["sft"]["sha256"]:
            raise ValueError(f"--sft={tc.sft} is not the file this run was trained on (its sha256 differs from the "
                             f"checkpoint's); an exact resume needs the same records")
        # metrics of steps after the checkpoint belong to a run that did not survive: drop them
        if main_rank:
            kept = [m for m in read_metrics(out_dir) if m["step"] <= start_step]
            _write_atomic(out_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in kept))

    tokens_per_step = tc.batch_size * tc.seq_len * comm.dp.size  # the global batch: every dp rank's rows
    step_flops = flops_per_token(cfg, tc.seq_len) * tokens_per_step
    peak = tc.peak_tflops * 1e12 if tc.peak_tflops else measure_peak_flops(xp, dtype)  # one rank's
    peak = comm.world.allreduce_scalar(peak)  # all ranks' (measured at the same time, so they share the cores)
    log(f"model: {num_params(cfg):,} parameters ({cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}) | "
        f"data: {data['dir']} ({len(data['train']):,} train / {len(data['val']):,} val {data['unit']}) | "
        f"device {tc.device} {tc.dtype} | peak {peak / 1e12:.3f} TFLOP/s "
        f"({'given' if tc.peak_tflops else 'measured'}{', all ranks' if comm.world.size > 1 else ''})")
    if comm.world.size > 1:
        log(f"parallel: {comm.world.size} ranks = tp {comm.tp.size} x dp {comm.dp.size}, zero={tc.zero} | "
            f"global batch {comm.dp.size} x {tc.batch_size} rows | {sum(p.size for p in params.values()):,} "
            f"parameters on each rank")
    if data["tokenizer"].vocab_size < cfg.vocab_size:
        log(f"note: the tokenizer has {data['tokenizer'].vocab_size} tokens and the model vocab_size={cfg.vocab_size}"
            f": embedding rows and logits {data['tokenizer'].vocab_size}..{cfg.vocab_size - 1} are padding that no "
            f"token uses")
    if resumed is not None:
        log(f"resumed from step {start_step} in {out_dir}")
    elif initial is not None:
        log(f"initialised from {tc.init_from} (its step {initial[2].get('step')}); a fresh optimizer, step 0")

    def save(step: int) -> Path:
        finite = all(bool(xp.isfinite(p).all()) for p in params.values())
        if comm.world.allreduce_scalar(0.0 if finite else 1.0) > 0:  # every rank stops if any rank's shards are bad
            raise TrainingError(f"step {step}: the parameters are not finite after the update; not saving them "
                                f"(last good checkpoint: {_latest_or_none(out_dir)})")
        meta = dict(model_config=dataclasses.asdict(cfg), train_config=dataclasses.asdict(tc), step=step,
                    sampler=sampler.state_dict(), rng=dict(seed=tc.seed, rule="BatchSampler: default_rng([seed, step])"),
                    tokenizer=dict(dir=str(data["tokenizer"].model_path.parent),
                                   fingerprint=data["tokenizer"].fingerprint),
                    data_dir=data["dir"])
        if tc.sft is not None:
            meta["sft"] = data["sft"]  # the file's path, sha256 and record counts: a resume checks the sha256
        return save_checkpoint_sharded(out_dir, step, params, opt_state, meta, comm, zero=tc.zero,
                                       keep=tc.keep_checkpoints)

    progress = None
    if sys.stderr.isatty() and main_rank:
        from tqdm import tqdm

        progress = tqdm(total=tc.steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
        log = progress.write
    history = []
    metrics_file = open(out_dir / METRICS_FILE if main_rank else os.devnull, "a")  # rank 0 writes the metrics
    try:
        if start_step == 0:  # the untrained model's validation loss: the baseline every later eval compares to
            val_loss = evaluate(params, cfg, data["val"], tc, xp, comm)
            m = dict(step=0, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 700.0)))
            metrics_file.write(json.dumps(m) + "\n")
            history.append(m)
            log(f"step 0/{tc.steps} | val loss {val_loss:.4f} | val ppl {m['val_ppl']:.2f}")
        for step in range(start_step, tc.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=tc.lr, warmup_steps=tc.warmup, total_steps=tc.decay_steps, min_lr=tc.min_lr)
            x, y = sampler.next()  # (B, T) each: this dp rank's rows
            loss, grads = accumulate_loss_and_grads(params, xp.asarray(x), xp.asarray(y), cfg, tc.micro_batches,
                                                    tp=comm.tp)
            loss, grads = global_batch_mean(loss, grads, y, comm)
            grads, norm, _ = reduce_and_clip(grads, comm, zero=tc.zero, max_norm=tc.grad_clip)  # dp mean, clipped
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank: all stop together
                raise TrainingError(f"step {step + 1}: loss {loss} / gradient norm {norm} is not finite; stopping "
                                    f"before the update (last good checkpoint: {_latest_or_none(out_dir)})")
            apply_update(params, grads, opt_state, comm, zero=tc.zero, lr=lr, beta1=tc.beta1, beta2=tc.beta2,
                         eps=tc.eps, weight_decay=tc.weight_decay)
            del grads  # before the next step's backward makes new ones
            float(asnumpy(params["norm.w"][0]))  # wait for a GPU to finish the step before reading the clock
            dt = time.perf_counter() - t0
            done = step + 1  # steps completed, the number a checkpoint and a log line carry
            m = dict(step=done, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_step / dt,
                     mfu=step_flops / dt / peak)
            if done % tc.eval_interval == 0 or done == tc.steps:
                m["val_loss"] = evaluate(params, cfg, data["val"], tc, xp, comm)
                m["val_ppl"] = math.exp(min(m["val_loss"], 700.0))
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            history.append(m)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}")
            if done % tc.log_interval == 0 or "val_loss" in m or done == start_step + 1:
                log(format_line(m, tc.steps))
            if done % tc.ckpt_interval == 0 or done == tc.steps:
                save(done)
    finally:
        metrics_file.close()
        if progress is not None:
            progress.close()
    plot = plot_losses(out_dir) if main_rank else None
    last = _latest_or_none(out_dir)
    rss = comm.world.allgather(np.array([peak_rss_bytes()], dtype=np.float64), axis=0) / 2**30  # (world,) GiB
    log(f"done: checkpoint {last}" + (f" | loss curve {plot}" if plot else "") + f" | metrics {out_dir / METRICS_FILE}"
        f" | peak memory {rss.max():.2f} GiB" + (f" per rank (least {rss.min():.2f})" if comm.world.size > 1 else ""))
    return history


def peak_rss_bytes() -> int:
    """The most physical memory this process has held so far (its high-water mark), in bytes."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return kib if sys.platform == "darwin" else kib * 1024


def _latest_or_none(out_dir: Path):
    from .checkpoint import latest_checkpoint

    return latest_checkpoint(out_dir)


def check_same_dp(meta: dict, comm) -> None:
    """ValueError unless the run has the checkpoint's number of data-parallel ranks (another dp would draw other
    windows: no exact resume). Another tp is fine: the checkpoint is re-sharded."""
    saved_dp = meta["sampler"].get("world_size", 1)
    if saved_dp != comm.dp.size:
        saved = meta.get("train_config", {})
        saved_tp = saved.get("tp", 1)
        raise ValueError(f"the checkpoint was written by tp={saved_tp} x dp={saved_dp} ranks (zero="
                         f"{saved.get('zero', 0)}) and this run has tp={comm.tp.size} x dp={comm.dp.size}; resuming "
                         f"needs dp={saved_dp} (another dp draws other data): e.g. mpirun -n {comm.tp.size * saved_dp} "
                         f"with --tp={comm.tp.size}")


def _silent(*args, **kwargs) -> None:
    """The log of every rank but world rank 0."""


def global_batch_mean(loss: float, grads: dict, targets, comm):
    """(loss, grads) of this dp rank turned into its share of the global batch's mean (``dp_count_weight``), and
    the loss into the global batch's mean loss, the same on every rank. With one dp rank: unchanged."""
    if comm.dp.size == 1:
        return loss, grads
    weight = dp_count_weight(int((np.asarray(targets) != IGNORE_INDEX).sum()), comm.dp)
    if weight != 1.0:  # only when the ranks count different numbers of targets (SFT): exactly 1.0 in pretraining
        for g in grads.values():
            g *= weight
    return dp_mean(weight * loss, comm.dp), grads


# ----------------------------------------------------------------------------------------------------------
# the command line


# The default corpus (~465 KB of text) trains tokenizers up to this size; a model with a larger vocabulary trains
# on the default corpus's usual 2048-token tokenizer, its other rows being padding (see load_data).
DEFAULT_CORPUS_MAX_VOCAB = 8192
DEFAULT_CORPUS_PADDED_VOCAB = 2048


def run_comm(tc: TrainConfig):
    """The run's communicator: the mpirun world split into tp x dp ranks (one process without mpirun)."""
    if tc.tp > 1 and not launched_by_mpirun():
        raise ValueError(f"--tp={tc.tp} needs {tc.tp * (tc.dp or 1)} ranks: start it with `mpirun -n "
                         f"{tc.tp * (tc.dp or 1)} python -m npllm.train ...` (--dry_run plans it on one process)")
    comm = make_comm(tc.tp)
    if tc.dp is not None and tc.dp != comm.dp.size:
        raise ValueError(f"--dp={tc.dp} but {comm.world.size} ranks with tp={tc.tp} make dp={comm.dp.size}; "
                         f"start {tc.dp * tc.tp} ranks or leave --dp out")
    return comm


def dry_run_report(cfg: ModelConfig, tc: TrainConfig, world_size: int = 1) -> str:
    """The --dry_run text: what one rank of this run would hold, computed from shapes alone (npllm/memory.py)."""
    dp = tc.dp if tc.dp is not None else max(1, world_size // tc.tp)
    plan = plan_memory(cfg, tp=tc.tp, dp=dp, zero=tc.zero, dtype=tc.dtype, batch_size=tc.batch_size,
                       seq_len=tc.seq_len, micro_batches=tc.micro_batches)
    if tc.device_memory_gb is not None:
        memory, source = tc.device_memory_gb, "--device_memory_gb"
    else:
        memory, source = default_device_memory_gib(tc.device, tc.tp * dp)
    return format_plan(plan, memory, source)


def report_error(err: Exception, code: int, vote: ErrorVote) -> int:
    """One line for an expected error: said once by world rank 0 when every rank hit it (then every rank returns
    ``code``), else by the rank that hit it, which then aborts the job (the others wait in a collective)."""
    if vote.all_failed():
        if vote.rank == 0:
            print(f"npllm.train: error: {err}", file=sys.stderr)
        return code
    print(f"npllm.train: error: [rank {vote.rank}] {err}", file=sys.stderr)
    abort_job(code)


def usage() -> str:
    """--help: the command's docstring, then every option with its default and meaning, model then training."""
    lines = [__doc__.split("\n\nEvery field")[0], "", "Model options (a preset sets them all; options override it):"]
    for name, default, comment in describe_fields(ModelConfig):
        lines.append(f"  {'--' + name + '=' + default:<26} {comment}")
    lines += ["", "Training options:"]
    for name, default, comment in describe_fields(TrainConfig):
        lines.append(f"  {'--' + name + '=' + default:<26} {comment}")
    lines += ["", f"Presets: {', '.join(PRESETS)}. Docs: docs/training.md, docs/finetuning.md, docs/parallelism.md."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    vote = ErrorVote()  # under mpirun: how the ranks find out whether an error below hit all of them
    try:
        model_opts, train_opts = parse_options(argv)
        resumed = initial = resumed_meta = None
        if train_opts.get("resume"):
            resumed_meta = read_checkpoint_meta(train_opts["resume"])  # its configs say the run's tp; tensors later
            train_opts.setdefault("out_dir", str(Path(train_opts["resume"])))
            if Path(train_opts["resume"]).name.startswith("ckpt_"):
                train_opts["out_dir"] = str(Path(train_opts["resume"]).parent)
        elif train_opts.get("init_from"):
            initial = load_checkpoint(train_opts["init_from"])
        cfg, tc = build_configs(model_opts, train_opts, resumed_meta, None if initial is None else initial[2])
        if tc.dry_run:
            report = dry_run_report(cfg, tc, vote.size)
            if vote.rank == 0:
                print(report)
            return 0
        check_tp_divides(cfg, tc.tp)
        comm = run_comm(tc)
        if resumed_meta is not None:  # this rank's shards (re-sharded if the checkpoint has another tp)
            resumed = load_checkpoint_shard(train_opts["resume"], comm.tp.rank, comm.tp.size)[:3]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are caught per step
            train(cfg, tc, resumed, initial=initial, comm=comm)
    except (ValueError, FileNotFoundError, TrainingError, ImportError) as err:  # ImportError: --device=cuda, no CuPy
        return report_error(err, 1 if isinstance(err, TrainingError) else 2, vote)
    except KeyboardInterrupt:
        if vote.rank == 0:
            print("npllm.train: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # any other exception on any rank: its traceback, and the whole job ends
