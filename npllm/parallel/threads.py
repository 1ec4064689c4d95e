"""Limit BLAS threads to this rank's share of the node's cores, before NumPy is imported.

NumPy's BLAS (OpenBLAS here) starts one thread per core when it is loaded. Two MPI ranks on a 2-core machine then
run 4 busy threads on 2 cores, and their GEMMs ran up to 35x slower than with one thread each. The thread count is
read once, when the BLAS library loads, so this must run before the first ``import numpy`` of the process: entry
points (``npllm.train``, the scripts under ``tests/mpi_scripts``) call it first thing. The same entry points also
shorten how long OpenBLAS's idle threads spin (``stop_idle_blas_spinning``; ``prepare_blas`` does both). This
module imports nothing but ``os``, ``sys`` and ``warnings``.
"""

from __future__ import annotations

import os
import sys
import warnings

# Any of these set by the user means the user chose; we then change nothing.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# OpenBLAS's worker threads busy-wait after each call, for 2 ** OPENBLAS_THREAD_TIMEOUT cycles (default 2 ** 28, about
# a tenth of a second), before they sleep. npllm's fast paths (npllm/fast) start their own threads right after many
# of those calls (the flash core after the q/k/v projections, the fused elementwise work after a matmul), and on a
# machine with few cores the spinning workers take the cores from them: the flash core of a GPT-2-sized layer took
# 22 ms right after a 2-thread matmul and 10 ms on its own. 2 ** 4 cycles, the least OpenBLAS takes, puts them to
# sleep at once; waking them costs microseconds against matmuls of milliseconds. Measured on 2 cores, best of 4 steps
# in each of 4 fresh processes per side, fast paths: a training step 11-22% shorter (benchmarks/RESULTS.md).
IDLE_SPIN_VAR, IDLE_SPIN_EXPONENT = "OPENBLAS_THREAD_TIMEOUT", "4"

# How launchers tell a process how many ranks share its node, most specific first:
# MPICH's hydra sets MPI_LOCALNRANKS, Open MPI sets OMPI_COMM_WORLD_LOCAL_SIZE; PMI_SIZE (hydra, the whole job's
# size) is the fallback, right on one node and conservative on several.
LOCAL_RANK_COUNT_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE")


def ranks_on_this_node(environ=None) -> int:
    """How many ranks of this job share this node, from the launcher's environment (1 outside mpirun)."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_RANK_COUNT_VARS:
        value = environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def limit_blas_threads(environ=None) -> int | None:
    """Set OMP/OPENBLAS/MKL_NUM_THREADS to max(1, cores // ranks on this node) unless the user set any of them.

    Returns the thread count it set, or None when it left the environment alone (a user setting, or a single
    process outside mpirun, where BLAS may use every core). Warns when NumPy is already imported, because the
    BLAS library has then read its thread count already and the setting only reaches child processes.
    """
    environ = os.environ if environ is None else environ
    if any(var in environ for var in THREAD_VARS):
        return None
    ranks = ranks_on_this_node(environ)
    if ranks == 1:
        return None
    threads = max(1, available_cores() // ranks)
    for var in THREAD_VARS:
        environ[var] = str(threads)
    if "numpy" in sys.modules and environ is os.environ:
        warnings.warn("limit_blas_threads() ran after numpy was imported; call it before the first "
                      "'import numpy' so BLAS starts with the limited thread count", RuntimeWarning, stacklevel=2)
    return threads


def stop_idle_blas_spinning(environ=None) -> bool:
    """Set OPENBLAS_THREAD_TIMEOUT=4 (above) unless the user set it; True when it set it. Like limit_blas_threads it
    acts only if it runs before NumPy loads OpenBLAS (or in the environment of a child process)."""
    environ = os.environ if environ is None else environ
    if IDLE_SPIN_VAR in environ:
        return False
    environ[IDLE_SPIN_VAR] = IDLE_SPIN_EXPONENT
    return True


def prepare_blas(environ=None) -> None:
    """What an entry point runs before its first ``import numpy``: limit_blas_threads and stop_idle_blas_spinning."""
    limit_blas_threads(environ)
    stop_idle_blas_spinning(environ)
