"""Fused softmax cross-entropy: mean over targets that are not IGNORE_INDEX.

Derivation: docs/derivations/loss.md
"""

from ..backend import get_array_module

IGNORE_INDEX = -100  # PyTorch's ignore index: such targets add nothing to the loss or its count


def cross_entropy_forward(logits, targets):
    """loss = mean over valid (b, t) of logsumexp(logits[b, t]) - logits[b, t, targets[b, t]].

    logits (B, T, V) or (N, V), targets int of the same leading shape. A batch with no valid target has loss 0
    and zero gradient (rather than 0/0).
    """
    xp = get_array_module(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V)
    tgt = targets.reshape(-1)  # (N,)
    valid = tgt != IGNORE_INDEX  # (N,)
    n_valid = int(valid.sum())
    safe_tgt = xp.where(valid, tgt, 0)  # (N,) any in-range index for the ignored rows
    z_shift = z - z.max(axis=-1, keepdims=True)  # (N, V) stable: exp never sees a positive number
    e = xp.exp(z_shift)  # (N, V)
    sum_e = e.sum(axis=-1, keepdims=True)  # (N, 1)
    nll = xp.log(sum_e[:, 0]) - z_shift[xp.arange(z.shape[0]), safe_tgt]  # (N,) -log softmax at the target
    denom = max(n_valid, 1)
    loss = (nll * valid).sum() / denom
    probs = e / sum_e  # (N, V) kept for backward: softmax is the gradient's main term
    cache = (probs, safe_tgt, valid, denom, logits.shape)
    return float(loss), cache


def cross_entropy_backward(dloss, cache):
    """forward was loss = (1/n) sum_valid (logsumexp(z) - z[target]), so
    dz = dloss * (softmax(z) - onehot(target)) * valid / n."""
    probs, safe_tgt, valid, denom, shape = cache
    xp = get_array_module(probs)
    dz = probs.copy()  # (N, V)
    dz[xp.arange(dz.shape[0]), safe_tgt] -= 1.0
    dz *= (valid * (dloss / denom))[:, None].astype(dz.dtype)
    return dz.reshape(shape), {}
