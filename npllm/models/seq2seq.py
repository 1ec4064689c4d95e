"""The encoder-decoder Transformer (Vaswani et al. 2017) with exactly torch.nn.Transformer's layer math: parameters,
forward and backward composed from the layers of ``ops(cfg)`` (npllm/fast or npllm/layers), teacher-forced
cross-entropy, and cached greedy / beam decoding.

    x      = drop(emb[src] * sqrt(C) + PE[0:S])                       the source, (B, S, C)
    x      = encoder layer l (x), l = 0 .. L-1                         bidirectional self-attention, FFN
    memory = enc_norm(x)                                               (B, S, C)
    y      = drop(emb[tokens] * sqrt(C) + PE[0:T])                     the decoder input, bos + target[:-1], (B, T, C)
    y      = decoder layer l (y, memory), l = 0 .. L_dec-1             causal self-attention, cross-attention, FFN
    logits = dec_norm(y) @ W_head                                      (B, T, V); W_head = tok_emb.T when tied
    loss   = mean cross-entropy over the target tokens (IGNORE_INDEX at padding)

A layer is torch.nn.TransformerEncoderLayer / TransformerDecoderLayer: each sub-layer ``branch`` (self-attention,
cross-attention, FFN) sits in a residual block, post-norm by default and pre-norm with cfg.norm_first:

    post-norm (norm_first=False):  x = norm(x + drop(branch(x)))
    pre-norm  (norm_first=True):   x = x + drop(branch(norm(x)))

with torch's dropouts: on the attention probabilities (cfg.attn_dropout), on each branch's output, and inside the
FFN after the activation (cfg.dropout). ``enc_norm`` and ``dec_norm`` are the final LayerNorms nn.Transformer always
applies (also after a post-norm stack). torch.nn.Transformer has no embeddings; the embedding, sqrt(C) scale,
sinusoidal positions and the dropout on their sum are those of PyTorch's "Language Translation with nn.Transformer"
tutorial (TokenEmbedding, PositionalEncoding) and of the paper (section 3.4, 3.5, 5.4). docs/seq2seq.md has the
parameter names, the cross-attention backward and how decoding caches.

Batches are dicts (npllm/pairs.py makes them): src (B, S) int, src_mask (B, S) bool (True: a real token), tokens
(B, T) int (the decoder input), tgt_mask (B, T) bool, targets (B, T) int (IGNORE_INDEX at padding). A padded source
position is never a key (encoder self-attention, cross-attention); a padded target position is never a key of the
decoder's self-attention and never a target.

Every layer runs ``ops(cfg)`` (npllm/models/ops.py): the fast paths by default (flash self-attention, causal or
with the source's key mask, flash cross-attention, the fused FFN with its hidden dropout, norms and loss), the
reference layers with cfg.impl = "reference". A training forward with attention dropout runs the reference
attentions, the only ones that form the probabilities they drop (ops.attention_ops); each cache names what ran.

Tensor parallelism as in decoder.py: heads, hidden units and the vocabulary are split, each branch reads
h = copy_to_tp(h) (f) and writes reduce_from_tp(.) (g) + its output bias. The memory is replicated and feeds every
rank's cross-attention keys/values through one f (memory_tp = copy_to_tp(memory)), whose backward all-reduces the
decoder layers' summed dmemory once. Dropout draws every mask at global rows, heads and hidden units.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import asnumpy, get_array_module
from ..checks import check_int, check_number
from ..config import ModelConfig
from ..layers.dropout import dropout_backward
from ..layers.linear import linear_backward, linear_forward
from ..layers.positions import sinusoidal_table
from ..parallel.comm import LocalComm
from ..parallel.mappings import (
    copy_to_tp,
    copy_to_tp_backward,
    reduce_from_tp,
    reduce_from_tp_backward,
)
from ..parallel.tensor import (
    check_tp_divides,
    vocab_parallel_embedding_backward,
    vocab_parallel_embedding_forward,
)
from ..sampling import log_softmax
from .decoder import _put_grads, _without, sub_params
from .ops import attention_ops, ops
from .spec import ParamSpec, shapes_of, shard_shapes_of

# ----------------------------------------------------------------------------------------------------------
# parameters


def embedding_names(cfg: ModelConfig) -> tuple[str, str]:
    """(source table, target table): ("tok_emb", "tok_emb") when shared, else ("src_emb", "tgt_emb")."""
    return ("tok_emb", "tok_emb") if cfg.share_embeddings else ("src_emb", "tgt_emb")


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """The parameters in order: name, full shape (weights (in, out)), tensor-parallel split axis, initial value.

        tok_emb (V, C)                       share_embeddings: source and target (and the head when tied)
        src_emb, tgt_emb (V, C)              otherwise
        enc.{l}.attn_norm.w/.b, enc.{l}.attn.wq/wk/wv/wo (+ bq/bk/bv/bo), enc.{l}.mlp_norm.w/.b,
        enc.{l}.mlp.w1/w2 (+ b1/b2)                                                  l < n_layers
        enc_norm.w/.b
        dec.{l}.self_norm, dec.{l}.self.*, dec.{l}.cross_norm, dec.{l}.cross.*, dec.{l}.mlp_norm, dec.{l}.mlp.*
                                                                                    l < n_decoder_layers
        dec_norm.w/.b
        lm_head (C, V)                       untied only; tied logits use the target table transposed

    In torch's names: attn_norm, mlp_norm = norm1, norm2 of an encoder layer; self_norm, cross_norm, mlp_norm =
    norm1, norm2, norm3 of a decoder layer; attn / self = self_attn, cross = multihead_attn with in_proj_weight =
    [wq | wk | wv].T and out_proj.weight = wo.T; mlp.w1 = linear1.weight.T, mlp.w2 = linear2.weight.T.
    Split axes as the decoder's (q/k/v and w1 by columns, wo and w2 by rows, embeddings by vocabulary rows, lm_head
    by vocabulary columns; the norms, bo and b2 replicated).
    Init, torch's nn.Transformer: xavier_uniform_ on every matrix ("uniform" with std sqrt(2 / (fan_in + fan_out)),
    q/k/v with the fans of torch's one (3C, C) in_proj_weight), biases 0, norm gains 1; embeddings N(0, 1/C) when
    scaled by sqrt(C) (fairseq's choice: the scaled rows have unit variance), else N(0, 1) (nn.Embedding's).
    """
    C, F, V, hs = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim
    q_dim, kv_dim = cfg.n_heads * hs, cfg.n_kv_heads * hs

    def xavier(name, shape, axis, fan_in=None, fan_out=None):
        fan_in, fan_out = fan_in or shape[0], fan_out or shape[1]
        return ParamSpec(name, shape, axis, "uniform", math.sqrt(2.0 / (fan_in + fan_out)))

    def zeros(name, size, axis):
        return [ParamSpec(name, (size,), axis, "zeros")] if cfg.bias else []

    def norm(prefix):
        out = [ParamSpec(prefix + ".w", (C,), None, "ones")]
        if cfg.norm == "layernorm":
            out.append(ParamSpec(prefix + ".b", (C,), None, "zeros"))
        return out

    def attention(pre):
        in_proj_rows = q_dim + 2 * kv_dim  # torch's in_proj_weight is one (3C, C) matrix: its fans
        return ([xavier(pre + ".wq", (C, q_dim), 1, C, in_proj_rows),
                 xavier(pre + ".wk", (C, kv_dim), 1, C, in_proj_rows),
                 xavier(pre + ".wv", (C, kv_dim), 1, C, in_proj_rows), xavier(pre + ".wo", (q_dim, C), 0)]
                + zeros(pre + ".bq", q_dim, 0) + zeros(pre + ".bk", kv_dim, 0) + zeros(pre + ".bv", kv_dim, 0)
                + zeros(pre + ".bo", C, None))

    def mlp(pre):
        return ([xavier(pre + ".w1", (C, F), 1), xavier(pre + ".w2", (F, C), 0)]
                + zeros(pre + ".b1", F, 0) + zeros(pre + ".b2", C, None))

    emb_std = C ** -0.5 if cfg.scale_embeddings else 1.0
    src_name, tgt_name = embedding_names(cfg)
    specs = [ParamSpec(name, (V, C), 0, "normal", emb_std) for name in dict.fromkeys((src_name, tgt_name))]
    for l in range(cfg.n_layers):
        pre = f"enc.{l}"
        specs += norm(pre + ".attn_norm") + attention(pre + ".attn") + norm(pre + ".mlp_norm") + mlp(pre + ".mlp")
    specs += norm("enc_norm")
    for l in range(cfg.n_decoder_layers):
        pre = f"dec.{l}"
        specs += (norm(pre + ".self_norm") + attention(pre + ".self") + norm(pre + ".cross_norm")
                  + attention(pre + ".cross") + norm(pre + ".mlp_norm") + mlp(pre + ".mlp"))
    specs += norm("dec_norm")
    if not cfg.tie_embeddings:
        specs.append(xavier("lm_head", (C, V), 1))
    return specs


def tp_split_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The sizes tensor parallelism splits evenly: heads, key/value heads, FFN width, vocabulary."""
    return dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward = 3 x forward, matmuls only) per position of a batch whose sources and
    targets are both seq_len long: one training step costs B * seq_len times this.

    Forward: 2 FLOPs per weight of every matmul per position (the encoder's at each source position, the decoder's
    and the head's at each target position, the cross-attention's k/v projections at each source position: with
    S = T all count once per position), plus q @ k^T and P @ v, 2 * 2 * NH * hs * seq_len for each attention: one
    per encoder layer, two per decoder layer (self and cross; the causal half is not discounted).
    """
    shapes = shapes_of(param_specs(cfg))
    matmul_weights = sum(math.prod(s) for n, s in shapes.items() if len(s) == 2 and n.startswith(("enc.", "dec.")))
    matmul_weights += cfg.vocab_size * cfg.dim  # the head, tied or not
    attention = (cfg.n_layers + 2 * cfg.n_decoder_layers) * 2 * 2 * cfg.n_heads * cfg.head_dim * seq_len
    return 3 * (2 * matmul_weights + attention)


def _check_shard_shapes(params: dict, cfg: ModelConfig, tp_size: int) -> None:
    """ValueError when a parameter's shape is not this rank's shard shape (e.g. full tensors given with tp > 1)."""
    check_tp_divides(tp_split_sizes(cfg), tp_size)
    for name, shape in shard_shapes_of(param_specs(cfg), tp_size).items():
        if name not in params:
            raise ValueError(f"params has no {name!r}; an encoder-decoder of this config needs every name of "
                             f"npllm.models.seq2seq.param_specs")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"params[{name!r}] has shape {tuple(params[name].shape)}; with tp={tp_size} this rank's "
                             f"shard has shape {shape} (see npllm.parallel.tensor.shard_params)")


# ----------------------------------------------------------------------------------------------------------
# the pieces: embeddings, one residual sub-layer, and the three branches


def _drop(dropout, x, layer: int, site: str):
    """Dropout of a (B, T, C) activation at (layer, site) in training; (x, None) without a Dropout."""
    return (x, None) if dropout is None else dropout.apply(x, layer, site)


def _embed_forward(table, ids, cfg: ModelConfig, tp, dropout, site: str, T_past: int = 0):
    """x = drop(table[ids] * sqrt(C) + PE[T_past : T_past + T]) (no sqrt(C) without cfg.scale_embeddings)."""
    xp = get_array_module(table)
    T = ids.shape[1]
    e, c_emb = vocab_parallel_embedding_forward(table, ids, tp)  # (B, T, C)
    scale = math.sqrt(cfg.dim) if cfg.scale_embeddings else 1.0
    pe = sinusoidal_table(np.arange(T_past, T_past + T), cfg.dim, xp=xp, dtype=table.dtype)  # (T, C)
    x = e * scale + pe  # (B, T, C), pe broadcast over the batch
    x, c_drop = _drop(dropout, x, 0, site)  # (B, T, C)
    return x, (c_emb, scale, c_drop)


def _embed_backward(dx, cache, tp):
    """forward was x = drop(e * scale + PE), e = table[ids]: d table = scatter-add of drop'(dx) * scale (PE is
    fixed). Returns this rank's (V_tp, C) gradient of the table."""
    c_emb, scale, c_drop = cache
    de, _ = dropout_backward(dx, c_drop)  # (B, T, C)
    _, g = vocab_parallel_embedding_backward(de * scale, c_emb, tp)
    return g["w"]  # (V_tp, C)


def _residual_forward(cfg: ModelConfig, o, p_norm: dict, x, branch, dropout, layer: int, site: str):
    """One sub-layer around ``branch`` (h -> (b, cache)), as torch's layers (o: the ops the norm runs):
    post-norm  y = norm(x + drop(branch(x)));   norm_first  y = x + drop(branch(norm(x)))."""
    if cfg.norm_first:
        h, c_norm = o.norm_forward(cfg.norm, p_norm, x, cfg.norm_eps)  # (B, T, C)
        b, c_branch = branch(h)  # (B, T, C)
        b, c_drop = _drop(dropout, b, layer, site)  # (B, T, C)
        y = x + b  # (B, T, C)
    else:
        b, c_branch = branch(x)  # (B, T, C)
        b, c_drop = _drop(dropout, b, layer, site)  # (B, T, C)
        y, c_norm = o.norm_forward(cfg.norm, p_norm, x + b, cfg.norm_eps)  # (B, T, C)
    return y, (c_norm, c_branch, c_drop)


def _residual_backward(cfg: ModelConfig, o, dy, cache, branch_backward):
    """Backward of _residual_forward: dy (B, T, C) -> (dx, norm grads, what branch_backward(db, c_branch) returned
    after its dh: its grads, and dmemory for cross-attention)."""
    c_norm, c_branch, c_drop = cache
    if cfg.norm_first:  # forward was y = x + drop(b), b = branch(h), h = norm(x)
        db, _ = dropout_backward(dy, c_drop)  # (B, T, C)
        dh, *rest = branch_backward(db, c_branch)  # (B, T, C)
        dx_branch, g_norm = o.norm_backward(cfg.norm, dh, c_norm)  # (B, T, C)
        dx = dy + dx_branch  # (B, T, C): the residual path plus the branch's
    else:  # forward was y = norm(z), z = x + drop(b), b = branch(x)
        dz, g_norm = o.norm_backward(cfg.norm, dy, c_norm)  # (B, T, C): every path from y to x passes the norm
        db, _ = dropout_backward(dz, c_drop)  # (B, T, C)
        dx_branch, *rest = branch_backward(db, c_branch)  # (B, T, C)
        dx = dz + dx_branch  # (B, T, C)
    return dx, g_norm, *rest


def _bias_grad(db):
    return db.reshape(-1, db.shape[-1]).sum(axis=0)  # (C,)


def _self_attention_branch(attention, p: dict, NH_tp: int, NKV_tp: int, tp, **kwargs):
    """h -> g(attention(f(h))) + bo, this rank's heads (attention: the ops it runs; kwargs: causal, key_mask,
    past_kv, dropout)."""
    def forward(h):
        a, c = attention.attention_forward(_without(p, "bo"), copy_to_tp(h, tp), NH_tp, NKV_tp, **kwargs)  # (B, T, C)
        a = reduce_from_tp(a, tp)  # (B, T, C) g: the sum over the ranks' heads
        return (a + p["bo"] if "bo" in p else a), c  # bo added once, after the sum
    return forward


def _self_attention_backward(attention, tp, bias: bool):
    def backward(da, c):
        """forward was a = g(attention(f(h))) + bo."""
        dh, g = attention.attention_backward(reduce_from_tp_backward(da, tp), c)  # (B, T, C) this rank's heads' part
        if bias:
            g["bo"] = _bias_grad(da)
        return copy_to_tp_backward(dh, tp), g  # f's backward: the sum over ranks
    return backward


def _cross_attention_branch(attention, p: dict, memory_tp, NH_tp: int, NKV_tp: int, tp, **kwargs):
    """h -> g(cross_attention(f(h), memory_tp)) + bo (kwargs: memory_mask, memory_kv, dropout)."""
    def forward(h):
        a, c = attention.cross_attention_forward(_without(p, "bo"), copy_to_tp(h, tp), memory_tp, NH_tp, NKV_tp,
                                                 **kwargs)  # (B, T, C) this rank's heads
        a = reduce_from_tp(a, tp)  # (B, T, C) g
        return (a + p["bo"] if "bo" in p else a), c
    return forward


def _cross_attention_backward(attention, tp, bias: bool):
    def backward(da, c):
        """forward was a = g(cross_attention(f(h), memory_tp)) + bo: the queries' path leads to h, the keys' and
        values' to memory_tp (this rank's heads' part of dmemory; the model sums it over layers and ranks)."""
        dh, dmemory_part, g = attention.cross_attention_backward(reduce_from_tp_backward(da, tp),
                                                                 c)  # (B, T, C), (B, S, C)
        if bias:
            g["bo"] = _bias_grad(da)
        return copy_to_tp_backward(dh, tp), g, dmemory_part
    return backward


def _mlp_branch(cfg: ModelConfig, o, p: dict, tp, **hidden_dropout):
    """h -> g(mlp(f(h))) + b2, this rank's hidden units (hidden_dropout: dropout inside, after the activation)."""
    def forward(h):
        m, c = o.mlp_forward(cfg.mlp, _without(p, "b2"), copy_to_tp(h, tp), **hidden_dropout)  # (B, T, C)
        m = reduce_from_tp(m, tp)  # (B, T, C) g
        return (m + p["b2"] if "b2" in p else m), c
    return forward


def _mlp_backward(cfg: ModelConfig, o, tp):
    def backward(dm, c):
        """forward was m = g(mlp(f(h))) + b2."""
        dh, g = o.mlp_backward(cfg.mlp, reduce_from_tp_backward(dm, tp), c)  # (B, T, C)
        if cfg.bias:
            g["b2"] = _bias_grad(dm)
        return copy_to_tp_backward(dh, tp), g
    return backward


def _attn_dropout(dropout, layer: int, site: str, head_offset: int) -> dict:
    """The attention core's dropout arguments at (layer, site): global rows and heads."""
    if dropout is None:
        return {}
    return dict(dropout_rate=dropout.attn_rate, dropout_key=dropout.key(layer, site), row_offset=dropout.row_offset,
                head_offset=head_offset)


def _hidden_dropout(dropout, layer: int, site: str, col_offset: int) -> dict:
    """The FFN's hidden-activation dropout arguments at (layer, site): global rows and hidden units."""
    if dropout is None:
        return {}
    return dict(dropout_rate=dropout.rate, dropout_key=dropout.key(layer, site), row_offset=dropout.row_offset,
                col_offset=col_offset)


# ----------------------------------------------------------------------------------------------------------
# the encoder and the decoder


def _check_ids(name: str, ids, cfg: ModelConfig):
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a (B, T) integer array; got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[1] > cfg.max_seq_len:
        raise ValueError(f"{name} has {ids.shape[1]} positions; max_seq_len={cfg.max_seq_len} is the most")


def _check_mask(name: str, mask, shape):
    if mask is not None and (mask.shape != shape or mask.dtype != bool):
        raise ValueError(f"{name} must be a boolean {shape} array (True: a real token); got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def encoder_forward(params: dict, src, src_mask, cfg: ModelConfig, tp=None, dropout=None):
    """src int (B, S), src_mask bool (B, S) or None (no padding) -> memory (B, S, C) and the cache.

    memory = enc_norm(encoder layers(drop(emb[src] * sqrt(C) + PE))); each layer: bidirectional self-attention
    that sees only the real source keys, then the FFN, each in a post-norm (or norm_first) residual block."""
    tp = LocalComm() if tp is None else tp
    _check_ids("src", src, cfg)
    _check_mask("src_mask", src_mask, src.shape)
    NH_tp, NKV_tp, F_tp = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size, cfg.ffn_dim // tp.size
    src_name, _ = embedding_names(cfg)
    o = ops(cfg)  # the fast paths, or the reference layers (npllm/models/ops.py)
    attention = attention_ops(cfg, dropout)  # o, or the reference under attention dropout
    x, c_emb = _embed_forward(params[src_name], src, cfg, tp, dropout, "enc.embed")  # (B, S, C)
    layers = []
    for l in range(cfg.n_layers):
        pre = f"enc.{l}"
        attn = _self_attention_branch(attention, sub_params(params, pre + ".attn"), NH_tp, NKV_tp, tp, causal=False,
                                      key_mask=src_mask, **_attn_dropout(dropout, l, "enc.attn_probs", tp.rank * NH_tp))
        x, c_attn = _residual_forward(cfg, o, sub_params(params, pre + ".attn_norm"), x, attn, dropout, l,
                                      "enc.attn_out")  # (B, S, C)
        mlp = _mlp_branch(cfg, o, sub_params(params, pre + ".mlp"), tp,
                          **_hidden_dropout(dropout, l, "enc.mlp_hidden", tp.rank * F_tp))
        x, c_mlp = _residual_forward(cfg, o, sub_params(params, pre + ".mlp_norm"), x, mlp, dropout, l,
                                     "enc.mlp_out")  # (B, S, C)
        layers.append((c_attn, c_mlp))
    memory, c_norm = o.norm_forward(cfg.norm, sub_params(params, "enc_norm"), x, cfg.norm_eps)  # (B, S, C)
    return memory, dict(emb=c_emb, layers=layers, norm=c_norm, tp=tp, ops=o, attention=attention)


def encoder_backward(dmemory, cache, cfg: ModelConfig) -> tuple[dict, object]:
    """dmemory (B, S, C) -> (grads of the encoder's layers and enc_norm, the source table's (V_tp, C) gradient)."""
    tp, o, attention = cache["tp"], cache["ops"], cache["attention"]  # the functions the forward ran
    grads: dict = {}
    dx, g = o.norm_backward(cfg.norm, dmemory, cache["norm"])  # forward was memory = enc_norm(x)
    _put_grads(grads, "enc_norm", g)
    for l in reversed(range(cfg.n_layers)):
        pre = f"enc.{l}"
        c_attn, c_mlp = cache["layers"][l]
        dx, g_norm, g = _residual_backward(cfg, o, dx, c_mlp, _mlp_backward(cfg, o, tp))  # (B, S, C)
        _put_grads(grads, pre + ".mlp_norm", g_norm)
        _put_grads(grads, pre + ".mlp", g)
        dx, g_norm, g = _residual_backward(cfg, o, dx, c_attn,
                                           _self_attention_backward(attention, tp, cfg.bias))  # (B, S, C)
        _put_grads(grads, pre + ".attn_norm", g_norm)
        _put_grads(grads, pre + ".attn", g)
    return grads, _embed_backward(dx, cache["emb"], tp)


def decoder_forward(params: dict, tokens, memory, src_mask, tgt_mask, cfg: ModelConfig, tp=None, dropout=None,
                    past_kv=None, memory_kv=None):
    """tokens int (B, T) (the decoder input), memory (B, S, C) -> logits (B, T, V_tp) and the cache.

    Each layer: causal self-attention (keys: the real target positions, tgt_mask (B, T) or None), cross-attention
    to the memory (keys: the real source positions, src_mask (B, S) or None), the FFN; then dec_norm and the head.
    Decoding (forward only): past_kv, a list of L_dec (k, v) (B, NKV, T_past, hs) of the earlier target positions
    (the tokens then sit at positions T_past ...; tgt_mask must be None), and memory_kv, the L_dec cross-attention
    (k, v) (B, NKV, S, hs) of ``cross_attention_kvs`` (memory is then not read: pass None). The cache's
    "present_kv" holds the self-attention keys/values to pass next.
    """
    tp = LocalComm() if tp is None else tp
    _check_ids("tokens", tokens, cfg)
    T = tokens.shape[1]
    T_past = 0 if past_kv is None else past_kv[0][0].shape[2]
    if T_past + T > cfg.max_seq_len:
        raise ValueError(f"target length {T_past + T} exceeds max_seq_len={cfg.max_seq_len}")
    _check_mask("tgt_mask", tgt_mask, tokens.shape)
    if tgt_mask is not None and T_past:
        raise ValueError("tgt_mask is for training; cached decoding (past_kv) takes none (every token is real)")
    NH_tp, NKV_tp, F_tp = cfg.n_heads // tp.size, cfg.n_kv_heads // tp.size, cfg.ffn_dim // tp.size
    _, tgt_name = embedding_names(cfg)
    o = ops(cfg)  # the fast paths, or the reference layers (npllm/models/ops.py)
    attention = attention_ops(cfg, dropout)  # o, or the reference under attention dropout
    y, c_emb = _embed_forward(params[tgt_name], tokens, cfg, tp, dropout, "dec.embed", T_past)  # (B, T, C)
    memory_tp = None if memory is None else copy_to_tp(memory, tp)  # (B, S, C) f, once for every layer's k/v
    layers, present_kv = [], []
    for l in range(cfg.n_decoder_layers):
        pre = f"dec.{l}"
        attn = _self_attention_branch(attention, sub_params(params, pre + ".self"), NH_tp, NKV_tp, tp, causal=True,
                                      key_mask=tgt_mask, past_kv=None if past_kv is None else past_kv[l],
                                      **_attn_dropout(dropout, l, "dec.attn_probs", tp.rank * NH_tp))
        y, c_self = _residual_forward(cfg, o, sub_params(params, pre + ".self_norm"), y, attn, dropout, l,
                                      "dec.attn_out")  # (B, T, C)
        cross = _cross_attention_branch(attention, sub_params(params, pre + ".cross"), memory_tp, NH_tp, NKV_tp, tp,
                                        memory_mask=src_mask, memory_kv=None if memory_kv is None else memory_kv[l],
                                        **_attn_dropout(dropout, l, "dec.cross_probs", tp.rank * NH_tp))
        y, c_cross = _residual_forward(cfg, o, sub_params(params, pre + ".cross_norm"), y, cross, dropout, l,
                                       "dec.cross_out")  # (B, T, C)
        mlp = _mlp_branch(cfg, o, sub_params(params, pre + ".mlp"), tp,
                          **_hidden_dropout(dropout, l, "dec.mlp_hidden", tp.rank * F_tp))
        y, c_mlp = _residual_forward(cfg, o, sub_params(params, pre + ".mlp_norm"), y, mlp, dropout, l,
                                     "dec.mlp_out")  # (B, T, C)
        layers.append((c_self, c_cross, c_mlp))
        present_kv.append((c_self[1]["k"], c_self[1]["v"]))  # each (B, NKV_tp, T_past + T, hs)
    y, c_norm = o.norm_forward(cfg.norm, sub_params(params, "dec_norm"), y, cfg.norm_eps)  # (B, T, C)
    w_head = params[tgt_name].T if cfg.tie_embeddings else params["lm_head"]  # (C, V_tp)
    logits, c_head = linear_forward({"w": w_head}, copy_to_tp(y, tp))  # (B, T, V_tp) f: each rank its slice
    return logits, dict(emb=c_emb, layers=layers, norm=c_norm, head=c_head, present_kv=present_kv, tp=tp, ops=o,
                        attention=attention)


def decoder_backward(dlogits, cache, cfg: ModelConfig) -> tuple[dict, object, object, object]:
    """dlogits (B, T, V_tp) -> (grads of the decoder's layers and dec_norm, the target table's (V_tp, C) lookup
    gradient, the head's weight gradient (C, V_tp), dmemory (B, S, C) summed over the layers and the ranks)."""
    tp, o, attention = cache["tp"], cache["ops"], cache["attention"]  # the functions the forward ran
    grads: dict = {}
    dh, g_head = linear_backward(dlogits, cache["head"])  # (B, T, C) this rank's vocabulary slice's term
    dy = copy_to_tp_backward(dh, tp)  # (B, T, C) f's backward: the sum over slices
    dy, g = o.norm_backward(cfg.norm, dy, cache["norm"])  # forward was out = dec_norm(y)
    _put_grads(grads, "dec_norm", g)
    dmemory_tp = None  # (B, S, C): the sum over decoder layers of what each cross-attention sends the memory
    for l in reversed(range(cfg.n_decoder_layers)):
        pre = f"dec.{l}"
        c_self, c_cross, c_mlp = cache["layers"][l]
        dy, g_norm, g = _residual_backward(cfg, o, dy, c_mlp, _mlp_backward(cfg, o, tp))  # (B, T, C)
        _put_grads(grads, pre + ".mlp_norm", g_norm)
        _put_grads(grads, pre + ".mlp", g)
        dy, g_norm, g, dmemory_l = _residual_backward(cfg, o, dy, c_cross,
                                                      _cross_attention_backward(attention, tp, cfg.bias))
        _put_grads(grads, pre + ".cross_norm", g_norm)
        _put_grads(grads, pre + ".cross", g)
        dmemory_tp = dmemory_l if dmemory_tp is None else dmemory_tp + dmemory_l  # (B, S, C) every layer reads it
        dy, g_norm, g = _residual_backward(cfg, o, dy, c_self,
                                           _self_attention_backward(attention, tp, cfg.bias))  # (B, T, C)
        _put_grads(grads, pre + ".self_norm", g_norm)
        _put_grads(grads, pre + ".self", g)
    dmemory = copy_to_tp_backward(dmemory_tp, tp)  # (B, S, C) forward was memory_tp = f(memory): all-reduce
    return grads, _embed_backward(dy, cache["emb"], tp), g_head["w"], dmemory


# ----------------------------------------------------------------------------------------------------------
# the model: forward, backward, loss


def _check_batch(batch: dict) -> None:
    missing = [key for key in ("src", "src_mask", "tokens", "tgt_mask", "targets") if key not in batch]
    if missing:
        raise ValueError(f"an encoder-decoder batch needs src, src_mask, tokens, tgt_mask and targets; missing "
                         f"{', '.join(missing)}")
    if tuple(batch["targets"].shape) != tuple(batch["tokens"].shape):
        raise ValueError(f"targets {tuple(batch['targets'].shape)} must have the shape of tokens "
                         f"{tuple(batch['tokens'].shape)}")
    if batch["src"].shape[0] != batch["tokens"].shape[0]:
        raise ValueError(f"src has {batch['src'].shape[0]} rows and tokens {batch['tokens'].shape[0]}; one source "
                         f"per target")


def model_forward(params: dict, batch: dict, cfg: ModelConfig, tp=None, dropout=None):
    """A batch (src, src_mask, tokens, tgt_mask) -> logits (B, T, V_tp) and the cache for ``model_backward``.

    tp: the tensor-parallel communicator (None: one process; then V_tp = V). dropout: a
    ``npllm.layers.dropout.Dropout`` in training, None otherwise (nothing dropped)."""
    tp = LocalComm() if tp is None else tp
    _check_shard_shapes(params, cfg, tp.size)
    _check_batch(batch)
    xp = get_array_module(next(iter(params.values())))
    src, tokens = xp.asarray(batch["src"]), xp.asarray(batch["tokens"])  # (B, S), (B, T)
    src_mask, tgt_mask = xp.asarray(batch["src_mask"]), xp.asarray(batch["tgt_mask"])  # (B, S), (B, T)
    memory, c_enc = encoder_forward(params, src, src_mask, cfg, tp, dropout)  # (B, S, C)
    logits, c_dec = decoder_forward(params, tokens, memory, src_mask, tgt_mask, cfg, tp, dropout)  # (B, T, V_tp)
    return logits, dict(encoder=c_enc, decoder=c_dec, tp=tp)


def model_backward(dlogits, cache, cfg: ModelConfig) -> dict:
    """dlogits (B, T, V_tp) -> grads with exactly the keys of the parameters (this rank's shards), in their order.

    The sums are written here: dmemory over the decoder layers (in decoder_backward), and a shared table's
    gradient over its uses (source lookup + target lookup + the tied head)."""
    dec_grads, d_tgt, d_head, dmemory = decoder_backward(dlogits, cache["decoder"], cfg)
    enc_grads, d_src = encoder_backward(dmemory, cache["encoder"], cfg)
    grads = {**enc_grads, **dec_grads}
    d_head_table = d_head.T if cfg.tie_embeddings else None  # (V_tp, C) the head read the target table transposed
    if not cfg.tie_embeddings:
        grads["lm_head"] = d_head  # (C, V_tp)
    if cfg.share_embeddings:  # one table: the source lookup, the target lookup (and the head)
        grads["tok_emb"] = d_src + d_tgt if d_head_table is None else d_src + d_tgt + d_head_table
    else:
        grads["src_emb"] = d_src
        grads["tgt_emb"] = d_tgt if d_head_table is None else d_tgt + d_head_table
    return {spec.name: grads[spec.name] for spec in param_specs(cfg)}


def forward(params: dict, batch: dict, cfg: ModelConfig):
    """Logits (B, T, V) of a batch, one process, no dropout."""
    logits, _ = model_forward(params, batch, cfg)
    return logits


def batch_loss_and_grads(params: dict, batch: dict, cfg: ModelConfig, tp=None, dropout=None):
    """Mean cross-entropy of batch["targets"] (IGNORE_INDEX at padding) under teacher forcing, and its gradient for
    every parameter: (loss: float, grads with exactly the keys of params). With tp the loss is the same on every
    rank and the grads are this rank's shards; the loss is the vocabulary-parallel one."""
    logits, cache = model_forward(params, batch, cfg, tp=tp, dropout=dropout)  # (B, T, V_tp)
    xp = get_array_module(logits)
    o = ops(cfg)
    loss, loss_cache = o.training_loss_forward(logits, xp.asarray(batch["targets"]),
                                               cache["tp"])  # the fast one works in the logits' memory
    dlogits, _ = o.cross_entropy_backward(1.0, loss_cache)  # (B, T, V_tp)
    return loss, model_backward(dlogits, cache, cfg)


def batch_loss(params: dict, batch: dict, cfg: ModelConfig, tp=None) -> float:
    """The mean loss of a batch, forward only, no dropout (validation)."""
    logits, cache = model_forward(params, batch, cfg, tp=tp)  # (B, T, V_tp)
    xp = get_array_module(logits)
    loss, _ = ops(cfg).cross_entropy_forward(logits, xp.asarray(batch["targets"]), cache["tp"])
    return loss


# ----------------------------------------------------------------------------------------------------------
# decoding: the memory and its cross-attention keys/values once per source, a KV cache for the self-attention


def encode(params: dict, src, src_mask, cfg: ModelConfig):
    """memory (B, S, C) of the sources src int (B, S) with src_mask bool (B, S) (None: no padding); no dropout."""
    xp = get_array_module(next(iter(params.values())))
    memory, _ = encoder_forward(params, xp.asarray(src), None if src_mask is None else xp.asarray(src_mask), cfg)
    return memory


def cross_attention_kvs(params: dict, memory, cfg: ModelConfig) -> list:
    """Every decoder layer's cross-attention keys and values of the memory, L_dec x (k, v) each (B, NKV, S, hs):
    computed once per source, then read by every decoding step (decoder_forward's memory_kv)."""
    cross_attention_kv = ops(cfg).cross_attention_kv
    return [cross_attention_kv(sub_params(params, f"dec.{l}.cross"), memory, cfg.n_kv_heads)
            for l in range(cfg.n_decoder_layers)]


def decode_step(params: dict, cfg: ModelConfig, tokens, memory_kv, src_mask, past_kv=None):
    """The next tokens' logits: tokens (B, T_new) after the past_kv positions (None at the start) ->
    (logits (B, T_new, V), present_kv to pass next)."""
    xp = get_array_module(next(iter(params.values())))
    logits, cache = decoder_forward(params, xp.asarray(tokens), None, src_mask, None, cfg, past_kv=past_kv,
                                    memory_kv=memory_kv)  # (B, T_new, V)
    return logits, cache["present_kv"]


def _sources(src_ids, cfg: ModelConfig, pad_id: int, xp):
    """A list of token-id sequences -> (src (N, S), src_mask (N, S)), padded with pad_id to the longest."""
    rows = []
    for i, ids in enumerate(src_ids):
        row = [int(t) for t in ids]
        if not row or min(row) < 0 or max(row) >= cfg.vocab_size or len(row) > cfg.max_seq_len:
            span = f" from {min(row)} to {max(row)}" if row else ""
            raise ValueError(f"source {i} must be 1 to max_seq_len={cfg.max_seq_len} token ids in [0, "
                             f"{cfg.vocab_size}); got {len(row)} ids{span}")
        rows.append(row)
    if not rows:
        raise ValueError("no sources given; pass a list of token-id sequences")
    S = max(len(r) for r in rows)
    src = np.full((len(rows), S), pad_id, dtype=np.int64)  # (N, S)
    mask = np.zeros((len(rows), S), dtype=bool)  # (N, S)
    for i, row in enumerate(rows):
        src[i, :len(row)], mask[i, :len(row)] = row, True
    return xp.asarray(src), xp.asarray(mask)


def _check_decoding(cfg: ModelConfig, max_new_tokens, bos_id, eos_id) -> int:
    check_int("max_new_tokens", max_new_tokens)
    if max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not allowed; the decoder reads at most "
                         f"max_seq_len={cfg.max_seq_len} positions")
    for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
        if check_int(name, value, 0) >= cfg.vocab_size:
            raise ValueError(f"{name}={value} is not a token of vocab_size={cfg.vocab_size}")
    return int(max_new_tokens)


def _select(kv, rows):
    """Each (k, v) of a list gathered at batch rows ``rows`` (repeats allowed)."""
    xp = get_array_module(kv[0][0])
    index = xp.asarray(rows)
    return [(k[index], v[index]) for k, v in kv]  # each (len(rows), NKV, ., hs)


def argmax_tokens(z, live):
    """The greedy choice: each live source's most likely token (the lowest id among equal logits). z (n_live, V)."""
    return np.argmax(z, axis=-1)  # (n_live,)


def greedy(params: dict, cfg: ModelConfig, src_ids, max_new_tokens: int, *, bos_id: int, eos_id: int,
           choose=argmax_tokens) -> list:
    """Greedy decoding of every source at once: at each step the argmax token (lowest id among equal logits). Returns
    one token list per source, ending with eos_id when the model produced it within max_new_tokens.

    choose(z, live) -> tokens (n_live,): picks each step's tokens from the float64 logits z (n_live, V) of the
    sources still decoding, live (n_live,) their indices; ``npllm.generate_encoders.sample`` passes a sampler."""
    max_new_tokens = _check_decoding(cfg, max_new_tokens, bos_id, eos_id)
    xp = get_array_module(next(iter(params.values())))
    src, src_mask = _sources(src_ids, cfg, eos_id, xp)  # (N, S)
    N = src.shape[0]
    memory_kv = cross_attention_kvs(params, encode(params, src, src_mask, cfg), cfg)  # L_dec x 2 x (N, NKV, S, hs)
    out = [[] for _ in range(N)]
    live = np.arange(N)  # (n_live,) the sources still decoding
    step_input, past_kv = np.full((N, 1), bos_id), None  # (n_live, 1)
    for _ in range(max_new_tokens):
        logits, past_kv = decode_step(params, cfg, step_input, _select(memory_kv, live), src_mask[xp.asarray(live)],
                                      past_kv)  # (n_live, 1, V)
        token = np.asarray(choose(np.asarray(asnumpy(logits[:, -1]), dtype=np.float64), live))  # (n_live,)
        for i, t in zip(live, token):
            out[i].append(int(t))
        going = token != eos_id  # (n_live,)
        if not going.any():
            break
        live, past_kv = live[going], _select(past_kv, np.flatnonzero(going))
        step_input = token[going, None]  # (n_live', 1)
    return out


def translate(params: dict, cfg: ModelConfig, src_ids, max_new_tokens: int, beams: int = 1,
              length_penalty: float = 1.0, *, bos_id: int, eos_id: int) -> list:
    """Beam search for every source at once: returns, per source, its ``beams`` hypotheses best first
    (npllm.generate.Hypothesis: tokens ending with eos_id when finished, log-probability, normalised score).

    The rule of npllm.generate.beam_search, per source: each step extends every live hypothesis by every token and
    keeps the (beams - finished) best extensions by total log-probability (ties: the earlier hypothesis, then the
    lower id); one ending in eos_id is finished and leaves the beam; the final ranking, across lengths, is by
    log-probability / length ** length_penalty. The encoder runs once, the cross-attention keys/values are computed
    once per source and gathered for the rows of its hypotheses, and the self-attention keys/values are cached and
    follow each survivor's parent. With beams=1 this is ``greedy``.
    """
    from ..generate import (  # here: npllm.generate may come to import this module
        Hypothesis,
        normalized_score,
    )

    check_int("beams", beams)
    check_number("length_penalty", length_penalty, 0)
    max_new_tokens = _check_decoding(cfg, max_new_tokens, bos_id, eos_id)
    xp = get_array_module(next(iter(params.values())))
    src, src_mask = _sources(src_ids, cfg, eos_id, xp)  # (N, S)
    N, V = src.shape[0], cfg.vocab_size
    memory_kv = cross_attention_kvs(params, encode(params, src, src_mask, cfg), cfg)  # L_dec x 2 x (N, NKV, S, hs)
    finished: list[list] = [[] for _ in range(N)]
    row_src = np.arange(N)  # (n_rows,) the source of each live hypothesis, grouped by source in order
    seqs = np.zeros((N, 0), dtype=np.int64)  # (n_rows, t) the generated tokens of each live hypothesis
    logprob = np.zeros(N)  # (n_rows,)
    step_input, past_kv = np.full((N, 1), bos_id), None  # (n_rows, 1)
    rows_kv, rows_mask, rows_of = None, None, None
    for _ in range(max_new_tokens):
        if rows_of is None or not np.array_equal(rows_of, row_src):  # the memory's k/v for the live rows' sources
            rows_of, rows_kv, rows_mask = row_src, _select(memory_kv, row_src), src_mask[xp.asarray(row_src)]
        logits, past_kv = decode_step(params, cfg, step_input, rows_kv, rows_mask, past_kv)  # (n_rows, 1, V)
        candidates = logprob[:, None] + log_softmax(asnumpy(logits[:, -1]))  # (n_rows, V) total log-probabilities
        parents, tokens = [], []
        for s in np.unique(row_src):
            rows = np.flatnonzero(row_src == s)  # (n_s,) this source's live hypotheses
            width = beams - len(finished[s])
            best = np.argsort(-candidates[rows].ravel(), kind="stable")[:width]  # (width,)
            for parent, token in zip(rows[best // V], best % V):
                if token == eos_id:
                    generated = seqs[parent].tolist() + [int(token)]
                    lp = float(candidates[parent, token])
                    score = normalized_score(lp, len(generated), length_penalty)
                    finished[s].append(Hypothesis(generated, lp, score, True))
                else:
                    parents.append(parent)
                    tokens.append(token)
        if not parents:
            row_src = row_src[:0]
            break
        parents, tokens = np.array(parents), np.array(tokens)  # (n_rows',) each
        seqs = np.concatenate([seqs[parents], tokens[:, None]], axis=1)  # (n_rows', t + 1)
        logprob, row_src = candidates[parents, tokens], row_src[parents]  # (n_rows',)
        past_kv = _select(past_kv, parents)  # each survivor continues from its parent's keys/values
        step_input = tokens[:, None]  # (n_rows', 1)
    for row, s in enumerate(row_src):  # the hypotheses still live after max_new_tokens
        lp = float(logprob[row])
        finished[s].append(Hypothesis(seqs[row].tolist(), lp, normalized_score(lp, seqs.shape[1], length_penalty),
                                      False))
    return [sorted(hyps, key=lambda h: -h.score) for hyps in finished]
