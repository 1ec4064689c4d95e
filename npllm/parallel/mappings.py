"""Megatron's f and g: the collectives inside a tensor-parallel model, as forward/backward adjoint pairs.

Every rank of a tensor-parallel group holds the same activations x (B, T, C) between blocks ("replicated") and a
slice of each split weight. Entering a split region, each rank computes its part from its slice; leaving it, the
parts are summed. Each collective's backward is the transpose of its forward (a linear map):

    op               forward                           backward
    copy_to_tp       identity  (x replicated)          all-reduce (sum)   Megatron's f
    reduce_from_tp   all-reduce (sum)                  identity           Megatron's g
    gather_from_tp   all-gather along the last axis    keep own slice
    scatter_to_tp    keep own slice of the last axis   all-gather

Why copy_to_tp's backward sums: the replicated x feeds every rank's slice, y_r = x @ W_r, so the loss depends on x
through all of them, dL/dx = sum_r dL/dy_r @ W_r^T; each rank holds one term. With a size-1 communicator every
row of the table is the identity.
"""


def copy_to_tp(x, tp):
    """forward: identity (every rank already holds the same x); backward: all-reduce."""
    return x


def copy_to_tp_backward(dy, tp):
    """forward was y = x on every rank, so dx = sum over ranks of dy (each rank's dy is its slice's share)."""
    return tp.allreduce(dy)


def reduce_from_tp(x, tp):
    """forward: all-reduce (sum the ranks' partial results); backward: identity."""
    return tp.allreduce(x)


def reduce_from_tp_backward(dy, tp):
    """forward was y = sum_r x_r, so dx_r = dy on every rank (dy is replicated)."""
    return dy


def gather_from_tp(x, tp):
    """forward: all-gather along the last axis, (..., n) -> (..., tp * n); backward: keep own slice."""
    return tp.allgather(x, axis=-1)


def gather_from_tp_backward(dy, tp):
    """forward was y = concat_r x_r along the last axis, so dx_r = dy[..., r*n : (r+1)*n]."""
    return split_last_axis(dy, tp)


def scatter_to_tp(x, tp):
    """forward: keep own slice of the last axis, (..., tp * n) -> (..., n); backward: all-gather."""
    return split_last_axis(x, tp)


def scatter_to_tp_backward(dy, tp):
    """forward was y = x[..., r*n : (r+1)*n] on rank r, so dx = concat_r dy_r (zero nowhere: the slices tile x)."""
    return tp.allgather(dy, axis=-1)


def split_last_axis(x, tp):
    """This rank's contiguous slice of the last axis (a copy): x[..., r*n : (r+1)*n] with n = x.shape[-1] / tp."""
    width = x.shape[-1]
    if width % tp.size:
        raise ValueError(f"last axis of size {width} does not split over tp={tp.size} ranks")
    n = width // tp.size
    return x[..., tp.rank * n:(tp.rank + 1) * n].copy()  # (..., n)
