"""The pool's chunk size (npllm.fast.pool.CHUNK_ELEMENTS) measured in whole training steps, sizes taken in turn.

    python benchmarks/bench_chunk_size.py                   # 65536 vs 262144; llama-8x256, gpt2-8x256, llama-1x2048
    python benchmarks/bench_chunk_size.py --sizes 65536 262144 1048576 --shapes gpt2-8x256 --pairs 30

A step is the trainer's in one process (npllm/train.py): forward + backward over the default row groups
(accumulate_loss_and_grads), one global-norm clip, the implementation's AdamW; the models, batches and optimizer
settings are benchmarks/bench_vs_pytorch.py's. The chunk size changes how many ufunc calls the fast paths make, so
how often the row groups hand the GIL to each other, and whether a chunk's arrays stay in a core's cache.

On a machine shared with other work one step's time moves by 10-30% within a minute (benchmarks/RESULTS.md), more
than the differences measured here. So the sizes run in turn, step by step, in one process (A B A B ..., every
other round B A, so that neither always runs first): each round's steps meet the same disturbance, and the median
over rounds of each size's step time over the first size's (the paired ratio) is the number to compare; below 1
the size is faster than the first. The first round warms up and is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_vs_pytorch, beside this file
import bench_vs_pytorch as bench  # noqa: E402 (after the sys.path line; it puts the checkout on sys.path too)

DEFAULT_SIZES = [1 << 16, 1 << 18]
DEFAULT_SHAPES = ["llama-8x256", "gpt2-8x256", "llama-1x2048"]


def step_function(case):
    """A function running one training step of ``case`` (the trainer's, one process), its row groups."""
    from npllm.models import accumulate_loss_and_grads, default_row_groups, init_params, ops, split_axes
    from npllm.parallel.comm import one_process_comm
    from npllm.parallel.data import init_optimizer

    cfg = bench.model_config(case)
    params = init_params(cfg, seed=bench.SEED)
    comm, axes = one_process_comm(), split_axes(cfg)
    state = init_optimizer(params, comm, 0)
    tokens, targets = bench.batch(cfg, case.B, case.T)  # (B, T) each
    groups = default_row_groups(case.B)

    def step():
        _, grads = accumulate_loss_and_grads(params, {"tokens": tokens, "targets": targets}, cfg, row_groups=groups)
        bench.clip_and_update(params, grads, state, comm, axes, {"update": ops(cfg).adamw_update})
    return step, groups


def compare(case, sizes: list[int], pairs: int) -> tuple[int, dict[int, list[float]]]:
    """(the row groups, {size: its step times in seconds, one per counted round}), the sizes run in turn."""
    from npllm.fast import pool

    step, groups = step_function(case)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    saved = pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS
    try:
        for round_ in range(pairs + 1):  # round 0: warm-up
            for size in (sizes if round_ % 2 == 0 else sizes[::-1]):
                pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS = size, 2 * size  # the module's own rule
                start = time.perf_counter()
                step()
                if round_:
                    times[size].append(time.perf_counter() - start)
    finally:
        pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS = saved
    return groups, times


def report(case, groups: int, times: dict[int, list[float]]) -> list[str]:
    first_size = next(iter(times))
    lines = []
    for size, ts in times.items():
        ratio = statistics.median(t / f for t, f in zip(ts, times[first_size]))
        lines.append(f"{case.name} ({groups} row group{'s' * (groups > 1)}): chunk {size:>8,d} elements: step median "
                     f"{1e3 * statistics.median(ts):7.1f} ms, fastest {1e3 * min(ts):7.1f} ms, "
                     f"{case.B * case.T / statistics.median(ts):7,.0f} tok/s | paired ratio to {first_size:,d}: "
                     f"{ratio:.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES, help="chunk sizes in elements")
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=list(bench.CASES))
    parser.add_argument("--pairs", type=int, default=20, help="counted rounds (each runs every size once)")
    args = parser.parse_args(argv)
    bad = [s for s in args.sizes if s < 1]
    if bad:
        parser.error(f"--sizes {' '.join(map(str, bad))}: a chunk size must be at least 1 element")
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: at least 1 counted round is needed")
    from npllm.allocator import keep_freed_memory

    keep_freed_memory()  # what the trainer does first
    print(f"command: python benchmarks/bench_chunk_size.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    for name in args.shapes:
        case = bench.CASES[name]
        for line in report(case, *compare(case, args.sizes, args.pairs)):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
