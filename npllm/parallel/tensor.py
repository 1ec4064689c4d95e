"""Tensor parallelism (Megatron-LM style): which weight is split along which axis, and the split layers.

A tensor-parallel group of ``tp`` ranks holds one model. The activations between blocks, x (B, T, C), are the
same on every rank ("replicated"); every large weight is split so that each rank computes a slice, and one
all-reduce per block puts the slices back together. ``_tp`` marks a shard: NH_tp = NH / tp, NKV_tp = NKV / tp,
F_tp = F / tp, V_tp = V / tp.

    block       weights (in, out)                        split                  output
    attention   wq, wk, wv  (C, H*hs)                    axis 1, by heads       column-parallel: each rank its heads
                wo          (NH*hs, C)                   axis 0, by heads       row-parallel: partial sums, all-reduce
                bo          (C,)                         replicated             added once, after the all-reduce
    MLP         w1, w3      (C, F)   b1, b3 (F,)         axis 1 / axis 0        column-parallel
                w2          (F, C)                       axis 0                 row-parallel, all-reduce
                b2          (C,)                         replicated             added once, after the all-reduce
    embedding   tok_emb     (V, C)                       axis 0, by vocabulary  0 for others' tokens; all-reduce
    head        lm_head     (C, V)  (or tok_emb.T)       axis 1, by vocabulary  logits (B, T, V_tp), never gathered
    norms, pos_emb, and the biases above marked replicated: full copies on every rank

Query head h reads key/value head h // G (G = NH / NKV). Rank r holds query heads r*NH_tp ... (r+1)*NH_tp - 1,
and they read key/value heads r*NKV_tp ... (r+1)*NKV_tp - 1 exactly: the same contiguous split of wq and of
wk/wv keeps every GQA group on one rank (it needs tp to divide NKV). The full story is in docs/parallelism.md.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..checks import check_int
from ..layers.embedding import embedding_backward, embedding_forward
from ..layers.loss import IGNORE_INDEX
from .mappings import reduce_from_tp, reduce_from_tp_backward

# ----------------------------------------------------------------------------------------------------------
# the layout: each parameter's split axis comes from its model's parameter spec (``split_axes(cfg)``)


def check_tp_divides(sizes: dict, tp_size: int) -> None:
    """ValueError naming every size in ``sizes`` ({"n_heads": 32, ...}: the sizes a model splits) that
    ``tp_size`` does not divide."""
    check_int("tp", tp_size)
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp_size]
    if bad:
        raise ValueError(f"tp={tp_size} does not divide {', '.join(bad)}: tensor parallelism splits "
                         f"{', '.join(sizes)} evenly across ranks")


def shard_shape(shape: tuple[int, ...], axis: int | None, tp_size: int) -> tuple[int, ...]:
    """The shape of one rank's shard of a tensor of ``shape`` split along ``axis`` (None: replicated, the full
    shape)."""
    if axis is None:
        return tuple(shape)
    if shape[axis] % tp_size:
        raise ValueError(f"shape {tuple(shape)}: axis {axis} of size {shape[axis]} does not split over tp={tp_size}")
    return tuple(n // tp_size if i == axis else n for i, n in enumerate(shape))


def shard_array(x, axis: int | None, tp_rank: int, tp_size: int):
    """Rank ``tp_rank``'s slice of the full tensor ``x`` along ``axis`` (a contiguous copy; None: a copy of all)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is not allowed; use an integer in [0, tp_size={tp_size})")
    xp = get_array_module(x)
    if axis is None:
        return xp.array(x, copy=True)
    n = shard_shape(x.shape, axis, tp_size)[axis]
    index = [slice(None)] * x.ndim
    index[axis] = slice(tp_rank * n, (tp_rank + 1) * n)
    return xp.ascontiguousarray(x[tuple(index)])


def shard_params(params: dict, axes: dict, tp_rank: int, tp_size: int) -> dict:
    """This rank's shards of full tensors keyed like the parameters (parameters, gradients, moments):
    {name: slice along axes[name]}, fresh arrays. ``axes``: ``split_axes(cfg)`` of the model."""
    return {name: shard_array(x, axes[name], tp_rank, tp_size) for name, x in params.items()}


def unshard_params(shards: list[dict], axes: dict) -> dict:
    """Full tensors from every rank's shards, listed in rank order (the inverse of shard_params)."""
    if not shards:
        raise ValueError("unshard_params needs the shards of at least one rank")
    full = {}
    for name, first in shards[0].items():
        xp = get_array_module(first)
        axis = axes[name]
        full[name] = first.copy() if axis is None else xp.concatenate([s[name] for s in shards], axis=axis)
    return full


def vocab_start(V_tp: int, tp) -> int:
    """First vocabulary id of this rank's slice: rank r holds ids r*V_tp ... (r+1)*V_tp - 1."""
    return tp.rank * V_tp


# ----------------------------------------------------------------------------------------------------------
# vocabulary-parallel embedding


def vocab_parallel_embedding_forward(w_tp, tokens, tp):
    """y[b, t] = tok_emb[tokens[b, t]] with tok_emb split by rows: w_tp (V_tp, C) holds ids start ... start+V_tp-1.

    Each rank looks up the tokens in its slice, writes 0 for the others, and the all-reduce adds the ranks'
    rows: exactly one rank holds each token, so the sum is the full lookup. tokens int (B, T) -> y (B, T, C).
    """
    xp = get_array_module(w_tp)
    V_tp = w_tp.shape[0]
    tokens = xp.asarray(tokens)  # (B, T) on the weights' device
    local = tokens - vocab_start(V_tp, tp)  # (B, T) row of each token in this rank's slice
    mine = (local >= 0) & (local < V_tp)  # (B, T) tokens this rank holds
    y_part, cache = embedding_forward({"w": w_tp}, xp.where(mine, local, 0))  # (B, T, C)
    y_part = xp.where(mine[..., None], y_part, 0)  # (B, T, C) zero rows for the other ranks' tokens
    return reduce_from_tp(y_part, tp), (cache, mine)  # (B, T, C) replicated


def vocab_parallel_embedding_backward(dy, cache, tp):
    """forward was y = sum_r (lookup in w_r, 0 where rank r lacks the token), so dw_r is the scatter-add of dy
    over the tokens rank r holds; dy (B, T, C) is replicated. Returns (None, {"w": dw_tp (V_tp, C)})."""
    emb_cache, mine = cache
    xp = get_array_module(dy)
    dy_part = reduce_from_tp_backward(dy, tp)  # (B, T, C) identity
    if tp.size > 1:  # one rank holds every token
        dy_part = xp.where(mine[..., None], dy_part, 0)  # rows of others' tokens add 0
    return embedding_backward(dy_part, emb_cache)


# ----------------------------------------------------------------------------------------------------------
# vocabulary-parallel cross-entropy: no rank ever holds the full (B, T, V) logits


def vocab_parallel_cross_entropy_forward(logits_tp, targets, tp):
    """loss = mean over valid (b, t) of logsumexp_v z[v] - z[target], with z split by vocabulary across ranks.

    logits_tp (B, T, V_tp) or (N, V_tp): this rank's slice; targets int, the same leading shape (-100 ignored).
        M      = all-reduce max over ranks of the local row max         (N, 1)  global max, for a stable exp
        S      = all-reduce sum over ranks of sum_v exp(z_tp - M)       (N, 1)  global sum of exponentials
        z_tgt  = all-reduce sum of (z[target] - M on the rank holding target, 0 elsewhere)   (N,)
        nll    = log S - z_tgt
    With one rank these are the fused cross-entropy's steps (npllm.layers.loss), operation for operation.
    Returns (loss: float, the same on every rank; cache).
    """
    xp = get_array_module(logits_tp)
    V_tp = logits_tp.shape[-1]
    z = logits_tp.reshape(-1, V_tp)  # (N, V_tp)
    tgt = xp.asarray(targets).reshape(-1)  # (N,) on the logits' device
    N = z.shape[0]
    valid = tgt != IGNORE_INDEX  # (N,)
    n_valid = int(valid.sum())
    local_tgt = tgt - vocab_start(V_tp, tp)  # (N,) the target's column in this rank's slice
    mine = valid & (local_tgt >= 0) & (local_tgt < V_tp)  # (N,) rows whose target this rank holds
    safe_tgt = xp.where(mine, local_tgt, 0)  # (N,) any in-range column for the other rows
    z_max = tp.allreduce(z.max(axis=-1, keepdims=True), op="max")  # (N, 1) max over the whole vocabulary
    z_shift = z - z_max  # (N, V_tp) exp never sees a positive number
    e = xp.exp(z_shift)  # (N, V_tp)
    sum_e = tp.allreduce(e.sum(axis=-1, keepdims=True))  # (N, 1) sum over the whole vocabulary
    z_tgt = tp.allreduce(xp.where(mine, z_shift[xp.arange(N), safe_tgt], 0))  # (N,) shifted target logit
    nll = xp.log(sum_e[:, 0]) - z_tgt  # (N,) -log softmax at the target
    denom = max(n_valid, 1)
    loss = (nll * valid).sum() / denom
    probs = e / sum_e  # (N, V_tp) this rank's slice of the softmax, kept for backward
    cache = (probs, safe_tgt, mine, valid, denom, logits_tp.shape)
    return float(loss), cache


def vocab_parallel_cross_entropy_backward(dloss, cache):
    """forward was loss = (1/n) sum_valid (logsumexp(z) - z[target]), so on each rank's slice
    dz_tp = dloss * (softmax(z)_tp - onehot(target)_tp) * valid / n; the one-hot is 1 only on the rank holding
    the target. No communication: the softmax slice already carries the global max and sum."""
    probs, safe_tgt, mine, valid, denom, shape = cache
    xp = get_array_module(probs)
    dz = probs.copy()  # (N, V_tp)
    dz[xp.arange(dz.shape[0]), safe_tgt] -= mine.astype(dz.dtype)  # subtract 1 where this rank holds the target
    dz *= (valid * (dloss / denom))[:, None].astype(dz.dtype)
    return dz.reshape(shape), {}
