"""How much memory one rank needs to train a model: the model behind ``python -m npllm.train --dry_run``.

Everything is counted from shapes alone; nothing is allocated. Per rank, in bytes (s = bytes per element of the
run's dtype; every count is this rank's shard: NH_tp = NH / tp, NKV_tp = NKV / tp, F_tp = F / tp, V_tp = V / tp):

    weights        the rank's parameter shards (``param_shard_shapes``)                         P_tp * s
    gradients      one gradient per weight; twice that with micro-batches (the running sum next
                   to the current micro-batch's gradients)                                       P_tp * s (x2)
    AdamW moments  m and v for every weight (zero=0), or for the tensors this dp rank owns
                   (zero=1: the largest share over the dp ranks, ``dp_partition``)              2 * P_own * s
    activations    exactly what the layers' caches keep for the backward pass (below), plus the
                   logits (and, on the reference path, their softmax and dlogits beside them)
    recomputed     under --recompute, the caches the backward rebuilds for one block at a time
                   (below); 0 with recompute="none"
    working        the largest short-lived temporaries of one block's backward: the reference
                   attention's (B, NH_tp, T, T) dP, ds and one product (3 of them), or SwiGLU's
                   F-wide products (5; GELU 3); the fast paths: the flash core's q, do, dq over
                   the heads and k, v, dk, dv over the kv heads plus a tile's P and dS, or
                   SwiGLU's dh1, dh3 (GELU's dh)                                                   an estimate
    loss temporary the reference cross-entropy's forward holds z - max and exp(z - max), (B, T, V_tp)
                   each, next to the logits and probabilities (the fast loss: none, it works in place) B T V_tp s
    comm buffers   data parallel: zero=0 packs the gradients into one flat buffer and MPI
                   returns another (2 * G); zero=1 packs them once (G) plus its segment, then
                   receives every parameter in the all-gather (W plus its own share)             0 when dp = 1

    AdamW scratch  ``adamw_update``'s one temporary, the size of the tensor it is updating: the
                   largest tensor whose moments this rank keeps                                      max|P_own| s
    init temporary a fresh run's ``init_params`` draws each full tensor in float64 on the host and
                   keeps this rank's slice: the largest full tensor, 8 bytes an element             8 max|P|

    peak ~ max(weights + init temporary,                                       start of a fresh run
               weights + moments + max(activations + loss temporary,           end of the forward pass
                                       activations + recomputed + gradients
                                       + working,                              backward
                                       gradients + max(comm buffers,           optimizer step
                                                       AdamW scratch)))
tests/test_memory.py measures the peak of real steps with tracemalloc and compares it with this sum.

Row groups (--row_groups; npllm/models/__init__.py) run side by side: a micro-batch's groups hold their caches and
temporaries at the same time, which add up to those of the micro-batch's B rows (below), and each group makes its
own set of gradients (the first becomes the running sum): row_groups sets, one more after the first micro-batch.
That is the default, one group per core; with more groups than cores fewer run at once and hold less.

The activation caches, per layer, for a batch of B sequences of T tokens (B = batch_size / micro_batches), read off
``npllm/layers`` and ``npllm/fast`` (cfg.impl; the reference attention's own comment: "keep x, q, k, v (after
RoPE), P and o_merged"; the flash attention keeps the row logsumexp L instead of P):

    attn_norm / mlp_norm   xhat (B, T, C) and rstd (B, T, 1)                          2 x (BTC + BT)
    attention              x (B, T, C): the norm's output; q (B, NH_tp, T, hs); k, v (B, NKV_tp, T, hs);
                           o (B, T, NH_tp hs); and P (B, NH_tp, T, T), the softmax, T x T per head
                           (reference), or L (B, NH_tp, T), one number per row (fast)
                           = BTC + 2 BT NH_tp hs + 2 BT NKV_tp hs + B NH_tp T^2 (or + B NH_tp T)
    MLP (SwiGLU)           x (B, T, C); h1, h3, sig, silu(h1), g (B, T, F_tp)          BTC + 5 BT F_tp
    MLP (GELU)             x (B, T, C); h, tanh(.), gelu(h) (B, T, F_tp)               BTC + 3 BT F_tp
and once per model: the final norm (xhat, rstd) and the head's input (B, T, C); the RoPE tables (T, hs) x 2; the
logits, softmax probabilities and dlogits (B, T, V_tp) x 3 (reference), or the logits' one buffer and the row max
and sum (B, T) x 2 (fast); and the integer/boolean bookkeeping of the embedding and the loss: int64 (B, T) ids x 2,
bool (B, T) x 3 (none of it depends on s). ``tests/test_memory.py`` walks the real caches of ``model_forward`` and
checks this count to the byte. Not counted: the token batch, the Python objects, the BLAS library's own buffers,
a tensor-parallel rank's (B, T) rescale factors in the fast loss, dropout's boolean masks, and for ``--device cuda``
the CuPy memory pool's rounding.

Activation recomputation (cfg.recompute, ``--recompute``; npllm/models/decoder.py) changes what each block keeps:
    "none"        the caches above, every block                                       recomputed = 0
    "attention"   all but the attention's internals q, k, v, o and P (or L), every block; the backward rebuilds
                  them for one block at a time     recomputed = 2 BT NH_tp hs + 2 BT NKV_tp hs + B NH_tp T^2 (or T)
    "block"       only each block's input x (B, T, C), BTC per block; the backward reruns one block's forward at
                  a time                                                  recomputed = one block's caches above
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig, TrainConfig
from .fast.attention import K_TILE, default_q_tile
from .models import default_row_groups, flops_per_token, num_params, param_shapes, param_shard_shapes, split_axes
from .optim import moment_dtype
from .parallel.data import dp_partition

GIB = 1 << 30
CUDA_DEVICE_MEMORY_GIB = 80.0  # the default device memory for --device cuda: an 80 GB A100 / H100


def layer_activation_bytes(cfg: ModelConfig, B: int, T: int, tp: int, itemsize: int) -> int:
    """Bytes of one transformer block's full caches for its backward pass (module docstring): what every block keeps
    with recompute="none"."""
    C = cfg.dim
    norms = 2 * (B * T * C + B * T)  # xhat and rstd, before attention and before the MLP
    attention = B * T * C  # x, the attention's input; its internals below
    mlp = B * T * C + (5 if cfg.mlp == "swiglu" else 3) * B * T * (cfg.ffn_dim // tp)
    return (norms + attention + mlp) * itemsize + attention_internal_bytes(cfg, B, T, tp, itemsize)


def attention_internal_bytes(cfg: ModelConfig, B: int, T: int, tp: int, itemsize: int) -> int:
    """Bytes of one attention's cache beyond its input: q, k, v, o, and P (reference) or the row logsumexp L (fast).
    What recompute="attention" drops in the forward and rebuilds, one layer at a time, in the backward."""
    hs, NH_tp, NKV_tp = cfg.head_dim, cfg.n_heads // tp, cfg.n_kv_heads // tp
    internals = 2 * B * T * NH_tp * hs + 2 * B * T * NKV_tp * hs  # q, o; k, v
    # the reference keeps the softmax P (B, NH_tp, T, T); the flash path only each row's logsumexp L (B, NH_tp, T)
    internals += B * NH_tp * T * (T if cfg.impl == "reference" else 1)
    return internals * itemsize


def kept_layer_bytes(cfg: ModelConfig, B: int, T: int, tp: int, itemsize: int) -> int:
    """Bytes the forward keeps of one block until its backward, by cfg.recompute: all its caches ("none"), all but
    the attention's internals ("attention"), or only the block's input x (B, T, C) ("block")."""
    if cfg.recompute == "block":
        return B * T * cfg.dim * itemsize
    full = layer_activation_bytes(cfg, B, T, tp, itemsize)
    return full - attention_internal_bytes(cfg, B, T, tp, itemsize) if cfg.recompute == "attention" else full


def recomputed_bytes(cfg: ModelConfig, B: int, T: int, tp: int = 1, itemsize: int = 4) -> int:
    """Bytes the backward rebuilds for one block at a time under cfg.recompute (freed after that block's backward):
    nothing ("none"), the attention's internals ("attention"), the block's full caches ("block")."""
    if cfg.recompute == "block":
        return layer_activation_bytes(cfg, B, T, tp, itemsize)
    return attention_internal_bytes(cfg, B, T, tp, itemsize) if cfg.recompute == "attention" else 0


def model_activation_bytes(cfg: ModelConfig, B: int, T: int, tp: int, itemsize: int) -> int:
    """Bytes kept through the backward pass outside the blocks: final norm, head input, RoPE tables, the logits
    with their softmax and gradient, and the embedding's and loss's integer and boolean arrays."""
    C, V_tp = cfg.dim, cfg.vocab_size // tp
    floats = (B * T * C + B * T) + B * T * C  # final norm xhat, rstd; head x
    if cfg.impl == "reference":
        floats += 3 * B * T * V_tp  # logits, softmax, dlogits
    else:
        floats += B * T * V_tp + 2 * B * T  # the logits' buffer (exp, then dlogits, in place); row max and sum
    if cfg.pos == "rope":
        floats += 2 * T * cfg.head_dim  # cos, sin (T, hs), shared by every layer
    ints = 2 * 8 * B * T  # int64 (B, T): the embedding's local row ids, the loss's target columns
    ints += 3 * B * T  # bool (B, T): tokens this rank holds (embedding), targets this rank holds, valid targets
    if cfg.pos == "learned":
        ints += 8 * T  # int64 (T,): the positions looked up in pos_emb
    return floats * itemsize + ints


def activation_bytes(cfg: ModelConfig, B: int, T: int, tp: int = 1, itemsize: int = 4) -> int:
    """Bytes of every activation that lives through the backward pass of one micro-batch of B rows of T tokens (what
    the forward keeps; under recompute the backward adds ``recomputed_bytes`` for one block at a time)."""
    return cfg.n_layers * kept_layer_bytes(cfg, B, T, tp, itemsize) + model_activation_bytes(cfg, B, T, tp, itemsize)


def working_bytes(cfg: ModelConfig, B: int, T: int, tp: int, itemsize: int) -> int:
    """The largest short-lived temporaries of one block's backward (an estimate, see the module docstring)."""
    hs, NH_tp, NKV_tp, F_tp = cfg.head_dim, cfg.n_heads // tp, cfg.n_kv_heads // tp, cfg.ffn_dim // tp
    if cfg.impl == "reference":
        attention = 3 * B * NH_tp * T * T  # dP, ds and one product, (B, NH_tp, T, T) each
        mlp = (5 if cfg.mlp == "swiglu" else 3) * B * T * F_tp  # SwiGLU's F-wide products (GELU's)
    else:
        # the flash core's backward: q, do (one column more), dq, and do itself, over all heads, k, v (one
        # column more), dk, dv over the kv heads; and per tile of q_t queries and k_t keys its P and dS
        q_t, k_t = min(T, default_q_tile(T)), min(T, K_TILE)
        attention = 4 * B * T * (NH_tp + NKV_tp) * (hs + 1) + 2 * B * NH_tp * q_t * k_t
        mlp = (2 if cfg.mlp == "swiglu" else 1) * B * T * F_tp  # dh1 and dh3 (dh): the rest is done in place
    return max(attention, mlp) * itemsize


def machine_ram_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training run (see the module docstring for what each line counts)."""

    cfg: ModelConfig
    tp: int
    dp: int
    zero: int
    dtype: str
    batch_size: int  # rows per dp rank per step
    micro_batches: int
    row_groups: int  # groups of a micro-batch's rows run side by side (npllm.models.accumulate_loss_and_grads)
    seq_len: int
    params_per_rank: int  # elements of this rank's shards
    replicated_per_rank: int  # elements of the tensors every tp rank holds whole
    owned_per_rank: int  # elements whose AdamW moments this rank keeps (the largest dp share under zero=1)
    weights: int
    gradients: int
    moments: int
    activations: int
    recomputed: int  # one block's caches rebuilt during its backward (cfg.recompute); 0 with "none"
    working: int
    comm_buffers: int
    loss_temporary: int
    init_temporary: int
    adamw_scratch: int

    @property
    def peak(self) -> int:
        training = self.weights + self.moments + max(self.activations + self.loss_temporary,
                                                     self.activations + self.recomputed + self.gradients
                                                     + self.working,
                                                     self.gradients + max(self.comm_buffers, self.adamw_scratch))
        return max(self.weights + self.init_temporary, training)

    @property
    def params_total(self) -> int:
        return num_params(self.cfg)

    @property
    def flops_per_token(self) -> int:
        return flops_per_token(self.cfg, self.seq_len)


def plan_memory(cfg: ModelConfig, *, tp: int = 1, dp: int = 1, zero: int = 0, dtype: str = "float32",
                batch_size: int, seq_len: int, micro_batches: int = 1, row_groups: int = 1) -> MemoryPlan:
    """The MemoryPlan of training ``cfg`` with tp x dp ranks, from shapes alone (nothing is allocated)."""
    if cfg.arch != "decoder":  # the activation counts above are the decoder's layers
        raise ValueError(f"--dry_run plans the decoder's memory only (npllm/memory.py); arch={cfg.arch!r} has no "
                         f"activation model yet")
    shard_shapes = param_shard_shapes(cfg, tp)  # ValueError when tp does not divide the split sizes
    s = np.dtype(dtype).itemsize
    s_moment = moment_dtype(np.dtype(dtype)).itemsize
    sizes = {name: math.prod(shape) for name, shape in shard_shapes.items()}
    P_tp = sum(sizes.values())
    axes = split_axes(cfg)
    replicated = sum(n for name, n in sizes.items() if axes[name] is None)
    if zero == 1:
        shares = dp_partition(shard_shapes, dp)  # [names of dp rank d]
        owned = max(sum(sizes[name] for name in names) for names in shares)
        largest_owned = max(sizes[name] for names in shares for name in names)
    else:
        owned, largest_owned = P_tp, max(sizes.values())
    B = batch_size // micro_batches
    weights = P_tp * s
    grads = P_tp * s
    if dp == 1:
        comm = 0
    elif zero == 0:
        comm = 2 * grads
    else:
        comm = max(grads + owned * s, weights + owned * s)
    return MemoryPlan(
        cfg=cfg, tp=tp, dp=dp, zero=zero, dtype=str(np.dtype(dtype)), batch_size=batch_size,
        micro_batches=micro_batches, row_groups=row_groups, seq_len=seq_len, params_per_rank=P_tp,
        replicated_per_rank=replicated, owned_per_rank=owned, weights=weights,
        gradients=grads * (row_groups if micro_batches == 1 else row_groups + 1),
        moments=2 * owned * s_moment, activations=activation_bytes(cfg, B, seq_len, tp, s),
        recomputed=recomputed_bytes(cfg, B, seq_len, tp, s),
        working=working_bytes(cfg, B, seq_len, tp, s), comm_buffers=comm,
        loss_temporary=B * seq_len * (cfg.vocab_size // tp) * s if cfg.impl == "reference" else 0,
        init_temporary=8 * max(math.prod(shape) for shape in param_shapes(cfg).values()),
        adamw_scratch=largest_owned * s_moment,
    )


def default_device_memory_gib(device: str, ranks_on_machine: int) -> tuple[float, str]:
    """(GiB per rank, where the number comes from) when --device_memory_gb is not given."""
    if device == "cuda":
        return CUDA_DEVICE_MEMORY_GIB, "the default for --device cuda: an 80 GB A100 / H100"
    ram = machine_ram_bytes() / GIB
    return ram / ranks_on_machine, f"this machine's {ram:.1f} GiB of RAM shared by {ranks_on_machine} rank(s)"


def _gradient_sets(micro_batches: int, row_groups: int) -> str:
    """What the gradients line counts: each row group's gradients (the first becomes the running sum), and after
    the first micro-batch the running sum beside them."""
    if micro_batches == 1:
        return f"one set per row group ({row_groups} side by side)" if row_groups > 1 else ""
    per = f"{row_groups} row groups'" if row_groups > 1 else "one micro-batch's"
    return f"running sum + {per}"


def _row(label: str, n: int, note: str = "") -> str:
    return f"  {label:<15}{n:>18,} B {n / GIB:9.2f} GiB" + (f"   {note}" if note else "")


def format_plan(plan: MemoryPlan, device_memory_gib: float, memory_source: str) -> str:
    """The dry run's report: parameters, bytes per rank line by line, FLOPs per token, and whether it fits."""
    cfg, B, T = plan.cfg, plan.batch_size // plan.micro_batches, plan.seq_len
    ranks = plan.tp * plan.dp
    s = np.dtype(plan.dtype).itemsize
    P_layers = cfg.n_layers if cfg.recompute == "none" else 0  # the blocks that keep P until their backward
    P_bytes = P_layers * B * (cfg.n_heads // plan.tp) * T * T * s if cfg.impl == "reference" else 0
    kept = {"none": "every block's caches", "attention": "every block's caches but the attention's internals",
            "block": "each block's input x (B, T, C) only"}[cfg.recompute]
    fits = plan.peak <= device_memory_gib * GIB
    tokens_per_step = plan.batch_size * T * plan.dp
    return "\n".join([
        f"dry run: {cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads} heads ({cfg.n_kv_heads} kv), ffn {cfg.ffn_dim}, "
        f"vocab {cfg.vocab_size} | tp={plan.tp} x dp={plan.dp} = {ranks} ranks, zero={plan.zero} | {plan.dtype} | "
        f"{plan.batch_size} x {T} tokens per dp rank"
        + (f" in {plan.micro_batches} micro-batches" if plan.micro_batches > 1 else "")
        + (f", rows in {plan.row_groups} groups side by side" if plan.row_groups > 1 else ""),
        f"parameters: {plan.params_total:,} in all | {plan.params_per_rank:,} per rank "
        f"({plan.replicated_per_rank:,} of them replicated on every tp rank)",
        "bytes per rank (nothing allocated; npllm/memory.py says what each line counts):",
        _row("weights", plan.weights),
        _row("gradients", plan.gradients, _gradient_sets(plan.micro_batches, plan.row_groups)),
        _row("AdamW moments", plan.moments, f"m and v of {plan.owned_per_rank:,} parameters"
             + (" (this rank's ZeRO-1 share)" if plan.zero == 1 else "")),
        _row("activations", plan.activations, f"kept for backward, B={B} T={T}: {kept} "
             f"(--recompute={cfg.recompute}); "
             + (f"attention's P (B, NH_tp, T, T) is {P_bytes / GIB:.2f} GiB of it" if P_bytes else
                "flash attention keeps no T x T array (--impl=reference would)" if cfg.impl == "fast" else
                "the attention's P is recomputed")),
        _row("recomputed", plan.recomputed, {"none": "none: --recompute=none keeps every cache",
                                             "attention": "one attention's internals, rebuilt in its backward",
                                             "block": "one block's caches, rebuilt in its backward"}[cfg.recompute]),
        _row("working", plan.working, "largest temporaries of one block's backward (estimate)"),
        _row("loss temporary", plan.loss_temporary, "exp(logits) next to the logits, end of forward"
             if plan.loss_temporary else "none: the fast loss works in the logits' own memory"),
        _row("AdamW scratch", plan.adamw_scratch, "one temporary the size of the largest tensor it updates"),
        _row("comm buffers", plan.comm_buffers, "packed gradients for the data-parallel reduction"
             if plan.dp > 1 else "none with dp=1"),
        _row("init temporary", plan.init_temporary, "the largest full tensor in float64, drawn whole then sliced"),
        _row("peak", plan.peak, "max(weights + init temporary, weights + moments + max(activations + loss "
             "temporary, activations + recomputed + gradients + working, gradients + max(comm buffers, AdamW "
             "scratch)))"),
        f"FLOPs per token: {plan.flops_per_token:,} (training = 3 x forward, matmuls, whole model; each tp rank does "
        f"1/{plan.tp}) | per step of {tokens_per_step:,} tokens: {plan.flops_per_token * tokens_per_step:.3e}",
        f"fits: {'yes' if fits else 'NO'}: {plan.peak / GIB:.2f} GiB per rank "
        f"{'<=' if fits else '>'} {device_memory_gib:.2f} GiB ({memory_source})",
    ])


def dry_run_report(cfg: ModelConfig, tc: TrainConfig, world_size: int = 1) -> str:
    """The text of ``python -m npllm.train --dry_run``: what one rank of this run would hold, from shapes alone."""
    dp = tc.dp if tc.dp is not None else max(1, world_size // tc.tp)
    rows = tc.batch_size // tc.micro_batches
    plan = plan_memory(cfg, tp=tc.tp, dp=dp, zero=tc.zero, dtype=tc.dtype, batch_size=tc.batch_size,
                       seq_len=tc.seq_len, micro_batches=tc.micro_batches,
                       row_groups=tc.row_groups or default_row_groups(rows, tc.device, tc.tp))
    if tc.device_memory_gb is not None:
        memory, source = tc.device_memory_gb, "--device_memory_gb"
    else:
        memory, source = default_device_memory_gib(tc.device, tc.tp * dp)
    return format_plan(plan, memory, source)
