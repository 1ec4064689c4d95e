"""AdamW, global-norm gradient clipping and the warmup + cosine learning-rate schedule.

Parameters and gradients are ordered ``dict[str, array]`` with the same keys (the names come from
``npllm.models.decoder.param_specs``). Arrays may be NumPy or CuPy: every function asks the data for its array module
(``xp = get_array_module(x)``), so the same code runs on either.

The math, with these symbols, is derived in ``docs/derivations/adamw.md``:

    g        gradient of the loss for one parameter tensor p
    m, v     first and second moment estimates (running averages of g and g*g)
    t        the optimizer step, 1 for the first update (state["step"] after the increment)
    lr, wd   learning rate and weight-decay coefficient

Gradient accumulation over micro-batches is not done here: the trainer sums the micro-batch gradients
(in model.py / train.py) and hands the summed (or averaged) grads to ``clip_grad_norm`` and ``adamw_update``.
"""

import math

import numpy as np

from .backend import get_array_module

# grad_sq_sum casts gradients to float64 this many elements at a time, so the float64 copy stays small
# (2**22 float64 values = 32 MiB) even for a (V, C) embedding gradient of a 7B model (131M elements).
SQ_SUM_CHUNK = 1 << 22


# ----------------------------------------------------------------------------------------------------------
# which parameters get weight decay


def decays(name, shape):
    """True when the parameter ``name`` of this ``shape`` gets decoupled weight decay.

    Rule: a tensor decays iff it has 2 or more dimensions. So every weight matrix decays, including
    ``tok_emb`` (V, C), ``pos_emb`` (T_max, C) and ``lm_head`` (C, V); the 1-D tensors (norm gains
    ``*.w`` of shape (C,), biases ``*.b``, ``attn.bq`` ...) do not. Pulling a norm gain towards 0 (instead
    of towards its natural value 1) or a bias towards 0 is not a useful prior, and they hold few numbers.
    The rule is by shape alone; ``name`` is part of the signature so that a reader who wants another
    convention (e.g. GPT-2's "no decay on embeddings") can write it here, in one place.
    """
    return len(shape) >= 2


def moment_dtype(param_dtype):
    """The dtype of AdamW's m and v for a parameter of ``param_dtype``.

    Rule: float32, unless the parameter is float64, then float64. float32 moments keep low-precision
    (float16 / bf16) parameters' optimizer state accurate; float64 moments keep float64 runs (the ones
    the tests compare to a plain transcription of the algorithm) exact to rounding.
    """
    # dtypes are NumPy objects for both backends (cupy.float32 is numpy.float32)
    return np.dtype(np.float64) if np.dtype(param_dtype) == np.float64 else np.dtype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# AdamW


def adamw_init(params):
    """Fresh AdamW state for ``params``: ``{"step": 0, "m": {name: zeros}, "v": {name: zeros}}``.

    m and v have each parameter's shape, live on the parameter's device, and have ``moment_dtype(p.dtype)``.
    """
    m, v = {}, {}
    for name, p in params.items():
        xp = get_array_module(p)
        m[name] = xp.zeros(p.shape, dtype=moment_dtype(p.dtype))  # m_0 = 0, same shape as p
        v[name] = xp.zeros(p.shape, dtype=moment_dtype(p.dtype))  # v_0 = 0, same shape as p
    return {"step": 0, "m": m, "v": v}


def adamw_update(params, grads, state, *, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """One AdamW step. Updates ``params`` and ``state["m"]``, ``state["v"]`` IN PLACE; returns None.

    In place because of memory: a 7B model in float32 holds 28 GB of parameters and 56 GB of moments.
    Returning new dicts would need another 84 GB at the peak. Here the only extra memory is one scratch
    array the size of the tensor being updated, freed before the next tensor.

    ``state["step"]`` is incremented first, so the first call uses t = 1 in the bias corrections.
    ``lr`` is this step's learning rate (from ``lr_at``). Weight decay is decoupled (not added to g) and
    applied only where ``decays(name, p.shape)``. The hyperparameters are checked once where they enter
    (``TrainConfig``), not here on every step; grads and state must have the keys and shapes of params.
    """
    state["step"] += 1
    t = state["step"]                                   # t = 1, 2, 3, ...
    bias1 = 1.0 - beta1**t                              # 1 - beta1^t: corrects m's pull towards m_0 = 0
    bias2 = 1.0 - beta2**t                              # 1 - beta2^t: corrects v's pull towards v_0 = 0
    for name, p in params.items():
        xp = get_array_module(p)
        g, m, v = grads[name], state["m"][name], state["v"][name]
        scratch = xp.empty_like(m)                      # (shape of p) the one temporary, in the moment dtype

        # first moment: m_t = beta1 * m_{t-1} + (1 - beta1) * g
        xp.multiply(g, 1.0 - beta1, out=scratch)        # scratch = (1 - beta1) * g
        m *= beta1                                      # m = beta1 * m_{t-1}
        m += scratch                                    # m = beta1 * m_{t-1} + (1 - beta1) * g

        # second moment: v_t = beta2 * v_{t-1} + (1 - beta2) * g^2
        xp.multiply(g, g, out=scratch)                  # scratch = g^2 (elementwise)
        scratch *= 1.0 - beta2                          # scratch = (1 - beta2) * g^2
        v *= beta2                                      # v = beta2 * v_{t-1}
        v += scratch                                    # v = beta2 * v_{t-1} + (1 - beta2) * g^2

        # decoupled weight decay, on p_{t-1} (before the Adam step): p = p - lr * wd * p = (1 - lr * wd) * p
        if weight_decay != 0 and decays(name, p.shape):
            p *= 1.0 - lr * weight_decay

        # Adam step: p = p - lr * m_hat / (sqrt(v_hat) + eps), with m_hat = m / bias1, v_hat = v / bias2
        xp.divide(v, bias2, out=scratch)                # scratch = v_hat
        xp.sqrt(scratch, out=scratch)                   # scratch = sqrt(v_hat)
        scratch += eps                                  # scratch = sqrt(v_hat) + eps
        xp.divide(m, scratch, out=scratch)              # scratch = m / (sqrt(v_hat) + eps)
        scratch *= lr / bias1                           # scratch = lr * m_hat / (sqrt(v_hat) + eps)
        p -= scratch                                    # p_t = p - lr * m_hat / (sqrt(v_hat) + eps)


# ----------------------------------------------------------------------------------------------------------
# gradient norm and clipping


def grad_sq_sum(grads, names=None):
    """Local sum of squares of the gradients, sum_name sum_i grads[name][i]^2, as a Python float.

    Accumulated in float64 whatever the gradients' dtype, so millions of float32 squares add up without
    losing the small ones. ``names`` restricts the sum to some tensors (default: all of ``grads``); a
    parallel layer uses it to count each tensor once across ranks (e.g. a replicated norm gain only on
    rank 0), all-reduces the local sums, and passes ``sqrt(total)`` to ``clip_grad_norm(..., norm=)``.
    """
    if names is None:
        names = list(grads)
    unknown = [n for n in names if n not in grads]
    if unknown:
        raise ValueError(f"names {unknown} are not in grads; known names: {list(grads)}")
    total = 0.0
    for name in names:
        g = grads[name]
        xp = get_array_module(g)
        flat = g.reshape(-1)                                        # (n,) a view when g is contiguous
        for start in range(0, flat.shape[0], SQ_SUM_CHUNK):
            chunk = flat[start:start + SQ_SUM_CHUNK].astype(xp.float64)   # (<= SQ_SUM_CHUNK,) float64 copy
            total += float(xp.dot(chunk, chunk))                          # += sum_i chunk_i^2
    return total


def global_grad_norm(grads):
    """The L2 norm of all gradients taken as one long vector: sqrt(sum_name sum_i grads[name][i]^2)."""
    return math.sqrt(grad_sq_sum(grads))


def clip_grad_norm(grads, max_norm, norm=None):
    """Scale ``grads`` IN PLACE so that their global norm is at most ``max_norm``.

    Returns ``(norm, scale)``: the global norm before clipping and the factor the grads were multiplied by.
      scale = max_norm / norm   when norm > max_norm      (after it, the global norm is exactly max_norm)
      scale = 1.0               otherwise; also when max_norm <= 0 (clipping disabled) and when the norm
                                is inf or nan (grads are left as they are: the trainer sees the
                                non-finite norm and stops before the update, naming the last good checkpoint).
    ``norm``: pass the global norm when it was computed elsewhere (a parallel run all-reduces
    ``grad_sq_sum`` of each rank's shard and passes the square root); default ``global_grad_norm(grads)``.
    """
    if norm is None:
        norm = global_grad_norm(grads)
    norm = float(norm)
    if norm < 0:
        raise ValueError(f"norm={norm!r}: a norm must be >= 0")
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return norm, 1.0
    scale = max_norm / norm                             # < 1, so ||scale * g|| = max_norm
    for g in grads.values():
        g *= scale                                      # g = g * max_norm / ||g||
    return norm, scale


# ----------------------------------------------------------------------------------------------------------
# learning-rate schedule


def lr_at(step, *, lr, warmup_steps, total_steps, min_lr):
    """Learning rate for the 0-based optimizer ``step``: linear warmup, cosine decay, then flat at min_lr.

        s < W:          lr_at(s) = lr * (s + 1) / W                      (W = warmup_steps; lr at s = W - 1)
        W <= s < S:     lr_at(s) = min_lr + 0.5 * (lr - min_lr) * (1 + cos(pi * (s - W) / (S - W)))
                                                                         (S = total_steps; lr at s = W)
        s >= S:         lr_at(s) = min_lr

    The warmup never starts at 0 (the first step already moves the weights). With W = 0 there is no
    warmup; with S = W there is no decay segment (lr until W, then min_lr). Needs 0 <= W <= S and
    0 <= min_lr <= lr, which ``TrainConfig`` checks where they enter.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps                       # linear: lr/W, 2 lr/W, ..., lr
    if step >= total_steps:
        return float(min_lr)                                        # after the schedule: flat
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))  # from lr down towards min_lr
