"""Token and learned-position embeddings: a row gather, whose adjoint is a scatter-add.

Derivation: docs/derivations/embedding.md
"""

from ..backend import get_array_module, scatter_add


def embedding_forward(p, idx):
    """y[b, t] = w[idx[b, t]].  p = {"w": (N, C)}, idx int (B, T) or (T,)."""
    w = p["w"]
    y = w[idx]  # (B, T, C)
    cache = (idx, w.shape, w.dtype)  # keep the indices only; the rows of w are not needed for backward
    return y, cache


def embedding_backward(dy, cache):
    """forward was y[b, t] = w[idx[b, t]], so dw[n] = sum of dy[b, t] over the (b, t) with idx[b, t] == n."""
    idx, shape, dtype = cache
    xp = get_array_module(dy)
    dw = xp.zeros(shape, dtype=dtype)  # (N, C)
    scatter_add(xp, dw, idx.reshape(-1), dy.reshape(-1, shape[1]))
    return None, {"w": dw}  # integer indices have no gradient
