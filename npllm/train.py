"""python -m npllm.train: train a model, log honestly, checkpoint atomically, resume exactly.

    python -m npllm.train --preset nano                          # the built-in default corpus
    python -m npllm.train --preset nano --data=DIR --steps=1000 --lr=3e-4 --out_dir=runs/x
    python -m npllm.train --resume=runs/x --steps=2000           # continue runs/x up to step 2000
    python -m npllm.train --init_from=runs/x --sft=qa.jsonl --out_dir=runs/x-sft  # fine-tune on prompt/response pairs
    python -m npllm.train --preset=bert-nano                     # BERT: masked-language modelling (npllm/mlm.py)
    python -m npllm.train --preset=seq2seq-nano --pairs=pairs.jsonl  # encoder-decoder on source/target records
    mpirun -n 4 python -m npllm.train --preset nano --tp=2 --zero=1  # 2 tensor-parallel x 2 data-parallel ranks
    python -m npllm.train --preset 7b --tp=8 --dry_run           # bytes per rank, FLOPs, the fit; allocates nothing

Every field of ModelConfig and TrainConfig (npllm/config.py) is an option ``--name=value``. One step:

    batch = sampler.next_batch()                                            # {"tokens", "targets"}: (B, T) each
    loss, grads = accumulate_loss_and_grads(params, batch, cfg, micro_batches, tp=comm.tp,
                                            row_groups=row_groups)  # forward + backward, groups side by side
    grads, norm, _ = reduce_and_clip(grads, axes, comm, zero=zero, max_norm=grad_clip)      # one global norm
    apply_update(params, grads, opt_state, comm, zero=zero, lr=lr_at(step), ...)          # AdamW, in place

With one process ``comm`` is a size-1 communicator (reduce_and_clip is clip_grad_norm, apply_update adamw_update);
under mpirun every rank runs this loop on its shards and rows, reduce_and_clip also averages over the data-parallel
ranks, and world rank 0 alone logs. Docs: docs/training.md, docs/finetuning.md, docs/parallelism.md.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a command: this rank's share of the cores for BLAS, before NumPy loads
    from .allocator import keep_freed_memory
    from .parallel.threads import prepare_blas

    prepare_blas()
    keep_freed_memory()  # a step reuses the memory the step before freed

import numpy as np

from .backend import asnumpy, to_device, xp_for_device
from .checkpoint import last_good_checkpoint, latest_checkpoint, save_checkpoint
from .cli import one_line, report_error
from .config import (
    EXECUTION_FIELDS, PRESETS, ModelConfig, TrainConfig, get_preset, options_help, parse_options, write_config_file,
)
from .batches import load_data, training_sampler, validation_batches
from .data import TrainingData
from .layers.dropout import Dropout
from .layers.loss import IGNORE_INDEX
from .memory import dry_run_report
from .metrics import (
    MetricsLog, format_line, measure_peak_flops, peak_rss_bytes, plot_losses, read_metrics,
    remove_stale_temp_files, start_lines, validation_metrics, write_metrics,
)
from .models import (
    accumulate_loss_and_grads, default_row_groups, flops_per_token, init_params, ops, split_axes, tp_split_sizes,
)
from .optim import lr_at
from .parallel.comm import (
    ErrorVote, Terminated, end_job_on_signals, one_process_comm, run_comm, run_main,
)
from .parallel.data import apply_update, global_batch_mean, init_optimizer, optimizer_names, reduce_and_clip
from .parallel.tensor import check_tp_divides, shard_params
from .run import (
    Resumed, RunMeta, TokenizerRef, Trained, check_param_shapes, check_same_dp, check_tokenizer, claim_run_dir,
    load_resumed, load_trained, read_run_meta, recorded_tokenizer,
)
from .tokenizer import copy_tokenizer


class TrainingError(Exception):
    """A run that cannot go on (a NaN loss, say): reported as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------------------
# the run's configs and where its weights come from


def build_configs(model_opts: dict, train_opts: dict, resumed_meta: RunMeta | None = None,
                  init_cfg: ModelConfig | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The run's (ModelConfig, TrainConfig): a preset plus overrides; a resumed run's configs plus overrides (the
    model may not change); or, with --init_from, that checkpoint's model and a new run."""
    how = {k: v for k, v in model_opts.items() if k in EXECUTION_FIELDS}  # these may change on resume, --init_from
    model_opts = {k: v for k, v in model_opts.items() if k not in EXECUTION_FIELDS}
    if resumed_meta is not None:
        cfg, saved = dataclasses.replace(resumed_meta.model_config, **how), resumed_meta.train_config
        changed = {k: v for k, v in model_opts.items() if getattr(cfg, k) != v}
        if changed:
            raise ValueError(f"cannot change the model when resuming: {changed} differs from the checkpoint's config")
        moved = {k: v for k, v in train_opts.items() if k in ("init_from", "sft", "pairs", "tokenizer")
                 and v != getattr(saved, k)}
        if moved:
            raise ValueError(f"cannot change the starting point or the records when resuming: {moved} differs from "
                             f"the run's {({k: getattr(saved, k) for k in moved})}")
        tc = dataclasses.replace(saved, **train_opts)
        if tc.steps <= resumed_meta.step:
            raise ValueError(f"--resume: the run is already at step {resumed_meta.step}, so --steps={tc.steps} leaves "
                             f"nothing to do; pass --steps above {resumed_meta.step}")
    elif init_cfg is not None:
        source = f"--init_from={train_opts['init_from']}"
        if "preset" in train_opts:
            raise ValueError(f"--preset={train_opts['preset']} cannot be combined with {source}: the model is the "
                             f"checkpoint's")
        cfg = dataclasses.replace(init_cfg, **how)
        changed = {k: v for k, v in model_opts.items() if getattr(cfg, k) != v}
        if changed:
            raise ValueError(f"cannot change the model of {source}: {changed} differs from the checkpoint's config "
                             f"{({k: getattr(cfg, k) for k in changed})}")
        tc = TrainConfig(**train_opts)
    else:
        tc = TrainConfig(**train_opts)
        cfg = get_preset(tc.preset, **model_opts, **how)
    if "seq_len" not in train_opts and resumed_meta is None:
        tc = dataclasses.replace(tc, seq_len=min(tc.seq_len, cfg.max_seq_len))  # the default, capped by the model
    if tc.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len={tc.seq_len} is above the model's max_seq_len={cfg.max_seq_len}")
    return cfg, tc


# ----------------------------------------------------------------------------------------------------------
# the run


def starting_state(cfg: ModelConfig, tc: TrainConfig, comm, data: TrainingData, sampler, resumed: Resumed | None,
                   initial: Trained | None) -> tuple[dict, dict, int]:
    """(params, AdamW state, first step) of this rank: fresh weights, the --init_from model's weights (a fresh
    optimizer, step 0), or exactly where the --resume checkpoint left them (the sampler moved there too)."""
    xp, dtype, out_dir, main_rank = xp_for_device(tc.device), np.dtype(tc.dtype), Path(tc.out_dir), comm.world.rank == 0
    if resumed is None:
        if initial is None:  # this rank's shards (all of the model with tp=1)
            params = init_params(cfg, seed=tc.seed, dtype=dtype, xp=xp, tp_rank=comm.tp.rank, tp_size=comm.tp.size)
        else:
            check_tokenizer(data.tokenizer, initial.tokenizer.fingerprint, f"--init_from={tc.init_from}")
            full = {name: np.asarray(value) for name, value in to_device(initial.params, "cpu").items()}
            check_param_shapes(full, cfg)
            mine = shard_params(full, split_axes(cfg), comm.tp.rank, comm.tp.size)
            params = {name: xp.asarray(value, dtype=dtype) for name, value in mine.items()}
        if main_rank:
            write_metrics(out_dir, [])
        return params, init_optimizer(params, comm, tc.zero), 0  # zero=1: moments of this dp rank's tensors only
    meta = resumed.meta
    check_tokenizer(data.tokenizer, meta.tokenizer.fingerprint, "this checkpoint")
    if data.sft is not None and (meta.sft or {}).get("sha256") != data.sft["sha256"]:
        raise ValueError(f"{data.dir} is not the file this run was trained on (its sha256 differs from the "
                         f"checkpoint's); an exact resume needs the same records")
    check_same_dp(meta, comm)
    params = {name: xp.asarray(value, dtype=dtype) for name, value in resumed.params.items()}
    kept = optimizer_names(params, comm, tc.zero)  # the saved moments are complete; keep this rank's
    opt_state = {"step": resumed.opt_state["step"],
                 "m": to_device({n: resumed.opt_state["m"][n] for n in kept}, tc.device),
                 "v": to_device({n: resumed.opt_state["v"][n] for n in kept}, tc.device)}
    sampler.load_state_dict(meta.sampler)
    if main_rank:  # metrics of steps after the checkpoint belong to a run that did not survive: drop them
        write_metrics(out_dir, [m for m in read_metrics(out_dir) if m["step"] <= meta.step])
    return params, opt_state, meta.step


def save_run(step: int, params: dict, opt_state: dict, cfg: ModelConfig, tc: TrainConfig, sampler,
             data: TrainingData, comm) -> Path:
    """One checkpoint of the run (every rank calls it): its tensors and the RunMeta an exact resume needs.
    TrainingError instead when any rank's parameters are not finite: a broken model is never saved."""
    xp = xp_for_device(tc.device)
    finite = all(bool(xp.isfinite(p).all()) for p in params.values())
    if comm.world.allreduce_scalar(0.0 if finite else 1.0) > 0:  # every rank stops if any rank's shards are bad
        raise TrainingError(f"step {step}: the parameters are not finite after the update; not saving them "
                            f"(last good checkpoint: {latest_checkpoint(tc.out_dir)})")
    meta = RunMeta(model_config=cfg, train_config=tc, step=step, sampler=sampler.state_dict(),
                   tokenizer=TokenizerRef("../tokenizer", data.tokenizer.fingerprint),  # RUN/tokenizer
                   data_dir=data.dir, sft=data.sft)
    return save_checkpoint(tc.out_dir, step, params, opt_state, meta.to_json(), comm=comm, zero=tc.zero,
                           keep=tc.keep_checkpoints)


def train(cfg: ModelConfig, tc: TrainConfig, resumed: Resumed | None = None, log=print,
          initial: Trained | None = None, comm=None) -> list[dict]:
    """Run (or continue) training; returns this invocation's metrics, one dict per step.

    resumed: the checkpoint to continue (--resume: this rank's shards and AdamW state); initial: the trained model
    to start from (--init_from: its weights, a fresh AdamW state, step 0). comm: the run's ParallelComm (default:
    one process). Every rank runs this on its own shards (tp) and rows (dp); world rank 0 alone logs and writes, and
    holds the lock that makes out_dir this run's alone for as long as it runs (``npllm.run.claim_run_dir``).
    """
    comm = one_process_comm() if comm is None else comm
    check_tp_divides(tp_split_sizes(cfg), comm.tp.size)
    log = log if comm.world.rank == 0 else (lambda *args, **kwargs: None)
    lock = claim_run_dir(tc.out_dir, comm, resume=resumed is not None, overwrite=tc.overwrite, log=log)
    try:
        return run_training(cfg, tc, resumed, log, initial, comm)
    finally:
        if lock is not None:
            lock.release()


def run_training(cfg: ModelConfig, tc: TrainConfig, resumed: Resumed | None, log, initial: Trained | None,
                 comm) -> list[dict]:
    """The body of ``train``, in phases: data, starting state, cost and log lines, the loop, the end."""
    main_rank = comm.world.rank == 0
    xp, dtype, out_dir, axes = xp_for_device(tc.device), np.dtype(tc.dtype), Path(tc.out_dir), split_axes(cfg)
    if main_rank:
        write_config_file(out_dir / "config.toml", cfg, tc)  # --config=RUN/config.toml runs it again

    # 1. data: this dp rank's rows of the global batch
    weights_tokenizer = (initial.tokenizer if initial is not None else None if resumed is None
                         else recorded_tokenizer(resumed.meta, resumed.path))  # --sft tokenizes with it
    data = load_data(tc, cfg, weights_tokenizer, comm.world)  # npllm/batches.py: what each architecture reads
    if main_rank:  # the run keeps its own copy of its tokenizer: a moved run directory still works
        copy_tokenizer(data.tokenizer, out_dir / "tokenizer")
    sampler = training_sampler(data, cfg, tc, comm.dp.rank, comm.dp.size)
    val_batches = validation_batches(data, cfg, tc.batch_size * comm.dp.size, tc)  # the same global batches each time
    # (V_tok,) bytes per id: validation bits per byte (not for BERT: its targets are scattered masked tokens)
    token_bytes = data.tokenizer.token_bytes() if cfg.arch != "encoder" else None

    # 2. weights and optimizer state: fresh, from --init_from, or exactly where --resume left them
    params, opt_state, start_step = starting_state(cfg, tc, comm, data, sampler, resumed, initial)
    if main_rank:
        remove_stale_temp_files(out_dir)

    # 3. what a step costs, and the first log lines
    tokens_per_step = tc.batch_size * tc.seq_len * comm.dp.size  # the global batch: every dp rank's rows
    step_flops = flops_per_token(cfg, tc.seq_len) * tokens_per_step
    peak = tc.peak_tflops * 1e12 if tc.peak_tflops else measure_peak_flops(xp, dtype)  # one rank's
    peak = comm.world.allreduce_scalar(peak)  # all ranks' (measured at the same time, so they share the cores)
    start = (f"resumed from step {start_step} in {tc.out_dir}" if resumed is not None else None if initial is None
             else f"initialised from {tc.init_from} (its step {0 if initial.meta is None else initial.meta.step}); "
                  f"a fresh optimizer, step 0")
    # each micro-batch's rows in groups whose forward/backward run side by side, one per core (npllm/models)
    row_groups = tc.row_groups or default_row_groups(tc.batch_size // tc.micro_batches, tc.device, comm.tp.size)
    for line in start_lines(cfg, tc, data, comm, sum(p.size for p in params.values()), peak, start, row_groups):
        log(line)

    # 4. the loop
    progress = None
    if sys.stderr.isatty() and main_rank:
        from tqdm import tqdm

        progress = tqdm(total=tc.steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)
        log = progress.write
    history, metrics = [], MetricsLog(out_dir, enabled=main_rank)
    try:
        if start_step == 0:  # the untrained model's validation loss: the baseline every later eval compares to
            m = dict(step=0, **validation_metrics(params, cfg, val_batches, tc, xp, comm, token_bytes, row_groups))
            metrics.write(m)
            history.append(m)
            log(format_line(m, tc.steps))
        for step in range(start_step, tc.steps):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=tc.lr, warmup_steps=tc.warmup, total_steps=tc.decay_steps, min_lr=tc.final_lr)
            batch = sampler.next_batch()  # {"tokens": (B, T), "targets": (B, T), ...}: this dp rank's rows
            n_targets = int((batch["targets"] != IGNORE_INDEX).sum())
            batch = {key: xp.asarray(value) for key, value in batch.items()}
            dropout = None if not (cfg.dropout or cfg.attn_dropout) else Dropout(
                cfg.dropout, cfg.attn_dropout, tc.seed, step, row_offset=comm.dp.rank * tc.batch_size)
            loss, grads = accumulate_loss_and_grads(params, batch, cfg, tc.micro_batches, tp=comm.tp, dropout=dropout,
                                                    row_groups=row_groups)
            loss, grads = global_batch_mean(loss, grads, n_targets, comm.dp)
            grads, norm, _ = reduce_and_clip(grads, axes, comm, zero=tc.zero, max_norm=tc.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # the same on every rank: all stop together
                raise TrainingError(f"step {step + 1}: loss {loss} / gradient norm {norm} is not finite; stopping "
                                    f"before the update (last good checkpoint: {latest_checkpoint(out_dir)})")
            apply_update(params, grads, opt_state, comm, zero=tc.zero, lr=lr, beta1=tc.beta1, beta2=tc.beta2,
                         eps=tc.eps, weight_decay=tc.weight_decay, update=ops(cfg).adamw_update)
            del grads  # before the next step's backward makes new ones
            float(asnumpy(next(iter(params.values())).ravel()[0]))  # a GPU finishes the step before the clock is read
            dt = time.perf_counter() - t0
            done = step + 1  # steps completed, the number a checkpoint and a log line carry
            m = dict(step=done, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_step / dt,
                     mfu=step_flops / dt / peak)
            if done % tc.eval_interval == 0 or done == tc.steps:
                m.update(validation_metrics(params, cfg, val_batches, tc, xp, comm, token_bytes, row_groups))
            metrics.write(m)
            history.append(m)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.3f}")
            if done % tc.log_interval == 0 or "val_loss" in m or done == start_step + 1:
                log(format_line(m, tc.steps))
            if done % tc.ckpt_interval == 0 or done == tc.steps:
                save_run(done, params, opt_state, cfg, tc, sampler, data, comm)
    finally:
        metrics.close()
        if progress is not None:
            progress.close()

    # 5. the end: the plot, and where everything is
    plot = plot_losses(out_dir) if main_rank else None
    rss = comm.world.allgather(np.array([peak_rss_bytes()], dtype=np.float64), axis=0) / 2**30  # (world,) GiB
    log(f"done: checkpoint {latest_checkpoint(out_dir)}" + (f" | loss curve {plot}" if plot else "")
        + f" | metrics {out_dir / 'metrics.jsonl'} | peak memory {rss.max():.2f} GiB"
        + (f" per rank (least {rss.min():.2f})" if comm.world.size > 1 else ""))
    return history


# ----------------------------------------------------------------------------------------------------------
# the command line


def usage() -> str:
    """--help: the command's docstring, then every option with its default and meaning, model then training."""
    return "\n".join([__doc__.split("\n\nEvery field")[0], "",
                      "Model options (a preset sets them all; options override it):", options_help(ModelConfig), "",
                      "Training options:", options_help(TrainConfig), "",
                      f"Presets: {', '.join(PRESETS)}. Docs: docs/training.md, docs/finetuning.md, "
                      f"docs/parallelism.md."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    vote = ErrorVote()  # under mpirun: how the ranks find out whether an error below hit all of them
    out_dir = None
    try:
        model_opts, train_opts = parse_options(argv, ModelConfig, TrainConfig)
        resumed_meta = initial = None
        if train_opts.get("resume"):
            resume = Path(train_opts["resume"])
            resumed_meta = read_run_meta(resume)  # its configs say the model; its tensors are read per rank below
            train_opts.setdefault("out_dir", str(resume.parent if resume.name.startswith("ckpt_") else resume))
        elif train_opts.get("init_from"):
            initial = load_trained(train_opts["init_from"])
        cfg, tc = build_configs(model_opts, train_opts, resumed_meta, None if initial is None else initial.cfg)
        out_dir = tc.out_dir
        if tc.dry_run:
            report = dry_run_report(cfg, tc, vote.size)
            if vote.rank == 0:
                print(report)
            return 0
        check_tp_divides(tp_split_sizes(cfg), tc.tp)
        comm = run_comm(tc.tp, tc.dp)
        # Ctrl-C or kill, to mpirun or to any rank: every rank ends, exit status 130 / 143
        end_job_on_signals(lambda: f"npllm.train: interrupted; {last_good_checkpoint(out_dir)}")
        resumed = None if resumed_meta is None else load_resumed(train_opts["resume"], cfg, comm)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # non-finite values are caught per step
            train(cfg, tc, resumed, initial=initial, comm=comm)
    except (ValueError, TrainingError, ImportError, OSError) as err:  # ImportError: --device=cuda without CuPy
        failed_io = isinstance(err, OSError) and not isinstance(err, FileNotFoundError)  # a write, not bad input
        if failed_io and out_dir is not None:
            err = OSError(f"{one_line(err)} ({last_good_checkpoint(out_dir)})")
        return report_error("npllm.train", err, 1 if failed_io or isinstance(err, TrainingError) else 2, vote)
    except KeyboardInterrupt as err:  # one process: Ctrl-C, or SIGTERM (Terminated)
        print(f"npllm.train: interrupted; {last_good_checkpoint(out_dir)}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # any other exception on any rank: its traceback, and the whole job ends
