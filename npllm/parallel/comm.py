"""Communicators: the collectives the parallel code needs, on NumPy (and CuPy) arrays.

Two implementations of one small interface (``rank``, ``size``, ``allreduce``, ``allgather``, ``allgatherv``,
``reduce_scatter``, ``broadcast``, ``barrier``):

    LocalComm   size 1; every collective is the identity and returns its input. One process runs the same code.
    MPIComm     wraps an mpi4py communicator. CuPy arrays are staged through host memory (the MPI wheels are not
                CUDA-aware); the result comes back with the input's array module.

``make_comm(tp)`` builds a ``ParallelComm``: the world, split into tensor-parallel groups of ``tp`` consecutive
ranks and data-parallel groups of the ranks with the same position in their tensor-parallel group:

    world ranks 0 1 2 3 4 5 6 7, tp=2:   tp groups {0,1} {2,3} {4,5} {6,7}    dp groups {0,2,4,6} {1,3,5,7}
    tp rank = world rank % tp,           dp rank = world rank // tp

Consecutive ranks share a node under mpirun's default placement, so the chatty tensor-parallel collectives (several
per layer) stay on the fast local links and the once-per-step data-parallel all-reduce crosses nodes.

mpi4py is imported only inside ``make_comm`` (and the abort helpers), so single-process npllm never initialises
MPI. A collective never modifies its input; it returns a new array, or (LocalComm) the input itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import asnumpy, get_array_module
from ..checks import check_int

REDUCE_OPS = ("sum", "max")

# Environment variables that a launcher (mpich's hydra, Open MPI, PMIx) sets in every rank it starts.
LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")


def _check_op(op: str) -> None:
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown reduction op={op!r}; allowed: {', '.join(REDUCE_OPS)}")


def _check_counts(counts, size: int, total: int | None = None) -> list[int]:
    counts = [int(c) for c in counts]
    if len(counts) != size or any(c < 0 for c in counts):
        raise ValueError(f"counts={counts} must be {size} non-negative integers, one per rank")
    if total is not None and sum(counts) != total:
        raise ValueError(f"counts={counts} sum to {sum(counts)}, the array has {total} elements")
    return counts


class LocalComm:
    """The size-1 communicator: every collective is the identity and returns its input (not a copy)."""

    rank = 0
    size = 1

    def allreduce(self, x, op: str = "sum"):
        _check_op(op)
        return x

    def allreduce_in_place(self, x, op: str = "sum"):
        _check_op(op)
        return x

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        _check_op(op)
        return float(value)

    def allgather(self, x, axis: int = -1):
        return x

    def allgatherv(self, x, counts):
        _check_counts(counts, 1, x.size)
        return x

    def reduce_scatter(self, x, counts=None):
        if counts is not None:
            _check_counts(counts, 1, x.size)
        return x

    def broadcast(self, x, root: int = 0):
        if root != 0:
            raise ValueError(f"root={root} is not a rank of a size-1 communicator; allowed: 0")
        return x

    def barrier(self) -> None:
        pass

    def __repr__(self):
        return "LocalComm(rank=0, size=1)"


def _to_host(x):
    """(contiguous NumPy copy-or-view of x, x's array module)."""
    return np.ascontiguousarray(asnumpy(x)), get_array_module(x)


def _from_host(host: np.ndarray, xp):
    return host if xp is np else xp.asarray(host)


class MPIComm:
    """Collectives over an mpi4py communicator. Arrays must have the same dtype on every rank (and the same
    shape, except where ``counts`` says otherwise)."""

    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()

    def _op(self, op: str):
        _check_op(op)
        return {"sum": self._MPI.SUM, "max": self._MPI.MAX}[op]

    def allreduce(self, x, op: str = "sum"):
        """Elementwise sum (or max) of x over the ranks; every rank gets the result. Same shape as x."""
        host, xp = _to_host(x)
        out = np.empty_like(host)
        self.comm.Allreduce(host, out, op=self._op(op))
        return _from_host(out, xp)

    def allreduce_in_place(self, x, op: str = "sum"):
        """allreduce into x itself, which must be C-contiguous; returns x. No second buffer: for a large x (the flat
        gradients of data parallelism) this halves the memory touched, and MPICH's in-place all-reduce of 28 MB of
        float32 on 2 ranks took 9-11 ms here against 17-19 ms into a separate output and 35 ms into a fresh one."""
        if not x.flags.c_contiguous:
            raise ValueError(f"allreduce_in_place needs a C-contiguous array; got strides {x.strides}")
        xp = get_array_module(x)
        host = x if xp is np else asnumpy(x)  # (a GPU array goes through one host copy, summed there)
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._op(op))
        if xp is not np:
            x[...] = xp.asarray(host)
        return x

    def allreduce_scalar(self, value: float, op: str = "sum") -> float:
        """allreduce of one Python number, returned as a float."""
        return float(self.allreduce(np.array([value], dtype=np.float64), op)[0])

    def allgather(self, x, axis: int = -1):
        """The ranks' x concatenated along ``axis`` in rank order: (..., n, ...) -> (..., size * n, ...)."""
        host, xp = _to_host(x)
        recv = np.empty((self.size,) + host.shape, dtype=host.dtype)  # (size, *x.shape)
        self.comm.Allgather(host, recv)
        return _from_host(np.concatenate(list(recv), axis=axis), xp)

    def allgatherv(self, x, counts):
        """1-D x of counts[rank] elements from each rank -> their concatenation (sum(counts),) in rank order."""
        counts = _check_counts(counts, self.size)
        host, xp = _to_host(x)
        if host.ndim != 1 or host.size != counts[self.rank]:
            raise ValueError(f"allgatherv needs a 1-D array of counts[{self.rank}]={counts[self.rank]} elements, "
                             f"got shape {host.shape}")
        recv = np.empty(sum(counts), dtype=host.dtype)  # (sum(counts),)
        self.comm.Allgatherv(host, [recv, counts])
        return _from_host(recv, xp)

    def reduce_scatter(self, x, counts=None):
        """Sum 1-D x over the ranks and give rank r its segment: counts[r] elements starting at sum(counts[:r]).

        counts defaults to equal segments (x.size must then divide by size). Returns (counts[rank],).
        """
        host, xp = _to_host(x)
        if host.ndim != 1:
            raise ValueError(f"reduce_scatter needs a 1-D array, got shape {host.shape}")
        if counts is None:
            if host.size % self.size:
                raise ValueError(f"reduce_scatter of {host.size} elements over {self.size} ranks needs counts "
                                 f"(the size does not divide evenly)")
            counts = [host.size // self.size] * self.size
        counts = _check_counts(counts, self.size, host.size)
        out = np.empty(counts[self.rank], dtype=host.dtype)  # (counts[rank],)
        self.comm.Reduce_scatter(host, out, recvcounts=counts, op=self._MPI.SUM)
        return _from_host(out, xp)

    def broadcast(self, x, root: int = 0):
        """Rank ``root``'s x on every rank (x must have the same shape and dtype everywhere). A new array."""
        if not 0 <= root < self.size:
            raise ValueError(f"root={root} is not a rank; allowed: 0..{self.size - 1}")
        host = np.array(asnumpy(x), order="C", copy=True)  # a copy: Bcast writes into it
        self.comm.Bcast(host, root=root)
        return _from_host(host, get_array_module(x))

    def barrier(self) -> None:
        self.comm.Barrier()

    def __repr__(self):
        return f"MPIComm(rank={self.rank}, size={self.size})"


def _wrap(mpi_comm):
    """A group of one needs no MPI: use the identity communicator so that its path equals one process's."""
    return LocalComm() if mpi_comm.Get_size() == 1 else MPIComm(mpi_comm)


@dataclass(frozen=True)
class ParallelComm:
    """The world and its two groups. ``tp``: the ranks that share one model replica, each holding a slice of
    every split weight. ``dp``: the ranks that hold the same slice and see different data."""

    world: LocalComm | MPIComm
    tp: LocalComm | MPIComm
    dp: LocalComm | MPIComm


def launched_by_mpirun(environ=None) -> bool:
    """True when a launcher (mpirun / mpiexec / srun with PMI) started this process."""
    environ = os.environ if environ is None else environ
    return any(var in environ for var in LAUNCHER_VARS)


def find_mpirun() -> str | None:
    """mpirun next to this Python (the mpich wheel of npllm's mpi extra installs it there), else on PATH, else None."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    return shutil.which("mpirun")


def check_tp(tp, world_size: int) -> int:
    """tp as an int; ValueError unless it is a positive integer that divides the world size."""
    check_int("tp", tp)
    if world_size % tp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(f"tp={tp} does not divide the number of ranks {world_size}; "
                         f"allowed: {', '.join(map(str, divisors))}")
    return tp


def one_process_comm() -> ParallelComm:
    """The world of one process: every group a LocalComm, every collective the identity."""
    return ParallelComm(world=LocalComm(), tp=LocalComm(), dp=LocalComm())


def make_comm(tp: int = 1, use_mpi: bool | None = None) -> ParallelComm:
    """The world split into tensor-parallel groups of ``tp`` consecutive ranks and data-parallel groups of
    world/tp ranks.

    use_mpi: None uses MPI exactly when the process was started by a launcher (see ``launched_by_mpirun``);
    False gives a one-process world of LocalComms without importing mpi4py.
    """
    if use_mpi is None:
        use_mpi = launched_by_mpirun()
    if not use_mpi:
        check_tp(tp, 1)
        return one_process_comm()
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    check_tp(tp, size)
    tp_comm = world.Split(color=rank // tp, key=rank % tp)  # ranks {g*tp, ..., g*tp + tp-1}
    dp_comm = world.Split(color=rank % tp, key=rank // tp)  # ranks {r, r + tp, r + 2 tp, ...}
    return ParallelComm(world=_wrap(world), tp=_wrap(tp_comm), dp=_wrap(dp_comm))


def run_comm(tp: int = 1, dp: int | None = None) -> ParallelComm:
    """A training run's communicator: the mpirun world split into tp x dp ranks (one process without mpirun).
    ValueError when the ranks cannot make that layout."""
    if tp > 1 and not launched_by_mpirun():
        raise ValueError(f"--tp={tp} needs {tp * (dp or 1)} ranks: start it with `mpirun -n {tp * (dp or 1)} python "
                         f"-m npllm.train ...` (--dry_run plans it on one process)")
    comm = make_comm(tp)
    if dp is not None and dp != comm.dp.size:
        raise ValueError(f"--dp={dp} but {comm.world.size} ranks with tp={tp} make dp={comm.dp.size}; "
                         f"start {dp * tp} ranks or leave --dp out")
    return comm


# ----------------------------------------------------------------------------------------------------------
# failure: one rank's exception ends the whole job


def _world_rank() -> str:
    if "mpi4py.MPI" in sys.modules:
        MPI = sys.modules["mpi4py.MPI"]
        if MPI.Is_initialized() and not MPI.Is_finalized():
            return str(MPI.COMM_WORLD.Get_rank())
    return os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))


def abort_job(exit_code: int = 1) -> None:
    """End this process with ``exit_code`` and, when MPI runs with other ranks, the whole job with it.

    Without the abort, the other ranks would wait forever in their next collective (and mpi4py's MPI_Finalize at
    exit could wait for them too). MPI_Abort makes the launcher kill every rank and exit non-zero.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if "mpi4py.MPI" in sys.modules:
        MPI = sys.modules["mpi4py.MPI"]
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(exit_code)
    sys.exit(exit_code)


class Terminated(KeyboardInterrupt):
    """SIGTERM in a single process: unwinds like Ctrl-C (``finally`` blocks run), exit status 143."""


ABORT_GRACE_S = 1.0  # between saying why the job ends and MPI_Abort


def end_job_on_signals(message) -> None:
    """SIGINT and SIGTERM end the whole job: exit status 128 + the signal (130, 143), whichever rank receives it.

    One process: SIGINT raises KeyboardInterrupt as usual and SIGTERM raises ``Terminated``, so the command unwinds
    and says ``message()`` itself. Under mpirun with several ranks a Python signal handler is not enough: a rank
    waiting inside a collective runs no Python code, so its handler would wait too, and a rank that returned would
    leave the others waiting forever. Here the signal's arrival is written (by the C-level handler, at once) to a
    pipe that a watcher thread reads; the watcher prints ``message()`` with its rank and calls MPI_Abort with
    128 + signal, which makes the launcher end every rank (mpi4py initialises MPI with threads allowed).
    """
    import signal
    import threading
    import time

    if not ("mpi4py.MPI" in sys.modules and sys.modules["mpi4py.MPI"].COMM_WORLD.Get_size() > 1):
        def terminate(signum, frame):
            raise Terminated()

        signal.signal(signal.SIGTERM, terminate)
        return
    MPI = sys.modules["mpi4py.MPI"]
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *args: None)  # the watcher acts; the main thread carries on until aborted

    def watch():
        signum = os.read(read_end, 1)[0]
        name = signal.Signals(signum).name
        print(f"{message()} ({name} on rank {MPI.COMM_WORLD.Get_rank()}; ending every rank)", file=sys.stderr,
              flush=True)
        time.sleep(ABORT_GRACE_S)  # the launcher forwards output through a proxy that the abort kills: let it pass
        MPI.COMM_WORLD.Abort(128 + signum)

    threading.Thread(target=watch, name="npllm-signal-watcher", daemon=True).start()


def _report_and_abort(exc_type, exc, tb) -> None:
    print(f"[rank {_world_rank()}] uncaught {exc_type.__name__}; ending the whole job", file=sys.stderr)
    traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
    abort_job(1)


def run_main(main, *args, **kwargs):
    """Call ``main(*args, **kwargs)``; an exception (or sys.exit with a non-zero code) on any rank prints the
    traceback with the rank and aborts the whole job with exit code 1, so no rank is left in a collective."""
    try:
        return main(*args, **kwargs)
    except SystemExit as e:
        if e.code in (None, 0):
            raise
        print(f"[rank {_world_rank()}] exit({e.code!r}); ending the whole job", file=sys.stderr)
        abort_job(e.code if isinstance(e.code, int) else 1)
    except BaseException:
        _report_and_abort(*sys.exc_info())


class ErrorVote:
    """Lets the ranks that caught an expected error (a bad option, a missing file) find out whether every rank did.

    Most bad input fails on every rank at the same line (they all parse the same options and read the same files),
    and then one rank should say so, once, and the job can end normally. An error that only one rank hits (its
    disk is full) must be reported by that rank, and the job aborted, because the others wait in a collective.
    ``all_failed`` tells the two apart: every failing rank joins a non-blocking all-reduce on a private duplicate of
    the world communicator (so it can never match a collective of the training code); it completes only if every
    rank joins. Create the vote on every rank at the same point (duplicating a communicator is collective).
    """

    def __init__(self, use_mpi: bool | None = None):
        if use_mpi is None:
            use_mpi = launched_by_mpirun()
        self.comm = None
        self.rank, self.size = 0, 1
        if use_mpi:
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD.Dup()
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def all_failed(self, timeout_s: float = 5.0) -> bool:
        """True when every rank calls this within ``timeout_s`` seconds of each other (always, with one rank)."""
        if self.comm is None or self.size == 1:
            return True
        import time

        from mpi4py import MPI

        count = np.zeros(1, dtype=np.int64)
        request = self.comm.Iallreduce(np.ones(1, dtype=np.int64), count, op=MPI.SUM)
        deadline = time.monotonic() + timeout_s
        while not request.Test():
            if time.monotonic() > deadline:
                return False  # some rank is elsewhere: the error is this rank's own (the request dies with the job)
            time.sleep(0.01)
        return int(count[0]) == self.size


def allgather_json(comm, obj) -> list:
    """Every rank's JSON-serialisable ``obj``, in rank order, on every rank (sent as UTF-8 bytes, never pickled)."""
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8)  # (n_bytes,)
    counts = comm.allgather(np.array([data.size], dtype=np.int64), axis=0)  # (size,) bytes per rank
    joined = comm.allgatherv(data, [int(c) for c in counts]).tobytes()
    out, offset = [], 0
    for count in counts:
        out.append(json.loads(joined[offset:offset + int(count)].decode("utf-8")))
        offset += int(count)
    return out
