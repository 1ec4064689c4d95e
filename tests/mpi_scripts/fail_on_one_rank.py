"""Rank 1 raises while the other ranks wait in a collective: run_main must end the whole job, non-zero, at once.

    mpirun -n 2 python tests/mpi_scripts/fail_on_one_rank.py
"""

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import numpy as np

from npllm.parallel.comm import make_comm, run_main


def main():
    comm = make_comm(tp=1)
    comm.world.barrier()
    if comm.world.rank == 1:
        raise ValueError("deliberate failure on rank 1")
    comm.world.allreduce(np.ones(3))  # rank 1 never joins: without the abort this waits forever
    print("rank 0 finished the all-reduce, which must not happen")


if __name__ == "__main__":
    run_main(main)
