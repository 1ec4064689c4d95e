"""A few training steps of the small CONFIGS under mpirun, with --tp and --zero; rank 0 saves what the test compares.

    mpirun -n 4 python tests/mpi_scripts/parallel_train.py --tp=2 --zero=1 --out=result.npz

For every config of mpi_common.CONFIGS and both float64 and float32, it saves (keys "<config>/<dtype>/..."):
    loss          (STEPS,)   the dp-mean loss of every step
    norm, scale   (STEPS,)   the global gradient norm before clipping, and the clip factor
    grad:<name>   the dp-averaged gradients of step 0, gathered over the tp ranks (full shapes)
    param:<name>  the parameters after STEPS optimizer steps, gathered over the tp ranks
"""

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import argparse

import numpy as np
from mpi_common import CONFIGS, INIT_SEED, MAX_NORM, OPTIM, STEPS, global_batch, rank_rows, save_npz

from npllm.models import init_params, split_axes
from npllm.models.decoder import loss_and_grads
from npllm.parallel.comm import make_comm, run_main
from npllm.parallel.data import dp_allreduce_grads, dp_mean, init_optimizer, optimizer_step


def gather(shards: dict, axes: dict, tp) -> dict:
    """The full tensors on every rank of the tensor-parallel group, from each rank's shards: split tensors are
    all-gathered along their split axis, replicated ones are taken as they are."""
    return {name: x if axes[name] is None else tp.allgather(x, axis=axes[name]) for name, x in shards.items()}


def train(cfg, dtype, comm, zero, ignore):
    params = init_params(cfg, seed=INIT_SEED, dtype=dtype, tp_rank=comm.tp.rank, tp_size=comm.tp.size)  # shards
    state = init_optimizer(params, comm, zero)
    out = {"loss": [], "norm": [], "scale": []}
    for step in range(STEPS):
        tokens, targets = global_batch(cfg, step, ignore)
        x = rank_rows(tokens, comm.dp.rank, comm.dp.size)  # (B / dp, T)
        y = rank_rows(targets, comm.dp.rank, comm.dp.size)
        loss, grads = loss_and_grads(params, x, y, cfg, tp=comm.tp)
        out["loss"].append(dp_mean(loss, comm.dp))
        if step == 0:  # the gradient the optimizer sees: dp-averaged, then gathered to full shapes for the test
            full = gather(dp_allreduce_grads(grads, comm.dp), split_axes(cfg), comm.tp)
            out.update({f"grad:{n}": np.array(g) for n, g in full.items()})
        norm, scale = optimizer_step(params, grads, state, split_axes(cfg), comm, zero=zero, max_norm=MAX_NORM,
                                     **OPTIM)
        out["norm"].append(norm)
        out["scale"].append(scale)
    out.update({f"param:{n}": np.array(p) for n, p in gather(params, split_axes(cfg), comm.tp).items()})
    return {k: np.asarray(v) for k, v in out.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--ignore", action="store_true", help="some targets -100 (runs without dp only)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = make_comm(tp=args.tp)
    result = {}
    for name, cfg in CONFIGS.items():
        for dtype in (np.float64, np.float32):
            run = train(cfg, dtype, comm, args.zero, args.ignore)
            result.update({f"{name}/{np.dtype(dtype).name}/{k}": v for k, v in run.items()})
    result["world"] = np.array([comm.world.size, comm.tp.size, comm.dp.size])
    if comm.world.rank == 0:
        save_npz(args.out, result)


if __name__ == "__main__":
    run_main(main)
