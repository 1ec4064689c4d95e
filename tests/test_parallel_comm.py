"""npllm.parallel.comm and npllm.parallel.threads: the size-1 communicator, group layout and its errors, the
BLAS thread limit, every MPI collective under a real ``mpirun -n 4``, and a failing rank ending the whole job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.mpi_scripts.mpi_common import NO_MPIRUN, find_mpirun, load_npz, run_mpi

from npllm.parallel.comm import (
    LAUNCHER_VARS, LocalComm, check_tp, launched_by_mpirun, make_comm, run_main,
)
from npllm.parallel.mappings import (
    copy_to_tp, copy_to_tp_backward, reduce_from_tp, reduce_from_tp_backward,
)
from npllm.parallel.threads import (
    THREAD_VARS, limit_blas_threads, prepare_blas, ranks_on_this_node, stop_idle_blas_spinning,
)

needs_mpirun = pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)


# ----------------------------------------------------------------------------------------------------------
# one process


def test_local_comm_collectives_return_their_input():
    comm = LocalComm()
    x = np.arange(6.0).reshape(2, 3)
    assert (comm.rank, comm.size) == (0, 1)
    for y in (comm.allreduce(x), comm.allreduce(x, op="max"), comm.allgather(x, axis=0), comm.allgather(x),
              comm.allgatherv(x.reshape(-1), [6]), comm.reduce_scatter(x.reshape(-1)), comm.broadcast(x)):
        assert np.shares_memory(y, x)  # no copy
        np.testing.assert_array_equal(y.reshape(x.shape), x)
    assert comm.allreduce_scalar(2.5) == 2.5
    assert comm.allreduce_in_place(x) is x


def test_mappings_on_one_rank_are_identities():
    comm = LocalComm()
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    for op in (copy_to_tp, copy_to_tp_backward, reduce_from_tp, reduce_from_tp_backward):
        np.testing.assert_array_equal(op(x, comm), x)


def test_local_comm_rejects_bad_arguments():
    comm = LocalComm()
    with pytest.raises(ValueError, match="op='min'.*sum, max"):
        comm.allreduce(np.ones(2), op="min")
    with pytest.raises(ValueError, match="counts"):
        comm.allgatherv(np.ones(3), [2])
    with pytest.raises(ValueError, match="root=1"):
        comm.broadcast(np.ones(3), root=1)


def test_make_comm_without_mpi_is_one_process():
    comm = make_comm(tp=1, use_mpi=False)
    assert all(isinstance(c, LocalComm) for c in (comm.world, comm.tp, comm.dp))
    with pytest.raises(ValueError, match=r"tp=2 does not divide the number of ranks 1; allowed: 1"):
        make_comm(tp=2, use_mpi=False)


@pytest.mark.parametrize("tp, world, message", [
    (3, 4, r"tp=3 does not divide the number of ranks 4; allowed: 1, 2, 4"),
    (0, 4, r"tp=0 is not allowed; use a positive integer"),
    (True, 4, r"tp=True is not allowed; use a positive integer"),
    (8, 4, r"tp=8 does not divide the number of ranks 4"),
])
def test_check_tp_errors(tp, world, message):
    with pytest.raises(ValueError, match=message):
        check_tp(tp, world)


def test_one_process_never_imports_mpi4py():
    code = ("import sys; import numpy as np; from npllm.parallel.comm import make_comm; "
            "from npllm.config import get_preset; from npllm.models import init_params; "
            "from npllm.models.decoder import loss_and_grads; "
            "cfg = get_preset('nano', n_layers=1); comm = make_comm(); "
            "loss_and_grads(init_params(cfg), np.zeros((1, 4), int), np.ones((1, 4), int), cfg, tp=comm.tp); "
            "print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_launcher_detection():
    assert launched_by_mpirun({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert launched_by_mpirun({"OMPI_COMM_WORLD_SIZE": "4"})
    assert not launched_by_mpirun({"HOME": "/root"})


def test_run_main_without_mpi_exits_nonzero_with_the_traceback(capsys):
    def fails():
        raise RuntimeError("broken on purpose")

    with pytest.raises(SystemExit) as info:
        run_main(fails)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "uncaught RuntimeError" in err and "broken on purpose" in err
    assert run_main(lambda a, b=0: a + b, 2, b=3) == 5


# ----------------------------------------------------------------------------------------------------------
# BLAS threads


def test_limit_blas_threads_divides_cores_by_local_ranks():
    cores = len(os.sched_getaffinity(0))
    env = {"MPI_LOCALNRANKS": "2", "PMI_SIZE": "8"}  # hydra: 2 ranks on this node, 8 in the job
    assert ranks_on_this_node(env) == 2
    assert limit_blas_threads(env) == max(1, cores // 2)
    assert {env[v] for v in THREAD_VARS} == {str(max(1, cores // 2))}


def test_limit_blas_threads_leaves_user_settings_and_single_processes_alone():
    env = {"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}
    assert limit_blas_threads(env) is None
    assert env == {"MPI_LOCALNRANKS": "2", "OMP_NUM_THREADS": "3"}
    env = {}
    assert limit_blas_threads(env) is None and env == {}
    env = {"OMPI_COMM_WORLD_LOCAL_SIZE": str(4 * len(os.sched_getaffinity(0)))}  # more ranks than cores
    assert limit_blas_threads(env) == 1


def test_entry_points_stop_openblas_idle_spinning_unless_the_user_chose():
    """prepare_blas (what `python -m npllm.train` runs before NumPy loads): OPENBLAS_THREAD_TIMEOUT=4 in one process
    and under mpirun beside the thread limit; a user's own value is kept."""
    env = {}
    prepare_blas(env)
    assert env == {"OPENBLAS_THREAD_TIMEOUT": "4"}
    env = {"MPI_LOCALNRANKS": "2"}
    prepare_blas(env)
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4"
    assert env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    env = {"OPENBLAS_THREAD_TIMEOUT": "28"}
    assert stop_idle_blas_spinning(env) is False and env == {"OPENBLAS_THREAD_TIMEOUT": "28"}


def test_the_train_command_sets_the_idle_spin_before_numpy_loads(tmp_path):
    """Run as `python -m npllm.train`, the setting is in place when NumPy (and so OpenBLAS) loads: the module's own
    __main__ guard runs prepare_blas before its `import numpy`."""
    script = ("import os, runpy, sys; sys.argv = ['npllm.train', '--help']; "
              "import builtins; real = builtins.__import__\n"
              "def spy(name, *a, **k):\n"
              "    if name == 'numpy' and 'seen' not in os.environ:\n"
              "        os.environ['seen'] = os.environ.get('OPENBLAS_THREAD_TIMEOUT', 'unset')\n"
              "    return real(name, *a, **k)\n"
              "builtins.__import__ = spy\n"
              "try:\n"
              "    runpy.run_module('npllm.train', run_name='__main__')\n"
              "except SystemExit:\n"
              "    pass\n"
              "print('numpy loaded with', os.environ['seen'])")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "numpy loaded with 4" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------------
# real MPI


@pytest.mark.mpi
@needs_mpirun
def test_collectives_under_mpirun_4_ranks_tp2(tmp_path):
    run_mpi(4, "collectives.py", "--tp=2", f"--out={tmp_path}")
    world, tp = 4, 2
    results = [load_npz(tmp_path / f"rank{r}.npz") for r in range(world)]
    xs = [np.arange(6.0).reshape(2, 3) + 10 * r for r in range(world)]  # each rank's input
    counts = [1, 2, 3, 4]
    for r, got in enumerate(results):
        tp_rank, dp_rank = r % tp, r // tp
        # layout: tp groups of consecutive ranks, dp groups of equal tp rank
        np.testing.assert_array_equal(got["ranks"], [r, world, tp_rank, tp, dp_rank, world // tp])
        np.testing.assert_array_equal(got["world_sum"], sum(xs))
        np.testing.assert_array_equal(got["world_max"], xs[-1])
        assert got["world_sum_f32"].dtype == np.float32
        np.testing.assert_array_equal(got["world_sum_f32"], sum(xs).astype(np.float32))
        assert got["world_sum_in_place"].dtype == np.float32
        np.testing.assert_array_equal(got["world_sum_in_place"], sum(xs).astype(np.float32))
        assert got["in_place_same_array_strided_refused"].tolist() == [True, True]
        assert float(got["world_scalar"]) == sum(k + 0.5 for k in range(world))
        group = range(dp_rank * tp, dp_rank * tp + tp)  # my tp group
        np.testing.assert_array_equal(got["tp_sum"], sum(xs[k] for k in group))
        np.testing.assert_array_equal(got["dp_sum"], sum(xs[k] for k in range(tp_rank, world, tp)))
        np.testing.assert_array_equal(got["world_gather_last"], np.concatenate(xs, axis=-1))
        np.testing.assert_array_equal(got["world_gather_first"], np.concatenate(xs, axis=0))
        np.testing.assert_array_equal(got["world_gatherv"], np.concatenate([np.full(c, float(k))
                                                                            for k, c in enumerate(counts)]))
        total = np.arange(sum(counts), dtype=np.float64) * sum(k + 1 for k in range(world))
        start = sum(counts[:r])
        np.testing.assert_array_equal(got["world_reduce_scatter"], total[start:start + counts[r]])
        np.testing.assert_array_equal(got["world_reduce_scatter_even"], np.full(2, float(sum(range(world)))))
        np.testing.assert_array_equal(got["world_bcast"], xs[-1])
        np.testing.assert_array_equal(got["tp_reduce_from"], sum(xs[k] for k in group))
        np.testing.assert_array_equal(got["tp_copy_to_backward"], sum(xs[k] for k in group))
        np.testing.assert_array_equal(got["input_unchanged"], xs[r])
        # 4 ranks on this node: each limited BLAS to its share of the cores (the test removed any user setting)
        threads = max(1, int(got["cores"]) // world)
        np.testing.assert_array_equal(got["blas_threads"], [threads] * 3)


@pytest.mark.mpi
@needs_mpirun
def test_an_exception_on_one_rank_ends_the_whole_job_quickly():
    proc, seconds = run_mpi(2, "fail_on_one_rank.py", timeout=60, check=False)
    assert proc.returncode != 0
    assert seconds < 30, f"the job took {seconds:.1f} s to end"
    assert "deliberate failure on rank 1" in proc.stderr + proc.stdout
    assert "[rank 1] uncaught ValueError" in proc.stderr + proc.stdout
    assert "must not happen" not in proc.stdout
