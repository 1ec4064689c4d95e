"""Inverted dropout whose masks come from a counter-based random function, so every split of a run draws the same mask.

    y = x * mask / (1 - rate),    mask ~ Bernoulli(1 - rate),    E[y] = x

rate = 0 is the identity: y is x itself, no mask is drawn, and the backward returns dy itself.

Where the bits come from. A sequential generator gives an element the bits of its place in the draw order, which
changes when the batch is split over data-parallel ranks, the heads over tensor-parallel ranks, or a run is resumed
half-way. Here an element's keep bit is a pure function of the key and of the element's own coordinates in the
tensor one process would hold for the whole global batch:

    key      = dropout_key(seed, step, micro_batch, layer, site)           two 64-bit words (a hash of the five)
    counter  = (c // 8, t, h, b)                                           four 64-bit words
    lanes    = philox4x64(counter, key)                                    4 x 64 bits = 8 lanes of 32 bits
    keep     = lanes[c % 8] < round((1 - rate) * 2^32)

for the element at global row b (row_offset + local row), global head h (head_offset + local head; 0 without a head
axis), position t and global column c (col_offset + local column). philox4x64 is Philox4x64-10 (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011), the function behind NumPy's Philox bit generator, evaluated
here with array arithmetic on all counters at once: the same code runs on CuPy arrays and gives the same bits on the
GPU. A rank that holds rows [r0, r0 + B) and heads [h0, h0 + H) computes its slice of the mask directly: nothing of
the full mask is drawn or stored anywhere, which is what matters for the (B, NH, T, Tk) attention probabilities of
a big model. Derivation: docs/derivations/dropout.md
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module
from ..checks import check_int, check_number, is_int

MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF
PHILOX_M = (0xD2E7470EE14C6C93, 0xCA5A826395121157)  # Philox4x64 round multipliers
PHILOX_W = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)  # Philox4x64 key increments (golden ratio, sqrt(3) - 1)
PHILOX_ROUNDS = 10
LANES = 8  # 32-bit lanes per counter: 4 output words of 64 bits
CHUNK_COUNTERS = 1 << 15  # counters per pass: temporaries of 256 KiB, cache-sized (2^18 ran 2x slower)
SITE_PATTERN = re.compile(r"[a-z][a-z0-9_.]*")
# the sites the models use; any name matching SITE_PATTERN is accepted, and each (layer, site) must name one place
SITES = ("embed", "attn_probs", "attn_out", "mlp_hidden", "mlp_out", "cross_probs", "cross_out", "pooler")


def dropout_key(seed: int, step: int, micro_batch: int, layer: int, site: str) -> tuple[int, int]:
    """The Philox key (two 64-bit words) of one dropout site in one micro-batch of one step.

    A 128-bit BLAKE2b hash of the five values: every (seed, step, micro_batch, layer, site) gets its own key, and the
    key does not depend on how the run is split. layer: the block's index (a model with two stacks numbers them
    apart or uses distinct site names, e.g. "enc.attn_probs").
    """
    values = [check_int(name, value, minimum=0) for name, value in
              (("seed", seed), ("step", step), ("micro_batch", micro_batch), ("layer", layer))]
    for name, value in zip(("seed", "step", "micro_batch", "layer"), values):
        if value > MASK64:
            raise ValueError(f"{name}={value} is not allowed; use an integer below 2^64")
    if not isinstance(site, str) or not SITE_PATTERN.fullmatch(site):
        raise ValueError(f"site={site!r} is not allowed; use a lowercase name such as {', '.join(SITES)}")
    message = struct.pack("<4Q", *values) + site.encode("ascii")
    digest = hashlib.blake2b(message, digest_size=16, person=b"npllm-dropout").digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def _check_key(key):
    if (not isinstance(key, tuple) or len(key) != 2 or not all(is_int(k) and 0 <= k <= MASK64 for k in key)):
        raise ValueError(f"key={key!r} is not allowed; use the (int, int) of dropout_key(...)")
    return int(key[0]), int(key[1])


def _mulhilo(xp, a, m):
    """(hi, lo): the 64-bit halves of the 128-bit product a * m, for a uint64 array a and a 64-bit constant m.

    Schoolbook multiplication in 32-bit halves, a = a_hi 2^32 + a_lo and m = m_hi 2^32 + m_lo:
        hi = a_hi m_hi + (mid >> 32) + ((a_lo m_hi + (mid & MASK32)) >> 32),  mid = a_hi m_lo + (a_lo m_lo >> 32)
    where every partial sum fits in 64 bits. Updated in place: the rounds are memory-bound, fresh arrays cost ~2x."""
    m_lo, m_hi, half = xp.uint64(m & MASK32), xp.uint64(m >> 32), xp.uint64(32)
    a_lo = a & xp.uint64(MASK32)  # (...)
    a_hi = a >> half  # (...)
    carry = a_lo * m_lo  # (...)
    carry >>= half  # the high half of a_lo m_lo
    mid = a_hi * m_lo  # (...)
    mid += carry  # mid = a_hi m_lo + (a_lo m_lo >> 32)
    a_lo *= m_hi
    a_lo += mid & xp.uint64(MASK32)  # a_lo m_hi + (mid & MASK32)
    a_lo >>= half
    mid >>= half
    a_hi *= m_hi
    a_hi += mid
    a_hi += a_lo  # hi
    return a_hi, a * xp.uint64(m)  # the low half is the product mod 2^64


def philox4x64(counter, key, rounds=PHILOX_ROUNDS):
    """Philox4x64 (10 rounds by default) of the counters ``counter`` = (c0, c1, c2, c3), uint64 arrays that
    broadcast together, under the two-word ``key``. Returns the four uint64 output words, each of the broadcast shape.

    Equal, bit for bit, to Random123's philox4x64_R(rounds, counter, key) and so to NumPy's Philox bit generator,
    whose k-th block of four outputs is this function at counter + k + 1 (NumPy increments before it computes)."""
    xp = get_array_module(*counter)
    k0, k1 = _check_key(tuple(key))
    c0, c1, c2, c3 = xp.broadcast_arrays(*counter)  # views; every round below makes full-size arrays
    for r in range(rounds):
        if r:  # bump the key before every round but the first
            k0, k1 = (k0 + PHILOX_W[0]) & MASK64, (k1 + PHILOX_W[1]) & MASK64
        hi0, lo0 = _mulhilo(xp, c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(xp, c2, PHILOX_M[1])
        hi1 ^= c1
        hi1 ^= xp.uint64(k0)
        hi0 ^= c3
        hi0 ^= xp.uint64(k1)
        c0, c1, c2, c3 = hi1, lo1, hi0, lo0  # (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    return c0, c1, c2, c3


def _as_rows_heads_positions_columns(shape):
    """(B, H, T, X) for an x of shape (B, X), (B, T, X) or (B, H, T, X)."""
    if len(shape) == 2:
        return shape[0], 1, 1, shape[1]
    if len(shape) == 3:
        return shape[0], 1, shape[1], shape[2]
    if len(shape) == 4:
        return tuple(shape)
    raise ValueError(f"dropout takes (B, X), (B, T, X) or (B, H, T, X) arrays; got shape {tuple(shape)}")


def keep_mask(shape, rate, key, xp=np, *, row_offset=0, head_offset=0, col_offset=0):
    """The boolean keep mask (True: kept, probability 1 - rate) of a (B, X), (B, T, X) or (B, H, T, X) array whose
    rows, heads and columns start at row_offset, head_offset and col_offset of the full tensor. See the module doc."""
    rate = check_number("rate", rate, 0.0, 1.0, high_open=True)
    key = _check_key(key)
    offsets = [check_int(name, value, minimum=0) for name, value in
               (("row_offset", row_offset), ("head_offset", head_offset), ("col_offset", col_offset))]
    row_offset, head_offset, col_offset = offsets
    B, H, T, X = _as_rows_heads_positions_columns(shape)
    threshold = xp.uint64(min(round((1.0 - rate) * 2.0**32), 2**32))  # P(lane < threshold) = threshold / 2^32
    g0 = col_offset // LANES  # the counters (groups of 8 columns) that cover columns [col_offset, col_offset + X)
    n_groups = (col_offset + X + LANES - 1) // LANES - g0
    first = col_offset - g0 * LANES  # this array's first column within the first group
    lines = B * H * T  # one line of columns per (row, head, position)
    mask = xp.empty((lines, X), dtype=bool)  # (B*H*T, X)
    word0 = xp.arange(g0, g0 + n_groups, dtype=xp.uint64)[None, :]  # (1, n_groups): the column group c // 8
    step = max(1, CHUNK_COUNTERS // max(n_groups, 1))
    for l0 in range(0, lines, step):
        line = xp.arange(l0, min(lines, l0 + step), dtype=xp.uint64)[:, None]  # (n, 1)
        t = line % xp.uint64(T)  # (n, 1) position
        h = (line // xp.uint64(T)) % xp.uint64(H) + xp.uint64(head_offset)  # (n, 1) global head
        b = line // xp.uint64(T * H) + xp.uint64(row_offset)  # (n, 1) global row
        words = philox4x64((xp.broadcast_to(word0, (line.shape[0], n_groups)), t, h, b), key)  # 4 x (n, n_groups)
        lanes_kept = xp.empty((line.shape[0], n_groups, 4, 2), dtype=bool)  # (n, n_groups, 4, 2)
        for w, word in enumerate(words):  # lane 2w is the low half of word w, lane 2w + 1 the high half
            lanes_kept[:, :, w, 0] = (word & xp.uint64(MASK32)) < threshold
            lanes_kept[:, :, w, 1] = (word >> xp.uint64(32)) < threshold
        mask[l0:l0 + line.shape[0]] = lanes_kept.reshape(line.shape[0], n_groups * LANES)[:, first:first + X]
    return mask.reshape(shape)


def dropout_forward(x, rate, key, *, row_offset=0, head_offset=0, col_offset=0):
    """y = x * mask / (1 - rate) for x (B, X), (B, T, X) or (B, H, T, X); mask = keep_mask(x.shape, rate, key, ...).

    rate: 0 <= rate < 1; 0 returns x itself (no mask drawn). key: dropout_key(seed, step, micro_batch, layer, site).
    row_offset / head_offset / col_offset: where this array's rows (axis 0), heads (axis 1 of a 4-D x) and columns
    (last axis) start in the tensor one process would hold (a data-parallel rank's first global row, a
    tensor-parallel rank's first head or hidden unit).
    """
    rate = check_number("rate", rate, 0.0, 1.0, high_open=True)
    if rate == 0.0:
        return x, None  # the identity: nothing drawn, nothing kept
    xp = get_array_module(x)
    mask = keep_mask(x.shape, rate, key, xp, row_offset=row_offset, head_offset=head_offset,
                     col_offset=col_offset)  # (same shape as x) bool
    scale = 1.0 / (1.0 - rate)
    y = x * mask * scale  # (same shape as x), x's dtype
    cache = (mask, scale)  # keep the boolean mask (1 byte per element); redrawing it would cost the Philox rounds again
    return y, cache


def dropout_backward(dy, cache):
    """forward was y = x * mask * scale (scale = 1 / (1 - rate)), so dx = dy * mask * scale; rate 0: dx is dy."""
    if cache is None:
        return dy, {}
    mask, scale = cache
    return dy * mask * scale, {}  # (same shape as dy)


@dataclass(frozen=True)
class Dropout:
    """What a model needs to drop out during one training forward: the rates, and the coordinates of the masks.

    Training builds one per micro-batch: ``Dropout(rate, attn_rate, seed, step, row_offset)`` with row_offset the
    global row (in the step's whole batch over every data-parallel rank) of the micro-batch's first row. The key's
    micro_batch stays 0: global rows already tell every micro-batch's rows apart, so a mask depends on neither how
    the batch is split into micro-batches nor over how many ranks, and every layout draws one process's masks.
    Evaluation and generation pass no Dropout (None): nothing is dropped.
    """

    rate: float  # on the embeddings and on every block's output branches (cfg.dropout)
    attn_rate: float  # on the attention probabilities (cfg.attn_dropout)
    seed: int
    step: int
    row_offset: int = 0

    def key(self, layer: int, site: str) -> tuple[int, int]:
        """The Philox key of one dropout site of one block (layer) in this step."""
        return dropout_key(self.seed, self.step, 0, layer, site)

    def rows(self, start: int) -> "Dropout":
        """The same step's dropout for the rows from ``start`` of this batch on (a micro-batch)."""
        return Dropout(self.rate, self.attn_rate, self.seed, self.step, self.row_offset + int(start))

    def apply(self, x, layer: int, site: str, **offsets):
        """dropout_forward of x at (layer, site) with this batch's row offset: (y, cache)."""
        return dropout_forward(x, self.rate, self.key(layer, site), row_offset=self.row_offset, **offsets)
