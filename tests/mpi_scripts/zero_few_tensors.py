"""ZeRO-1 with more data-parallel ranks than tensors: some ranks own nothing and must still join every collective.

    mpirun -n 4 python tests/mpi_scripts/zero_few_tensors.py --out=result.npz

Two tensors, four dp ranks; dp rank d uses the gradients few_tensor_problem(4)[1][d]. Rank 0 saves the parameters
after 2 optimizer steps, the (norm, scale) of each step, and which tensors each rank owned.
"""

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import argparse

import numpy as np
from mpi_common import FEW_TENSOR_STEPS, few_tensor_problem, save_npz

from npllm.parallel.comm import make_comm, run_main
from npllm.parallel.data import dp_partition, init_optimizer, optimizer_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = make_comm(tp=1)
    params, grads_per_rank = few_tensor_problem(comm.dp.size)
    state = init_optimizer(params, comm, zero=1)
    norms = []
    for step in range(FEW_TENSOR_STEPS):
        grads = {n: g * (step + 1) for n, g in grads_per_rank[comm.dp.rank].items()}
        axes = {n: None for n in params}  # a plain data-parallel problem: nothing is split over tp
        norms.append(optimizer_step(params, grads, state, axes, comm, zero=1, lr=0.1, max_norm=0.5))
    owned = dp_partition({n: p.shape for n, p in params.items()}, comm.dp.size)
    if comm.world.rank == 0:
        save_npz(args.out, {"norms": np.array(norms), "owned_count": np.array([len(o) for o in owned]),
                            **{f"param:{n}": p for n, p in params.items()}})


if __name__ == "__main__":
    run_main(main)
