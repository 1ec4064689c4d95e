"""Shared by the scripts that tests launch under mpirun and by the tests that check their results.

Scripts import this after ``limit_blas_threads()`` (it imports NumPy). Tests use ``run_mpi`` to launch a script
and ``CONFIGS`` / ``global_batch`` to recompute on one process what the ranks computed together.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from npllm.config import ModelConfig

SCRIPTS = Path(__file__).resolve().parent
NO_MPIRUN = "mpirun not found next to sys.executable or on PATH (pip install mpich)"  # the tests' skip reason
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
REPO = SCRIPTS.parents[1]

# Small models that tp=2 can split (n_heads, n_kv_heads, ffn_dim, vocab_size even), one per architecture family.
CONFIGS = {
    # LLaMA-like: RMSNorm, RoPE, SwiGLU, grouped-query attention (2 query heads per key/value head), untied head
    "llama": ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=16),
    # GPT-2-like: LayerNorm, learned positions, GELU, biases everywhere, tied embeddings
    "gpt2": ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=16,
                        norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True),
}

# Tiny versions of CONFIGS for the finite-difference check under mpirun (split evenly by tp=2).
TINY_CONFIGS = {
    "llama": ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=8, max_seq_len=8),
    "gpt2": ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=8, max_seq_len=8,
                        norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True),
}

# The training runs: global batch rows, sequence length, optimizer settings (max_norm small so clipping acts).
GLOBAL_BATCH, SEQ_LEN, STEPS = 4, 8, 3
OPTIM = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
MAX_NORM = 0.5
INIT_SEED = 3


def global_batch(cfg: ModelConfig, step: int, ignore: bool = False):
    """The global batch of ``step``: tokens, targets int64 (GLOBAL_BATCH, SEQ_LEN). With ``ignore``, about one
    target in eight is -100 (only for runs without data parallelism: dp averages per-rank means)."""
    rng = np.random.default_rng([11, step])
    tokens = rng.integers(0, cfg.vocab_size, size=(GLOBAL_BATCH, SEQ_LEN))  # (B, T)
    targets = rng.integers(0, cfg.vocab_size, size=(GLOBAL_BATCH, SEQ_LEN))  # (B, T)
    if ignore:
        targets[rng.random(targets.shape) < 0.125] = -100
    return tokens, targets


FEW_TENSOR_STEPS = 2


def few_tensor_problem(dp_size: int):
    """(params, [grads of dp rank d]) with two tensors only, for ZeRO-1 with more dp ranks than tensors. Step s
    uses grads * (s + 1)."""
    rng = np.random.default_rng(0)
    params = {"tok_emb": rng.standard_normal((5, 3)), "norm.w": rng.standard_normal(3)}
    grads = [{n: rng.standard_normal(p.shape) for n, p in params.items()} for _ in range(dp_size)]
    return params, grads


def rank_rows(array, dp_rank: int, dp_size: int):
    """Rows of the global batch that data-parallel rank dp_rank computes on: the dp_rank-th of dp_size equal blocks."""
    rows = array.shape[0] // dp_size
    return array[dp_rank * rows:(dp_rank + 1) * rows]


def save_npz(path, arrays: dict) -> None:
    """Write arrays atomically (temp name in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


# ----------------------------------------------------------------------------------------------------------
# launching


def find_mpirun() -> str | None:
    """mpirun next to this Python (the mpich wheel installs it there), else on PATH, else None."""
    beside = Path(sys.executable).parent / "mpirun"
    if beside.exists():
        return str(beside)
    return shutil.which("mpirun")


def run_mpi(n: int, script: str, *args: str, timeout: float = 120, check: bool = True):
    """Run ``mpirun -n n python tests/mpi_scripts/<script> args...`` from the repository root.

    Returns (CompletedProcess, seconds). The BLAS thread variables are removed from the environment so that the
    ranks' own limit_blas_threads() decides. With check, a non-zero exit fails with the output's tail.
    """
    mpirun = find_mpirun()
    if mpirun is None:
        raise RuntimeError("mpirun not found next to sys.executable or on PATH")
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [mpirun, "-n", str(n), sys.executable, str(SCRIPTS / script), *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} after {seconds:.1f} s\n"
                             f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc, seconds
