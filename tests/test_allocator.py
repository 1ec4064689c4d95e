"""npllm.allocator.keep_freed_memory: a training step's freed memory is reused by the next step instead of being
faulted in again; a user's malloc settings are left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from npllm.allocator import USER_SETTINGS, keep_freed_memory

# Three forward + backward steps of a small GPT-2-shaped model on the fast paths, after four warm-up steps; prints the
# minor page faults of the three. The argument "keep" calls keep_freed_memory first, as the training entry points do.
STEPS = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from npllm.allocator import keep_freed_memory
    assert keep_freed_memory()
from npllm.config import ModelConfig
from npllm.models import accumulate_loss_and_grads, init_params
cfg = ModelConfig(vocab_size=2048, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=512, max_seq_len=128,
                  norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)
params = init_params(cfg, seed=0)
rng = np.random.default_rng(0)
batch = {"tokens": rng.integers(0, 2048, (8, 128)), "targets": rng.integers(0, 2048, (8, 128))}
for _ in range(4):
    accumulate_loss_and_grads(params, batch, cfg, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    accumulate_loss_and_grads(params, batch, cfg, 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# A 64 MiB array (the size of the benchmark's (B*T, V) logits: larger than any mmap threshold glibc takes) allocated,
# filled and freed three times after one warm-up; prints the minor page faults of the three.
LARGE = """
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from npllm.allocator import keep_freed_memory
    assert keep_freed_memory()
a = np.ones(16 << 20, np.float32)
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    a = np.ones(16 << 20, np.float32)
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# The same from a thread (as a row group run side by side allocates): three 32 MiB arrays alive at once, more than one
# of the 64 MiB heaps a thread's own malloc arena is made of, allocated, filled and freed three times after one
# warm-up; prints the minor page faults of the three.
THREAD = """
import resource, sys, threading
import numpy as np
if sys.argv[1] == "keep":
    from npllm.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = []
def step():
    arrays = [np.ones(8 << 20, np.float32) for _ in range(3)]
    del arrays
def thread():
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=thread)
t.start()
t.join()
print(faults[0])
"""


def page_faults(script: str, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc; elsewhere the function is a no-op")
def test_a_step_reuses_the_memory_the_step_before_freed():
    """With malloc's defaults the steps fault tens of thousands of pages in again (measured ~33,000-36,000: the
    heap's top trimmed back to the OS after each step; 20,673 on 2026-12-02); after keep_freed_memory a few (measured
    1-407 over 24 runs while pool threads had malloc arenas of their own, 0-54 over 8 runs with one arena). Bounds:
    more than 5,000 before (the test sees the problem it checks for), fewer than 1,000 after."""
    assert page_faults(STEPS, "default") > 5000
    assert page_faults(STEPS, "keep") < 1000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc; elsewhere the function is a no-op")
def test_a_large_array_is_reused_too():
    """Served by mmap under the defaults, a freed 64 MiB array goes back to the OS and the next one is faulted in
    (measured 1,632 faults for three, with huge pages where the kernel gave them; 49,152 without); after
    keep_freed_memory it comes from the heap and is reused (measured 0). Bounds: more than 500 before, fewer than 50
    after."""
    assert page_faults(LARGE, "default") > 500
    assert page_faults(LARGE, "keep") < 50


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc; elsewhere the function is a no-op")
def test_a_threads_freed_memory_is_reused_too():
    """A thread's arena deletes a heap once all of it is free, whatever M_TRIM_THRESHOLD says; with one arena
    (M_ARENA_MAX 1) the thread's arrays come from the main heap and are reused. Measured: 3,219 faults for three
    steps under the defaults, 1,590 with only the mmap and trim settings (this module before M_ARENA_MAX), 0 with
    keep_freed_memory. Bounds: more than 500 before, fewer than 50 after."""
    assert page_faults(THREAD, "default") > 500
    assert page_faults(THREAD, "keep") < 50


def test_a_users_malloc_settings_are_left_alone():
    for var in USER_SETTINGS:
        assert keep_freed_memory({var: "1"}) is False


@pytest.mark.parametrize("entry", ["runpy.run_module('npllm.train', run_name='__main__')",
                                   "__import__('npllm.cli').cli.train_entry()"])
def test_the_training_entry_points_keep_freed_memory(entry):
    """`python -m npllm.train` and `npllm-train` call keep_freed_memory before they train (here: before --help)."""
    script = ("import runpy, sys\n"
              "import npllm.allocator as allocator\n"
              "calls = []\n"
              "allocator.keep_freed_memory = lambda *a: calls.append(a) or True\n"
              "sys.argv = ['npllm-train', '--help']\n"
              "try:\n"
              f"    {entry}\n"
              "except SystemExit:\n"
              "    pass\n"
              "print('calls', len(calls))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert "calls 1" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
