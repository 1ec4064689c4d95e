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
from ..config import ModelConfig
from ..layers.attention import attention_backward, attention_forward
from ..layers.embedding import embedding_backward, embedding_forward
from ..layers.linear import linear_backward, linear_forward
from ..layers.loss import IGNORE_INDEX
from ..layers.mlp import mlp_backward, mlp_forward
from .mappings import copy_to_tp, copy_to_tp_backward, reduce_from_tp, reduce_from_tp_backward

# ----------------------------------------------------------------------------------------------------------
# the layout: which axis each parameter splits along (None: replicated on every rank)

# Keyed by the name without its "layers.{l}." prefix. Every parameter of param_shapes has a rule here.
TP_SPLIT_AXIS: dict[str, int | None] = {
    "tok_emb": 0,  # (V, C): rows by vocabulary
    "pos_emb": None,  # (T_max, C)
    "attn_norm.w": None, "attn_norm.b": None,  # (C,)
    "attn.wq": 1, "attn.wk": 1, "attn.wv": 1,  # (C, NH*hs), (C, NKV*hs): columns by heads
    "attn.bq": 0, "attn.bk": 0, "attn.bv": 0,  # (NH*hs,), (NKV*hs,): follow their weight's columns
    "attn.wo": 0,  # (NH*hs, C): rows by heads
    "attn.bo": None,  # (C,): added once after the reduce
    "mlp_norm.w": None, "mlp_norm.b": None,  # (C,)
    "mlp.w1": 1, "mlp.w3": 1,  # (C, F): columns
    "mlp.b1": 0, "mlp.b3": 0,  # (F,)
    "mlp.w2": 0,  # (F, C): rows
    "mlp.b2": None,  # (C,): added once after the reduce
    "norm.w": None, "norm.b": None,  # (C,) final norm
    "lm_head": 1,  # (C, V): columns by vocabulary
}

# The config sizes that tensor parallelism splits; tp must divide each.
TP_SPLIT_SIZES = ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size")


def tp_split_axis(name: str) -> int | None:
    """The axis parameter ``name`` is split along across tensor-parallel ranks, or None if replicated."""
    parts = name.split(".")
    key = ".".join(parts[2:]) if parts[0] == "layers" else name  # drop "layers.{l}."
    if key not in TP_SPLIT_AXIS:
        raise ValueError(f"no tensor-parallel rule for parameter {name!r}; known: {', '.join(TP_SPLIT_AXIS)}")
    return TP_SPLIT_AXIS[key]


def is_split(name: str) -> bool:
    """True when each tensor-parallel rank holds a different slice of ``name`` (False: a full copy)."""
    return tp_split_axis(name) is not None


def check_tp_divides(cfg: ModelConfig, tp_size: int) -> None:
    """ValueError naming every size of ``cfg`` that ``tp_size`` does not divide."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp={tp_size!r} must be a positive integer")
    bad = [f"{name}={getattr(cfg, name)}" for name in TP_SPLIT_SIZES if getattr(cfg, name) % tp_size]
    if bad:
        raise ValueError(f"tp={tp_size} does not divide {', '.join(bad)}: tensor parallelism splits "
                         f"{', '.join(TP_SPLIT_SIZES)} evenly across ranks")


def shard_shape(name: str, shape: tuple[int, ...], tp_size: int) -> tuple[int, ...]:
    """The shape of one rank's shard of parameter ``name`` whose full shape is ``shape``."""
    axis = tp_split_axis(name)
    if axis is None:
        return tuple(shape)
    if shape[axis] % tp_size:
        raise ValueError(f"{name} {tuple(shape)}: axis {axis} of size {shape[axis]} does not split over tp={tp_size}")
    return tuple(n // tp_size if i == axis else n for i, n in enumerate(shape))


def shard_array(name: str, x, tp_rank: int, tp_size: int):
    """Rank ``tp_rank``'s slice of the full parameter ``x`` (a contiguous copy; replicated ones are copied whole)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} must be in [0, tp_size={tp_size})")
    xp = get_array_module(x)
    axis = tp_split_axis(name)
    if axis is None:
        return xp.array(x, copy=True)
    n = shard_shape(name, x.shape, tp_size)[axis]
    index = [slice(None)] * x.ndim
    index[axis] = slice(tp_rank * n, (tp_rank + 1) * n)
    return xp.ascontiguousarray(x[tuple(index)])


def shard_params(params: dict, cfg: ModelConfig, tp_rank: int, tp_size: int) -> dict:
    """This rank's shards of full parameters (or gradients, or moments): {name: slice}, fresh arrays."""
    check_tp_divides(cfg, tp_size)
    return {name: shard_array(name, x, tp_rank, tp_size) for name, x in params.items()}


def unshard_params(shards: list[dict]) -> dict:
    """Full parameters from every rank's shards, listed in rank order (the inverse of shard_params)."""
    if not shards:
        raise ValueError("unshard_params needs the shards of at least one rank")
    full = {}
    for name, first in shards[0].items():
        axis = tp_split_axis(name)
        xp = get_array_module(first)
        full[name] = first.copy() if axis is None else xp.concatenate([s[name] for s in shards], axis=axis)
    return full


def gather_params(shards: dict, tp) -> dict:
    """The full tensors on every rank of the tensor-parallel communicator ``tp``, from each rank's shards.

    Works for any dict keyed like the parameters: parameters, gradients, AdamW moments. Split tensors are
    all-gathered along their split axis; replicated ones are returned as they are.
    """
    return {name: x if tp_split_axis(name) is None else tp.allgather(x, axis=tp_split_axis(name))
            for name, x in shards.items()}


def vocab_start(V_tp: int, tp) -> int:
    """First vocabulary id of this rank's slice: rank r holds ids r*V_tp ... (r+1)*V_tp - 1."""
    return tp.rank * V_tp


# ----------------------------------------------------------------------------------------------------------
# column-parallel linear (the output head)


def column_parallel_linear_forward(p, x, tp):
    """y_tp = x @ w_tp (+ b_tp), w split by columns: x (..., Cin) replicated, w_tp (Cin, Cout_tp) -> (..., Cout_tp).

    The output stays split (the vocabulary-parallel loss consumes it as it is)."""
    h = copy_to_tp(x, tp)  # (..., Cin) forward identity
    return linear_forward(p, h)  # (..., Cout_tp), cache


def column_parallel_linear_backward(dy, cache, tp):
    """forward was y_r = x @ w_r on every rank r, so dx = sum_r dy_r @ w_r.T (an all-reduce); dw_r = x.T @ dy_r."""
    dh, grads = linear_backward(dy, cache)  # dh (..., Cin) this rank's term
    return copy_to_tp_backward(dh, tp), grads  # (..., Cin) summed over ranks


# ----------------------------------------------------------------------------------------------------------
# split blocks: column-parallel in, row-parallel out (attention and MLP)


def _split_block_forward(block_forward, p, x, tp, out_bias: str):
    """y = all-reduce(block(x) on this rank's slice) + p[out_bias].

    The output bias is left out of the block and added once after the sum; inside, every rank would add it."""
    local = {name: w for name, w in p.items() if name != out_bias}
    h = copy_to_tp(x, tp)  # (B, T, C) forward identity
    y_part, cache = block_forward(local, h)  # (B, T, C) this rank's partial sum
    y = reduce_from_tp(y_part, tp)  # (B, T, C) summed over ranks
    if out_bias in p:
        y = y + p[out_bias]  # (B, T, C)
    return y, {"block": cache, "out_bias": out_bias if out_bias in p else None, "order": list(p)}


def _split_block_backward(block_backward, dy, cache, tp):
    """forward was y = sum_r block_r(x) + b, so db = sum of dy over rows, every block_r gets dy, and
    dx = sum_r dx_r (copy_to_tp's backward)."""
    dy_part = reduce_from_tp_backward(dy, tp)  # (B, T, C) identity
    dh, grads = block_backward(dy_part, cache["block"])  # dh (B, T, C) this rank's term
    if cache["out_bias"] is not None:
        grads[cache["out_bias"]] = dy.reshape(-1, dy.shape[-1]).sum(axis=0)  # (C,)
    dx = copy_to_tp_backward(dh, tp)  # (B, T, C)
    return dx, {name: grads[name] for name in cache["order"]}


def parallel_attention_forward(p, x, cfg: ModelConfig, tp, rope=None, past_kv=None):
    """Causal attention over this rank's NH_tp query heads and NKV_tp key/value heads, summed over ranks.

    p: this rank's shards {"wq": (C, NH_tp*hs), "wk", "wv": (C, NKV_tp*hs), "wo": (NH_tp*hs, C)} and the biases.
    past_kv: this rank's cached (k, v), each (B, NKV_tp, T_past, hs). Returns y (B, T, C) replicated, and the
    cache; cache["k"], cache["v"] are this rank's keys/values (past included) for the next decoding step.
    """
    n_heads, n_kv_heads = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size  # NH_tp, NKV_tp

    def block(local, h):
        return attention_forward(local, h, n_heads, n_kv_heads, rope=rope, past_kv=past_kv)

    y, cache = _split_block_forward(block, p, x, tp, "bo")
    cache["k"], cache["v"] = cache["block"]["k"], cache["block"]["v"]  # (B, NKV_tp, T_past+T, hs)
    return y, cache


def parallel_attention_backward(dy, cache, tp):
    """Backward of parallel_attention_forward: dx (B, T, C) replicated, grads of this rank's shards."""
    return _split_block_backward(attention_backward, dy, cache, tp)


def parallel_mlp_forward(kind: str, p, x, tp):
    """The MLP over this rank's F_tp hidden units, summed over ranks.

    p: this rank's shards {"w1", "w3": (C, F_tp), "w2": (F_tp, C)} (and "b1", "b3" (F_tp,), "b2" (C,)).
    """
    return _split_block_forward(lambda local, h: mlp_forward(kind, local, h), p, x, tp, "b2")


def parallel_mlp_backward(kind: str, dy, cache, tp):
    return _split_block_backward(lambda d, c: mlp_backward(kind, d, c), dy, cache, tp)


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
    return embedding_backward(xp.where(mine[..., None], dy_part, 0), emb_cache)  # rows of others' tokens add 0


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
