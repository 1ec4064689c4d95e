"""Peak memory and step time of one training step under --recompute=none|attention|block (ModelConfig.recompute).

    python benchmarks/bench_recompute.py [--preset nano] [--batch_size 8] [--seq_len 256 1024] [--impl fast]
                                         [--repeats 3] [--blas_threads 1]

Each (seq_len, recompute) runs in a fresh process, so its peak RSS is its own. One step is what the trainer does:
forward + backward (npllm.models.accumulate_loss_and_grads), gradient clipping and AdamW (npllm.parallel.data).
Printed per row:
    step ms         the best of ``repeats`` timed steps (after one untimed step)
    traced MiB      tracemalloc's peak over one step, plus the weights and AdamW moments allocated before it
                    (NumPy reports its buffers to tracemalloc); a separate, untimed step
    planned MiB     npllm.memory.plan_memory's peak for the same run (what --dry_run prints)
    RSS MiB         the process's peak resident memory (ru_maxrss): the traced bytes plus the interpreter, NumPy,
                    BLAS buffers and the allocator's slack
A longer seq_len needs max_seq_len >= seq_len: it is raised to fit (RoPE has no table to size). --blas_threads sets
OMP/OPENBLAS/MKL_NUM_THREADS in the children (default: the environment's); on a machine busy with other work,
OpenBLAS's own threads can spin for seconds per step, and 1 gives steady times (npllm's pool still uses the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from npllm.config import RECOMPUTE, get_preset
from npllm.memory import plan_memory
from npllm.models import accumulate_loss_and_grads, init_params, split_axes
from npllm.models.ops import ops
from npllm.parallel.comm import make_comm
from npllm.parallel.data import apply_update, init_optimizer, reduce_and_clip

MIB = 1 << 20


def one_config(preset: str, impl: str, recompute: str, B: int, T: int, repeats: int) -> dict:
    """Run in the child process: the measurements of one (recompute, B, T)."""
    cfg = get_preset(preset, impl=impl, recompute=recompute)
    cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, T))
    comm = make_comm(1)
    params = init_params(cfg, dtype=np.float32)
    state = init_optimizer(params, comm)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, cfg.vocab_size, (B, T)), "targets": rng.integers(0, cfg.vocab_size, (B, T))}

    def step():
        _, grads = accumulate_loss_and_grads(params, batch, cfg, 1, tp=comm.tp)
        grads, _, _ = reduce_and_clip(grads, split_axes(cfg), comm, max_norm=1.0)
        apply_update(params, grads, state, comm, lr=1e-5, update=ops(cfg).adamw_update)

    step()  # warm-up: the thread pools, BLAS buffers
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    plan = plan_memory(cfg, batch_size=B, seq_len=T)
    tracemalloc.start()
    step()
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dict(step_s=min(times), traced=traced + plan.weights + plan.moments, planned=plan.peak,
                activations=plan.activations, rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--impl", default="fast", choices=["fast", "reference"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--blas_threads", type=int, help="OMP/OPENBLAS/MKL_NUM_THREADS for the children")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "recompute,T": measure one config, print JSON
    args = parser.parse_args()
    B = args.batch_size
    if args.child:
        recompute, T = args.child.split(",")
        print(json.dumps(one_config(args.preset, args.impl, recompute, B, int(T), args.repeats)))
        return
    env = dict(os.environ)
    if args.blas_threads:
        env.update({name: str(args.blas_threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                               "MKL_NUM_THREADS")})
    print(f"{args.preset} ({args.impl}), B={B}: one training step (forward, backward, clip, AdamW), float32, "
          f"BLAS threads: {env.get('OPENBLAS_NUM_THREADS', 'default')}")
    print(f"{'T':>6} {'recompute':>10} {'step ms':>9} {'x none':>7} {'traced MiB':>11} {'planned MiB':>12} "
          f"{'activations MiB':>16} {'RSS MiB':>8}")
    for T in args.seq_len:
        base = None
        for recompute in RECOMPUTE:
            proc = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--impl", args.impl,
                                   "--batch_size", str(B), "--repeats", str(args.repeats), "--child",
                                   f"{recompute},{T}"], capture_output=True, text=True, check=True, env=env)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or r["step_s"]
            print(f"{T:>6} {recompute:>10} {1e3 * r['step_s']:>9.0f} {r['step_s'] / base:>7.2f} "
                  f"{r['traced'] / MIB:>11.1f} {r['planned'] / MIB:>12.1f} {r['activations'] / MIB:>16.1f} "
                  f"{r['rss'] / MIB:>8.0f}")


if __name__ == "__main__":
    main()
