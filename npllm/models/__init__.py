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
from ..checks import check_int
from ..parallel.cores import default_threads, side_by_side
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


def default_row_groups(rows: int, device: str = "cpu", tp_size: int = 1) -> int:
    """The row groups ``accumulate_loss_and_grads`` runs side by side when the trainer is given none: one per core of
    this process's share (npllm.parallel.cores.default_threads), at most ``rows`` (a micro-batch's rows); 1 on a GPU
    (it runs one computation at a time anyway) and under tensor parallelism (each group's collectives would have to
    keep one order across the ranks' threads)."""
    if device != "cpu" or tp_size > 1:
        return 1
    return max(1, min(rows, default_threads()))


def accumulate_loss_and_grads(params: dict, batch: dict, cfg, micro_batches: int = 1, tp=None, dropout=None,
                              row_groups: int = 1):
    """``batch_loss_and_grads`` over a batch split into ``micro_batches`` row chunks, one after the other, each cut
    again into ``row_groups`` groups of rows whose forward/backward passes run side by side, each on one core of this
    process (npllm.parallel.cores.side_by_side; one after the other where there is one core, on a GPU and under
    tensor parallelism).

    Each group's mean loss (and gradient) is weighted by its share of the batch's counted targets and the groups are
    added in row order, so the sum equals the mean over the whole batch (up to float rounding). The groups are fixed
    by micro_batches and row_groups, whichever threads run them; what a thread count can change is BLAS's own
    (side by side, BLAS runs on one thread per group), whose sums OpenBLAS may split differently, as anywhere in
    npllm. Only one micro-batch's activations are alive at once (its groups' together).
    """
    check_int("micro_batches", micro_batches)
    check_int("row_groups", row_groups)
    targets = batch["targets"]
    B = targets.shape[0]
    xp = get_array_module(next(iter(params.values())))
    n_total = int((targets != IGNORE_INDEX).sum())
    if micro_batches * row_groups == 1 or n_total == 0:
        return batch_loss_and_grads(params, batch, cfg, tp=tp, dropout=dropout)
    side_by_side_threads = None if xp is np and (tp is None or tp.size == 1) else 1

    def group(rows):
        """The task of one group of rows: (its weight, its loss, its gradients times the weight), or None without a
        target. The weight is the group's share of the batch's counted targets; the gradients are scaled in the
        group's own thread, side by side with the other groups."""
        def run():
            part = {key: value[xp.asarray(rows)] for key, value in batch.items()}  # (B_group, ...) each
            n_part = int((part["targets"] != IGNORE_INDEX).sum())
            if n_part == 0:
                return None  # no target in this group: it adds nothing to the mean
            part_dropout = None if dropout is None else dropout.rows(int(rows[0]))  # the group's global rows
            part_loss, part_grads = batch_loss_and_grads(params, part, cfg, tp=tp, dropout=part_dropout)
            weight = n_part / n_total
            for g in part_grads.values():
                g *= weight  # the group's own fresh arrays
            return weight, part_loss, part_grads
        return run

    loss, grads = 0.0, None
    for chunk in np.array_split(np.arange(B), micro_batches):
        tasks = [group(rows) for rows in np.array_split(chunk, row_groups) if len(rows)]
        results = side_by_side(tasks, threads=side_by_side_threads)
        while results:
            result = results.pop(0)
            if result is None:
                continue
            weight, part_loss, part_grads = result
            loss += weight * part_loss
            if grads is None:
                grads = part_grads  # the first group's weighted gradients become the running sum
            else:
                for name, g in part_grads.items():
                    grads[name] += g  # the sum over groups, in row order
            del part_grads, result  # this group's own gradients are freed once added
    return loss, grads
