"""npllm.allocator.keep_freed_memory: a training step's freed memory is reused by the next step instead of being
faulted in again; a user's malloc settings are left alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from npllm.allocator import USER_SETTINGS, keep_freed_memory

# Three forward + backward steps of a small GPT-2-shaped model on the fast paths, after one warm-up step; prints the
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
accumulate_loss_and_grads(params, batch, cfg, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    accumulate_loss_and_grads(params, batch, cfg, 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_three_steps(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc; elsewhere the function is a no-op")
def test_a_step_reuses_the_memory_the_step_before_freed():
    """With malloc's defaults the steps fault tens of thousands of pages in again (measured ~35,000: the heap's top
    trimmed back to the OS after each step); after keep_freed_memory a few (measured 3-17). Bounds: at least 5,000
    faults before (so the test sees the problem it checks for), at most 200 after."""
    assert page_faults_of_three_steps("default") > 5000
    assert page_faults_of_three_steps("keep") < 200


def test_a_users_malloc_settings_are_left_alone():
    for var in USER_SETTINGS:
        assert keep_freed_memory({var: "1"}) is False
