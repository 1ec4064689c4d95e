"""Shared by the scripts that tests launch under mpirun and by the tests that check their results.

Scripts import this after ``limit_blas_threads()`` (it imports NumPy). Tests use ``run_mpi`` to launch a script
and ``CONFIGS`` / ``global_batch`` to recompute on one process what the ranks computed together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from npllm.config import ModelConfig
from npllm.parallel.comm import find_mpirun  # noqa: F401 (the tests import it from here too)

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


# ----------------------------------------------------------------------------------------------------------
# the 7B shapes without drawing 7B random numbers: each element from a random bit pattern of its row and of its column

SEVEN_B_SHAPES = dict(n_layers=1, max_seq_len=64)  # --preset 7b with these: its real block, embedding and head
SEVEN_B_BATCH = (1, 16)  # (B, T)


def _as_2d(shape) -> tuple[int, int]:
    return (shape[0], 1) if len(shape) == 1 else tuple(shape)


def _shard_offsets(axis, full_shape, tp_rank: int, tp_size: int):
    """(shard shape, first row, first column) of rank tp_rank's shard of a tensor split along ``axis``, in the
    (rows, cols) view of the tensor."""
    from npllm.parallel.tensor import shard_shape

    shape = shard_shape(tuple(full_shape), axis, tp_size)
    rows, cols = _as_2d(shape)
    return shape, (tp_rank * rows if axis == 0 else 0), (tp_rank * cols if axis == 1 else 0)


def synthetic_shard(axis, salt: int, full_shape, tp_rank: int, tp_size: int, scale: float, dtype):
    """Rank tp_rank's shard of a full tensor with element (i, j) = scale * u(row_bits[i] XOR col_bits[j]), u uniform
    in [-1, 1): random 32-bit patterns per row and per column, so a rank computes its shard alone, cheaply."""
    rows_full, cols_full = _as_2d(full_shape)
    rng = np.random.default_rng([salt])
    row_bits = rng.integers(0, 2**32, rows_full, dtype=np.uint32)  # (rows,)
    col_bits = rng.integers(0, 2**32, cols_full, dtype=np.uint32)  # (cols,)
    shape, row0, col0 = _shard_offsets(axis, full_shape, tp_rank, tp_size)
    rows, cols = _as_2d(shape)
    bits = row_bits[row0:row0 + rows, None] ^ col_bits[None, col0:col0 + cols]  # (rows, cols) uint32
    out = (bits >> np.uint32(8)).astype(dtype)  # (rows, cols) integers 0 .. 2^24 - 1
    out *= dtype(scale * 2.0 ** -23)
    out -= dtype(scale)
    return out.reshape(shape)


def seven_b_params(cfg, tp_rank: int, tp_size: int, dtype=np.float32) -> dict:
    """Parameters of the 7B shapes: weights uniform with std 0.02, norm gains 1 + uniform(-0.1, 0.1)."""
    from npllm.models.decoder import param_specs

    params = {}
    for salt, spec in enumerate(param_specs(cfg)):
        if spec.name.endswith("norm.w"):
            params[spec.name] = 1.0 + synthetic_shard(spec.split_axis, salt, spec.shape, tp_rank, tp_size, 0.1, dtype)
        else:
            params[spec.name] = synthetic_shard(spec.split_axis, salt, spec.shape, tp_rank, tp_size, 0.02 * 3 ** 0.5,
                                                dtype)
    return params


def seven_b_probe_dot(axis, g_shard: np.ndarray, full_shape, tp_rank: int, tp_size: int) -> float:
    """p^T g q for a random rank-one direction p q^T (float64) on the full tensor, from one rank's shard g_shard:
    summed over the shards of a split tensor it is the full tensor's p^T g q. A wrong element changes it (almost
    surely), and no full tensor is needed."""
    rows_full, cols_full = _as_2d(full_shape)
    rng = np.random.default_rng(0x5EED)
    p, q = rng.standard_normal(rows_full), rng.standard_normal(cols_full)  # (rows,), (cols,)
    shape, row0, col0 = _shard_offsets(axis, full_shape, tp_rank, tp_size)
    rows, cols = _as_2d(shape)
    g = np.asarray(g_shard, dtype=np.float64).reshape(rows, cols)
    return float(p[row0:row0 + rows] @ g @ q[col0:col0 + cols])


def seven_b_batch(cfg):
    rng = np.random.default_rng(7)
    B, T = SEVEN_B_BATCH
    return rng.integers(0, cfg.vocab_size, size=(B, T)), rng.integers(0, cfg.vocab_size, size=(B, T))
