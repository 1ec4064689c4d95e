"""The decoder-only transformer (GPT-2, LLaMA): parameters, forward and backward, composed from ``npllm.layers``.

Pre-norm residual blocks (x = x + attn(norm(x)); x = x + mlp(norm(x))), a final norm, and a tied or untied
output head. All gradient accumulation of one forward/backward happens here: the residual stream and the tied
embedding (micro-batches are summed in ``npllm.models.accumulate_loss_and_grads``). Start reading at
``loss_and_grads``; ``param_specs`` lists the parameters.

Tensor parallelism: pass a communicator ``tp`` and this rank's shards of the parameters
(``npllm.models.param_shard_shapes``). Attention and MLP then run on this rank's heads and hidden units, the
embedding, head and loss on its slice of the vocabulary, and Megatron's f and g (``copy_to_tp``,
``reduce_from_tp`` of ``npllm.parallel.mappings``) stand in ``model_forward`` where they act
(docs/parallelism.md). Without ``tp`` (one process) they are identities and this is the plain single-process
model, the same lines.

Activation recomputation (cfg.recompute, ``--recompute=none|attention|block``): training's forward may keep less of
each block (``keep_for_backward``) and the backward then redoes the dropped part right before that block's backward
(``rebuild_for_backward``), bit for bit the same gradients for less memory (docs/model.md).
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from ..checks import check_choice
from ..config import RECOMPUTE, ModelConfig
from ..layers.dropout import dropout_backward
from ..layers.embedding import embedding_backward, embedding_forward
from ..layers.linear import linear_backward, linear_forward
from ..layers.rope import rope_tables
from .ops import REFERENCE, ops
from .spec import ParamSpec, shapes_of, shard_shapes_of
from ..parallel.comm import LocalComm
from ..parallel.mappings import copy_to_tp, copy_to_tp_backward, reduce_from_tp, reduce_from_tp_backward
from ..parallel.tensor import (
    check_tp_divides,
    vocab_parallel_embedding_backward, vocab_parallel_embedding_forward,
)


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The single source of truth for the parameters: name, full shape (weights (in, out)), tensor-parallel split
    axis and initial-value rule of each, in order.

    Split axes (docs/parallelism.md): q/k/v and w1/w3 by output columns (heads, hidden units), wo and w2 by input
    rows, their biases with their columns; tok_emb by vocabulary rows and lm_head by vocabulary columns; bo, b2, the
    norms and pos_emb replicated (bo and b2 are added once, after the all-reduce).
    Init: weights ~ N(0, 0.02^2); the two projections that write into the residual stream (attn.wo, mlp.w2) have
    std 0.02 / sqrt(2 L) as in GPT-2; norm gains 1, biases 0.
    """
    C, F, V, hs, L = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim, cfg.n_layers
    q_dim, kv_dim = cfg.n_heads * hs, cfg.n_kv_heads * hs
    std, residual_std = 0.02, 0.02 / math.sqrt(2 * L)

    def weight(name, shape, axis, std=std):
        return ParamSpec(name, shape, axis, "normal", std)

    def norm(prefix):
        out = [ParamSpec(prefix + ".w", (C,), None, "ones")]
        if cfg.norm == "layernorm":
            out.append(ParamSpec(prefix + ".b", (C,), None, "zeros"))
        return out

    def bias(name, size, axis):
        return [ParamSpec(name, (size,), axis, "zeros")] if cfg.bias else []

    specs = [weight("tok_emb", (V, C), 0)]
    if cfg.pos == "learned":
        specs.append(weight("pos_emb", (cfg.max_seq_len, C), None))
    for l in range(L):
        pre = f"layers.{l}."
        specs += norm(pre + "attn_norm")
        specs += [weight(pre + "attn.wq", (C, q_dim), 1), weight(pre + "attn.wk", (C, kv_dim), 1),
                  weight(pre + "attn.wv", (C, kv_dim), 1), weight(pre + "attn.wo", (q_dim, C), 0, residual_std)]
        specs += (bias(pre + "attn.bq", q_dim, 0) + bias(pre + "attn.bk", kv_dim, 0) + bias(pre + "attn.bv", kv_dim, 0)
                  + bias(pre + "attn.bo", C, None))
        specs += norm(pre + "mlp_norm")
        if cfg.mlp == "swiglu":
            specs += [weight(pre + "mlp.w1", (C, F), 1), weight(pre + "mlp.w3", (C, F), 1),
                      weight(pre + "mlp.w2", (F, C), 0, residual_std)]
            specs += bias(pre + "mlp.b1", F, 0) + bias(pre + "mlp.b3", F, 0) + bias(pre + "mlp.b2", C, None)
        else:
            specs += [weight(pre + "mlp.w1", (C, F), 1), weight(pre + "mlp.w2", (F, C), 0, residual_std)]
            specs += bias(pre + "mlp.b1", F, 0) + bias(pre + "mlp.b2", C, None)
    specs += norm("norm")
    if not cfg.tie_embeddings:
        specs.append(weight("lm_head", (C, V), 1))
    return specs


def tp_split_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The sizes tensor parallelism splits evenly: heads, key/value heads, MLP width, vocabulary."""
    return dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward), counting matmuls only.

    Forward: 2 FLOPs per weight of every matmul (the embedding lookup is no matmul, the tied or untied head is),
    plus attention's q @ k^T and P @ v: 2 * 2 * NH * hs * T per layer (full T x T, the causal half not discounted).
    """
    shapes = shapes_of(param_specs(cfg))
    matmul_weights = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n not in ("tok_emb", "pos_emb"))
    if cfg.tie_embeddings:
        matmul_weights += cfg.vocab_size * cfg.dim
    attention = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len
    return 3 * (2 * matmul_weights + attention)


def sub_params(params: dict, prefix: str) -> dict:
    """The parameters under ``prefix.`` with local names: sub_params(p, "layers.0.attn") -> {"wq": ..., ...}."""
    start = prefix + "."
    return {name[len(start):]: value for name, value in params.items() if name.startswith(start)}


def _put_grads(grads: dict, prefix: str, local: dict) -> None:
    for name, g in local.items():
        grads[f"{prefix}.{name}"] = g


def _without(p: dict, name: str) -> dict:
    """p without the entry ``name``: the output bias of a split block, added once after the sum over ranks."""
    return {key: value for key, value in p.items() if key != name}


def _check_shard_shapes(params: dict, cfg: ModelConfig, tp_size: int) -> None:
    """ValueError when a parameter's shape is not this rank's shard shape (e.g. full tensors given with tp > 1)."""
    check_tp_divides(tp_split_sizes(cfg), tp_size)
    for name, shape in shard_shapes_of(param_specs(cfg), tp_size).items():
        if name in params and tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}; with tp={tp_size} this rank's "
                             f"shard has shape {shape} (see npllm.parallel.tensor.shard_params)")


def _drop(dropout, x, layer: int, site: str):
    """Dropout of a (B, T, C) activation at (layer, site) in training; (x, None) without a Dropout."""
    return (x, None) if dropout is None else dropout.apply(x, layer, site)


class Shared(NamedTuple):
    """What every block of one forward reads besides its parameters and its input x: so also all that the backward
    needs to redo a block exactly (activation recomputation, below)."""

    cfg: ModelConfig
    tp: object  # the tensor-parallel communicator (LocalComm for one process)
    o: SimpleNamespace  # the layer functions, ops(cfg)
    attention: SimpleNamespace  # the attention's: o's, or the reference's under attention dropout
    rope: tuple | None  # (cos, sin) (T, hs) of the positions (RoPE), or None (learned positions)
    dropout: object  # this micro-batch's Dropout (its keys and row offset), or None


class BlockCache(NamedTuple):
    """One block's caches for its backward, in forward order."""

    attn_norm: tuple
    attn: dict
    drop_attn: tuple | None
    mlp_norm: tuple
    mlp: tuple
    drop_mlp: tuple | None


def attention_inputs(params: dict, l: int, s: Shared) -> tuple[dict, dict]:
    """Layer l's attention parameters (the output bias left out: added after the sum over ranks) and the keywords of
    its attention_forward call: this rank's heads, the RoPE tables, and under attention dropout (layer l,
    "attn_probs")'s masks of the global heads."""
    cfg, tp, dropout = s.cfg, s.tp, s.dropout
    NH_tp, NKV_tp = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size  # this rank's query and key/value heads
    keywords = dict(n_heads=NH_tp, n_kv_heads=NKV_tp, rope=s.rope)
    if dropout is not None and dropout.attn_rate:
        keywords.update(dropout_rate=dropout.attn_rate, dropout_key=dropout.key(l, "attn_probs"),
                        row_offset=dropout.row_offset, head_offset=tp.rank * NH_tp)
    return _without(sub_params(params, f"layers.{l}.attn"), "bo"), keywords


def block_forward(params: dict, l: int, x, s: Shared, past_kv=None):
    """Block l: x (B, T, C) -> x (B, T, C), and its BlockCache. past_kv: this layer's (k, v) in cached decoding."""
    cfg, tp, o, pre = s.cfg, s.tp, s.o, f"layers.{l}"
    bo, b2 = params.get(pre + ".attn.bo"), params.get(pre + ".mlp.b2")
    # attention block: x = x + drop(g(attention(f(norm(x)))) + bo)
    h, c_attn_norm = o.norm_forward(cfg.norm, sub_params(params, pre + ".attn_norm"), x, cfg.norm_eps)  # (B, T, C)
    h = copy_to_tp(h, tp)  # (B, T, C) f: identity
    attn, keywords = attention_inputs(params, l, s)
    a, c_attn = s.attention.attention_forward(attn, h, past_kv=past_kv, **keywords)  # (B, T, C) this rank's heads
    a = reduce_from_tp(a, tp)  # (B, T, C) g: the sum over the ranks' heads
    if bo is not None:
        a = a + bo  # (B, T, C) added once, after the sum
    a, c_drop_attn = _drop(s.dropout, a, l, "attn_out")  # (B, T, C)
    x = x + a  # (B, T, C) residual
    # MLP block: x = x + drop(g(mlp(f(norm(x)))) + b2)
    h, c_mlp_norm = o.norm_forward(cfg.norm, sub_params(params, pre + ".mlp_norm"), x, cfg.norm_eps)  # (B, T, C)
    h = copy_to_tp(h, tp)  # (B, T, C) f
    m, c_mlp = o.mlp_forward(cfg.mlp, _without(sub_params(params, pre + ".mlp"), "b2"), h)  # (B, T, C) this rank's
    m = reduce_from_tp(m, tp)  # (B, T, C) g
    if b2 is not None:
        m = m + b2  # (B, T, C)
    m, c_drop_mlp = _drop(s.dropout, m, l, "mlp_out")  # (B, T, C)
    x = x + m  # (B, T, C) residual
    return x, BlockCache(c_attn_norm, c_attn, c_drop_attn, c_mlp_norm, c_mlp, c_drop_mlp)


def block_backward(dx, c: BlockCache, l: int, s: Shared, grads: dict):
    """dx (B, T, C) at block l's output -> dx at its input; the block's parameter gradients go into ``grads``."""
    cfg, tp, o, pre = s.cfg, s.tp, s.o, f"layers.{l}"
    # forward was x_out = x_mid + drop(g(mlp(f(norm(x_mid)))) + b2): the residual passes dx on, the branch adds
    dm, _ = dropout_backward(dx, c.drop_mlp)  # (B, T, C); dx itself without dropout
    if cfg.bias:
        grads[pre + ".mlp.b2"] = dm.reshape(-1, dm.shape[-1]).sum(axis=0)  # (C,)
    dh, g = o.mlp_backward(cfg.mlp, reduce_from_tp_backward(dm, tp), c.mlp)  # (B, T, C); g's backward: identity
    _put_grads(grads, pre + ".mlp", g)
    dh, g = o.norm_backward(cfg.norm, copy_to_tp_backward(dh, tp), c.mlp_norm)  # f's backward: all-reduce
    _put_grads(grads, pre + ".mlp_norm", g)
    dx = dx + dh  # (B, T, C)
    # forward was x_mid = x_in + drop(g(attention(f(norm(x_in)))) + bo)
    da, _ = dropout_backward(dx, c.drop_attn)  # (B, T, C)
    if cfg.bias:
        grads[pre + ".attn.bo"] = da.reshape(-1, da.shape[-1]).sum(axis=0)  # (C,)
    dh, g = s.attention.attention_backward(reduce_from_tp_backward(da, tp), c.attn)  # (B, T, C)
    _put_grads(grads, pre + ".attn", g)
    dh, g = o.norm_backward(cfg.norm, copy_to_tp_backward(dh, tp), c.attn_norm)
    _put_grads(grads, pre + ".attn_norm", g)
    return dx + dh  # (B, T, C)


# Activation recomputation (cfg.recompute, --recompute): what model_forward keeps of each block for the backward.
#   "none"       the BlockCache
#   "attention"  the BlockCache with the attention's cache (q, k, v, o and P or the row logsumexp) swapped for its
#                input h (B, T, C): Redo("attention", h)
#   "block"      only the block's input x (B, T, C): Redo("block", x)
# Right before the block's backward, model_backward rebuilds the dropped caches with the very calls the forward made
# (same inputs, dropout keys, RoPE tables and collectives), so loss and gradients are bit for bit those of "none";
# the rebuilt caches are freed once the block's backward is done. The price: one more attention forward per layer
# ("attention"), or one more forward of the whole block, its two all-reduces included ("block").


class Redo(NamedTuple):
    what: str  # "attention" or "block"
    x: object  # the input it is redone from: the attention's h or the block's x (B, T, C)


def keep_for_backward(c: BlockCache, x_in, recompute: str):
    """What the forward keeps of a block whose input was x_in (B, T, C) and whose caches are c."""
    if recompute == "block":
        return Redo("block", x_in)
    if recompute == "attention":
        return c._replace(attn=Redo("attention", c.attn["x"]))  # both attentions keep their input as "x"
    return c


def rebuild_for_backward(kept, params: dict, l: int, s: Shared) -> BlockCache:
    """Block l's BlockCache from what keep_for_backward kept: recomputed where it was dropped."""
    if isinstance(kept, Redo):  # "block"
        _, c = block_forward(params, l, kept.x, s)
        return c
    if isinstance(kept.attn, Redo):  # "attention"
        attn, keywords = attention_inputs(params, l, s)
        _, c_attn = s.attention.attention_forward(attn, kept.attn.x, **keywords)
        return kept._replace(attn=c_attn)
    return kept


def model_forward(params: dict, tokens, cfg: ModelConfig, past_kv=None, tp=None, dropout=None, recompute="none"):
    """tokens int (B, T) -> logits (B, T, V_tp), and the cache for ``model_backward``.

    past_kv: for cached decoding, a list of L (k, v) pairs (B, NKV_tp, T_past, hs) from earlier positions; the
    tokens then sit at positions T_past ... T_past + T - 1. The cache's "present_kv" holds the keys/values to pass next.
    tp: the tensor-parallel communicator; None for one process. With tp ranks, ``params`` are this rank's shards
    and the logits are this rank's slice of the vocabulary (V_tp = V / tp); with one process V_tp = V, NKV_tp = NKV.
    Each split block reads h = copy_to_tp(h) (f) in and y = reduce_from_tp(y) (g) out: identities with one process.
    dropout: a ``npllm.layers.dropout.Dropout`` in training (on the embeddings, the attention probabilities and each
    block's output branches, GPT-2's three places), None otherwise.
    recompute: what each block keeps for the backward (above): training passes cfg.recompute; "attention" and
    "block" keep no keys/values for decoding (present_kv stays empty) and take no past_kv.
    """
    check_choice("recompute", recompute, RECOMPUTE)
    if recompute != "none" and past_kv is not None:
        raise ValueError(f"recompute={recompute!r} is for training; cached decoding (past_kv) takes 'none'")
    tp = LocalComm() if tp is None else tp
    _check_shard_shapes(params, cfg, tp.size)
    xp = get_array_module(params["tok_emb"])
    B, T = tokens.shape
    T_past = 0 if past_kv is None else past_kv[0][0].shape[2]
    if T_past + T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T_past + T} exceeds max_seq_len={cfg.max_seq_len}")
    positions = np.arange(T_past, T_past + T)  # (T,)
    dtype = params["tok_emb"].dtype
    o = ops(cfg)  # the fast paths, or the reference layers (npllm/models/ops.py)
    attention = REFERENCE if dropout is not None and dropout.attn_rate else o  # attention dropout: reference only
    cache = {"tokens": tokens, "layers": [], "present_kv": [], "tp": tp, "params": params}

    x, cache["tok_emb"] = vocab_parallel_embedding_forward(params["tok_emb"], tokens, tp)  # (B, T, C)
    rope = None
    if cfg.pos == "learned":
        pe, cache["pos_emb"] = embedding_forward({"w": params["pos_emb"]}, xp.asarray(positions))  # (T, C)
        x = x + pe  # (B, T, C), pe broadcast over the batch
    else:
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, xp=xp, dtype=dtype)  # 2 x (T, hs)
    x, cache["drop_embed"] = _drop(dropout, x, 0, "embed")  # (B, T, C)
    cache["shared"] = s = Shared(cfg, tp, o, attention, rope, dropout)

    for l in range(cfg.n_layers):
        x_in = x
        x, c = block_forward(params, l, x, s, past_kv=None if past_kv is None else past_kv[l])  # (B, T, C)
        cache["layers"].append(keep_for_backward(c, x_in, recompute))
        if recompute == "none":
            cache["present_kv"].append((c.attn["k"], c.attn["v"]))  # each (B, NKV_tp, T_past + T, hs)
        del c, x_in  # under recompute the dropped caches are freed here, before the next block

    x, cache["norm"] = o.norm_forward(cfg.norm, sub_params(params, "norm"), x, cfg.norm_eps)  # (B, T, C)
    w_head = params["tok_emb"].T if cfg.tie_embeddings else params["lm_head"]  # (C, V_tp)
    h = copy_to_tp(x, tp)  # (B, T, C) f: each rank computes its vocabulary slice's logits
    logits, cache["head"] = linear_forward({"w": w_head}, h)  # (B, T, V_tp), never gathered
    return logits, cache


def model_backward(dlogits, cache, cfg: ModelConfig) -> dict:
    """dlogits (B, T, V_tp) -> grads, a dict with exactly the keys of the parameters (this rank's shards).

    Every sum of gradient contributions is written out here: the residual stream (dx = dx + dx_branch), the
    tied embedding (lookup + head), and each f's backward (an all-reduce over the tp ranks)."""
    tp, s = cache["tp"], cache["shared"]
    grads: dict = {}
    dh, g_head = linear_backward(dlogits, cache["head"])  # dh (B, T, C) this rank's vocabulary slice's term
    dx = copy_to_tp_backward(dh, tp)  # (B, T, C) f's backward: the sum over slices
    dx, g_norm = s.o.norm_backward(cfg.norm, dx, cache["norm"])
    _put_grads(grads, "norm", g_norm)

    for l in reversed(range(cfg.n_layers)):
        c = rebuild_for_backward(cache["layers"][l], cache["params"], l, s)  # recomputed under cfg.recompute
        dx = block_backward(dx, c, l, s, grads)  # (B, T, C)
        del c  # a rebuilt block's caches are freed before the next block is rebuilt

    dx, _ = dropout_backward(dx, cache["drop_embed"])  # forward was x = drop(tok_emb[tokens] + pos_emb[positions])
    if cfg.pos == "learned":  # forward was x = tok_emb[tokens] + pos_emb[positions] (broadcast over B)
        _, g = embedding_backward(dx.sum(axis=0), cache["pos_emb"])
        grads["pos_emb"] = g["w"]
    _, g = vocab_parallel_embedding_backward(dx, cache["tok_emb"], tp)
    if cfg.tie_embeddings:  # tok_emb is used twice: as the lookup table and (transposed) as the head
        grads["tok_emb"] = g["w"] + g_head["w"].T
    else:
        grads["tok_emb"] = g["w"]
        grads["lm_head"] = g_head["w"]
    return {spec.name: grads[spec.name] for spec in param_specs(cfg)}  # the parameters' own order


def forward(params: dict, tokens, cfg: ModelConfig):
    """Logits (B, T, V) for tokens (B, T)."""
    logits, _ = model_forward(params, tokens, cfg)
    return logits


def loss_and_grads(params: dict, tokens, targets, cfg: ModelConfig, tp=None, dropout=None):
    """Mean cross-entropy of ``targets`` (B, T) under the model, and its gradient for every parameter.

    Targets equal to IGNORE_INDEX (-100) are ignored. Returns (loss: float, grads: dict with exactly the keys of
    params).
    tp: the tensor-parallel communicator (None: one process); the loss is then the same on every rank of the group
    and the grads are this rank's shards. The loss is computed from each rank's vocabulary slice of the logits.
    """
    logits, cache = model_forward(params, tokens, cfg, tp=tp, dropout=dropout, recompute=cfg.recompute)  # (B, T, V_tp)
    o = ops(cfg)
    loss, loss_cache = o.training_loss_forward(logits, targets, cache["tp"])  # the fast one reuses the logits' memory
    dlogits, _ = o.cross_entropy_backward(1.0, loss_cache)  # (B, T, V_tp)
    return loss, model_backward(dlogits, cache, cfg)


def batch_loss_and_grads(params: dict, batch: dict, cfg: ModelConfig, tp=None, dropout=None):
    """``loss_and_grads`` of a batch {"tokens": (B, T), "targets": (B, T)} (the form every architecture takes)."""
    return loss_and_grads(params, batch["tokens"], batch["targets"], cfg, tp=tp, dropout=dropout)


def batch_loss(params: dict, batch: dict, cfg: ModelConfig, tp=None) -> float:
    """The mean loss of a batch, forward only (validation)."""
    logits, cache = model_forward(params, batch["tokens"], cfg, tp=tp)  # (B, T, V_tp)
    loss, _ = ops(cfg).cross_entropy_forward(logits, batch["targets"], cache["tp"])
    return loss
