"""Tokens/s of one training step (forward + backward + AdamW) of a preset on the CPU, against this machine's GEMM.

    python benchmarks/bench_train_step.py [--preset nano] [--batch_size 16] [--seq_len 128] [--repeats 5]

The reference, run in the same process, is a square float32 matmul (npllm.train.measure_peak_flops): the ratio
printed is model FLOPs utilisation, the share of that ceiling a step reaches (model FLOPs from flops_per_token).
The step's time is also split into forward+backward and the optimizer, the best of ``repeats`` runs each.
"""

import argparse
import time

import numpy as np

from npllm.config import get_preset
from npllm.models import flops_per_token, init_params
from npllm.models.decoder import loss_and_grads
from npllm.optim import adamw_init, adamw_update, clip_grad_norm
from npllm.metrics import measure_peak_flops


def best_of(repeats, fn):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = get_preset(args.preset)
    B, T = args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))  # (B, T) each
    params = init_params(cfg)
    state = adamw_init(params)
    grads = loss_and_grads(params, x, y, cfg)[1]  # warm-up

    t_fb = best_of(args.repeats, lambda: loss_and_grads(params, x, y, cfg))
    t_opt = best_of(args.repeats, lambda: (clip_grad_norm(grads, 1.0), adamw_update(params, grads, state, lr=1e-4)))
    peak = measure_peak_flops(np, np.float32)
    step = t_fb + t_opt
    flops = flops_per_token(cfg, T) * B * T
    print(f"{args.preset}: B={B} T={T} | forward+backward {1e3 * t_fb:.1f} ms | clip+AdamW {1e3 * t_opt:.1f} ms | "
          f"{B * T / step:,.0f} tok/s")
    print(f"reference matmul: {peak / 1e9:.1f} GFLOP/s | step: {flops / step / 1e9:.1f} GFLOP/s | "
          f"ratio step/matmul (MFU) = {flops / step / peak:.3f}")


if __name__ == "__main__":
    main()
