"""Keep the memory a training step frees for the next step, instead of handing it back to the OS and faulting it in.

A step allocates and frees the same arrays every time: activations, their gradients, temporaries of a few MiB each,
the (B*T, V) logits of tens of MiB. glibc's malloc by default serves large requests with fresh mmap'd pages, handed
back to the OS when freed (the size cut-off moves with the program, M_MMAP_THRESHOLD), and returns freed memory at the
top of its heap to the OS once more than 128 KiB of it is free (M_TRIM_THRESHOLD). So every step paid for the same
memory again, in page faults and the kernel's zeroing of each page: measured on the GPT-2-shaped benchmark step (B=8,
T=256, 2 cores), 42,000-45,000 page faults and 0.20-0.27 s of kernel time per ~1.1 s step, and the head's 64 MiB
logits alone took 20-40 ms longer to compute into fresh pages than into reused ones. With the two settings here every
array comes from malloc's heap and goes back to it, and the next step reuses it: 0-1 faults and 0.02-0.03 s per step.
The peak resident memory does not grow (the step reuses what it freed); the memory is only no longer returned between
steps.

Threads need the third setting. A thread that allocates (a row group run side by side, npllm.parallel.cores) gets its
own malloc arena, made of 64 MiB heaps, and glibc deletes a thread heap as soon as all of it is free, whatever
M_TRIM_THRESHOLD says (heap_trim). A row group whose step needs more than one heap so made and unmapped a heap every
step: measured on the GPT-2-shaped benchmark step in 2 row groups, ~8,900 page faults and 40-60 ms of kernel time
per ~0.6 s step, all of it in the group run by a pool thread; with one arena, 0-4 faults per step.

    M_MMAP_MAX        0: no request is served by mmap; all come from the heap (whose free space is reused)
    M_TRIM_THRESHOLD  1 GiB: up to that much free memory stays at the heap's top for the next step
    M_ARENA_MAX       1: every thread allocates from that one heap (the main arena); a step's few thousand
                      allocations take its lock uncontended nearly always

Called once by the training entry points (``python -m npllm.train``, ``npllm-train``); it changes nothing when the
user tuned malloc through its environment (MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_ARENA_MAX, ...,
GLIBC_TUNABLES), and nothing outside glibc (macOS, musl): there it returns False. It must run before any thread
allocates (a thread keeps the arena it first took). Imports only ctypes, os and sys: safe before NumPy.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt's parameter numbers (malloc.h)
MMAP_MAX = 0  # requests served by mmap at most at once: none
TRIM_THRESHOLD = 1 << 30  # bytes
ARENA_MAX = 1  # malloc arenas: the main one only

USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "GLIBC_TUNABLES")


def keep_freed_memory(environ=None) -> bool:
    """Set glibc malloc's M_MMAP_MAX, M_TRIM_THRESHOLD and M_ARENA_MAX (above) in this process. True when all three
    were set; False when the user's environment tunes malloc already, or this is not glibc, or glibc refused a value."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or any(var in environ for var in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # no glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (bool(mallopt(M_MMAP_MAX, MMAP_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            and bool(mallopt(M_ARENA_MAX, ARENA_MAX)))
