"""The architectures, each composed from ``npllm.layers`` with Megatron's f and g written where they act.

    spec.py      ParamSpec, and what is read off an architecture's specs (shapes, split axes, initial values)
    decoder.py   decoder-only: GPT-2 and LLaMA shapes (pre-norm, RoPE or learned positions, GQA, SwiGLU or GELU,
                 tied or untied head), next-token cross-entropy
    bert.py      encoder: BERT (BertForMaskedLM's post-norm layers, segments, embedding LayerNorm, the MLM head
                 tied to tok_emb); cross-entropy at the masked positions (the objective: npllm/mlm.py)
    seq2seq.py   encoder-decoder: torch.nn.Transformer's layers (post-norm or norm_first, ReLU or GELU), sinusoidal
                 positions, shared or separate embeddings, tied or untied head; teacher-forced cross-entropy;
                 cached greedy and beam decoding

Every architecture module has the same few functions; the rest of npllm reaches them through the ones below,
which dispatch on ``cfg.arch``:

    param_specs(cfg) -> [ParamSpec]                    the one list of parameters
    tp_split_sizes(cfg) -> {name: size}                what tensor parallelism splits evenly
    flops_per_token(cfg, seq_len) -> int               training FLOPs per token (matmuls), for MFU
    batch_loss_and_grads(params, batch, cfg, tp=None) -> (loss, grads)
                                                       a batch is a dict of (B, ...) arrays with a "targets" entry
                                                       (IGNORE_INDEX where nothing is learned)
    batch_loss(params, batch, cfg, tp=None) -> loss    forward only (validation)
"""

from __future__ import annotations

import importlib

import numpy as np

from ..backend import get_array_module
from ..layers.loss import IGNORE_INDEX
from ..parallel.tensor import check_tp_divides
from .ops import ops  # noqa: F401  (the trainer's AdamW follows cfg.impl)
from .spec import count_of, init_from_specs, shapes_of, shard_shapes_of, split_axes_of

MODULES = {"decoder": "decoder", "encoder": "bert", "encoder-decoder": "seq2seq"}  # cfg.arch -> module of npllm.models


def architecture(cfg):
    """The module of ``cfg``'s architecture (imported on first use)."""
    return importlib.import_module(f"{__name__}.{MODULES[cfg.arch]}")


def param_specs(cfg):
    """The architecture's one ordered list of parameters."""
    return architecture(cfg).param_specs(cfg)


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{name: full shape} in parameter order."""
    return shapes_of(param_specs(cfg))


def split_axes(cfg) -> dict[str, int | None]:
    """{name: tensor-parallel split axis or None (replicated)}."""
    return split_axes_of(param_specs(cfg))


def tp_split_sizes(cfg) -> dict[str, int]:
    """The sizes tensor parallelism splits evenly (tp must divide each)."""
    return architecture(cfg).tp_split_sizes(cfg)


def param_shard_shapes(cfg, tp_size: int) -> dict[str, tuple[int, ...]]:
    """The shapes of one tensor-parallel rank's shards; ValueError when tp_size does not divide the split sizes."""
    check_tp_divides(tp_split_sizes(cfg), tp_size)
    return shard_shapes_of(param_specs(cfg), tp_size)


def num_params(cfg) -> int:
    """Parameter count, from the shapes alone (nothing is allocated)."""
    return count_of(param_specs(cfg))


def flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per token (forward + backward), counting matmuls."""
    return architecture(cfg).flops_per_token(cfg, seq_len)


def init_params(cfg, seed: int = 0, dtype=np.float32, xp=np, *, tp_rank: int = 0, tp_size: int = 1) -> dict:
    """All parameters in spec order as ``dtype`` arrays of ``xp``, each drawn by its spec's init rule from the stream
    (seed, its index); with tp_size > 1 rank tp_rank's shards, equal to slicing the full initial parameters."""
    check_tp_divides(tp_split_sizes(cfg), tp_size)
    return init_from_specs(param_specs(cfg), seed, dtype, xp, tp_rank=tp_rank, tp_size=tp_size)


def batch_loss_and_grads(params: dict, batch: dict, cfg, tp=None, dropout=None):
    """The architecture's mean loss over the batch's counted targets, and its gradient for every parameter.
    dropout: a ``npllm.layers.dropout.Dropout`` when training with dropout, else None."""
    return architecture(cfg).batch_loss_and_grads(params, batch, cfg, tp=tp, dropout=dropout)


def batch_loss(params: dict, batch: dict, cfg, tp=None) -> float:
    """The architecture's mean loss over the batch's counted targets, forward only."""
    return architecture(cfg).batch_loss(params, batch, cfg, tp=tp)


def accumulate_loss_and_grads(params: dict, batch: dict, cfg, micro_batches: int = 1, tp=None, dropout=None):
    """``batch_loss_and_grads`` over a batch split into ``micro_batches`` row chunks, one forward/backward at a time.

    Each chunk's mean loss (and gradient) is weighted by its share of the batch's counted targets, so the sum equals
    the mean over the whole batch (up to float rounding) while only one chunk's activations are alive at once.
    """
    targets = batch["targets"]
    B = targets.shape[0]
    xp = get_array_module(next(iter(params.values())))
    n_total = int((targets != IGNORE_INDEX).sum())
    if micro_batches == 1 or n_total == 0:
        return batch_loss_and_grads(params, batch, cfg, tp=tp, dropout=dropout)
    loss, grads = 0.0, None
    for rows in np.array_split(np.arange(B), micro_batches):
        rows = xp.asarray(rows)
        chunk = {key: value[rows] for key, value in batch.items()}  # (B_chunk, ...) each
        n_chunk = int((chunk["targets"] != IGNORE_INDEX).sum())
        if n_chunk == 0:
            continue  # no target in this chunk: it adds nothing to the mean
        weight = n_chunk / n_total
        chunk_dropout = None if dropout is None else dropout.rows(int(rows[0]))  # the chunk's global rows
        chunk_loss, chunk_grads = batch_loss_and_grads(params, chunk, cfg, tp=tp, dropout=chunk_dropout)
        loss += weight * chunk_loss
        if grads is None:
            grads = {name: weight * g for name, g in chunk_grads.items()}
        else:
            for name, g in chunk_grads.items():
                grads[name] += weight * g  # the micro-batch sum
        del chunk_grads  # freed before the next micro-batch's backward makes new ones: 2 sets of grads alive, not 3
    return loss, grads
