"""One training step of the encoder-decoder and the encoder (BERT) on the reference layers and on the fast paths.

    python benchmarks/bench_architectures.py [--presets seq2seq-nano bert-nano] [--batch_size 16] [--repeats 5]
                                             [--dropout preset no-attn none] [--blas_threads N]

One step is what the trainer does: forward + backward (npllm.models.accumulate_loss_and_grads), gradient clipping
and AdamW (npllm.parallel.data), float32, on a random batch of batch_size rows at the preset's max_seq_len:
    seq2seq-nano   sources and targets of 64 positions, each row's real length drawn from [32, 64] (padding masks)
    bert-nano      128 real positions per row, MLM targets at 15% of them
The dropout rows:
    preset         the preset's rates (hidden 0.1, attention 0.1), as training runs them: attention dropout means the
                   reference attention on both sides (only it forms the probabilities it drops), so the fast side
                   gains from the FFN, norms, loss and AdamW only
    no-attn        hidden dropout 0.1, attention dropout 0: the fast side runs flash attention too
    none           no dropout at all
Each row times ``repeats`` steps of each implementation, alternating (reference, fast, reference, ...) after one
untimed warm-up step each, in a process set up as the trainer's (npllm.allocator.keep_freed_memory), and prints
the median step time and fast / reference. --blas_threads sets OMP/OPENBLAS/MKL_NUM_THREADS in a fresh process
(default: the environment's).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time

import numpy as np

MODES = ("preset", "no-attn", "none")


def make_batch(cfg, B: int, rng) -> dict:
    from npllm.layers.loss import IGNORE_INDEX

    T = cfg.max_seq_len
    if cfg.arch == "encoder-decoder":
        src_mask = np.arange(T)[None, :] < rng.integers(T // 2, T + 1, B)[:, None]  # (B, S)
        tgt_mask = np.arange(T)[None, :] < rng.integers(T // 2, T + 1, B)[:, None]  # (B, T)
        targets = np.where(tgt_mask, rng.integers(0, cfg.vocab_size, (B, T)), IGNORE_INDEX)  # (B, T)
        return dict(src=rng.integers(0, cfg.vocab_size, (B, T)), src_mask=src_mask,
                    tokens=rng.integers(0, cfg.vocab_size, (B, T)), tgt_mask=tgt_mask, targets=targets)
    chosen = rng.random((B, T)) < 0.15  # (B, T) the MLM targets
    return dict(tokens=rng.integers(0, cfg.vocab_size, (B, T)), segments=np.zeros((B, T), dtype=np.int64),
                key_mask=np.ones((B, T), dtype=bool),
                targets=np.where(chosen, rng.integers(0, cfg.vocab_size, (B, T)), IGNORE_INDEX))


def run(presets, B: int, repeats: int, modes):
    """Yields one dict per (preset, dropout mode): the median step times of both implementations."""
    from npllm.allocator import keep_freed_memory

    keep_freed_memory()  # as `python -m npllm.train` does: freed memory stays in the heap for the next step
    from npllm.config import get_preset
    from npllm.layers.dropout import Dropout
    from npllm.models import accumulate_loss_and_grads, init_params, split_axes
    from npllm.models.ops import ops
    from npllm.parallel.comm import make_comm
    from npllm.parallel.data import apply_update, init_optimizer, reduce_and_clip

    comm = make_comm(1)
    for preset in presets:
        for mode in modes:
            base = get_preset(preset)
            rates = {"preset": (base.dropout, base.attn_dropout), "no-attn": (base.dropout, 0.0), "none": None}[mode]
            batch = make_batch(base, B, np.random.default_rng(0))
            setups = {}
            for impl in ("reference", "fast"):
                cfg = dataclasses.replace(base, impl=impl)
                params = init_params(cfg, dtype=np.float32)
                setups[impl] = (cfg, params, init_optimizer(params, comm))
            times = {"reference": [], "fast": []}
            losses = {}

            def step(impl, i):
                cfg, params, state = setups[impl]
                dropout = None if rates is None else Dropout(*rates, seed=0, step=i)
                t0 = time.perf_counter()
                loss, grads = accumulate_loss_and_grads(params, batch, cfg, 1, tp=comm.tp, dropout=dropout)
                grads, _, _ = reduce_and_clip(grads, split_axes(cfg), comm, max_norm=1.0)
                apply_update(params, grads, state, comm, lr=1e-4, update=ops(cfg).adamw_update)
                return time.perf_counter() - t0, loss

            for impl in times:  # warm-up: thread pools, BLAS buffers; the first losses agree (same weights and masks)
                _, losses[impl] = step(impl, 0)
            for i in range(1, repeats + 1):
                for impl in times:
                    times[impl].append(step(impl, i)[0])
            ref, fast = (statistics.median(times[i]) for i in ("reference", "fast"))
            yield dict(preset=preset, mode=mode, reference_ms=1e3 * ref, fast_ms=1e3 * fast, ratio=fast / ref,
                       loss_reference=float(losses["reference"]), loss_fast=float(losses["fast"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["seq2seq-nano", "bert-nano"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dropout", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--blas_threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.blas_threads is not None and os.environ.get("NPLLM_BENCH_CHILD") != "1":
        env = dict(os.environ, NPLLM_BENCH_CHILD="1", **{v: str(args.blas_threads) for v in (
            "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        sys.exit(subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env=env))
    print(f"one training step (forward, backward, clip, AdamW), float32, batch {args.batch_size}, max_seq_len, "
          f"median of {args.repeats}; {os.cpu_count()} cores")
    print(f"{'preset':<14} {'dropout':<8} {'reference ms':>13} {'fast ms':>9} {'fast/ref':>9}  first loss ref / fast")
    for r in run(args.presets, args.batch_size, args.repeats, args.dropout):
        print(f"{r['preset']:<14} {r['mode']:<8} {r['reference_ms']:>13.1f} {r['fast_ms']:>9.1f} {r['ratio']:>9.2f}  "
              f"{r['loss_reference']:.6f} / {r['loss_fast']:.6f}", flush=True)


if __name__ == "__main__":
    main()
