"""BERT (Hugging Face's BertForMaskedLM): a post-norm bidirectional encoder with the masked-language-model head.

    e      = tok_emb[tokens] + seg_emb[segments] + pos_emb[0 .. T-1]                       (B, T, C)
    x      = dropout(norm(e))                                         the embedding LayerNorm "emb_norm"
    for each layer l:                                                 post-norm, HF's BertLayer
        x  = norm(x + dropout(attention(x, key_mask) + bo))           "attn_norm" (HF: attention.output.LayerNorm)
        x  = norm(x + dropout(mlp(x) + b2))                           "mlp_norm"  (HF: output.LayerNorm)
    h      = norm(gelu(x @ head.dense.w + head.dense.b))              the MLM head's transform, "head.norm"
    logits = h @ tok_emb.T + head.bias                                the decoder, tied to the token embedding

Attention is bidirectional; key_mask (B, T) (True for a real token) hides padded keys from every query, and
dropout acts on the attention probabilities (cfg.attn_dropout) and on each sublayer's output before its residual
sum and on the embeddings (cfg.dropout), HF's four places. The FFN and the head use the exact GELU h * Phi(h).
There is no final norm after the last layer: a post-norm stack already ends with one.

The loss is the cross-entropy at the positions the MLM objective chose (npllm/mlm.py; targets = -100 elsewhere).
Training computes the head only at those positions, ~15% of them (the head acts on each position alone, so the
loss and every gradient are the same as computing all logits and ignoring the rest). All gradient sums of one
forward/backward are written here: the residual stream, tok_emb's three uses (lookup, tied decoder) and each f's
backward. Start reading at ``batch_loss_and_grads``; ``param_specs`` lists the parameters; docs/bert.md.

Tensor parallelism as in the decoder (docs/parallelism.md): heads, hidden units and the vocabulary are split
(tok_emb by rows, head.bias by vocabulary), the embeddings, norms and the head's
transform are replicated, and Megatron's f and g (copy_to_tp, reduce_from_tp) stand where they act.

Every layer runs ``ops(cfg)`` (npllm/models/ops.py: the fast paths by default, flash attention bidirectional with
the key padding mask; or the reference layers with cfg.impl = "reference"). A training forward with attention
dropout runs the reference attention, the only one that forms the probabilities it drops (ops.attention_ops).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import asnumpy, get_array_module
from ..config import ModelConfig
from ..layers.dropout import dropout_backward
from ..layers.embedding import embedding_backward, embedding_forward
from ..layers.linear import linear_backward, linear_forward
from ..layers.loss import IGNORE_INDEX
from ..layers.mlp import _gelu_erf, _gelu_erf_backward
from ..parallel.comm import LocalComm
from ..parallel.mappings import copy_to_tp, copy_to_tp_backward, reduce_from_tp, reduce_from_tp_backward
from ..parallel.tensor import (
    check_tp_divides, vocab_parallel_embedding_backward, vocab_parallel_embedding_forward, vocab_start,
)
from .decoder import _put_grads, _without, sub_params
from .ops import attention_ops, ops
from .spec import ParamSpec, shapes_of, shard_shapes_of

MLM_PROBABILITY = 0.15  # the share of positions the MLM objective predicts (npllm/mlm.py); flops_per_token uses it
INIT_STD = 0.02  # HF's initializer_range: every weight matrix and embedding ~ N(0, 0.02^2)


def check_config(cfg: ModelConfig) -> None:
    """ValueError when ``cfg`` asks for something BertForMaskedLM does not compute (this module is BERT only)."""
    if cfg.arch != "encoder":
        raise ValueError(f"arch={cfg.arch!r} is not allowed for npllm.models.bert; use 'encoder'")
    wanted = dict(norm="layernorm", mlp="gelu_erf", pos="learned", norm_first=False, bias=True, tie_embeddings=True)
    for name, value in wanted.items():
        if getattr(cfg, name) != value:
            raise ValueError(f"{name}={getattr(cfg, name)!r} is not allowed for arch='encoder' (BERT); use "
                             f"{name}={value!r}")
    if cfg.type_vocab_size < 1:
        raise ValueError(f"type_vocab_size={cfg.type_vocab_size} is not allowed for arch='encoder' (BERT); use an "
                         f"integer >= 1 (BERT's 2: segments A and B)")


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The single source of truth for BERT's parameters: name, full shape (weights (in, out)), tensor-parallel split
    axis and initial-value rule, in order (the HF names are in npllm/hf.py's table and docs/bert.md).

    Split axes: q/k/v and w1 by output columns (heads, hidden units), wo and w2 by input rows, their biases with their
    columns; tok_emb by vocabulary rows; head.bias by vocabulary; everything else replicated
    (bo and b2 are added once, after the all-reduce). Init as HF's BERT: weights and embeddings ~ N(0, 0.02^2), norm
    gains 1, biases 0 (no 1/sqrt(2L) on the residual projections).
    """
    check_config(cfg)
    C, F, V, hs = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * hs, cfg.n_kv_heads * hs

    def weight(name, shape, axis):
        return ParamSpec(name, shape, axis, "normal", INIT_STD)

    def zeros(name, size, axis):
        return ParamSpec(name, (size,), axis, "zeros")

    def norm(prefix):
        return [ParamSpec(prefix + ".w", (C,), None, "ones"), zeros(prefix + ".b", C, None)]

    specs = [weight("tok_emb", (V, C), 0), weight("pos_emb", (cfg.max_seq_len, C), None),
             weight("seg_emb", (cfg.type_vocab_size, C), None)]
    specs += norm("emb_norm")
    for l in range(cfg.n_layers):
        pre = f"layers.{l}."
        specs += [weight(pre + "attn.wq", (C, q_dim), 1), weight(pre + "attn.wk", (C, kv_dim), 1),
                  weight(pre + "attn.wv", (C, kv_dim), 1), weight(pre + "attn.wo", (q_dim, C), 0),
                  zeros(pre + "attn.bq", q_dim, 0), zeros(pre + "attn.bk", kv_dim, 0),
                  zeros(pre + "attn.bv", kv_dim, 0), zeros(pre + "attn.bo", C, None)]
        specs += norm(pre + "attn_norm")
        specs += [weight(pre + "mlp.w1", (C, F), 1), weight(pre + "mlp.w2", (F, C), 0),
                  zeros(pre + "mlp.b1", F, 0), zeros(pre + "mlp.b2", C, None)]
        specs += norm(pre + "mlp_norm")
    specs += [weight("head.dense.w", (C, C), None), zeros("head.dense.b", C, None)]
    specs += norm("head.norm")
    specs.append(zeros("head.bias", V, 0))
    return specs


def tp_split_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The sizes tensor parallelism splits evenly: heads, key/value heads, MLP width, vocabulary."""
    return dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward), counting matmuls only.

    Forward: 2 FLOPs per weight of every encoder matmul, attention's q @ k^T and P @ v (2 * 2 * NH * hs * T per
    layer, every query against every key), and the MLM head (its dense C x C and the decoder C x V) at the share
    MLM_PROBABILITY of the positions where training computes it.
    """
    shapes = shapes_of(param_specs(cfg))
    encoder = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n.startswith("layers."))
    head = cfg.dim * cfg.dim + cfg.dim * cfg.vocab_size
    attention = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len
    return int(round(3 * (2 * encoder + attention + 2 * MLM_PROBABILITY * head)))


def _check_params(params: dict, cfg: ModelConfig, tp_size: int) -> None:
    """ValueError when a parameter is missing or its shape is not this rank's shard shape."""
    check_tp_divides(tp_split_sizes(cfg), tp_size)
    for name, shape in shard_shapes_of(param_specs(cfg), tp_size).items():
        if name not in params:
            raise ValueError(f"params has no {name!r}; an encoder needs every name of param_specs(cfg)")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}; with tp={tp_size} this rank's "
                             f"shard has shape {shape} (see npllm.parallel.tensor.shard_params)")


def _inputs(batch: dict, cfg: ModelConfig, xp):
    """(tokens, segments, key_mask) of an encoder batch on the device of ``xp``, checked; segments default to 0 and
    key_mask to all True."""
    if "tokens" not in batch:
        raise ValueError(f"an encoder batch needs 'tokens' (B, T); got keys {sorted(batch)}")
    tokens = xp.asarray(batch["tokens"])  # (B, T)
    if tokens.ndim != 2 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens must be an integer (B, T) array; got {tokens.dtype} {tuple(tokens.shape)}")
    B, T = tokens.shape
    if T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T} exceeds max_seq_len={cfg.max_seq_len}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
        raise ValueError(f"token ids must be in [0, {cfg.vocab_size}); got min {int(tokens.min())} "
                         f"max {int(tokens.max())}")
    segments = batch.get("segments")
    segments = xp.zeros((B, T), dtype=np.int64) if segments is None else xp.asarray(segments)  # (B, T)
    if segments.shape != (B, T) or segments.dtype.kind not in "iu":
        raise ValueError(f"segments must be an integer (B, T) = ({B}, {T}) array; got {segments.dtype} "
                         f"{tuple(segments.shape)}")
    if segments.size and (int(segments.min()) < 0 or int(segments.max()) >= cfg.type_vocab_size):
        raise ValueError(f"segment ids must be in [0, type_vocab_size={cfg.type_vocab_size}); got min "
                         f"{int(segments.min())} max {int(segments.max())}")
    key_mask = batch.get("key_mask")
    key_mask = xp.ones((B, T), dtype=bool) if key_mask is None else xp.asarray(key_mask)  # (B, T)
    if key_mask.shape != (B, T) or key_mask.dtype != bool:
        raise ValueError(f"key_mask must be a boolean (B, T) = ({B}, {T}) array, True for a real token; got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    return tokens, segments, key_mask


def _drop(dropout, x, layer: int, site: str):
    """Dropout of a replicated activation at (layer, site) in training; (x, None) without a Dropout."""
    return (x, None) if dropout is None else dropout.apply(x, layer, site)


def model_forward(params: dict, batch: dict, cfg: ModelConfig, tp=None, dropout=None, head_rows=None):
    """An encoder batch {"tokens", "segments", "key_mask"} -> logits and the cache for ``model_backward``.

    head_rows: None computes the head at every position, logits (B, T, V_tp); or a pair of index arrays (b, t), each
    (N,), computes it only at those N positions, logits (N, V_tp) in that order (training: the masked positions).
    tp: the tensor-parallel communicator (None: one process; V_tp = V). dropout: a ``npllm.layers.dropout.Dropout``
    in training, None otherwise (rate 0 gives exactly the same numbers as None).
    """
    tp = LocalComm() if tp is None else tp
    _check_params(params, cfg, tp.size)
    xp = get_array_module(params["tok_emb"])
    tokens, segments, key_mask = _inputs(batch, cfg, xp)
    B, T = tokens.shape
    NH_tp, NKV_tp = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size  # this rank's query and key/value heads
    attn_mask = None if bool(key_mask.all()) else key_mask  # (B, T); None: no padding, the same numbers, less work
    o = ops(cfg)  # the fast paths, or the reference layers (npllm/models/ops.py)
    attention = attention_ops(cfg, dropout)  # o, or the reference under attention dropout
    cache = {"tp": tp, "B": B, "T": T, "head_rows": head_rows, "ops": o, "attention": attention}

    # embeddings: e = tok_emb[tokens] + seg_emb[segments] + pos_emb[0..T-1] (HF's order of the sums), then norm
    e, cache["tok_emb"] = vocab_parallel_embedding_forward(params["tok_emb"], tokens, tp)  # (B, T, C)
    s, cache["seg_emb"] = embedding_forward({"w": params["seg_emb"]}, segments)  # (B, T, C)
    e = e + s  # (B, T, C)
    pe, cache["pos_emb"] = embedding_forward({"w": params["pos_emb"]}, xp.arange(T))  # (T, C)
    e = e + pe  # (B, T, C), pe broadcast over the batch
    x, cache["emb_norm"] = o.norm_forward(cfg.norm, sub_params(params, "emb_norm"), e, cfg.norm_eps)  # (B, T, C)
    x, cache["drop_embed"] = _drop(dropout, x, 0, "embed")  # (B, T, C)
    attn_dropout = {} if dropout is None else dict(dropout_rate=dropout.attn_rate, row_offset=dropout.row_offset,
                                                   head_offset=tp.rank * NH_tp)  # the global heads' masks

    cache["layers"] = []
    for l in range(cfg.n_layers):
        pre = f"layers.{l}"
        attn, mlp = sub_params(params, pre + ".attn"), sub_params(params, pre + ".mlp")
        # attention sublayer: x = norm(x + drop(g(attention(f(x))) + bo))
        if dropout is not None:
            attn_dropout["dropout_key"] = dropout.key(l, "attn_probs")
        h = copy_to_tp(x, tp)  # (B, T, C) f: identity
        a, c_attn = attention.attention_forward(_without(attn, "bo"), h, NH_tp, NKV_tp, causal=False,
                                                key_mask=attn_mask, **attn_dropout)  # (B, T, C) this rank's heads
        a = reduce_from_tp(a, tp) + attn["bo"]  # (B, T, C) g: the sum over the ranks' heads; bo added once
        a, c_drop_attn = _drop(dropout, a, l, "attn_out")  # (B, T, C)
        x, c_attn_norm = o.norm_forward(cfg.norm, sub_params(params, pre + ".attn_norm"), x + a,
                                        cfg.norm_eps)  # (B, T, C) post-norm
        # feed-forward sublayer: x = norm(x + drop(g(mlp(f(x))) + b2))
        h = copy_to_tp(x, tp)  # (B, T, C) f
        m, c_mlp = o.mlp_forward(cfg.mlp, _without(mlp, "b2"), h)  # (B, T, C) this rank's hidden units
        m = reduce_from_tp(m, tp) + mlp["b2"]  # (B, T, C) g
        m, c_drop_mlp = _drop(dropout, m, l, "mlp_out")  # (B, T, C)
        x, c_mlp_norm = o.norm_forward(cfg.norm, sub_params(params, pre + ".mlp_norm"), x + m,
                                       cfg.norm_eps)  # (B, T, C)
        cache["layers"].append((c_attn, c_drop_attn, c_attn_norm, c_mlp, c_drop_mlp, c_mlp_norm))

    # the MLM head at the chosen positions: logits = norm(gelu(x @ Wd + bd)) @ tok_emb.T + head.bias
    if head_rows is not None:
        x = x[head_rows[0], head_rows[1]]  # (N, C) the gathered positions
    h, cache["head_dense"] = linear_forward(sub_params(params, "head.dense"), x)  # (..., C)
    h, cache["head_gelu"] = _gelu_erf(xp, h)  # (..., C) the exact GELU, as the FFN's
    cache["head_act"] = h
    h, cache["head_norm"] = o.norm_forward(cfg.norm, sub_params(params, "head.norm"), h, cfg.norm_eps)  # (..., C)
    h = copy_to_tp(h, tp)  # (..., C) f: each rank computes its vocabulary slice's logits
    logits, cache["head_decoder"] = linear_forward({"w": params["tok_emb"].T, "b": params["head.bias"]},
                                                   h)  # (..., V_tp), the decoder tied to tok_emb (C, V_tp)
    return logits, cache


def model_backward(dlogits, cache, cfg: ModelConfig) -> dict:
    """dlogits (B, T, V_tp), or (N, V_tp) at the forward's head_rows -> grads, a dict with exactly the keys of the
    parameters (this rank's shards), in spec order."""
    tp, o, attention = cache["tp"], cache["ops"], cache["attention"]  # the functions the forward ran
    grads: dict = {}
    # forward was logits = h @ w_dec + head.bias, with h = f(norm(gelu(x @ Wd + bd)))
    dh, g_dec = linear_backward(dlogits, cache["head_decoder"])  # (..., C) this rank's vocabulary slice's term
    grads["head.bias"] = g_dec["b"]  # (V_tp,)
    dh = copy_to_tp_backward(dh, tp)  # (..., C) f's backward: the sum over slices
    dh, g = o.norm_backward(cfg.norm, dh, cache["head_norm"])
    _put_grads(grads, "head.norm", g)
    dh = _gelu_erf_backward(dh, cache["head_gelu"], cache["head_act"])  # (..., C)
    dx, g = linear_backward(dh, cache["head_dense"])  # (..., C)
    _put_grads(grads, "head.dense", g)
    head_rows = cache["head_rows"]
    if head_rows is not None:  # forward gathered x[b, t] at distinct positions: scatter dx back, 0 elsewhere
        xp = get_array_module(dx)
        full = xp.zeros((cache["B"], cache["T"], dx.shape[-1]), dtype=dx.dtype)  # (B, T, C)
        full[head_rows[0], head_rows[1]] = dx
        dx = full

    for l in reversed(range(cfg.n_layers)):
        pre = f"layers.{l}"
        c_attn, c_drop_attn, c_attn_norm, c_mlp, c_drop_mlp, c_mlp_norm = cache["layers"][l]
        # forward was x_out = norm(z), z = x_mid + drop(g(mlp(f(x_mid))) + b2): the norm first, then both paths
        dz, g = o.norm_backward(cfg.norm, dx, c_mlp_norm)  # (B, T, C)
        _put_grads(grads, pre + ".mlp_norm", g)
        dm, _ = dropout_backward(dz, c_drop_mlp)  # (B, T, C); dz itself without dropout
        grads[pre + ".mlp.b2"] = dm.reshape(-1, dm.shape[-1]).sum(axis=0)  # (C,)
        dh, g = o.mlp_backward(cfg.mlp, reduce_from_tp_backward(dm, tp), c_mlp)  # (B, T, C); g's backward: identity
        _put_grads(grads, pre + ".mlp", g)
        dx = dz + copy_to_tp_backward(dh, tp)  # (B, T, C) the residual path + the branch (f's backward: all-reduce)
        # forward was x_mid = norm(z), z = x_in + drop(g(attention(f(x_in))) + bo)
        dz, g = o.norm_backward(cfg.norm, dx, c_attn_norm)  # (B, T, C)
        _put_grads(grads, pre + ".attn_norm", g)
        da, _ = dropout_backward(dz, c_drop_attn)  # (B, T, C)
        grads[pre + ".attn.bo"] = da.reshape(-1, da.shape[-1]).sum(axis=0)  # (C,)
        dh, g = attention.attention_backward(reduce_from_tp_backward(da, tp), c_attn)  # (B, T, C)
        _put_grads(grads, pre + ".attn", g)
        dx = dz + copy_to_tp_backward(dh, tp)  # (B, T, C)
        del dh, dm, da  # freed before the next layer's backward: only dx flows on

    # forward was x = drop(norm(e)), e = tok_emb[tokens] + seg_emb[segments] + pos_emb[0..T-1]
    dx, _ = dropout_backward(dx, cache["drop_embed"])  # (B, T, C)
    de, g = o.norm_backward(cfg.norm, dx, cache["emb_norm"])  # (B, T, C)
    _put_grads(grads, "emb_norm", g)
    _, g = embedding_backward(de.sum(axis=0), cache["pos_emb"])  # pos_emb was broadcast over the batch
    grads["pos_emb"] = g["w"]
    _, g = embedding_backward(de, cache["seg_emb"])
    grads["seg_emb"] = g["w"]
    _, g = vocab_parallel_embedding_backward(de, cache["tok_emb"], tp)
    g_lookup = g["w"]  # (V_tp, C)
    if cfg.pad_id is not None:  # HF's padding_idx: the lookup never trains the padding token's row
        row = cfg.pad_id - vocab_start(g_lookup.shape[0], tp)
        if 0 <= row < g_lookup.shape[0]:
            g_lookup[row] = 0.0
    grads["tok_emb"] = g_lookup + g_dec["w"].T  # (V_tp, C): the lookup table's and (transposed) the decoder's
    return {spec.name: grads[spec.name] for spec in param_specs(cfg)}  # the parameters' own order


def masked_positions(targets):
    """(b, t): the index arrays, each (N,), of the positions with a target (not IGNORE_INDEX), in row-major order."""
    xp = get_array_module(targets)
    return xp.nonzero(targets != IGNORE_INDEX)


def _targets(batch: dict, xp):
    if "targets" not in batch:
        raise ValueError(f"an encoder batch needs 'targets' (B, T), IGNORE_INDEX={IGNORE_INDEX} where nothing is "
                         f"predicted; got keys {sorted(batch)}")
    targets = xp.asarray(batch["targets"])  # (B, T)
    if targets.shape != tuple(np.shape(batch["tokens"])):
        raise ValueError(f"targets {tuple(targets.shape)} must have the tokens' shape "
                         f"{tuple(np.shape(batch['tokens']))}")
    return targets


def batch_loss_and_grads(params: dict, batch: dict, cfg: ModelConfig, tp=None, dropout=None):
    """The mean cross-entropy over the batch's masked positions (targets != -100) and its gradient for every
    parameter: (loss: float, grads with exactly the keys of params). The head runs at those positions only.

    batch: {"tokens", "segments", "key_mask", "targets"}, each (B, T). tp: the tensor-parallel communicator (None:
    one process); the loss is then the same on every rank and the grads are this rank's shards. dropout: a
    ``npllm.layers.dropout.Dropout`` in training (row_offset: this batch's first global row), None for none.
    """
    xp = get_array_module(params["tok_emb"])
    targets = _targets(batch, xp)
    rows = masked_positions(targets)  # (N,) each
    logits, cache = model_forward(params, batch, cfg, tp=tp, dropout=dropout, head_rows=rows)  # (N, V_tp)
    o = cache["ops"]
    loss, loss_cache = o.training_loss_forward(logits, targets[rows], cache["tp"])  # fast: in the logits' memory
    dlogits, _ = o.cross_entropy_backward(1.0, loss_cache)  # (N, V_tp)
    return loss, model_backward(dlogits, cache, cfg)


def batch_loss(params: dict, batch: dict, cfg: ModelConfig, tp=None) -> float:
    """The mean MLM cross-entropy of a batch, forward only, no dropout (validation)."""
    xp = get_array_module(params["tok_emb"])
    targets = _targets(batch, xp)
    rows = masked_positions(targets)  # (N,) each
    logits, cache = model_forward(params, batch, cfg, tp=tp, head_rows=rows)  # (N, V_tp)
    loss, _ = cache["ops"].cross_entropy_forward(logits, targets[rows], cache["tp"])
    return loss


def mlm_logits(params: dict, batch: dict, cfg: ModelConfig):
    """The MLM head's logits (B, T, V) at every position of an encoder batch (one process, no dropout)."""
    logits, _ = model_forward(params, batch, cfg)  # (B, T, V)
    return logits


def fill_mask(params: dict, cfg: ModelConfig, tokens, segments=None, key_mask=None, top_k: int = 5) -> list:
    """The model's top_k guesses at every [MASK] (cfg.mask_id) of ``tokens`` (B, T) (or one row (T,)).

    segments, key_mask: as in a batch (default: all 0, all True). Returns, for each row, a list over its [MASK]
    positions in order of (position, [(token id, probability), ...]), the guesses by falling probability
    (softmax over the whole vocabulary).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k!r} is not allowed; use an integer in [1, vocab_size={cfg.vocab_size}]")
    xp = get_array_module(params["tok_emb"])
    tokens = xp.asarray(tokens)
    one_row = tokens.ndim == 1
    batch = {"tokens": tokens[None] if one_row else tokens}
    for name, value in (("segments", segments), ("key_mask", key_mask)):
        if value is not None:
            batch[name] = xp.asarray(value)[None] if one_row else xp.asarray(value)
    rows = xp.nonzero(batch["tokens"] == cfg.mask_id)  # (N,) each: the [MASK] positions
    logits, _ = model_forward(params, batch, cfg, head_rows=rows)  # (N, V)
    z = asnumpy(logits).astype(np.float64)  # (N, V) on the host
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs = probs / probs.sum(axis=-1, keepdims=True)  # (N, V) softmax
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # (N, top_k), ties by token id
    out = [[] for _ in range(batch["tokens"].shape[0])]
    for n, (b, t) in enumerate(zip(asnumpy(rows[0]).tolist(), asnumpy(rows[1]).tolist())):
        out[b].append((t, [(int(v), float(probs[n, v])) for v in best[n]]))
    return out[0] if one_row else out
