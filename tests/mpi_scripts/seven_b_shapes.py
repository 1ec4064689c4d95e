"""One forward/backward of the real LLaMA-7B shapes (one block, the full 32000-token embedding and head), split
over tensor-parallel ranks; each rank saves what the test compares with one process.

    mpirun -n 4 python tests/mpi_scripts/seven_b_shapes.py --out=DIR

The parameters are mpi_common.seven_b_params (each element from random bits of its row and its column: no rank
draws or holds a full tensor). Every rank writes DIR/rank{r}.npz: the loss, the global gradient norm (each element
counted once), and for every parameter p^T g q of its gradient shard (mpi_common.seven_b_probe_dot), whose sum over
the shards is the full gradient's.
"""

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import argparse
from pathlib import Path

import numpy as np
from mpi_common import SEVEN_B_SHAPES, save_npz, seven_b_batch, seven_b_params, seven_b_probe_dot

from npllm.config import get_preset
from npllm.models import param_shapes, split_axes
from npllm.models.decoder import loss_and_grads
from npllm.parallel.comm import make_comm, run_main
from npllm.parallel.data import world_grad_norm


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cfg = get_preset("7b", **SEVEN_B_SHAPES)
    comm = make_comm(tp=comm_size())
    params = seven_b_params(cfg, comm.tp.rank, comm.tp.size)  # this rank's shards only
    tokens, targets = seven_b_batch(cfg)
    loss, grads = loss_and_grads(params, tokens, targets, cfg, tp=comm.tp)
    axes = split_axes(cfg)
    norm = world_grad_norm(grads, axes, comm, grads_replicated_over_dp=True)
    shapes = param_shapes(cfg)
    result = {"loss": np.array(loss), "norm": np.array(norm), "tp": np.array([comm.tp.rank, comm.tp.size])}
    for name, g in grads.items():
        result[f"dot:{name}"] = np.array(seven_b_probe_dot(axes[name], g, shapes[name], comm.tp.rank, comm.tp.size))
    save_npz(Path(args.out) / f"rank{comm.tp.rank}.npz", result)


def comm_size():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


if __name__ == "__main__":
    run_main(main)
