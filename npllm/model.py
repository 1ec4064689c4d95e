"""The transformer: parameters, forward and backward, composed from ``npllm.layers``.

Pre-norm residual blocks (x = x + attn(norm(x)); x = x + mlp(norm(x))), a final norm, and a tied or untied
output head. All gradient accumulation happens here: the residual stream, the tied embedding, and (in the trainer)
micro-batches. Start reading at ``loss_and_grads``.

Tensor parallelism: pass a communicator ``tp`` and this rank's shards of the parameters (``param_shard_shapes``).
Attention and MLP then run on this rank's heads and hidden units, the embedding, head and loss on its slice of the
vocabulary, and the collectives of ``npllm.parallel.mappings`` join the slices (docs/parallelism.md). Without
``tp`` (one process) every collective is the identity and this is the plain single-process model.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import get_array_module
from .config import ModelConfig
from .layers.embedding import embedding_backward, embedding_forward
from .layers.norm import norm_backward, norm_forward
from .layers.rope import rope_tables
from .parallel.comm import LocalComm
from .parallel.tensor import (
    check_tp_divides, column_parallel_linear_backward, column_parallel_linear_forward, parallel_attention_backward,
    parallel_attention_forward, parallel_mlp_backward, parallel_mlp_forward, shard_array, shard_shape,
    vocab_parallel_cross_entropy_backward, vocab_parallel_cross_entropy_forward, vocab_parallel_embedding_backward,
    vocab_parallel_embedding_forward,
)


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The single source of truth for the parameters: an ordered {name: shape}, weights stored (in, out)."""
    C, F, V, hs = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * hs, cfg.n_kv_heads * hs
    norm_has_bias = cfg.norm == "layernorm"
    shapes: dict[str, tuple[int, ...]] = {"tok_emb": (V, C)}
    if cfg.pos == "learned":
        shapes["pos_emb"] = (cfg.max_seq_len, C)
    for l in range(cfg.n_layers):
        pre = f"layers.{l}."
        shapes[pre + "attn_norm.w"] = (C,)
        if norm_has_bias:
            shapes[pre + "attn_norm.b"] = (C,)
        shapes[pre + "attn.wq"] = (C, q_dim)
        shapes[pre + "attn.wk"] = (C, kv_dim)
        shapes[pre + "attn.wv"] = (C, kv_dim)
        shapes[pre + "attn.wo"] = (q_dim, C)
        if cfg.bias:
            shapes.update({pre + "attn.bq": (q_dim,), pre + "attn.bk": (kv_dim,), pre + "attn.bv": (kv_dim,),
                           pre + "attn.bo": (C,)})
        shapes[pre + "mlp_norm.w"] = (C,)
        if norm_has_bias:
            shapes[pre + "mlp_norm.b"] = (C,)
        if cfg.mlp == "swiglu":
            shapes.update({pre + "mlp.w1": (C, F), pre + "mlp.w3": (C, F), pre + "mlp.w2": (F, C)})
            if cfg.bias:
                shapes.update({pre + "mlp.b1": (F,), pre + "mlp.b3": (F,), pre + "mlp.b2": (C,)})
        else:
            shapes.update({pre + "mlp.w1": (C, F), pre + "mlp.w2": (F, C)})
            if cfg.bias:
                shapes.update({pre + "mlp.b1": (F,), pre + "mlp.b2": (C,)})
    shapes["norm.w"] = (C,)
    if norm_has_bias:
        shapes["norm.b"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (C, V)
    return shapes


def param_shard_shapes(cfg: ModelConfig, tp_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one tensor-parallel rank's shards: ``param_shapes`` with each split axis divided by tp_size
    (the rule per name is ``npllm.parallel.tensor.TP_SPLIT_AXIS``). ValueError when tp_size does not divide."""
    check_tp_divides(cfg, tp_size)
    return {name: shard_shape(name, shape, tp_size) for name, shape in param_shapes(cfg).items()}


def num_params(cfg: ModelConfig) -> int:
    """Parameter count, from the shapes alone (nothing is allocated)."""
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward = 3 x forward), counting matmuls only.

    Forward: 2 FLOPs per weight of every matmul (the embedding lookup is no matmul, the tied or untied head is),
    plus attention's q @ k^T and P @ v: 2 * 2 * NH * hs * T per layer (full T x T, the causal half not discounted).
    """
    shapes = param_shapes(cfg)
    matmul_weights = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n not in ("tok_emb", "pos_emb"))
    if cfg.tie_embeddings:
        matmul_weights += cfg.vocab_size * cfg.dim
    attention = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len
    return 3 * (2 * matmul_weights + attention)


def init_param(name: str, shape, cfg: ModelConfig, seed: int = 0) -> np.ndarray:
    """One parameter's initial value in float64 NumPy, drawn from its own stream (seed, index of name).

    Weights ~ N(0, 0.02^2); the two projections that write into the residual stream (attn.wo, mlp.w2) are scaled by
    1/sqrt(2 L) as in GPT-2; norm weights are 1; biases are 0. A parameter depends only on (seed, name), so a
    tensor-parallel rank can draw one full tensor at a time and keep its slice.
    """
    index = list(param_shapes(cfg)).index(name)
    if name.endswith("norm.w"):
        return np.ones(shape)
    if name.endswith(".b") or name.split(".")[-1].startswith("b"):
        return np.zeros(shape)
    std = 0.02
    if name.endswith("attn.wo") or name.endswith("mlp.w2"):
        std /= math.sqrt(2 * cfg.n_layers)
    return np.random.default_rng([seed, index]).normal(0.0, std, size=shape)


def init_params(cfg: ModelConfig, seed: int = 0, dtype=np.float32, xp=np, *, tp_rank: int = 0,
                tp_size: int = 1) -> dict:
    """All parameters, ordered as ``param_shapes``, as ``dtype`` arrays of the array module ``xp``.

    With tp_size > 1: rank tp_rank's shards, equal to slicing the full initial parameters (one full tensor is
    drawn at a time, on the host, and only its slice is kept).
    """
    check_tp_divides(cfg, tp_size)
    return {name: xp.asarray(shard_array(name, init_param(name, shape, cfg, seed), tp_rank, tp_size), dtype=dtype)
            for name, shape in param_shapes(cfg).items()}


def sub_params(params: dict, prefix: str) -> dict:
    """The parameters under ``prefix.`` with local names: sub_params(p, "layers.0.attn") -> {"wq": ..., ...}."""
    start = prefix + "."
    return {name[len(start):]: value for name, value in params.items() if name.startswith(start)}


def _put_grads(grads: dict, prefix: str, local: dict) -> None:
    for name, g in local.items():
        grads[f"{prefix}.{name}"] = g


def _check_shard_shapes(params: dict, cfg: ModelConfig, tp_size: int) -> None:
    """ValueError when a parameter's shape is not this rank's shard shape (e.g. full tensors given with tp > 1)."""
    for name, shape in param_shard_shapes(cfg, tp_size).items():
        if name in params and tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}; with tp={tp_size} this rank's "
                             f"shard has shape {shape} (see npllm.parallel.tensor.shard_params)")


def model_forward(params: dict, tokens, cfg: ModelConfig, past_kv=None, tp=None):
    """tokens int (B, T) -> logits (B, T, V_tp), and the cache for ``model_backward``.

    past_kv: for cached decoding, a list of L (k, v) pairs (B, NKV_tp, T_past, hs) from earlier positions; the
    tokens then sit at positions T_past ... T_past + T - 1. The cache's "present_kv" holds the keys/values to pass next.
    tp: the tensor-parallel communicator; None for one process. With tp ranks, ``params`` are this rank's shards
    and the logits are this rank's slice of the vocabulary (V_tp = V / tp); with one process V_tp = V, NKV_tp = NKV.
    """
    tp = LocalComm() if tp is None else tp
    _check_shard_shapes(params, cfg, tp.size)
    xp = get_array_module(params["tok_emb"])
    B, T = tokens.shape
    T_past = 0 if past_kv is None else past_kv[0][0].shape[2]
    if T_past + T > cfg.max_seq_len:
        raise ValueError(f"sequence length {T_past + T} exceeds max_seq_len={cfg.max_seq_len}")
    positions = np.arange(T_past, T_past + T)  # (T,)
    dtype = params["tok_emb"].dtype
    cache = {"tokens": tokens, "layers": [], "present_kv": [], "tp": tp}

    x, cache["tok_emb"] = vocab_parallel_embedding_forward(params["tok_emb"], tokens, tp)  # (B, T, C)
    rope = None
    if cfg.pos == "learned":
        pe, cache["pos_emb"] = embedding_forward({"w": params["pos_emb"]}, xp.asarray(positions))  # (T, C)
        x = x + pe  # (B, T, C), pe broadcast over the batch
    else:
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta, xp=xp, dtype=dtype)  # 2 x (T, hs)

    for l in range(cfg.n_layers):
        pre = f"layers.{l}"
        h, c_attn_norm = norm_forward(cfg.norm, sub_params(params, pre + ".attn_norm"), x, cfg.norm_eps)
        a, c_attn = parallel_attention_forward(sub_params(params, pre + ".attn"), h, cfg, tp,
                                               rope=rope, past_kv=None if past_kv is None else past_kv[l])
        x = x + a  # (B, T, C) residual
        h, c_mlp_norm = norm_forward(cfg.norm, sub_params(params, pre + ".mlp_norm"), x, cfg.norm_eps)
        m, c_mlp = parallel_mlp_forward(cfg.mlp, sub_params(params, pre + ".mlp"), h, tp)
        x = x + m  # (B, T, C) residual
        cache["layers"].append((c_attn_norm, c_attn, c_mlp_norm, c_mlp))
        cache["present_kv"].append((c_attn["k"], c_attn["v"]))  # each (B, NKV_tp, T_past + T, hs)

    x, cache["norm"] = norm_forward(cfg.norm, sub_params(params, "norm"), x, cfg.norm_eps)  # (B, T, C)
    w_head = params["tok_emb"].T if cfg.tie_embeddings else params["lm_head"]  # (C, V_tp)
    logits, cache["head"] = column_parallel_linear_forward({"w": w_head}, x, tp)  # (B, T, V_tp)
    return logits, cache


def model_backward(dlogits, cache, cfg: ModelConfig) -> dict:
    """dlogits (B, T, V_tp) -> grads, a dict with exactly the keys of the parameters (this rank's shards)."""
    tp = cache["tp"]
    grads: dict = {}
    dx, g_head = column_parallel_linear_backward(dlogits, cache["head"], tp)  # dx (B, T, C)
    dx, g_norm = norm_backward(cfg.norm, dx, cache["norm"])
    _put_grads(grads, "norm", g_norm)

    for l in reversed(range(cfg.n_layers)):
        pre = f"layers.{l}"
        c_attn_norm, c_attn, c_mlp_norm, c_mlp = cache["layers"][l]
        # forward was x_out = x_mid + mlp(norm(x_mid)): the residual passes dx through and the branch adds to it
        dh, g = parallel_mlp_backward(cfg.mlp, dx, c_mlp, tp)
        _put_grads(grads, pre + ".mlp", g)
        dx_branch, g = norm_backward(cfg.norm, dh, c_mlp_norm)
        _put_grads(grads, pre + ".mlp_norm", g)
        dx = dx + dx_branch
        # forward was x_mid = x_in + attn(norm(x_in))
        dh, g = parallel_attention_backward(dx, c_attn, tp)
        _put_grads(grads, pre + ".attn", g)
        dx_branch, g = norm_backward(cfg.norm, dh, c_attn_norm)
        _put_grads(grads, pre + ".attn_norm", g)
        dx = dx + dx_branch

    if cfg.pos == "learned":  # forward was x = tok_emb[tokens] + pos_emb[positions] (broadcast over B)
        _, g = embedding_backward(dx.sum(axis=0), cache["pos_emb"])
        grads["pos_emb"] = g["w"]
    _, g = vocab_parallel_embedding_backward(dx, cache["tok_emb"], tp)
    if cfg.tie_embeddings:  # tok_emb is used twice: as the lookup table and (transposed) as the head
        grads["tok_emb"] = g["w"] + g_head["w"].T
    else:
        grads["tok_emb"] = g["w"]
        grads["lm_head"] = g_head["w"]
    return {name: grads[name] for name in param_shapes(cfg)}  # the parameters' own order


def forward(params: dict, tokens, cfg: ModelConfig):
    """Logits (B, T, V) for tokens (B, T)."""
    logits, _ = model_forward(params, tokens, cfg)
    return logits


def loss_and_grads(params: dict, tokens, targets, cfg: ModelConfig, tp=None):
    """Mean cross-entropy of ``targets`` (B, T) under the model, and its gradient for every parameter.

    Targets equal to -100 are ignored. Returns (loss: float, grads: dict with exactly the keys of params).
    tp: the tensor-parallel communicator (None: one process); the loss is then the same on every rank of the group
    and the grads are this rank's shards. The loss is computed from each rank's vocabulary slice of the logits.
    """
    logits, cache = model_forward(params, tokens, cfg, tp=tp)  # (B, T, V_tp)
    loss, loss_cache = vocab_parallel_cross_entropy_forward(logits, targets, cache["tp"])
    dlogits, _ = vocab_parallel_cross_entropy_backward(1.0, loss_cache)  # (B, T, V_tp)
    return loss, model_backward(dlogits, cache, cfg)


def accumulate_loss_and_grads(params: dict, tokens, targets, cfg: ModelConfig, micro_batches: int = 1, tp=None):
    """``loss_and_grads`` over a batch split into ``micro_batches`` row chunks, one forward/backward at a time.

    Each chunk's mean loss (and gradient) is weighted by its share of the batch's valid targets, so the sum equals
    the mean over the whole batch (up to float rounding) while only one chunk's activations are alive at once.
    tp: the tensor-parallel communicator, passed on to ``loss_and_grads`` (None: one process).
    """
    B = tokens.shape[0]
    xp = get_array_module(params["tok_emb"])
    n_total = int((targets != -100).sum())
    if micro_batches == 1 or n_total == 0:
        return loss_and_grads(params, tokens, targets, cfg, tp=tp)
    loss, grads = 0.0, None
    for rows in np.array_split(np.arange(B), micro_batches):
        rows = xp.asarray(rows)
        n_chunk = int((targets[rows] != -100).sum())
        if n_chunk == 0:
            continue  # no target in this chunk: it adds nothing to the mean
        weight = n_chunk / n_total
        chunk_loss, chunk_grads = loss_and_grads(params, tokens[rows], targets[rows], cfg, tp=tp)
        loss += weight * chunk_loss
        if grads is None:
            grads = {name: weight * g for name, g in chunk_grads.items()}
        else:
            for name, g in chunk_grads.items():
                grads[name] += weight * g  # the micro-batch sum
        del chunk_grads  # freed before the next micro-batch's backward makes new ones: 2 sets of grads alive, not 3
    return loss, grads
