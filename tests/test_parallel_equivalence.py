"""Parallel training equals one process: real ``mpirun`` jobs against the single-process run on the same global batch.

Each job (tests/mpi_scripts/parallel_train.py) trains both small configs (LLaMA-like with GQA, GPT-2-like with
biases and tied embeddings) for STEPS AdamW steps with gradient clipping active, in float64 and float32, and saves:
the dp-mean loss of every step, the global gradient norm and clip factor of every step, the dp-averaged gradients of
step 0 gathered to full shapes, and the parameters after the last step gathered to full shapes. Here one process
recomputes all of it with the plain model, ``clip_grad_norm`` and ``adamw_update``.

Bounds (relative error, ||a - b|| / ||b|| per tensor or per series):
    float64: 1e-10 for everything (measured: <= 3e-14).
    float32: loss and norm 1e-6 (measured <= 6e-8), step-0 gradients 1e-5 (measured <= 3e-7), parameters after
             3 steps 1e-4 (measured <= 4e-6: AdamW divides by sqrt(v), which magnifies the rounding of small
             gradient entries, so the parameters drift further apart than the gradients).
The key bias ``attn.bk`` has an exactly zero true gradient (adding a constant to every score of a softmax row
changes nothing), so both runs hold rounding noise there: its gradient is checked to be zero on both sides (below
1e-12, float32 1e-5, of the whole gradient's norm) instead of by relative error, and it is left out of the
parameter comparison, where AdamW turns that noise into +-lr steps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tests.mpi_scripts.mpi_common import (
    CONFIGS, INIT_SEED, MAX_NORM, NO_MPIRUN, OPTIM, STEPS, find_mpirun, global_batch, load_npz, run_mpi,
)

from npllm.models import init_params, param_shapes
from npllm.models.decoder import loss_and_grads
from npllm.optim import adamw_init, adamw_update, clip_grad_norm

pytestmark = [pytest.mark.mpi, pytest.mark.skipif(find_mpirun() is None, reason=NO_MPIRUN)]

BOUNDS = {  # dtype -> (loss and norm, step-0 gradients, parameters after STEPS)
    "float64": (1e-10, 1e-10, 1e-10),
    "float32": (1e-6, 1e-5, 1e-4),
}
ZERO_GRADIENT = "attn.bk"  # exactly zero true gradient: compared as zero, not by relative error
ZERO_TOL = {"float64": 1e-12, "float32": 1e-5}  # |rounding noise| allowed there, relative to the gradient's norm

# name -> (ranks, script arguments). --ignore puts -100 targets in the batch (only without dp: see mpi_common).
LAYOUTS = {
    "dp=2": (2, ["--tp=1"]),
    "tp=2": (2, ["--tp=2", "--ignore"]),
    "tp=2 x dp=2": (4, ["--tp=2"]),
    "dp=2 zero=1": (2, ["--tp=1", "--zero=1"]),
    "tp=2 x dp=2 zero=1": (4, ["--tp=2", "--zero=1"]),
}


@functools.lru_cache(maxsize=None)
def reference(config: str, dtype: str, ignore: bool) -> dict:
    """One process, the whole global batch: the same STEPS of loss, clipping and AdamW."""
    cfg = CONFIGS[config]
    params = init_params(cfg, seed=INIT_SEED, dtype=np.dtype(dtype))
    state = adamw_init(params)
    out = {"loss": [], "norm": [], "scale": []}
    for step in range(STEPS):
        tokens, targets = global_batch(cfg, step, ignore)
        loss, grads = loss_and_grads(params, tokens, targets, cfg)
        out["loss"].append(loss)
        if step == 0:
            out.update({f"grad:{n}": g.copy() for n, g in grads.items()})
        norm, scale = clip_grad_norm(grads, MAX_NORM)
        out["norm"].append(norm)
        out["scale"].append(scale)
        adamw_update(params, grads, state, **OPTIM)
    out.update({f"param:{n}": p.copy() for n, p in params.items()})
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def job(request, tmp_path_factory):
    """(layout name, the job's saved results, seconds the job took)."""
    n, args = LAYOUTS[request.param]
    out = tmp_path_factory.mktemp("parallel_train") / "result.npz"
    _, seconds = run_mpi(n, "parallel_train.py", *args, f"--out={out}", timeout=300)
    return request.param, load_npz(out), seconds


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_parallel_run_equals_one_process(job, config, dtype):
    layout, result, seconds = job
    n, args = LAYOUTS[layout]
    tp = int(args[0].split("=")[1])
    np.testing.assert_array_equal(result["world"], [n, tp, n // tp])
    ref = reference(config, dtype, "--ignore" in args)
    got = {k.split("/", 2)[2]: v for k, v in result.items() if k.startswith(f"{config}/{dtype}/")}
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    b_loss, b_grad, b_param = BOUNDS[dtype]
    where = f"{layout}, {config}, {dtype}"

    assert rel_err(got["norm"], ref["norm"]) <= b_loss, (where, "norm", got["norm"], ref["norm"])
    assert rel_err(got["loss"], ref["loss"]) <= b_loss, (where, "loss", got["loss"], ref["loss"])
    assert np.all(ref["scale"] < 1), "clipping must act in these runs, or the global norm goes untested"
    assert rel_err(got["scale"], ref["scale"]) <= b_loss, (where, got["scale"], ref["scale"])

    grad_scale = np.sqrt(sum(float(np.sum(ref[k] ** 2)) for k in ref if k.startswith("grad:")))
    for name in param_shapes(CONFIGS[config]):
        g, g_ref = got[f"grad:{name}"], ref[f"grad:{name}"]
        p, p_ref = got[f"param:{name}"], ref[f"param:{name}"]
        assert g.shape == g_ref.shape and p.shape == p_ref.shape, (where, name)
        if name.endswith(ZERO_GRADIENT):
            zero_tol = ZERO_TOL[dtype] * grad_scale
            assert np.abs(g).max() <= zero_tol and np.abs(g_ref).max() <= zero_tol, (where, name)
            continue
        assert rel_err(g, g_ref) <= b_grad, (where, name, rel_err(g, g_ref))
        assert rel_err(p, p_ref) <= b_param, (where, name, rel_err(p, p_ref))
    assert seconds < 120, f"{layout} took {seconds:.1f} s"
