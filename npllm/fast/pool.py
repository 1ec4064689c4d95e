"""Row-chunked elementwise work on npllm's worker threads (npllm.parallel.cores.side_by_side): the fused layers of
npllm/fast run on it.

NumPy releases the GIL inside a ufunc's inner loop, so Python threads that each run ufuncs on their own rows of an
array use several cores. ``map_rows(fn, n_rows, row_size)`` cuts the rows [0, n_rows) into contiguous chunks of
about CHUNK_ELEMENTS elements (``row_size`` elements per row) and calls ``fn(rows)``, rows a ``slice``, once per
chunk; the pool's threads and the calling thread take chunks from one queue (a thread slowed down by another
process on its core simply takes fewer chunks), and the results come back in row order.

Rules for ``fn``:
  - it writes only its own rows of its outputs (no two chunks write the same memory);
  - it never waits on another chunk or another thread (no collectives, no locks);
  - it calls no BLAS (no ``@``, ``dot``, ``matmul``, ``vecdot``, ``einsum(optimize=True)``): the matmuls stay in the
    calling thread, where BLAS already uses every core. A BLAS call from a pool thread would start BLAS's own threads
    on top of the pool's (oversubscription), and limiting them would mean changing BLAS's thread settings, which are
    process-wide state the rest of the program relies on. Nothing here changes any setting of the process: the pool
    threads run ufuncs and reductions only.

Determinism: the chunks depend only on (n_rows, row_size, CHUNK_ELEMENTS), never on the number of threads or on
which thread ran which chunk, and the results come back in chunk order. A function that sums its chunks' partial
results in that order therefore gives the same bits with 1 thread, 2 threads or serially.

Thread count: the cores this process may run on (its CPU affinity) divided by the MPI ranks on this node, at least 1.
Below MIN_PARALLEL_ELEMENTS elements in all, the chunks run in the calling thread: a hand-off to the pool costs
more than it saves there. A ``map_rows`` called from inside a chunk (nested), or from a thread that does one core's
work (``npllm.parallel.cores.one_core``: the row groups of a batch run side by side), also runs in its own thread.
For CuPy arrays (``xp`` not NumPy) ``fn`` is called once over all rows: the GPU does the parallel work.
"""

from __future__ import annotations

import functools

import numpy as np

from ..parallel.cores import default_threads, on_one_core, side_by_side

# Elements per chunk. Measured with benchmarks/bench_elementwise.py --tune (float32, the profile's shapes) on two
# 2-core machines. On a Zen 3 (512 KiB L2 per core) 64K and 128K were the fastest or within noise of it for every fast
# path, 4K-16K were 10-60% slower (each chunk costs 5-15 ufunc calls of ~1-2 us, and the norms' rows of 256 have the
# least work per call), 256K no slower. On a Zen 4 (1 MiB L2) 256K beat 64K on every path, serial and on 2 threads
# (cross-entropy forward + backward 42 -> 39 ms serial, 31 -> 24 on 2 threads; AdamW 13.4 -> 10.4 and 13.1 -> 9.1),
# and whole training steps were 1-6% faster (benchmarks/bench_chunk_size.py, the sizes taken in turn in one process:
# paired ratios 0.94-0.99 over llama-8x256, gpt2-8x256 and llama-1x2048). The row groups run their chunks serially,
# side by side, and a chunk 4x as large means a quarter of the GIL hand-offs between them (4,700 -> 2,100 per
# GPT-2-style group pass, counted with a uprobe on CPython's drop_gil). A chunk's float32 array is 1 MiB: one core's
# L2 on the Zen 4, in L3 on the Zen 3.
CHUNK_ELEMENTS = 1 << 18

# Below this many elements in all, map_rows runs every chunk in the calling thread. Two chunks are needed for two
# threads at all; at two chunks the work of one (~0.2-1 ms: 256K elements of 5-15 passes at 0.15-0.3 ns per element,
# a tanh or exp ~2-3 ns) is larger than handing it to a pool thread and waiting for it (~35-90 us round trip measured
# here, --tune), so the cut is at two chunks.
MIN_PARALLEL_ELEMENTS = 2 * CHUNK_ELEMENTS

# The thread count when a call gives none; None: default_threads(). Benchmarks and tests set it.
THREADS: int | None = None

def chunk_rows(row_size: int) -> int:
    """Rows per chunk for rows of ``row_size`` elements: CHUNK_ELEMENTS // row_size, at least 1."""
    return max(1, CHUNK_ELEMENTS // max(1, row_size))


def row_chunks(n_rows: int, row_size: int) -> list[slice]:
    """The contiguous row slices map_rows cuts [0, n_rows) into (the last one may be shorter)."""
    step = chunk_rows(row_size)
    return [slice(lo, min(lo + step, n_rows)) for lo in range(0, n_rows, step)]


def map_rows(fn, n_rows: int, row_size: int, *, xp=np, threads: int | None = None) -> list:
    """[fn(rows) for rows in row_chunks(n_rows, row_size)], the chunks spread over the pool and this thread.

    n_rows: rows of the work; row_size: elements per row (what a chunk's size is measured in); xp: the array module
    of the data (CuPy: one call fn(slice(0, n_rows))); threads: the most threads to use, this one included (default:
    THREADS, or ``default_threads()`` when that is None). Returns fn's results in row order. An exception raised by
    fn in any chunk is raised here (the first in row order), after every started chunk has finished; no chunk
    starts after a failure. The call returns as soon as every chunk is done: it never waits for a pool thread that
    was too late (on a busy machine) to take a chunk, so a loaded machine costs at most the serial time, not a
    scheduling delay.
    """
    if xp is not np:
        return [fn(slice(0, n_rows))]
    chunks = row_chunks(n_rows, row_size)
    if threads is None:
        threads = THREADS if THREADS is not None else default_threads()
    n = min(threads, len(chunks))
    if n <= 1 or n_rows * row_size < MIN_PARALLEL_ELEMENTS or on_one_core():
        return [fn(rows) for rows in chunks]

    # ufuncs only, no BLAS: the chunks go to npllm's worker threads as side_by_side's tasks
    return side_by_side([functools.partial(fn, rows) for rows in chunks], threads=n, calls_blas=False)


def sum_parts(xp, parts: list, width: int, dtype):
    """The sum of per-chunk partial sums ``parts`` [(width,), ...] (map_rows' results), added in row order: the same
    bits whatever the thread count. No chunks (no rows): zeros (width,) of ``dtype``."""
    if not parts:
        return xp.zeros(width, dtype=dtype)  # (width,)
    total = parts[0].copy()  # (width,)
    for part in parts[1:]:
        total += part
    return total
