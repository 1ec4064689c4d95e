"""Megatron's f and g: the two collectives inside a tensor-parallel model, as forward/backward adjoint pairs.

Every rank of a tensor-parallel group holds the same activations x (B, T, C) between blocks ("replicated") and a
slice of each split weight. Entering a split region, each rank computes its part from its slice; leaving it, the
parts are summed:

    op               forward                           backward
    copy_to_tp       identity  (x replicated)          all-reduce (sum)   Megatron's f
    reduce_from_tp   all-reduce (sum)                  identity           Megatron's g

Why, seen over the whole group of R ranks: f maps one x to R copies, f(x) = (x, ..., x); g maps the R partial
results to their sum, g(y_1, ..., y_R) = sum_r y_r. Both are linear, and a linear map's backward is its transpose:
f^T(dy_1, ..., dy_R) = sum_r dy_r (the copies' gradients add up: an all-reduce), and g^T(dy) = (dy, ..., dy) (every
rank's part receives the whole gradient: on each rank the identity). With a size-1 communicator every row of the
table is the identity.
"""


def copy_to_tp(x, tp):
    """f, forward: identity (every rank already holds the same x); its backward is an all-reduce."""
    return x


def copy_to_tp_backward(dy, tp):
    """forward was y_r = x on every rank r, so dx = sum over ranks of dy_r (each rank holds its slice's share)."""
    return tp.allreduce(dy)


def reduce_from_tp(x, tp):
    """g, forward: all-reduce (sum the ranks' partial results); its backward is the identity."""
    return tp.allreduce(x)


def reduce_from_tp_backward(dy, tp):
    """forward was y = sum_r x_r, so dx_r = dy on every rank (dy is replicated)."""
    return dy
