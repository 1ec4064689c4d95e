"""Sharing this process's cores at run time: BLAS's thread count, threads that hold one core each, and whole
computations run side by side.

    blas_on_one_thread()      context manager: BLAS runs on one thread inside the block (OpenBLAS), as before after it
    one_core() / on_one_core()   this thread does one core's work: npllm's own thread pools run serially inside it
    side_by_side(tasks, threads) the callables run at the same time, each on one core, the results in task order

Why: NumPy releases the GIL inside every BLAS call and ufunc, so Python threads that each run their own
computation (their own rows of a batch, say) use several cores. Splitting every single operation over the cores
instead (BLAS's threads, npllm.fast.pool's row chunks) pays a fork and a join per operation, and on a 2-core machine
a training step's ~10-300 us elementwise operations ran ~1.4x faster on two threads than on one, not 2x
(benchmarks/RESULTS.md). Two whole forward/backward passes side by side, each with one thread for everything, meet
only where both hold the GIL at once (between operations).

BLAS. OpenBLAS keeps one thread count for the whole process; each call from a thread of ours would otherwise start
that many BLAS threads on top of the others (measured on 2 cores: 10-50x slower). ``side_by_side`` sets it to 1
for its duration and gives it back after; where the count cannot be set (another BLAS, not Linux) it runs at most
cores // (BLAS threads from the environment) tasks at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from .threads import available_cores, ranks_on_this_node

_state = threading.local()  # .one_core: this thread does one core's share of the work


def default_threads() -> int:
    """This process's share of the node's cores: max(1, cores it may use // MPI ranks on this node)."""
    return max(1, available_cores() // ranks_on_this_node(os.environ))


# ----------------------------------------------------------------------------------------------------------
# BLAS's thread count


_blas_control = None  # (get, set) once looked up; False: looked up, none found


def _find_blas_thread_control():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None (another BLAS, or not Linux).

    Looked up in the shared objects of this process (/proc/self/maps). OpenBLAS keeps one thread count for the whole
    process: even its openblas_set_num_threads_local sets that one count in a pthreads build (measured: a pool
    thread's call made the main thread's BLAS single-threaded), so callers change it only around their own
    parallel section (blas_on_one_thread).
    """
    import ctypes

    names = (("openblas_get_num_threads", "openblas_set_num_threads"),
             ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
             ("openblas_get_num_threads64_", "openblas_set_num_threads64_"))
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
        for path in paths:
            lib = ctypes.CDLL(path)
            for get_name, set_name in names:
                get, set_ = getattr(lib, get_name, None), getattr(lib, set_name, None)
                if get is not None and set_ is not None:
                    get.argtypes, get.restype = [], ctypes.c_int
                    set_.argtypes, set_.restype = [ctypes.c_int], None
                    return get, set_
    except OSError:
        pass
    return None


def blas_thread_control():
    """(get, set) of OpenBLAS's thread count, or None; looked up on first use (after NumPy has loaded its BLAS)."""
    global _blas_control
    if _blas_control is None:
        import numpy  # noqa: F401  (loads the BLAS whose symbols are looked up)

        _blas_control = _find_blas_thread_control() or False
    return _blas_control or None


_blas_lock = threading.Lock()
_blas_users = 0  # blocks of blas_on_one_thread running now (side_by_side's tasks may nest the attention core's)
_blas_before = None  # the count to give back when the last one ends


@contextlib.contextmanager
def blas_on_one_thread():
    """Run BLAS on one thread inside the block, and on as many as before after it.

    Inside, threads of ours call BLAS side by side; the thread that entered the block runs or waits for them, and
    nothing else in npllm calls BLAS from another thread meanwhile, so no other computation sees the change. Blocks
    may overlap (from several threads): the count is set to 1 when the first begins and given back when the last
    ends.
    """
    global _blas_users, _blas_before
    control = blas_thread_control()
    if control is None:
        yield
        return
    get, set_ = control
    with _blas_lock:
        if _blas_users == 0:
            _blas_before = get()
            if _blas_before != 1:
                set_(1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0 and _blas_before != 1:
                set_(_blas_before)


def blas_threads_from_environment():
    """The BLAS thread count the environment fixed (OPENBLAS/OMP/MKL_NUM_THREADS), or None."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def threads_beside_blas(share: int) -> int:
    """How many of our threads may call BLAS at once within ``share`` cores: all of them where BLAS can be put on
    one thread (OpenBLAS), else share // (BLAS threads each call may start), at least 1."""
    if blas_thread_control() is not None:
        return share
    return max(1, share // (blas_threads_from_environment() or share))


# ----------------------------------------------------------------------------------------------------------
# threads that do one core's work


def on_one_core() -> bool:
    """True in a thread doing one core's share of a parallel computation: it splits nothing further."""
    return getattr(_state, "one_core", False)


def mark_one_core_thread():
    """Mark this thread as doing one core's work for the rest of its life (a pool's worker threads)."""
    _state.one_core = True


@contextlib.contextmanager
def one_core():
    """Mark this thread as doing one core's work inside the block (npllm.fast.pool and the flash core run serially
    in it); nested blocks leave the mark as the outer one set it."""
    before = on_one_core()
    _state.one_core = True
    try:
        yield
    finally:
        _state.one_core = before


_pool: ThreadPoolExecutor | None = None  # created on first use, grown when a call asks for more threads
_pool_size = 0
_pool_lock = threading.Lock()


def executor(workers: int) -> ThreadPoolExecutor:
    """The one pool of worker threads of npllm (side_by_side's, npllm.fast.pool's), with at least ``workers``
    threads. Each of them only ever does one core's work (marked for life), so nothing running in it submits to it
    again: no task waits for a thread that one of its own kind holds."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="npllm-worker",
                                       initializer=mark_one_core_thread)
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)  # its running work finishes; new work goes to the larger pool
        return _pool


def side_by_side(tasks, threads: int | None = None, *, calls_blas: bool = True) -> list:
    """[task() for task in tasks], up to ``threads`` at a time (this thread included), each in ``one_core()``;
    returns the results in task order.

    calls_blas: the tasks call BLAS, which then runs on one thread meanwhile (blas_on_one_thread), and where BLAS's
    thread count cannot be set fewer tasks run at once (threads_beside_blas); False for tasks of ufuncs only
    (npllm.fast.pool's row chunks). Each task sees this thread's context variables (NumPy's errstate among them: a
    task warns where this thread would). threads: default ``default_threads()``.
    With one thread (or one task, or inside a one_core thread) the tasks run here, one after the other, BLAS and
    npllm's pools as this thread has them. A task computes the same thing on any thread; only BLAS's thread count,
    which can change how OpenBLAS splits (and so rounds) a product, differs between the two ways. An exception
    raised by a task is raised here (the first in task order) after every started task has ended; no task starts
    after a failure. The call returns as soon as every task is done: it never waits for a worker thread that was
    too late (on a busy machine) to take a task, so a loaded machine costs at most the serial time.
    """
    tasks = list(tasks)
    threads = default_threads() if threads is None else threads
    n = min(threads_beside_blas(threads) if calls_blas else threads, len(tasks))
    if n <= 1 or on_one_core():
        return [task() for task in tasks]

    results = [None] * len(tasks)
    cond = threading.Condition()
    progress = {"next": 0, "done": 0}  # tasks handed out / finished (under cond)
    errors = {}  # task index -> exception (under cond)

    def work():
        with one_core():  # a task that would split its work again runs it serially
            while True:
                with cond:
                    if errors or progress["next"] == len(tasks):
                        return
                    i = progress["next"]
                    progress["next"] += 1
                try:
                    results[i] = tasks[i]()
                except BaseException as e:  # noqa: BLE001 - raised to the caller below
                    with cond:
                        errors[i] = e
                finally:
                    with cond:
                        progress["done"] += 1
                        if progress["done"] == progress["next"]:
                            cond.notify_all()  # the caller may be waiting for exactly this

    with blas_on_one_thread() if calls_blas else contextlib.nullcontext():
        pool = executor(n - 1)
        for _ in range(n - 1):  # a worker that starts late finds no task left and returns at once, calling nothing
            # in a copy of this thread's context: NumPy's errstate (a context variable) holds in the tasks
            pool.submit(contextvars.copy_context().run, work)
        work()
        with cond:  # every task taken has ended (before BLAS gets its threads back); late workers are not waited for
            cond.wait_for(lambda: progress["done"] == progress["next"])
    if errors:
        raise errors[min(errors)]
    return results
