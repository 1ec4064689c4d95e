"""Data parallelism: gradient averaging, the global gradient norm, and ZeRO-1 (AdamW state sharded over dp ranks).

The dp ranks of a data-parallel group hold the same parameters (the same tensor-parallel shards) and each computes
gradients on its own rows of the global batch (``npllm.data.BatchSampler(rank=dp.rank, world_size=dp.size)``). The
global batch's gradient is the mean of theirs, when every rank counts the same number of targets (always so in
pretraining, where no target is ignored):

    zero=0   one all-reduce of all gradients packed into one flat buffer, divided by dp; every rank then clips and
             runs AdamW on all its parameters, holding the full moments.
    zero=1   the flat gradient is reduce-scattered instead: dp rank d receives the summed gradient of only the
             parameters it owns (``dp_partition``: whole tensors, contiguous in parameter order, balanced by
             size), updates those with the same AdamW (keeping moments for them alone: 1/dp of the optimizer
             memory), and an all-gather of the updated parameters brings every rank up to date. The same bytes
             move as in one all-reduce (a reduce-scatter plus an all-gather is how all-reduce works inside).

Gradient clipping uses one norm over the whole model, every gradient element counted exactly once across the world:
a split tensor's shards on every tp rank (they are disjoint), a replicated one (norm gains, the biases added after a
reduce, pos_emb) only on tp rank 0, and with zero=0 only dp rank 0's copy (all dp ranks hold the same averaged
gradients). The counted squares are summed with one scalar all-reduce over the world.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..checks import check_choice, check_int
from ..optim import adamw_init, adamw_update, clip_grad_norm, grad_sq_sum
from .comm import ParallelComm

ZERO_STAGES = (0, 1)


def check_zero(zero) -> int:
    return check_choice("zero", check_int("zero", zero, 0), ZERO_STAGES)


# ----------------------------------------------------------------------------------------------------------
# flat buffers: many tensors as one 1-D array, so that one collective moves them all


def flatten(arrays: dict, names) -> object:
    """The tensors ``arrays[name]`` for ``names``, raveled and concatenated in that order: (sum of sizes,)."""
    names = list(names)
    dtypes = {np.dtype(a.dtype) for a in arrays.values()}
    if len(dtypes) != 1:
        raise ValueError(f"flatten needs tensors of one dtype, got {sorted(map(str, dtypes))}")
    first = next(iter(arrays.values()))
    xp = get_array_module(first)
    if not names:  # a rank that owns nothing still takes part in the collective
        return xp.zeros(0, dtype=first.dtype)  # (0,)
    return xp.concatenate([arrays[n].reshape(-1) for n in names])  # (N,)


def unflatten(flat, shapes: dict) -> dict:
    """{name: view of ``flat`` with shapes[name]}, segments taken in the order of ``shapes`` (flatten's inverse)."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        out[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    if offset != flat.shape[0]:
        raise ValueError(f"the flat buffer has {flat.shape[0]} elements, the shapes need {offset}")
    return out


# ----------------------------------------------------------------------------------------------------------
# plain data parallel


def dp_allreduce_grads(grads: dict, dp) -> dict:
    """The mean over the dp ranks of ``grads``, with ONE all-reduce of one flat buffer.

    Returns new arrays (views into the averaged buffer), keyed and ordered like ``grads``; with one dp rank, grads.
    """
    if dp.size == 1:
        return grads
    flat = dp.allreduce_in_place(flatten(grads, grads))  # (N,) sum over dp ranks, in the fresh flat buffer
    flat /= dp.size  # mean
    return unflatten(flat, {name: g.shape for name, g in grads.items()})


def dp_mean(value: float, dp) -> float:
    """The mean of a per-rank number (the loss) over the dp ranks."""
    return dp.allreduce_scalar(value) / dp.size


def global_batch_mean(loss: float, grads: dict, n_targets: int, dp) -> tuple[float, dict]:
    """(loss, grads) of this dp rank, a mean over its ``n_targets`` counted targets, turned into its share of the
    global batch's mean (``dp_count_weight``, applied to grads IN PLACE), and the loss into the global batch's mean
    loss, the same on every rank. With one dp rank: unchanged."""
    if dp.size == 1:
        return loss, grads
    weight = dp_count_weight(n_targets, dp)
    if weight != 1.0:  # only when the ranks count different numbers of targets (SFT): exactly 1.0 in pretraining
        for g in grads.values():
            g *= weight
    return dp_mean(weight * loss, dp), grads


def dp_count_weight(n_local: int, dp) -> float:
    """The factor w that makes the dp-average of w * (this rank's mean) the mean over the whole global batch.

    Each dp rank's loss and gradients are means over its own n_local counted targets (-100 targets are not
    counted); averaging the ranks' means weights every rank alike, but the global batch's mean weights every
    target alike: mean = sum_r n_r mean_r / N = (1/dp) sum_r (dp n_r / N) mean_r, so w = dp n_local / N. It is
    exactly 1.0 when all ranks count the same number of targets (always in pretraining). One scalar all-reduce.
    """
    n_total = dp.allreduce_scalar(float(n_local))
    return dp.size * n_local / n_total if n_total > 0 else 1.0


# ----------------------------------------------------------------------------------------------------------
# the global gradient norm


def norm_counted_names(names, axes: dict, tp_rank: int, counts_dp_replicas: bool) -> list[str]:
    """The gradient names whose squares this rank adds to the global norm, so that each element counts once.

    Split tensors (axes[name] is not None) count on every tp rank (each rank holds a different slice); replicated
    ones only on tp rank 0. counts_dp_replicas=False (the grads are the same on every dp rank) leaves everything to
    another rank.
    """
    if not counts_dp_replicas:
        return []
    return [name for name in names if axes[name] is not None or tp_rank == 0]


def world_grad_norm(grads: dict, axes: dict, comm: ParallelComm, grads_replicated_over_dp: bool) -> float:
    """sqrt(sum of squares of every gradient element of the model), each counted once across the world (the
    parallel form of ``npllm.optim.global_grad_norm``).

    grads: this rank's gradients; axes: the model's ``split_axes(cfg)``. grads_replicated_over_dp: True after
    dp_allreduce_grads (every dp rank holds the same values, so only dp rank 0 counts them); False under ZeRO-1
    (each dp rank holds different tensors). One scalar all-reduce over the world.
    """
    counts = comm.dp.rank == 0 or not grads_replicated_over_dp
    local = grad_sq_sum(grads, norm_counted_names(grads, axes, comm.tp.rank, counts))
    return math.sqrt(comm.world.allreduce_scalar(local))


# ----------------------------------------------------------------------------------------------------------
# ZeRO-1: AdamW moments and the update sharded over the dp ranks


def dp_partition(shapes: dict, dp_size: int) -> list[list[str]]:
    """Which parameters each dp rank owns: whole tensors, contiguous in parameter order, balanced by size.

    A tensor belongs to the rank whose share [d N / dp, (d+1) N / dp) of the N elements holds its middle
    element, so each rank's tensors form one contiguous segment of the flat buffer (what reduce-scatter and
    all-gather need). A rank owns nothing when dp exceeds the number of tensors. Returns [names of rank d].
    """
    check_int("dp_size", dp_size)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = max(sum(sizes.values()), 1)
    owned: list[list[str]] = [[] for _ in range(dp_size)]
    offset = 0
    for name, size in sizes.items():
        middle = offset + size / 2
        owned[min(dp_size - 1, int(middle * dp_size / total))].append(name)
        offset += size
    return owned


def zero_adamw_init(params: dict, dp) -> dict:
    """AdamW state for the parameters this dp rank owns (``adamw_init`` of that subset): 1/dp of the moments."""
    mine = dp_partition({n: p.shape for n, p in params.items()}, dp.size)[dp.rank]
    return adamw_init({name: params[name] for name in mine})


def dp_reduce_scatter_grads(grads: dict, dp) -> dict:
    """The dp-mean gradients of the parameters this rank owns, with one reduce-scatter of the flat buffer."""
    owned = dp_partition({n: g.shape for n, g in grads.items()}, dp.size)
    counts = [sum(math.prod(grads[n].shape) for n in names) for names in owned]  # elements per dp rank
    mine = dp.reduce_scatter(flatten(grads, grads), counts)  # (counts[rank],) summed over dp ranks
    mine = mine / dp.size  # mean
    return unflatten(mine, {name: grads[name].shape for name in owned[dp.rank]})


def dp_allgather_params(params: dict, dp) -> None:
    """Every rank's owned (freshly updated) parameters, copied into ``params`` on every rank, IN PLACE.
    One all-gather of the flat buffer."""
    owned = dp_partition({n: p.shape for n, p in params.items()}, dp.size)
    counts = [sum(math.prod(params[n].shape) for n in names) for names in owned]
    flat = dp.allgatherv(flatten(params, owned[dp.rank]), counts)  # (N,)
    for name, value in unflatten(flat, {n: p.shape for n, p in params.items()}).items():
        params[name][...] = value


# ----------------------------------------------------------------------------------------------------------
# one optimizer step, for all layouts


def optimizer_names(shapes: dict, comm: ParallelComm, zero: int = 0) -> list[str]:
    """The parameters whose AdamW moments this rank keeps: all of them (zero=0), or its dp rank's share (zero=1).

    shapes: {name: shape} (or the parameters themselves) of this rank's shards, in parameter order."""
    shapes = {name: tuple(getattr(x, "shape", x)) for name, x in shapes.items()}
    return list(shapes) if check_zero(zero) == 0 else dp_partition(shapes, comm.dp.size)[comm.dp.rank]


def init_optimizer(params: dict, comm: ParallelComm, zero: int = 0) -> dict:
    """AdamW state for this rank: all its parameters (zero=0) or the ones its dp rank owns (zero=1)."""
    return adamw_init(params) if check_zero(zero) == 0 else zero_adamw_init(params, comm.dp)


def reduce_and_clip(grads: dict, axes: dict, comm: ParallelComm, *, zero: int = 0,
                    max_norm: float) -> tuple[dict, float, float]:
    """The first half of ``optimizer_step``: average the gradients over dp and clip them by the global norm.

    axes: the model's ``split_axes(cfg)`` (which gradients are slices and which full copies, for the norm).
    Returns (the gradients to apply, the global norm before clipping, the clip scale); norm and scale are the same
    on every rank. zero=0: all of this rank's gradients, all-reduced; zero=1: those of the tensors its dp rank owns,
    reduce-scattered. The trainer looks at the norm here, before ``apply_update`` touches the parameters.
    """
    if check_zero(zero) == 0:
        grads = dp_allreduce_grads(grads, comm.dp)  # every dp rank: all grads, averaged
        norm = world_grad_norm(grads, axes, comm, grads_replicated_over_dp=True)
    else:
        grads = dp_reduce_scatter_grads(grads, comm.dp)  # this dp rank's tensors, averaged
        norm = world_grad_norm(grads, axes, comm, grads_replicated_over_dp=False)
    norm, scale = clip_grad_norm(grads, max_norm, norm=norm)
    return grads, norm, scale


def apply_update(params: dict, grads: dict, state: dict, comm: ParallelComm, *, zero: int = 0, lr: float,
                 beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.1,
                 update=adamw_update) -> None:
    """The second half of ``optimizer_step``: AdamW, IN PLACE on params, with the gradients ``reduce_and_clip``
    returned. zero=1: only the owned tensors are updated, then one all-gather brings every rank up to date.
    update: the AdamW step to run, npllm.optim's or the fast path's (npllm.models.ops: the same bits)."""
    if check_zero(zero) == 0:
        update(params, grads, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        return
    owned_params = {name: params[name] for name in grads}  # the same arrays: updated in place
    update(owned_params, grads, state, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    dp_allgather_params(params, comm.dp)  # everyone's updated tensors, everywhere


def optimizer_step(params: dict, grads: dict, state: dict, axes: dict, comm: ParallelComm, *, zero: int = 0,
                   lr: float, max_norm: float, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.1) -> tuple[float, float]:
    """Average the gradients over dp, clip them by the global norm, and take one AdamW step, IN PLACE on params.

    params, grads: this rank's (tensor-parallel shards of the) parameters and its local gradients; axes: the
    model's ``split_axes(cfg)``.
    state: from ``init_optimizer`` with the same ``zero``. Returns (global grad norm before clipping, clip scale),
    the same on every rank. With one process this is clip_grad_norm + adamw_update, the same arithmetic.
    It is ``reduce_and_clip`` followed by ``apply_update``.
    """
    grads, norm, scale = reduce_and_clip(grads, axes, comm, zero=zero, max_norm=max_norm)
    apply_update(params, grads, state, comm, zero=zero, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                 weight_decay=weight_decay)
    return norm, scale
