"""npllm.parallel.data in one process: flat buffers, the ZeRO-1 partition, which rank counts which gradient in the
global norm, and that one process's optimizer_step is exactly clip_grad_norm + adamw_update. The multi-rank runs
(dp=2, zero=1) are compared with one process under mpirun in test_parallel_equivalence.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npllm.config import get_preset
from npllm.models import init_params, param_shapes, split_axes
from npllm.models.decoder import loss_and_grads
from npllm.optim import adamw_init, adamw_update, clip_grad_norm
from npllm.parallel.comm import make_comm
from npllm.parallel.data import (
    check_zero, dp_allreduce_grads, dp_partition, flatten, init_optimizer, norm_counted_names, optimizer_step,
    unflatten,
)
from tests.mpi_scripts.mpi_common import (
    FEW_TENSOR_STEPS, NO_MPIRUN, few_tensor_problem, find_mpirun, load_npz, run_mpi,
)

FAST = settings(max_examples=25, deadline=None)


def test_flatten_and_unflatten_are_inverse():
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4), "c": rng.standard_normal((1, 1, 2))}
    flat = flatten(arrays, arrays)
    assert flat.shape == (12,)
    back = unflatten(flat, {n: a.shape for n, a in arrays.items()})
    assert all(np.array_equal(back[n], arrays[n]) for n in arrays)
    back["a"][0, 0] = 7.0  # unflatten gives views of the buffer
    assert flat[0] == 7.0
    np.testing.assert_array_equal(flatten(arrays, ["b"]), arrays["b"])
    assert flatten(arrays, []).shape == (0,) and flatten(arrays, []).dtype == np.float64
    with pytest.raises(ValueError, match="one dtype"):
        flatten({"a": np.zeros(2), "b": np.zeros(2, np.float32)}, ["a", "b"])
    with pytest.raises(ValueError, match="has 12 elements, the shapes need 10"):
        unflatten(flat, {"a": (2, 5)})


@FAST
@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=12), dp=st.integers(1, 6))
def test_dp_partition_is_contiguous_complete_and_balanced(sizes, dp):
    shapes = {f"p{i}": (s,) for i, s in enumerate(sizes)}
    owned = dp_partition(shapes, dp)
    assert len(owned) == dp
    assert [n for names in owned for n in names] == list(shapes)  # every tensor once, in order: contiguous
    total, largest = sum(sizes), max(sizes)
    for names in owned:  # no rank holds more than its share plus one tensor
        assert sum(shapes[n][0] for n in names) <= total / dp + largest


def test_dp_partition_of_a_model_balances_and_rejects_bad_sizes():
    shapes = param_shapes(get_preset("nano"))
    owned = dp_partition(shapes, 2)
    load = [sum(math.prod(shapes[n]) for n in names) for names in owned]
    assert abs(load[0] - load[1]) <= max(math.prod(s) for s in shapes.values())
    assert dp_partition({"a": (3,)}, 3) == [[], ["a"], []]  # more ranks than tensors: some own nothing
    with pytest.raises(ValueError, match="dp_size=0"):
        dp_partition(shapes, 0)


def test_norm_counts_every_gradient_once_across_ranks():
    axes = split_axes(get_preset("nano-gpt2"))
    names = list(axes)
    on_rank0 = norm_counted_names(names, axes, tp_rank=0, counts_dp_replicas=True)
    on_rank1 = norm_counted_names(names, axes, tp_rank=1, counts_dp_replicas=True)
    assert on_rank0 == names  # shards of split tensors and the replicated tensors
    assert on_rank1 == [n for n in names if axes[n] is not None]  # shards only: the replicated copy counts on rank 0
    assert "norm.w" not in on_rank1 and "layers.0.attn.bo" not in on_rank1 and "pos_emb" not in on_rank1
    assert norm_counted_names(names, axes, tp_rank=0, counts_dp_replicas=False) == []


def test_check_zero():
    assert check_zero(0) == 0 and check_zero(1) == 1
    for bad in (2, -1, True, "1"):
        with pytest.raises(ValueError, match=r"zero=.* is not allowed"):
            check_zero(bad)


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_process_optimizer_step_is_clip_then_adamw_exactly(zero, dtype):
    cfg = get_preset("nano-gpt2", n_layers=1, vocab_size=64, dim=32, ffn_dim=48)
    comm = make_comm(use_mpi=False)
    params = init_params(cfg, seed=1, dtype=dtype)
    ref_params = {n: p.copy() for n, p in params.items()}
    state, ref_state = init_optimizer(params, comm, zero), adamw_init(ref_params)
    rng = np.random.default_rng(2)
    for step in range(3):
        tokens = rng.integers(0, cfg.vocab_size, (2, 8))
        targets = rng.integers(0, cfg.vocab_size, (2, 8))
        _, grads = loss_and_grads(params, tokens, targets, cfg, tp=comm.tp)
        _, ref_grads = loss_and_grads(ref_params, tokens, targets, cfg)
        assert dp_allreduce_grads(grads, comm.dp) is grads  # one dp rank: nothing to average
        got = optimizer_step(params, grads, state, split_axes(cfg), comm, zero=zero, lr=1e-2, max_norm=0.3)
        expected = clip_grad_norm(ref_grads, 0.3)
        adamw_update(ref_params, ref_grads, ref_state, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        assert got == expected and expected[1] < 1  # (norm, scale), clipping active
        for n in params:
            assert np.array_equal(params[n], ref_params[n]), (step, n)


@pytest.mark.mpi
@pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)
def test_zero1_with_ranks_that_own_nothing_equals_one_process(tmp_path):
    run_mpi(4, "zero_few_tensors.py", f"--out={tmp_path / 'r.npz'}")
    got = load_npz(tmp_path / "r.npz")
    assert sorted(got["owned_count"]) == [0, 0, 1, 1]  # two of the four dp ranks own no tensor
    params, grads_per_rank = few_tensor_problem(4)
    state = adamw_init(params)
    for step in range(FEW_TENSOR_STEPS):
        mean = {n: sum(g[n] for g in grads_per_rank) * (step + 1) / 4 for n in params}  # what dp averaging gives
        norm, scale = clip_grad_norm(mean, 0.5)
        adamw_update(params, mean, state, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        np.testing.assert_allclose(got["norms"][step], [norm, scale], rtol=1e-12)
    for n, p in params.items():
        np.testing.assert_allclose(got[f"param:{n}"], p, rtol=1e-12, atol=1e-15)
