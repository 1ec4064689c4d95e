"""AdamW, fused over each tensor and chunked over all cores: npllm.optim.adamw_update's contract (same name,
signature, in-place updates of params and state, ``state["step"]`` incremented first), with the same bits.

The reference runs each of its 14 operations over the whole tensor with one tensor-sized scratch: 14 passes over
memory (the (V, C) embedding and head are 8 MiB each at V=8192, C=256, float32). Here every tensor's elements are cut
into pieces of at most npllm.fast.pool.CHUNK_ELEMENTS, consecutive small pieces (biases, norm gains, the smaller
matrices) are packed together up to that size, and the packs are spread over every core in one map_rows call for the
whole model: each piece runs the same 14 operations, in the same order, on its slice of p, g, m and v with a
piece-sized scratch, so it stays in cache between them, and each element goes through exactly the reference's
floating-point operations: p, m and v come out bit for bit the same. (One pass per tensor, as before 2026-12-02,
left every tensor below two chunks to the calling thread: at the GPT-2-shaped profile's 256K-element chunks that was
all of them but the embedding, 60% of the elements.)

Everything else (adamw_init, decays, moment_dtype, clipping, the schedule) is npllm.optim's.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..optim import decays
from . import pool


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
    where ``decays(name, p.shape)``); the only extra memory is one piece-sized scratch per thread. A tensor that is
    not C-contiguous (p, g, m or v) is updated whole, in the calling thread; so is every tensor of a CuPy model (the
    GPU runs each operation over the whole tensor).
    """
    state["step"] += 1
    t = state["step"]  # t = 1, 2, 3, ...
    consts = {"beta1": beta1, "beta2": beta2, "eps": eps, "lr": lr,
              "bias1": 1.0 - beta1**t,  # 1 - beta1^t: corrects m's pull towards m_0 = 0
              "bias2": 1.0 - beta2**t}  # 1 - beta2^t: corrects v's pull towards v_0 = 0
    chunk = pool.CHUNK_ELEMENTS
    pieces = []  # (decay, p, g, m, v): 1-D views of at most `chunk` elements, in parameter order
    for name, p in params.items():
        xp = get_array_module(p)
        g, m, v = grads[name], state["m"][name], state["v"][name]
        decay = 1.0 - lr * weight_decay if weight_decay != 0 and decays(name, p.shape) else None
        flats = [_flat(a) for a in (p, g, m, v)]
        if any(f is None for f in flats) or xp is not np:
            _adamw_slice(xp, p, g, m, v, decay=decay, **consts)
            continue
        for lo in range(0, p.size, chunk):
            pieces.append((decay, *(f[lo:lo + chunk] for f in flats)))
    packs = _packs(pieces, chunk)

    def rows(r):
        for pack in packs[r]:
            for decay, p, g, m, v in pack:
                _adamw_slice(np, p, g, m, v, decay=decay, **consts)

    pool.map_rows(rows, len(packs), chunk)  # one pack per chunk of the pool: row_size = chunk elements


def _packs(pieces, size):
    """The pieces (decay, p, g, m, v) grouped in order into packs of at most ``size`` elements (a piece of ``size``
    elements is a pack of its own)."""
    packs, current, elements = [], [], 0
    for piece in pieces:
        n = piece[1].size
        if current and elements + n > size:
            packs.append(current)
            current, elements = [], 0
        current.append(piece)
        elements += n
    if current:
        packs.append(current)
    return packs
