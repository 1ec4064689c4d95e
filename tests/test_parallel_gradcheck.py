"""Float64 finite differences of the tensor-parallel model, inside a real ``mpirun -n 2`` job (tp=2).

The job (tests/mpi_scripts/gradcheck_tp.py) perturbs replicated parameters on both ranks at once and each split
shard on its own rank only, so the finite differences measure the gradient of the one model the two ranks hold
together. Every parameter of both configs (LLaMA-like with GQA; GPT-2-like with biases and tied embeddings) must
pass on both ranks' shards. As a control, the same check with copy_to_tp's backward all-reduce removed must fail:
that bug is invisible to any single-process check.
"""

from __future__ import annotations


import pytest

from tests.mpi_scripts.mpi_common import NO_MPIRUN, TINY_CONFIGS, find_mpirun, load_npz, run_mpi

from npllm.models import split_axes


@pytest.mark.mpi
@pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)
def test_tensor_parallel_gradients_match_finite_differences_under_mpirun(tmp_path, assert_grads):
    run_mpi(2, "gradcheck_tp.py", "--tp=2", f"--out={tmp_path}", timeout=300)
    ranks = [{k: float(v) for k, v in load_npz(tmp_path / f"rank{r}.npz").items()} for r in range(2)]
    for config, cfg in TINY_CONFIGS.items():
        expected = set()
        for name, axis in split_axes(cfg).items():
            if axis is not None:
                expected |= {f"{config}:rank0:{name}", f"{config}:rank1:{name}"}
            else:
                expected.add(f"{config}:{name}")
        checked = {k: e for rank in ranks for k, e in rank.items() if k.startswith(config + ":")}
        assert set(checked) == expected, sorted(set(checked) ^ expected)
        assert_grads(checked, f"tensor parallel tp=2 under mpirun: {config}")
    broken = {k: e for k, e in ranks[0].items() if k.startswith("broken:")}
    assert broken and max(broken.values()) > 1e-2, f"the control bug went unnoticed: {broken}"
