"""Flash-style attention: the contract of npllm.layers.attention, computed tile by tile.

    flash_attention_forward / _backward              self-attention, causal (a decoder) or bidirectional (an
                                                     encoder), key padding mask, GQA, RoPE, past_kv for decoding
    flash_cross_attention_forward / _backward        cross-attention: queries from x, keys/values from a memory
                                                     (memory_mask; memory_kv precomputed by flash_cross_attention_kv)
    flash_core_forward / _backward                   the part from (q, k, v) to o that both share

Same signatures and cache contract as the reference's, so a model calls either (npllm/models/ops.py). Attention
dropout is the reference's alone: the flash path never forms P, the matrix it drops (dropout_rate must be 0 here).

The projections, RoPE and the output projection are those of the reference. The core differs: instead of the full
(T, Tk) probability matrix P per head, it walks over tiles of query rows x keys with an online softmax and keeps for
backward only the output o and each query row's logsumexp L. The backward recomputes each tile's P from q, k and L
and uses D = rowsum(do * o) (FlashAttention-2). Derivation: docs/derivations/attention.md, the last section.

Layout. The core works on "rows": the G query heads that share key/value head kv are laid out query-position-major,
row r = t * G + g, so q becomes (S, R, hs) with S = B * NKV slices and R = T * G rows per slice. A tile is then one
matrix product per slice with M = (query positions of the tile) * G, k and v are broadcast over the G heads of their
group without a copy, and the sum over those G heads in dk, dv is the matrix product's own sum over rows.

    forward, per query tile Q_i and each key tile K_j, V_j not entirely above the causal diagonal:
        s = (Q_i * scale) @ K_j^T  (masked: -inf)        m_new = max(m, rowmax(s))
        p = exp(s - m_new)                                l = l * exp(m - m_new) + rowsum(p)
        acc = acc * exp(m - m_new) + p @ V_j              m = m_new
    o = acc / l,  L = m + log(l)
    backward, with D = rowsum(do * o), per tile:
        P = exp(s - L)    dv_j += P^T @ do_i    dS = P * (do_i @ V_j^T - D)
        dq_i += dS @ K_j * scale                dk_j += dS^T @ Q_i * scale
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers

from ..backend import get_array_module
from ..parallel.cores import on_one_core, side_by_side, threads_beside_blas
from ..parallel.cores import default_threads as cores_default_threads

# Default tile sizes, chosen by measurement (benchmarks/bench_attention.py --tune; float32, NH=4, hs=64, 2 cores).
# A query tile cut by the causal diagonal wastes about half of its last key tile, q_tile^2 / 2 scores, so the waste
# is ~q_tile / T of the useful work, while every tile costs ~10-20 NumPy calls of overhead. T / 8 positions per
# query tile within [32, 128] balanced the two: at T=256, q_tile=32 took half the time of one 256 x 256 tile; at
# T=1024 and 2048, q_tile=128 was 5-10% faster than 256 and as fast as 64. Key tiles of 512 were as fast as 1024 or
# faster, and keep the score tile at (q_tile * G) x 512 whatever T is.
Q_TILES_PER_SEQUENCE = 8
Q_TILE_MIN, Q_TILE_MAX = 32, 128
K_TILE = 512


def default_q_tile(T: int) -> int:
    """Query positions per tile when the caller gives none: T / 8 within [32, 128]."""
    return min(Q_TILE_MAX, max(Q_TILE_MIN, T // Q_TILES_PER_SEQUENCE))


# Below this many score entries (S * R * Tk) a call runs in the calling thread: a thread pool's hand-off (~50 us)
# would cost more than it saves (decoding one token, tests' tiny shapes).
MIN_WORK_FOR_THREADS = 1 << 18


def default_threads() -> int:
    """Threads for the core: this process's share of the node's cores (npllm.parallel.cores.default_threads), fewer
    where BLAS's thread count cannot be set (threads_beside_blas); 1 in a thread that does one core's work."""
    if on_one_core():
        return 1
    return threads_beside_blas(cores_default_threads())


def _run_over_slices(xp, fn, S, work, threads):
    """fn(lo, hi) over the slices [0, S), split into contiguous chunks run side by side on up to ``threads`` threads
    (npllm.parallel.cores.side_by_side: BLAS on one thread meanwhile).

    The chunks touch disjoint slices of every output, so no two threads write the same memory. NumPy releases the GIL
    inside BLAS and its ufuncs, which is where the time goes. (CuPy: one thread; the GPU runs the work.)
    """
    n = min(threads, S) if work >= MIN_WORK_FOR_THREADS and xp.__name__ == "numpy" else 1
    if n <= 1:
        fn(0, S)
        return
    bounds = [S * c // n for c in range(n + 1)]
    side_by_side([functools.partial(fn, lo, hi) for lo, hi in itertools.pairwise(bounds)], threads=n)


def _positive_int(name, value, default):
    if value is None:
        return default
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a positive int")
    return int(value)


def _check_core_args(qg, k, v, causal, T_past, key_mask):
    if qg.ndim != 5:
        raise ValueError(f"qg has shape {qg.shape}; expected (B, NKV, G, T, hs)")
    B, NKV, G, T, hs = qg.shape
    if k.ndim != 4 or k.shape[:2] != (B, NKV) or k.shape[3] != hs or v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must both be (B, NKV, Tk, hs) = ({B}, {NKV}, Tk, {hs})")
    Tk = k.shape[2]
    if causal and T_past + T != Tk:
        raise ValueError(f"causal attention needs Tk = T_past + T; got Tk={Tk}, T_past={T_past}, T={T}")
    if not causal and T_past != 0:
        raise ValueError(f"T_past={T_past} is the query offset of causal attention; use 0 when causal=False")
    if key_mask is not None and (key_mask.shape != (B, Tk) or key_mask.dtype != bool):
        raise ValueError(f"key_mask must be a boolean (B, Tk) = ({B}, {Tk}) array; got {key_mask.dtype} "
                         f"{key_mask.shape}")
    return B, NKV, G, T, hs, Tk


def _rows(a):
    """(B, NKV, G, T, X) -> (B*NKV, T*G, X), row r = t * G + g; free when a is a view of a (B, NKV, T, G, X) array."""
    B, NKV, G, T = a.shape[:4]
    return a.transpose(0, 1, 3, 2, *range(4, a.ndim)).reshape(B * NKV, T * G, *a.shape[4:])


def _unrows(a, B, NKV, G):
    """(B*NKV, T*G, X) -> the (B, NKV, G, T, X) view of it (no copy)."""
    R = a.shape[1]
    return a.reshape(B, NKV, R // G, G, *a.shape[2:]).transpose(0, 1, 3, 2, *range(4, a.ndim + 2))


class _Tiling:
    """Which tiles exist and which need a mask; the masks themselves. Shared by forward and backward."""

    def __init__(self, xp, B, NKV, G, T, Tk, causal, T_past, key_mask, q_tile, k_tile, dtype):
        self.G, self.T, self.Tk, self.causal, self.T_past = G, T, Tk, causal, T_past
        self.q_tile, self.k_tile = q_tile, k_tile
        self.row_pos = T_past + xp.arange(T * G) // G  # (R,): the absolute position of each query row
        self.key_pos = xp.arange(Tk)  # (Tk,)
        self.key_bias = None
        if key_mask is not None:  # 0 for a real key, -inf for padding, one row per slice s = b * NKV + kv
            bias = xp.where(key_mask, 0.0, -xp.inf).astype(dtype)  # (B, Tk)
            self.key_bias = xp.repeat(bias, NKV, axis=0)[:, None, :]  # (S, 1, Tk)

    def query_tiles(self):
        """(r0, r1, i0, i1): rows [r0, r1) of query positions [i0, i1)."""
        for i0 in range(0, self.T, self.q_tile):
            i1 = min(self.T, i0 + self.q_tile)
            yield i0 * self.G, i1 * self.G, i0, i1

    def key_tiles(self, i0, i1):
        """(j0, j1, crosses): key tiles that some query of [i0, i1) may see; crosses: the tile needs the causal mask.

        Causal: query i sits at position T_past + i and sees keys j <= T_past + i, so keys past T_past + i1 - 1 are
        seen by no query of the tile (those tiles are skipped), and a tile whose last key j1 - 1 <= T_past + i0 is
        seen whole by every query (no mask).
        """
        j_end = min(self.Tk, self.T_past + i1) if self.causal else self.Tk
        for j0 in range(0, j_end, self.k_tile):
            j1 = min(j_end, j0 + self.k_tile)
            yield j0, j1, self.causal and j1 - 1 > self.T_past + i0

    def mask(self, xp, s, lo, hi, r0, r1, j0, j1, crosses):
        """Set the scores s (n, rows, keys) of invisible keys to -inf, in place."""
        if crosses:  # only keys past the tile's first query position can be in anyone's future
            c0 = max(j0, self.T_past + r0 // self.G + 1)
            future = self.key_pos[None, c0:j1] > self.row_pos[r0:r1, None]  # (rows, keys after c0)
            xp.copyto(s[..., c0 - j0:], -xp.inf, where=future)
        if self.key_bias is not None:
            s += self.key_bias[lo:hi, :, j0:j1]


def _append_column(xp, a, column, factor=None):
    """[a * factor, column] as (S, N, X+1), in one pass over a.

    a: (S, N, X), or (B, NKV, G, T, X) which is laid out as rows (S, T*G, X); column: a scalar or (S, N, 1).
    """
    if a.ndim == 5:
        B, NKV, G, T, X = a.shape
        out = xp.empty((B * NKV, T * G, X + 1), dtype=a.dtype)  # (S, R, X+1)
        dest, a = out.reshape(B, NKV, T, G, X + 1)[..., :X], a.transpose(0, 1, 3, 2, 4)  # both (B, NKV, T, G, X)
    else:
        out = xp.empty(a.shape[:-1] + (a.shape[-1] + 1,), dtype=a.dtype)  # (S, N, X+1)
        dest = out[..., :-1]
    if factor is None:
        dest[...] = a
    else:
        xp.multiply(a, factor, out=dest)
    out[..., -1:] = column
    return out


def _view(buf, shape):
    """A C-contiguous array of ``shape`` at the start of the flat buffer ``buf``."""
    return buf[:math.prod(shape)].reshape(shape)


def flash_core_forward(qg, k, v, scale, causal=True, T_past=0, key_mask=None, *, q_tile=None, k_tile=None,
                       threads=None):
    """Attention of the queries qg over keys k and values v, tile by tile; returns o and the row logsumexp L.

    qg: (B, NKV, G, T, hs), query head h = kv * G + g reads key/value head kv.  k, v: (B, NKV, Tk, hs).
    scale: the score factor (1 / sqrt(hs)).  causal: query i (at position T_past + i) sees keys j <= T_past + i, and
    then Tk = T_past + T; causal=False: every query sees every key.  key_mask: None or a boolean (B, Tk), True for a
    real key, False for padding that no query sees.  A query row that sees no key at all gets o = 0 and L = +inf
    (so that the backward's exp(s - L) is 0 there).
    q_tile / k_tile: tile sizes in query positions / keys (default default_q_tile(T), K_TILE).  threads: how many
    threads share the (batch, kv-head) slices (default: this process's share of the cores, default_threads()).
    Returns o (B, NKV, G, T, hs) and L (B, NKV, G, T), both views of row-major (B, NKV, T, G, ...) arrays.
    """
    xp = get_array_module(qg, k, v)
    B, NKV, G, T, hs, Tk = _check_core_args(qg, k, v, causal, T_past, key_mask)
    q_tile, k_tile = _positive_int("q_tile", q_tile, default_q_tile(T)), _positive_int("k_tile", k_tile, K_TILE)
    threads = _positive_int("threads", threads, None) or default_threads()
    S, R, dtype = B * NKV, T * G, qg.dtype
    qs = _rows(qg) if scale == 1 else _rows(qg) * scale  # (S, R, hs): scaled once, not once per score tile
    k3 = k.reshape(S, Tk, hs)  # (S, Tk, hs)
    v1 = _append_column(xp, v.reshape(S, Tk, hs), 1.0)  # (S, Tk, hs+1): [v, 1], so p @ v1 = [p @ v, rowsum(p)]
    o = xp.empty((S, R, hs), dtype=dtype)  # (S, R, hs)
    L = xp.empty((S, R), dtype=dtype)  # (S, R)
    tiling = _Tiling(xp, B, NKV, G, T, Tk, causal, T_past, key_mask, q_tile, k_tile, dtype)
    safe = key_mask is not None  # only padding can leave a row with no visible key so far (its max is then -inf)

    def chunk(lo, hi):
        n = hi - lo
        sbuf = xp.empty(n * min(R, q_tile * G) * min(Tk, k_tile), dtype=dtype)  # one score tile, reused
        for r0, r1, i0, i1 in tiling.query_tiles():
            q_t = qs[lo:hi, r0:r1]  # (n, rows, hs)
            m = acc = None
            for j0, j1, crosses in tiling.key_tiles(i0, i1):
                s = _view(sbuf, (n, r1 - r0, j1 - j0))  # (n, rows, keys)
                xp.matmul(q_t, k3[lo:hi, j0:j1].swapaxes(-1, -2), out=s)
                tiling.mask(xp, s, lo, hi, r0, r1, j0, j1, crosses)
                m_tile = s.max(axis=-1, keepdims=True)  # (n, rows, 1)
                m_new = m_tile if m is None else xp.maximum(m, m_tile)  # (n, rows, 1): the running row max
                m_sub = m_new  # what this tile's exponents are taken relative to
                if safe:  # a row with no visible key yet: subtract 0, not -inf (exp(-inf - -inf) is NaN); p = 0
                    m_sub = xp.where(m_new == -xp.inf, 0.0, m_new).astype(dtype, copy=False)
                s -= m_sub
                xp.exp(s, out=s)  # p = exp(s - m_new): the tile's unnormalised probabilities
                if m is None:  # first key tile: nothing to rescale
                    acc = s @ v1[lo:hi, j0:j1]  # (n, rows, hs+1): [sum_j p v_j, l = sum_j p]
                else:  # the old terms were relative to the old max: rescale them by exp(m_old - m_new) <= 1
                    acc *= xp.exp(m - m_sub)
                    acc += s @ v1[lo:hi, j0:j1]
                m = m_new
            l = acc[..., hs:]  # (n, rows, 1)
            if safe:
                empty = l == 0  # (n, rows, 1): rows that saw no key
                l = xp.where(empty, 1.0, l).astype(dtype, copy=False)
                xp.divide(acc[..., :hs], l, out=o[lo:hi, r0:r1])
                L[lo:hi, r0:r1] = xp.where(empty, xp.inf, m + xp.log(l))[..., 0]
            else:
                xp.divide(acc[..., :hs], l, out=o[lo:hi, r0:r1])
                L[lo:hi, r0:r1] = (m + xp.log(l))[..., 0]

    _run_over_slices(xp, chunk, S, S * R * Tk, threads)
    return _unrows(o, B, NKV, G), _unrows(L, B, NKV, G)


def flash_core_backward(do, qg, k, v, o, L, scale, causal=True, T_past=0, key_mask=None, *, q_tile=None,
                        k_tile=None, threads=None):
    """Backward of flash_core_forward: from do (B, NKV, G, T, hs) and the forward's inputs, o and L, return dq
    (B, NKV, G, T, hs), dk and dv (B, NKV, Tk, hs).  Same tiles as the forward (any tile sizes give the same result).

    forward was o = softmax(qg @ k^T * scale, masked) @ v per head; P is recomputed per tile as exp(s - L).
    """
    xp = get_array_module(do, qg, k, v)
    B, NKV, G, T, hs, Tk = _check_core_args(qg, k, v, causal, T_past, key_mask)
    q_tile, k_tile = _positive_int("q_tile", q_tile, default_q_tile(T)), _positive_int("k_tile", k_tile, K_TILE)
    threads = _positive_int("threads", threads, None) or default_threads()
    S, R, dtype = B * NKV, T * G, qg.dtype
    D = xp.einsum("bngtd,bngtd->bngt", do, o)  # (B, NKV, G, T): rowsum(do * o) = rowsum(dP * P)
    # the subtractions s - L and dP - D ride in the matrix products as one more column:
    # [q * scale, -L] @ [k, 1]^T = s - L  and  [do, -D] @ [v, 1]^T = dP - D
    q1 = _append_column(xp, qg, -_rows(L[..., None]), factor=None if scale == 1 else scale)  # (S, R, hs+1)
    k1 = _append_column(xp, k.reshape(S, Tk, hs), 1.0)  # (S, Tk, hs+1)
    do1 = _append_column(xp, do, -_rows(D[..., None]))  # (S, R, hs+1)
    v1 = _append_column(xp, v.reshape(S, Tk, hs), 1.0)  # (S, Tk, hs+1)
    dq = xp.zeros((S, R, hs), dtype=dtype)  # (S, R, hs)
    dk = xp.zeros((S, Tk, hs), dtype=dtype)  # (S, Tk, hs)
    dv = xp.zeros((S, Tk, hs), dtype=dtype)  # (S, Tk, hs)
    tiling = _Tiling(xp, B, NKV, G, T, Tk, causal, T_past, key_mask, q_tile, k_tile, dtype)

    def chunk(lo, hi):
        n = hi - lo
        rows, keys = min(R, q_tile * G), min(Tk, k_tile)
        pbuf = xp.empty(n * rows * keys, dtype=dtype)  # P of one tile
        dsbuf = xp.empty(n * rows * keys, dtype=dtype)  # dP - D, then dS, of one tile
        kvbuf = xp.empty(n * keys * hs, dtype=dtype)  # a tile's contribution to dk or dv
        qbuf = xp.empty(n * rows * hs, dtype=dtype)  # a tile's contribution to dq
        for r0, r1, i0, i1 in tiling.query_tiles():
            q_t, do_t = q1[lo:hi, r0:r1], do1[lo:hi, r0:r1]  # (n, rows, hs+1) each
            dq_t = dq[lo:hi, r0:r1]  # (n, rows, hs): accumulated over the key tiles
            for j0, j1, crosses in tiling.key_tiles(i0, i1):
                k_t, v_t = k1[lo:hi, j0:j1], v1[lo:hi, j0:j1]  # (n, keys, hs+1) each
                P = _view(pbuf, (n, r1 - r0, j1 - j0))  # (n, rows, keys)
                xp.matmul(q_t, k_t.swapaxes(-1, -2), out=P)  # s - L, recomputed
                tiling.mask(xp, P, lo, hi, r0, r1, j0, j1, crosses)
                xp.exp(P, out=P)  # P = exp(s - L): the forward's probabilities, 0 where masked
                tmp = _view(kvbuf, (n, j1 - j0, hs))  # (n, keys, hs)
                # forward was o = P @ v, so dv = P^T @ do (the G heads of a group are rows: the product sums them)
                dv[lo:hi, j0:j1] += xp.matmul(P.swapaxes(-1, -2), do_t[..., :hs], out=tmp)
                dS = _view(dsbuf, (n, r1 - r0, j1 - j0))  # (n, rows, keys)
                xp.matmul(do_t, v_t.swapaxes(-1, -2), out=dS)  # dP - D, with dP = do @ v^T
                dS *= P  # forward was P = softmax(s), so dS = P * (dP - rowsum(dP * P)) = P * (dP - D)
                # forward was s = (q * scale) @ k^T: dq = dS @ k * scale (scaled at the end), dk = dS^T @ (q * scale)
                dq_t += xp.matmul(dS, k_t[..., :hs], out=_view(qbuf, (n, r1 - r0, hs)))
                dk[lo:hi, j0:j1] += xp.matmul(dS.swapaxes(-1, -2), q_t[..., :hs], out=tmp)
        if scale != 1:
            dq[lo:hi] *= scale

    _run_over_slices(xp, chunk, S, S * R * Tk, threads)
    return _unrows(dq, B, NKV, G), dk.reshape(B, NKV, Tk, hs), dv.reshape(B, NKV, Tk, hs)


def _project(x, p, w, b):
    y = x @ p[w]  # (B, T, out)
    return y + p[b] if b in p else y


def _project_together(xp, x, p, names):
    """x @ w{name} + b{name} for each name of ``names`` ("q", "k", "v"), as one matrix product with the weights side by
    side: returns the (B, T, H*hs) column views of one (B, T, sum of widths) array, in the order of ``names``. One
    larger product instead of two or three keeps BLAS busier (fewer, wider calls)."""
    w = xp.concatenate([p["w" + n] for n in names], axis=1)  # (C, sum of H*hs)
    y = x @ w  # (B, T, sum of H*hs)
    widths = [p["w" + n].shape[1] for n in names]
    starts = [sum(widths[:i]) for i in range(len(names) + 1)]
    blocks = [y[..., a:b] for a, b in zip(starts, starts[1:])]  # (B, T, H*hs) views
    if all("b" + n in p for n in names):  # the biases side by side: one pass over y, not one per strided block
        y += xp.concatenate([p["b" + n] for n in names])
    else:
        for n, block in zip(names, blocks):
            if "b" + n in p:
                block += p["b" + n]
    return blocks


def _tables(rope, ndim, factor):
    """The RoPE tables (T, hs) shaped (T, 1, ..., hs) to broadcast over the head axes of a (B, T, ..., hs) array of
    ``ndim`` axes, times ``factor``; None without RoPE."""
    if rope is None:
        return None
    return tuple((t * factor).reshape(t.shape[0], *(1,) * (ndim - 3), t.shape[1]) for t in rope)


def _swapped_halves(xp, x, signs, sin):
    """[x2 * signs[0] * sin1, x1 * signs[1] * sin2] for x = [x1, x2] (halves of the last axis) and the table sin
    (..., hs): one product of a view of x with its halves swapped (the half axis walked backwards, no copy) and the
    signed table. A half of hs elements is the product's inner loop instead of a quarter of the work per operation:
    the pieces are the same products, so the sum below has the same bits as the four half-sized operations it
    replaces (a - b = a + (-b) exactly, and (-s) * x = -(s * x))."""
    h = x.shape[-1] // 2
    halves = x.shape[:-1] + (2, h)
    signed = xp.concatenate([signs[0] * sin[..., :h], signs[1] * sin[..., h:]], axis=-1)  # (..., hs) tiny
    out = xp.empty(halves, dtype=xp.result_type(x, sin))  # (..., 2, h)
    xp.multiply(x.reshape(halves)[..., ::-1, :], signed.reshape(sin.shape[:-1] + (2, h)), out=out)
    return out.reshape(x.shape)


def _rope_into(xp, x, tables, out):
    """out = rope(x) = x * cos + rotate_half(x) * sin (npllm.layers.rope, rounding for rounding), or out = x * factor
    when tables is (None, factor): the rotation and the change of layout (out may be any view) in one pass.
    rotate_half([x1, x2]) * sin = [-x2 * sin1, x1 * sin2]."""
    cos, sin = tables
    if cos is None:
        return xp.multiply(x, sin, out=out)
    rotated = _swapped_halves(xp, x, (-1.0, 1.0), sin)  # rotate_half(x) * sin
    xp.multiply(x, cos, out=out)
    out += rotated
    return out


def _rope_transposed_into(xp, dy, tables, out):
    """out = rope_backward(dy) = dy * cos + rotate_half^T(dy * sin), rotate_half^T([z1, z2]) = [z2, -z1], so the
    second term is [dy2 * sin2, -dy1 * sin1]; or out = dy * factor when tables is (None, factor)."""
    cos, sin = tables
    if cos is None:
        return xp.multiply(dy, sin, out=out)
    h = sin.shape[-1] // 2
    back = xp.concatenate([sin[..., h:], sin[..., :h]], axis=-1)  # [sin2, sin1]: what each swapped half meets
    rotated = _swapped_halves(xp, dy, (1.0, -1.0), back)  # [dy2 * sin2, -dy1 * sin1]
    xp.multiply(dy, cos, out=out)
    out += rotated
    return out


def _check_heads(n_heads, n_kv_heads):
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")


def _check_no_dropout(dropout_rate):
    if dropout_rate:
        raise ValueError(f"dropout_rate={dropout_rate!r} is not allowed here: the flash path never forms the "
                         f"probabilities P, so attention dropout is the reference's alone (npllm.layers.attention)")


def _queries(xp, q_lin, n_heads, n_kv_heads, rope, scale):
    """qs = rope(q_lin) * scale, q_lin (B, T, NH*hs), written straight into the core's layout: returns the
    (B, NKV, G, T, hs) view of a (B, NKV, T, G, hs) array (rows t * G + g of each (b, kv)). The score scale rides
    here, so that the core (called with scale 1) need not make a scaled copy."""
    B, T, _ = q_lin.shape
    NKV, G = n_kv_heads, n_heads // n_kv_heads
    hs = q_lin.shape[-1] // n_heads
    qs = xp.empty((B, NKV, T, G, hs), dtype=q_lin.dtype)  # (B, NKV, T, G, hs)
    _rope_into(xp, q_lin.reshape(B, T, NKV, G, hs), _tables(rope, 5, scale) or (None, scale),
               qs.transpose(0, 2, 1, 3, 4))
    return qs.transpose(0, 1, 3, 2, 4)  # (B, NKV, G, T, hs), a view


def _keys(xp, k_lin, n_kv_heads, rope):
    """k = rope(k_lin), k_lin (B, T, NKV*hs) -> (B, NKV, T, hs), contiguous."""
    B, T, _ = k_lin.shape
    hs = k_lin.shape[-1] // n_kv_heads
    k = xp.empty((B, n_kv_heads, T, hs), dtype=k_lin.dtype)  # (B, NKV, T, hs)
    _rope_into(xp, k_lin.reshape(B, T, n_kv_heads, hs), _tables(rope, 4, 1.0) or (None, 1.0), k.transpose(0, 2, 1, 3))
    return k


def _heads(xp, lin, n_kv_heads):
    """lin (B, T, NKV*hs) (v, or cross-attention's k) split into heads: (B, NKV, T, hs), contiguous."""
    B, T, _ = lin.shape
    return xp.ascontiguousarray(lin.reshape(B, T, n_kv_heads, -1).transpose(0, 2, 1, 3))  # (B, NKV, T, hs)


def _merge_heads(o):
    """o (B, NKV, G, T, hs) -> (B, T, NH*hs), query head h = kv * G + g."""
    B, NKV, G, T, hs = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, NKV * G * hs)  # (B, T, NH*hs)


def _output_backward(dy, p, o_merged, n_kv_heads, hs, grads):
    """forward was y = o_merged @ wo + bo: puts the grads of wo (and bo) into ``grads`` and returns do and o, the
    (B, NKV, G, T, hs) views the core's backward reads."""
    B, T, C = dy.shape
    dy_rows = dy.reshape(B * T, C)  # (BT, C)
    grads["wo"] = o_merged.reshape(B * T, -1).T @ dy_rows  # (NH*hs, C)
    if "bo" in p:
        grads["bo"] = dy_rows.sum(axis=0)  # (C,)
    do = (dy @ p["wo"].T).reshape(B, T, n_kv_heads, -1, hs).transpose(0, 2, 3, 1, 4)  # (B, NKV, G, T, hs), a view
    o = o_merged.reshape(B, T, n_kv_heads, -1, hs).transpose(0, 2, 3, 1, 4)  # (B, NKV, G, T, hs), a view
    return do, o


def _queries_backward(xp, dqs, rope, scale, out):
    """forward was qs = rope(q_lin) * scale: the transposed rotation (times scale) of dqs (B, NKV, G, T, hs), back in
    the projection's layout, written into ``out``, rows (BT, NH*hs) (a column block of the rows _input_backward
    reads)."""
    B, NKV, G, T, hs = dqs.shape
    dq = out.reshape(B, T, NKV, G, hs)  # (B, T, NKV, G, hs) a view of out
    _rope_transposed_into(xp, dqs.transpose(0, 3, 1, 2, 4), _tables(rope, 5, scale) or (None, scale), dq)


def _keys_backward(xp, dk, rope, out):
    """forward was k = rope(k_lin): dk (B, NKV, T, hs) -> d k_lin, written into ``out``, rows (BT, NKV*hs)."""
    B, NKV, T, hs = dk.shape
    dk_lin = out.reshape(B, T, NKV, hs)  # (B, T, NKV, hs) a view of out
    _rope_transposed_into(xp, dk.transpose(0, 2, 1, 3), _tables(rope, 4, 1.0) or (None, 1.0), dk_lin)


def _values_backward(xp, dv, out):
    """forward was v = heads(v_lin): dv (B, NKV, T, hs) -> d v_lin, written into ``out``, rows (BT, NKV*hs)."""
    B, NKV, T, hs = dv.shape
    out.reshape(B, T, NKV, hs)[...] = dv.transpose(0, 2, 1, 3)


def _rows_for(xp, p, names, BT, dtype):
    """The (BT, sum of widths) rows of the gradients of {name}_lin for ``names``, and their column blocks (views)."""
    widths = [p["w" + n].shape[1] for n in names]
    d_rows = xp.empty((BT, sum(widths)), dtype=dtype)  # (BT, sum of H*hs)
    starts = [sum(widths[:i]) for i in range(len(names) + 1)]
    return d_rows, [d_rows[:, a:b] for a, b in zip(starts, starts[1:])]


def _input_backward(inp, p, names, d_rows, grads):
    """forward was {name}_lin = inp @ w{name} + b{name} for each name of ``names`` (q, k or v), computed together
    (_project_together); d_rows (BT, sum of H*hs): their gradients side by side, in the order of ``names``. Puts the
    weight (and bias) gradients into ``grads`` and returns d inp = d_rows @ [w{name} ...].T (B, T, C): the sum of
    the names' paths is the matrix product's own sum."""
    xp = get_array_module(d_rows)
    B, T, C = inp.shape
    w = xp.concatenate([p["w" + n] for n in names], axis=1)  # (C, sum of H*hs)
    dw = inp.reshape(B * T, C).T @ d_rows  # (C, sum of H*hs)
    db = d_rows.sum(axis=0) if any("b" + n in p for n in names) else None  # (sum of H*hs,) in one pass
    start = 0
    for n in names:
        width = p["w" + n].shape[1]
        grads["w" + n] = xp.ascontiguousarray(dw[:, start:start + width])  # (C, H*hs)
        if "b" + n in p:
            grads["b" + n] = db[start:start + width].copy()  # (H*hs,)
        start += width
    return (d_rows @ w.T).reshape(B, T, C)  # (B, T, C)


def flash_attention_forward(p, x, n_heads, n_kv_heads, rope=None, past_kv=None, *, causal=True, key_mask=None,
                            dropout_rate=0.0, dropout_key=None, row_offset=0, head_offset=0, q_tile=None,
                            k_tile=None, threads=None):
    """Self-attention, causal (a decoder) by default or bidirectional (causal=False, an encoder); the contract of
    npllm.layers.attention.attention_forward, computed by flash tiles.

    p: {"wq": (C, NH*hs), "wk": (C, NKV*hs), "wv": (C, NKV*hs), "wo": (NH*hs, C)}, and "bq", "bk", "bv", "bo".
    x: (B, T, C).  rope: (cos, sin) tables (T, hs) for the positions of x, or None.
    past_kv: (k, v) of earlier positions, each (B, NKV, T_past, hs), for cached causal decoding; forward only.
    key_mask: None or a boolean (B, Tk), True for a real key (Tk = T_past + T); a query that sees no real key gets 0.
    dropout_rate: 0 only (attention dropout is the reference's: a forward with it runs npllm.layers.attention);
    dropout_key, row_offset, head_offset are taken, and unused, so that a caller passes either function the same
    arguments.  q_tile, k_tile, threads: see flash_core_forward.
    Returns y (B, T, C) and the cache; cache["k"], cache["v"] hold all keys/values (past included).
    """
    _check_heads(n_heads, n_kv_heads)
    _check_no_dropout(dropout_rate)
    if past_kv is not None and not causal:
        raise ValueError("past_kv is for causal decoding; bidirectional attention (causal=False) takes none")
    xp = get_array_module(x)
    q_lin, k_lin, v_lin = _project_together(xp, x, p, "qkv")  # (B, T, NH*hs), (B, T, NKV*hs) x 2: views of one
    hs = q_lin.shape[-1] // n_heads
    scale = 1.0 / math.sqrt(hs)
    # q, k = rope(q_lin), rope(k_lin) as in the reference, written straight into the core's layout (q times scale)
    qsg = _queries(xp, q_lin, n_heads, n_kv_heads, rope, scale)  # (B, NKV, G, T, hs)
    k = _keys(xp, k_lin, n_kv_heads, rope)  # (B, NKV, T, hs)
    v = _heads(xp, v_lin, n_kv_heads)  # (B, NKV, T, hs)
    del q_lin, k_lin, v_lin
    T_past = 0
    if past_kv is not None:
        T_past = past_kv[0].shape[2]
        k = xp.concatenate([past_kv[0], k], axis=2)  # (B, NKV, T_past+T, hs)
        v = xp.concatenate([past_kv[1], v], axis=2)  # (B, NKV, T_past+T, hs)
    tiles = dict(q_tile=q_tile, k_tile=k_tile, threads=threads)
    # s = qs @ k^T: the scale is in qs already
    o, L = flash_core_forward(qsg, k, v, 1.0, causal=causal, T_past=T_past, key_mask=key_mask,
                              **tiles)  # (B, NKV, G, T, hs), (B, NKV, G, T)
    o_merged = _merge_heads(o)  # (B, T, NH*hs)
    y = _project(o_merged, p, "wo", "bo")  # (B, T, C)
    # keep x, qs = rope(q) * scale, k, v (after RoPE), o_merged and the row logsumexp L (B, NKV, G, T); P is
    # recomputed per tile
    cache = dict(p=p, x=x, qs=qsg, k=k, v=v, o=o_merged, L=L, rope=rope, scale=scale, n_heads=n_heads,
                 n_kv_heads=n_kv_heads, T_past=T_past, causal=causal, key_mask=key_mask, tiles=tiles)
    return y, cache


def flash_attention_backward(dy, cache):
    """Backward of flash_attention_forward (without past_kv). Returns dx (B, T, C) and grads with the keys of p."""
    if cache["T_past"]:
        raise ValueError("flash_attention_backward does not support past_kv (cached decoding is forward-only)")
    p, x, qsg, k, v, o_merged, L, rope, scale = (cache[n] for n in ("p", "x", "qs", "k", "v", "o", "L", "rope",
                                                                      "scale"))
    xp = get_array_module(dy)
    grads = {}
    do, o = _output_backward(dy, p, o_merged, cache["n_kv_heads"], k.shape[-1], grads)  # (B, NKV, G, T, hs) views
    # forward was o = softmax(qs @ k^T, causal / masked) @ v
    dqs, dk, dv = flash_core_backward(do, qsg, k, v, o, L, 1.0, causal=cache["causal"], T_past=0,
                                      key_mask=cache["key_mask"], **cache["tiles"])
    del do  # each (B, T, H, hs) array is freed once used: npllm/memory.py counts what stays
    # forward was qs = rope(q_lin) * scale, k = rope(k_lin), v = heads(v_lin): back in the projections' layout, side
    # by side as rows (BT, NH*hs + 2 NKV*hs)
    d_rows, (dq_rows, dk_rows, dv_rows) = _rows_for(xp, p, "qkv", x.shape[0] * x.shape[1], dqs.dtype)
    _queries_backward(xp, dqs, rope, scale, dq_rows)
    del dqs
    _keys_backward(xp, dk, rope, dk_rows)
    del dk
    _values_backward(xp, dv, dv_rows)
    del dv
    # forward was q_lin = x @ wq + bq (and likewise k, v): x receives the sum of the three paths
    dx = _input_backward(x, p, "qkv", d_rows, grads)  # (B, T, C)
    return dx, {name: grads[name] for name in p}


# ----------------------------------------------------------------------------------------------------------
# cross-attention: queries from x, keys and values from the memory


def flash_cross_attention_kv(p, memory, n_kv_heads):
    """The memory's keys and values, k = memory @ wk + bk and v = memory @ wv + bv split into heads, each
    (B, NKV, Tk, hs) and contiguous (the core's layout): npllm.layers.attention.cross_attention_kv's values, what a
    decoder computes once per source sequence and passes to every step as memory_kv. Two separate products (not
    _project_together), so that both implementations' memory_kv have the same bits and decode alike."""
    xp = get_array_module(memory)
    k = _heads(xp, _project(memory, p, "wk", "bk"), n_kv_heads)  # (B, NKV, Tk, hs): no RoPE on cross keys
    v = _heads(xp, _project(memory, p, "wv", "bv"), n_kv_heads)  # (B, NKV, Tk, hs)
    return k, v


def flash_cross_attention_forward(p, x, memory, n_heads, n_kv_heads, memory_mask=None, memory_kv=None, *,
                                  dropout_rate=0.0, dropout_key=None, row_offset=0, head_offset=0, q_tile=None,
                                  k_tile=None, threads=None):
    """Cross-attention: queries from x (B, T, C), keys and values from memory (B, Tk, C); the contract of
    npllm.layers.attention.cross_attention_forward, computed by flash tiles (bidirectional, memory_mask (B, Tk) as
    the key mask: True for a real memory position; a query that sees none gets 0).

    memory_kv: the memory's (k, v), each (B, NKV, Tk, hs), from flash_cross_attention_kv (or the reference's
    cross_attention_kv) or an earlier call's cache: then memory is not read (pass None) and the call is forward-only.
    dropout_rate: 0 only, as flash_attention_forward.  q_tile, k_tile, threads: see flash_core_forward.
    Returns y (B, T, C) and the cache; cache["k"], cache["v"] hold the memory's keys and values.
    """
    _check_heads(n_heads, n_kv_heads)
    _check_no_dropout(dropout_rate)
    xp = get_array_module(x)
    B, T, C = x.shape
    if memory_kv is None:
        if memory is None or memory.ndim != 3 or memory.shape[0] != B or memory.shape[2] != C:
            raise ValueError(f"memory must be (B, Tk, C) = ({B}, Tk, {C}); got "
                             f"{None if memory is None else tuple(memory.shape)}")
        k, v = flash_cross_attention_kv(p, memory, n_kv_heads)  # (B, NKV, Tk, hs) each
    else:
        k, v = memory_kv
    q_lin = _project(x, p, "wq", "bq")  # (B, T, NH*hs)
    scale = 1.0 / math.sqrt(q_lin.shape[-1] // n_heads)
    qsg = _queries(xp, q_lin, n_heads, n_kv_heads, None, scale)  # (B, NKV, G, T, hs): q * scale
    tiles = dict(q_tile=q_tile, k_tile=k_tile, threads=threads)
    o, L = flash_core_forward(qsg, k, v, 1.0, causal=False, key_mask=memory_mask,
                              **tiles)  # (B, NKV, G, T, hs), (B, NKV, G, T)
    o_merged = _merge_heads(o)  # (B, T, NH*hs)
    y = _project(o_merged, p, "wo", "bo")  # (B, T, C)
    # keep x, memory, qs = q * scale, the memory's k and v, o_merged and the row logsumexp L; P is recomputed per tile
    cache = dict(p=p, x=x, memory=memory, qs=qsg, k=k, v=v, o=o_merged, L=L, scale=scale, n_heads=n_heads,
                 n_kv_heads=n_kv_heads, key_mask=memory_mask, memory_kv_given=memory_kv is not None, tiles=tiles)
    return y, cache


def flash_cross_attention_backward(dy, cache):
    """Backward of flash_cross_attention_forward (without memory_kv). Returns dx (B, T, C), dmemory (B, Tk, C) and
    grads with the keys of p: the queries' path leads to x, the keys' and values' paths to the memory."""
    if cache["memory_kv_given"]:
        raise ValueError("flash_cross_attention_backward does not support memory_kv (precomputed keys/values are for "
                         "decoding, which is forward-only); pass memory instead")
    p, x, memory, qsg, k, v, o_merged, L, scale = (cache[n] for n in ("p", "x", "memory", "qs", "k", "v", "o", "L",
                                                                      "scale"))
    xp = get_array_module(dy)
    grads = {}
    do, o = _output_backward(dy, p, o_merged, cache["n_kv_heads"], k.shape[-1], grads)  # (B, NKV, G, T, hs) views
    # forward was o = softmax(qs @ k^T, masked) @ v
    dqs, dk, dv = flash_core_backward(do, qsg, k, v, o, L, 1.0, causal=False, key_mask=cache["key_mask"],
                                      **cache["tiles"])
    del do
    # forward was q_lin = x @ wq + bq, qs = heads(q_lin) * scale; k_lin = memory @ wk + bk, v_lin = memory @ wv + bv
    dq_rows, (dq_block,) = _rows_for(xp, p, "q", x.shape[0] * x.shape[1], dqs.dtype)  # (BT, NH*hs)
    _queries_backward(xp, dqs, None, scale, dq_block)
    del dqs
    dx = _input_backward(x, p, "q", dq_rows, grads)  # (B, T, C)
    del dq_rows
    dkv_rows, (dk_block, dv_block) = _rows_for(xp, p, "kv", memory.shape[0] * memory.shape[1], dk.dtype)
    _values_backward(xp, dk, dk_block)  # no RoPE on cross keys: k = heads(k_lin), as v
    _values_backward(xp, dv, dv_block)
    del dk, dv
    dmemory = _input_backward(memory, p, "kv", dkv_rows, grads)  # (B, Tk, C)
    return dx, dmemory, {name: grads[name] for name in p}
