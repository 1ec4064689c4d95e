"""Every collective of npllm.parallel.comm on rank-dependent inputs; each rank writes what it got to OUT/rank<r>.npz.

    mpirun -n 4 python tests/mpi_scripts/collectives.py --tp=2 --out=DIR

Rank r's inputs are built from r, so the test can compute each expected result from the rank numbers alone.
"""

import os

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import argparse
from pathlib import Path

import numpy as np
from mpi_common import save_npz

from npllm.parallel.comm import make_comm, run_main
from npllm.parallel.mappings import copy_to_tp_backward, reduce_from_tp


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = make_comm(tp=args.tp)
    r = comm.world.rank
    x = np.arange(6, dtype=np.float64).reshape(2, 3) + 10 * r  # (2, 3) rank-dependent
    counts = [k + 1 for k in range(comm.world.size)]  # rank k contributes / receives k+1 elements
    summed = x.astype(np.float32)  # a fresh buffer, summed in place: the result is that very array
    same_array = comm.world.allreduce_in_place(summed) is summed
    try:
        comm.world.allreduce_in_place(np.zeros((3, 2)).T)
        strided_refused = False
    except ValueError as e:
        strided_refused = "needs a C-contiguous array" in str(e)
    out = {
        "ranks": np.array([comm.world.rank, comm.world.size, comm.tp.rank, comm.tp.size, comm.dp.rank, comm.dp.size]),
        "world_sum": comm.world.allreduce(x),
        "world_max": comm.world.allreduce(x, op="max"),
        "world_sum_f32": comm.world.allreduce(x.astype(np.float32)),
        "world_scalar": np.array(comm.world.allreduce_scalar(r + 0.5)),
        "world_sum_in_place": summed,
        "in_place_same_array_strided_refused": np.array([same_array, strided_refused]),
        "tp_sum": comm.tp.allreduce(x),
        "dp_sum": comm.dp.allreduce(x),
        "world_gather_last": comm.world.allgather(x, axis=-1),
        "world_gather_first": comm.world.allgather(x, axis=0),
        "world_gatherv": comm.world.allgatherv(np.full(counts[r], float(r)), counts),
        "world_reduce_scatter": comm.world.reduce_scatter(np.arange(sum(counts), dtype=np.float64) * (r + 1), counts),
        "world_reduce_scatter_even": comm.world.reduce_scatter(np.ones(2 * comm.world.size) * r),
        "world_bcast": comm.world.broadcast(x, root=comm.world.size - 1),
        "tp_reduce_from": reduce_from_tp(x, comm.tp),  # g: the sum over the tp group
        "tp_copy_to_backward": copy_to_tp_backward(x, comm.tp),  # f's backward: the same sum
        "input_unchanged": x,  # collectives must not write into their input
        "blas_threads": np.array([int(os.environ.get(v, "-1")) for v in
                                  ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")]),
        "cores": np.array(len(os.sched_getaffinity(0))),
    }
    comm.world.barrier()
    save_npz(Path(args.out) / f"rank{r}.npz", out)


if __name__ == "__main__":
    run_main(main)
