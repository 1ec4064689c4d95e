"""Which functions a model's layers run: the readable reference (npllm/layers) or the fast paths (npllm/fast).

``ops(cfg)`` is read by the model files at each forward: ``o.norm_forward(...)``, ``o.attention_forward(...)``.
The two sets compute the same math (the fast paths are tested against the reference in float64 to 1e-10), so
``cfg.impl = "reference"`` (``--impl=reference``) runs the whole model on the reference layers, e.g. to check a
result or to read along with docs/derivations. The trainer's AdamW follows the same switch.

    op                      reference (npllm/layers, npllm/parallel/tensor)   fast (npllm/fast)
    norm_forward/backward   rmsnorm / layernorm                               row chunks over the pool, fused passes
    attention               P (B, NKV, G, T, Tk) kept for backward            flash tiles, online softmax, the row
                                                                              logsumexp kept (memory linear in T)
    cross_attention         the same core, keys/values from a memory          the same flash core
    cross_attention_kv      the memory's k, v split into heads (views)        the same values, contiguous
    mlp_forward/backward    swiglu, gelu (tanh), gelu_erf, relu              fused elementwise work over the pool
    cross_entropy           softmax kept for backward                         one pass; the logits' memory reused
    adamw_update            npllm.optim                                       chunked over the pool (the same bits)

Attention dropout (cfg.attn_dropout in training) is the reference's alone: a forward with it runs the reference
attention (``attention_ops(cfg, dropout)``), whose backward its cache then names. Self- and cross-attention take the
same arguments in both sets (the flash functions accept dropout_rate=0 and the dropout coordinates, unused), so a
model passes one set of arguments to whichever ran.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

from ..fast import attention as fast_attention, loss as fast_loss, mlp as fast_mlp, norm as fast_norm
from ..fast import optim as fast_optim
from ..layers import attention, mlp, norm
from ..optim import adamw_update
from ..parallel import tensor

IMPLS = ("fast", "reference")

REFERENCE = SimpleNamespace(
    norm_forward=norm.norm_forward, norm_backward=norm.norm_backward,
    attention_forward=attention.attention_forward, attention_backward=attention.attention_backward,
    cross_attention_forward=attention.cross_attention_forward,
    cross_attention_backward=attention.cross_attention_backward,
    cross_attention_kv=attention.cross_attention_kv,
    mlp_forward=mlp.mlp_forward, mlp_backward=mlp.mlp_backward,
    cross_entropy_forward=tensor.vocab_parallel_cross_entropy_forward,
    cross_entropy_backward=tensor.vocab_parallel_cross_entropy_backward,
    training_loss_forward=tensor.vocab_parallel_cross_entropy_forward,  # the logits are a temporary in training
    adamw_update=adamw_update,
)

FAST = SimpleNamespace(
    norm_forward=fast_norm.norm_forward, norm_backward=fast_norm.norm_backward,
    attention_forward=fast_attention.flash_attention_forward,
    attention_backward=fast_attention.flash_attention_backward,
    cross_attention_forward=fast_attention.flash_cross_attention_forward,
    cross_attention_backward=fast_attention.flash_cross_attention_backward,
    cross_attention_kv=fast_attention.flash_cross_attention_kv,
    mlp_forward=fast_mlp.mlp_forward, mlp_backward=fast_mlp.mlp_backward,
    cross_entropy_forward=fast_loss.vocab_parallel_cross_entropy_forward,
    cross_entropy_backward=fast_loss.vocab_parallel_cross_entropy_backward,
    training_loss_forward=partial(fast_loss.vocab_parallel_cross_entropy_forward, in_place=True),  # reuses logits
    adamw_update=fast_optim.adamw_update,
)


def ops(cfg) -> SimpleNamespace:
    """The layer functions of ``cfg.impl``."""
    return FAST if cfg.impl == "fast" else REFERENCE


def attention_ops(cfg, dropout=None) -> SimpleNamespace:
    """The functions a forward's attentions run: ops(cfg), but the reference's when ``dropout`` (a
    npllm.layers.dropout.Dropout, or None) drops attention probabilities, which only the reference forms."""
    return REFERENCE if dropout is not None and dropout.attn_rate else ops(cfg)
