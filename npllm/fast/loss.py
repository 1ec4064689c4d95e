"""Softmax cross-entropy, vocabulary-parallel, chunk by chunk of rows: the loss of npllm.parallel.tensor
(vocab_parallel_cross_entropy_forward / _backward: same names, signatures, loss and dlogits) without a second
(N, V_tp) array.

The reference keeps the softmax probabilities for backward, a second (N, V_tp) array beside the logits, and makes
three more on the way (z - max, exp, the quotient). Here the forward walks over chunks of rows (npllm.fast.pool, all
cores) and keeps only per-row numbers:

    per chunk, on each rank:   m   = max_v z_tp[n, v]                       (N,)  this rank's row max
                               s   = sum_v exp(z_tp[n, v] - m)              (N,)  computed in a chunk-sized scratch
                               zt  = z_tp[n, target] (on the rank that holds the target)
    across ranks (3 all-reduces, the reference's three):
                               M   = max over ranks of m                    (N,)  the global row max
                               S   = sum over ranks of s * exp(m - M)       (N,)  the global sum of exp(z - M)
                               z_tgt = sum over ranks of (zt - M where the rank holds the target, else 0)
    nll = log S - z_tgt,  loss = mean of nll over valid rows;  M and S (together the row logsumexp M + log S) are
    what backward needs

One pass over the logits: the max and the exponentials of a chunk are taken while its rows are in cache, and the
rescaling by exp(m - M) (the online softmax's) lets every rank use its own max first. With one rank exp(m - M) is 1
exactly and every number above is the reference's: the loss has the reference's bits.

backward: dz = dloss * (exp(z - M) / S - onehot(target)) * valid / n, chunk by chunk into the returned array, in the
reference's operations (with one rank, dlogits has the reference's bits too).

What is kept and the memory, for logits of N x V_tp elements (measured in tests/test_fast_elementwise.py with
tracemalloc, and for the profile's 2048 x 8192 float32 by benchmarks/bench_elementwise.py):
  in_place=False (default): the cache holds a reference to the logits and M, S (N,) each. The forward
      allocates one chunk (~CHUNK_ELEMENTS values) per thread and no (N, V_tp) array; the backward allocates exactly
      one, the gradient it returns. The logits stay alive until backward, so 2 (N, V_tp) arrays at the peak (logits
      and dlogits); the reference: 4 in its forward, 3 in its backward.
  in_place=True: the caller gives the logits away. The forward writes exp(z - m) over them (the chunk scratch is
      the logits' own rows); the backward multiplies by exp(m - M) where a rank's max is not the global one (never
      with one rank), divides by S (softmax), subtracts the one-hot and scales, in place, and returns that same
      array. One
      (N, V_tp) array from forward to backward; the backward can run once (a second call raises ValueError).
"""

from __future__ import annotations

from ..backend import get_array_module
from ..layers.loss import IGNORE_INDEX
from ..parallel.comm import LocalComm
from ..parallel.tensor import vocab_start
from .pool import map_rows


def vocab_parallel_cross_entropy_forward(logits_tp, targets, tp, *, in_place=False):
    """loss = mean over valid (b, t) of logsumexp_v z[v] - z[target], with z split by vocabulary across ranks.

    logits_tp (B, T, V_tp) or (N, V_tp): this rank's slice; targets int, the same leading shape (-100 ignored).
    in_place: the forward may overwrite logits_tp (and the backward returns dlogits in its memory). Returns
    (loss: float, the same on every rank; cache).
    """
    xp = get_array_module(logits_tp)
    V_tp = logits_tp.shape[-1]
    z = logits_tp.reshape(-1, V_tp)  # (N, V_tp) a view of contiguous logits (a copy otherwise)
    tgt = xp.asarray(targets).reshape(-1)  # (N,) on the logits' device
    N = z.shape[0]
    if tgt.shape[0] != N:
        raise ValueError(f"targets {tuple(xp.asarray(targets).shape)} do not match logits "
                         f"{tuple(logits_tp.shape)}: one target per row of logits")
    valid = tgt != IGNORE_INDEX  # (N,)
    n_valid = int(valid.sum())
    local_tgt = tgt - vocab_start(V_tp, tp)  # (N,) the target's column in this rank's slice
    mine = valid & (local_tgt >= 0) & (local_tgt < V_tp)  # (N,) rows whose target this rank holds
    safe_tgt = xp.where(mine, local_tgt, 0)  # (N,) any in-range column for the other rows
    m = xp.empty(N, dtype=z.dtype)  # (N,) this rank's row max
    s = xp.empty(N, dtype=z.dtype)  # (N,) this rank's sum of exp(z - m)
    zt = z[xp.arange(N), safe_tgt]  # (N,) the target logit (meaningful where mine)

    def rows(r):
        zr = z[r]  # (n, V_tp)
        mr = zr.max(axis=-1, keepdims=True)  # (n, 1)
        e = zr if in_place else xp.empty_like(zr)  # (n, V_tp) exp(z - m): over the logits or in a scratch
        xp.subtract(zr, mr, out=e)  # z - m: exp never sees a positive number
        xp.exp(e, out=e)
        m[r] = mr[:, 0]
        s[r] = e.sum(axis=-1)  # sum_v exp(z - m)

    map_rows(rows, N, V_tp, xp=xp)
    z_max = tp.allreduce(m, op="max")  # (N,) M: the max over the whole vocabulary
    sum_e = tp.allreduce(s * xp.exp(m - z_max))  # (N,) S = sum over the whole vocabulary of exp(z - M)
    z_tgt = tp.allreduce(xp.where(mine, zt - z_max, 0))  # (N,) z[target] - M
    nll = xp.log(sum_e) - z_tgt  # (N,) -log softmax at the target
    denom = max(n_valid, 1)
    loss = (nll * valid).sum() / denom
    # keep the logits (a reference) with M and S: softmax(z) = exp(z - M) / S; or, in place, exp(z - m) written over
    # the logits with S and, where some row's m < M (tp > 1), exp(m - M): softmax(z) = exp(z - m) exp(m - M) / S
    rescale = None
    if in_place and not bool((m == z_max).all()):
        rescale = xp.exp(m - z_max)  # (N,) <= 1; 0 where this rank's entries are negligible next to another's
    cache = {"z": z, "z_max": z_max, "sum_e": sum_e, "rescale": rescale, "safe_tgt": safe_tgt, "mine": mine,
             "valid": valid, "denom": denom, "shape": logits_tp.shape, "in_place": in_place, "used": False}
    return float(loss), cache


def vocab_parallel_cross_entropy_backward(dloss, cache):
    """forward was loss = (1/n) sum_valid (logsumexp(z) - z[target]), so on each rank's slice
    dz_tp = dloss * (softmax(z)_tp - onehot(target)_tp) * valid / n with softmax(z) = exp(z - M) / S; the one-hot is 1
    only on the rank holding the target. No communication. In place (see the forward): dz is written over the
    forward's exp(z - m), softmax = exp(z - m) exp(m - M) / S, and this can run once per forward."""
    z, z_max, sum_e, rescale, in_place = cache["z"], cache["z_max"], cache["sum_e"], cache["rescale"], cache["in_place"]
    if in_place and cache["used"]:
        raise ValueError("this in-place cross-entropy cache was used by an earlier backward (it holds dlogits now); "
                         "run the forward again, or use in_place=False to call the backward more than once")
    cache["used"] = True
    xp = get_array_module(z)
    N, V_tp = z.shape
    scale = (cache["valid"] * (dloss / cache["denom"])).astype(z.dtype)  # (N,) dloss / n on valid rows, else 0
    safe_tgt, mine = cache["safe_tgt"], cache["mine"]
    one_hot = mine.astype(z.dtype)  # (N,) 1 where this rank holds the target
    dz = z if in_place else xp.empty_like(z)  # (N, V_tp)

    def rows(r):
        dzr = dz[r]  # (n, V_tp)
        if not in_place:
            xp.subtract(z[r], z_max[r, None], out=dzr)  # z - M
            xp.exp(dzr, out=dzr)  # exp(z - M)
        elif rescale is not None:
            dzr *= rescale[r, None]  # exp(z - m) (there from the forward) * exp(m - M) = exp(z - M)
        dzr /= sum_e[r, None]  # softmax(z)
        idx = xp.arange(dzr.shape[0])  # (n,)
        dzr[idx, safe_tgt[r]] -= one_hot[r]  # softmax - onehot
        dzr *= scale[r, None]  # * dloss * valid / n

    map_rows(rows, N, V_tp, xp=xp)
    return dz.reshape(cache["shape"]), {}


def cross_entropy_forward(logits, targets, *, in_place=False):
    """npllm.layers.loss.cross_entropy_forward (one process: the whole vocabulary here), computed as above."""
    return vocab_parallel_cross_entropy_forward(logits, targets, LocalComm(), in_place=in_place)


def cross_entropy_backward(dloss, cache):
    """forward was loss = (1/n) sum_valid (logsumexp(z) - z[target]), so
    dz = dloss * (softmax(z) - onehot(target)) * valid / n."""
    return vocab_parallel_cross_entropy_backward(dloss, cache)
