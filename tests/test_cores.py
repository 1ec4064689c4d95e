"""Tests for npllm/parallel/cores.py: BLAS's thread count at run time, one-core threads, side_by_side."""

import contextlib
import threading

import numpy as np
import pytest

from npllm.fast import pool
from npllm.parallel import cores
from npllm.parallel.cores import blas_on_one_thread, blas_thread_control, on_one_core, one_core, side_by_side

@contextlib.contextmanager
def pool_threads(threads):
    """npllm.fast.pool with ``threads`` threads and chunks small enough that a test's arrays are cut into many."""
    saved = pool.THREADS, pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS
    pool.THREADS, pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS = threads, 1 << 10, 1
    try:
        yield
    finally:
        pool.THREADS, pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS = saved


OPENBLAS = pytest.mark.skipif(blas_thread_control() is None,
                              reason="BLAS is not an OpenBLAS whose thread count we can read")


def test_default_threads_divides_the_cores_by_the_ranks_on_this_node(monkeypatch):
    monkeypatch.setattr(cores, "available_cores", lambda: 8)
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert cores.default_threads() == 8
    monkeypatch.setenv("MPI_LOCALNRANKS", "3")
    assert cores.default_threads() == 2
    monkeypatch.setenv("MPI_LOCALNRANKS", "16")
    assert cores.default_threads() == 1


def test_tasks_run_side_by_side_and_return_in_task_order():
    # the barrier lets a task through only while the other task waits at it too: both must run at the same time
    barrier = threading.Barrier(2, timeout=20)
    seen = {}

    def task(i):
        def run():
            seen[i] = (threading.get_ident(), on_one_core())
            barrier.wait()
            return i * 10
        return run

    assert side_by_side([task(0), task(1)], threads=2) == [0, 10]
    assert seen[0][0] != seen[1][0]  # two threads
    assert seen[0][1] and seen[1][1]  # each marked as doing one core's work
    assert not on_one_core()  # the calling thread's mark is given back


def test_one_thread_runs_the_tasks_here_in_order():
    order = []
    me = threading.get_ident()

    def task(i):
        def run():
            order.append((i, threading.get_ident()))
            return i
        return run

    assert side_by_side([task(i) for i in range(4)], threads=1) == [0, 1, 2, 3]
    assert order == [(i, me) for i in range(4)]
    with one_core():  # inside a one-core thread, too
        assert side_by_side([task(i) for i in range(2)], threads=2) == [0, 1]
    assert order[4:] == [(0, me), (1, me)]


def test_the_first_error_in_task_order_is_raised_after_the_others_end():
    ended = []

    def ok(i):
        def run():
            ended.append(i)
            return i
        return run

    def failing(i):
        def run():
            raise KeyError(f"task {i}")
        return run

    with pytest.raises(KeyError, match="task 1"):
        side_by_side([ok(0), failing(1), failing(2), ok(3)], threads=2)
    assert 0 in ended
    assert side_by_side([ok(5), ok(6)], threads=2) == [5, 6]  # the pool still works


def test_map_rows_runs_serially_inside_a_task():
    # a row group does one core's work: the fused elementwise layers inside it do not fan out again
    def task():
        me = threading.get_ident()
        idents = pool.map_rows(lambda rows: threading.get_ident(), 1 << 12, 1 << 10, threads=2)
        return set(idents) == {me}

    assert side_by_side([task, task], threads=2) == [True, True]


@OPENBLAS
def test_blas_runs_on_one_thread_inside_and_gets_its_count_back():
    get, set_ = blas_thread_control()
    before = get()
    set_(2)
    try:
        def count():
            return get()

        assert side_by_side([count, count], threads=2) == [1, 1]
        assert get() == 2

        def failing():
            raise RuntimeError("task failed")

        with pytest.raises(RuntimeError, match="task failed"):
            side_by_side([count, failing], threads=2)
        assert get() == 2
        # blocks that overlap (side_by_side's tasks may hold their own): the count comes back when the last ends
        with blas_on_one_thread():
            with blas_on_one_thread():
                assert get() == 1
            assert get() == 1
        assert get() == 2
    finally:
        set_(before)


def test_without_thread_control_at_most_cores_over_blas_threads_run_at_once(monkeypatch):
    # another BLAS starts its own threads in every call: two of ours on 2 cores with 2 BLAS threads each would be 4
    monkeypatch.setattr(cores, "blas_thread_control", lambda: None)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert cores.threads_beside_blas(2) == 1
    assert cores.threads_beside_blas(8) == 4
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert cores.threads_beside_blas(2) == 2
    me = threading.get_ident()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert side_by_side([threading.get_ident] * 2, threads=2) == [me, me]


def test_numpy_work_in_tasks_gives_the_serial_results():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64)).astype(np.float32)

    def task(k):
        return lambda: np.tanh(a @ a + k)

    together = side_by_side([task(k) for k in range(4)], threads=2)
    alone = [task(k)() for k in range(4)]
    for x, y in zip(together, alone):
        np.testing.assert_array_equal(x, y)


def test_tasks_and_chunks_see_the_callers_errstate():
    # np.errstate is a context variable: a thread of ours must run in the caller's context (the trainer ignores
    # overflow warnings and reports a non-finite loss itself), not in a fresh one where NumPy would warn
    big = np.full(1 << 12, 1e30, dtype=np.float32)

    def overflow_raises(*_):
        try:
            np.multiply(big, big)
        except FloatingPointError:
            return True
        return False

    with np.errstate(over="raise"):
        assert side_by_side([overflow_raises, overflow_raises], threads=2) == [True, True]
        with pool_threads(2):
            assert all(pool.map_rows(overflow_raises, 1 << 12, 1 << 10))
