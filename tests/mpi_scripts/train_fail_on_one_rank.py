"""``python -m npllm.train`` with an error planted on one rank, for the failure tests.

    mpirun -n 2 python tests/mpi_scripts/train_fail_on_one_rank.py KIND RANK STEP -- TRAINER OPTIONS...

KIND is the exception world rank RANK raises in its forward/backward of step STEP (1-based): "RuntimeError" (a
bug: the traceback and MPI_Abort of run_main) or "ValueError" (bad input only that rank sees: its one line, then
the abort). Everything else is the trainer's own entry point, run exactly as `python -m npllm.train` runs it.
"""

import sys

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import npllm.train
from npllm.parallel.comm import run_main

KINDS = {"RuntimeError": RuntimeError, "ValueError": ValueError}


def plant(kind: str, rank: int, step: int) -> None:
    """Make world rank ``rank`` raise ``kind`` when it computes the gradients of step ``step``."""
    real = npllm.train.accumulate_loss_and_grads
    calls = []

    def failing(*args, **kwargs):
        from mpi4py import MPI  # initialised by the trainer's communicator by now

        calls.append(1)
        if MPI.COMM_WORLD.Get_rank() == rank and len(calls) == step:
            raise KINDS[kind](f"planted failure on rank {rank} at step {step}")
        return real(*args, **kwargs)

    npllm.train.accumulate_loss_and_grads = failing


if __name__ == "__main__":
    kind, rank, step, separator, *options = sys.argv[1:]
    assert separator == "--", "usage: KIND RANK STEP -- OPTIONS"
    plant(kind, int(rank), int(step))
    sys.exit(run_main(npllm.train.main, options))
