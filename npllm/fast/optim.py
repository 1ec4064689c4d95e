"""AdamW, fused over each tensor and chunked over all cores: npllm.optim.adamw_update's contract (same name,
signature, in-place updates of params and state, ``state["step"]`` incremented first), with the same bits.

The reference runs each of its 14 operations over the whole tensor with one tensor-sized scratch: 14 passes over
memory (the (V, C) embedding and head are 8 MiB each at V=8192, C=256, float32). Here a tensor's elements are cut
into chunks (npllm.fast.pool) and each chunk runs the same 14 operations, in the same order, on its slice of p, g, m
and v with a chunk-sized scratch: the chunk stays in cache between them, the chunks run on every core, and each
element goes through exactly the reference's floating-point operations, so p, m and v come out bit for bit the same.

Everything else (adamw_init, decays, moment_dtype, clipping, the schedule) is npllm.optim's.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..optim import decays
from .pool import map_rows


def _adamw_slice(xp, p, g, m, v, *, beta1, beta2, eps, bias1, bias2, lr, decay):
    """The AdamW step on one slice (views of p, g, m, v of the same shape), in the reference's operations."""
    scratch = xp.empty_like(m)  # the one temporary, in the moment dtype

    # first moment: m_t = beta1 * m_{t-1} + (1 - beta1) * g
    xp.multiply(g, 1.0 - beta1, out=scratch)
    m *= beta1
    m += scratch

    # second moment: v_t = beta2 * v_{t-1} + (1 - beta2) * g^2
    xp.multiply(g, g, out=scratch)
    scratch *= 1.0 - beta2
    v *= beta2
    v += scratch

    # decoupled weight decay on p_{t-1}: p = (1 - lr * wd) * p (decay: 1 - lr * wd, or None for no decay)
    if decay is not None:
        p *= decay

    # Adam step: p = p - lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / bias1, v_hat = v / bias2
    xp.divide(v, bias2, out=scratch)
    xp.sqrt(scratch, out=scratch)
    scratch += eps
    xp.divide(m, scratch, out=scratch)
    scratch *= lr / bias1
    p -= scratch


def _flat(a):
    """The 1-D view of a C-contiguous array, or None when there is no such view (then the tensor is not chunked)."""
    return a.reshape(-1) if a.flags.c_contiguous else None


def adamw_update(params, grads, state, *, lr, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1):
    """One AdamW step. Updates ``params`` and ``state["m"]``, ``state["v"]`` IN PLACE; returns None.

    As npllm.optim.adamw_update (read its docstring for the rules: t = 1 on the first call, decoupled weight decay
    where ``decays(name, p.shape)``); the only extra memory is one chunk-sized scratch per thread. A tensor that is
    not C-contiguous (p, g, m or v) is updated whole, in the calling thread.
    """
    state["step"] += 1
    t = state["step"]  # t = 1, 2, 3, ...
    consts = {"beta1": beta1, "beta2": beta2, "eps": eps, "lr": lr,
              "bias1": 1.0 - beta1**t,  # 1 - beta1^t: corrects m's pull towards m_0 = 0
              "bias2": 1.0 - beta2**t}  # 1 - beta2^t: corrects v's pull towards v_0 = 0
    for name, p in params.items():
        xp = get_array_module(p)
        g, m, v = grads[name], state["m"][name], state["v"][name]
        decay = 1.0 - lr * weight_decay if weight_decay != 0 and decays(name, p.shape) else None
        flats = [_flat(a) for a in (p, g, m, v)]
        if any(f is None for f in flats):
            _adamw_slice(xp, p, g, m, v, decay=decay, **consts)
            continue
        fp, fg, fm, fv = flats

        def rows(r, fp=fp, fg=fg, fm=fm, fv=fv, decay=decay, xp=xp):
            _adamw_slice(xp, fp[r], fg[r], fm[r], fv[r], decay=decay, **consts)

        map_rows(rows, fp.shape[0], 1, xp=xp)
