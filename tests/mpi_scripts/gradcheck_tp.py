"""Float64 finite-difference check of the tensor-parallel model, inside an mpirun job.

    mpirun -n 2 python tests/mpi_scripts/gradcheck_tp.py --tp=2 --out=DIR

Every rank evaluates the same scalar loss (the vocabulary-parallel cross-entropy is all-reduced). Perturbing a
parameter must perturb the one model the ranks hold together, so:
  * a replicated parameter (norms, pos_emb, the biases added after a reduce) is perturbed on every rank at once,
    the same way (the same seed draws the same directions);
  * a split parameter's shard is perturbed on one rank at a time: the active rank passes its real shards to the
    checker, the others pass throwaway copies, so they make the same number of loss calls (each a collective)
    while their own shards stay put.
Each rank writes OUT/rank<r>.npz with the relative error of every check it was active in, keyed
"<config>:<name>" (replicated) or "<config>:rank<r>:<name>" (its shard).

Then, as a control, the llama config is checked again (keys "broken:...") with copy_to_tp's backward (an
all-reduce) replaced by the identity, a plausible bug that no single-process check can see; the test requires
large errors there.
"""

if __name__ == "__main__":  # a rank of an mpirun job: its share of the cores for BLAS, before NumPy loads
    from npllm.parallel.threads import limit_blas_threads

    limit_blas_threads()

import argparse
from pathlib import Path

import numpy as np
from mpi_common import TINY_CONFIGS, save_npz

import npllm.parallel.tensor as tensor
from npllm.gradcheck import check_gradients
import npllm.models.decoder as decoder
from npllm.models import init_params, split_axes
from npllm.models.decoder import loss_and_grads, model_forward
from npllm.parallel.comm import make_comm, run_main

# Shards of up to MAX_ELEMENTWISE entries are checked entry by entry, larger ones along random directions: every
# loss call is a few collectives, so the count of calls is the cost.
MAX_ELEMENTWISE = 16


def full_params(cfg):
    """Initial float64 parameters plus noise (so norm gains differ from 1 and biases from 0), the same on every
    rank."""
    params = init_params(cfg, seed=5, dtype=np.float64)
    rng = np.random.default_rng(6)
    return {n: p + 0.3 * rng.standard_normal(p.shape) for n, p in params.items()}


def check_config(name, cfg, comm):
    tp = comm.tp
    axes = split_axes(cfg)
    params = tensor.shard_params(full_params(cfg), axes, tp.rank, tp.size)  # this rank's shards
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 4))  # (B, T)
    targets = rng.integers(0, cfg.vocab_size, size=(2, 4))  # (B, T)
    targets[0, 1] = -100
    _, grads = loss_and_grads(params, tokens, targets, cfg, tp=tp)

    def loss():
        logits, _ = model_forward(params, tokens, cfg, tp=tp)  # (B, T, V_tp)
        return tensor.vocab_parallel_cross_entropy_forward(logits, targets, tp)[0]

    replicated = [n for n in params if axes[n] is None]
    split = [n for n in params if axes[n] is not None]
    errors = {}
    errs = check_gradients(loss, params, {n: grads[n] for n in replicated}, seed=1, max_elementwise=MAX_ELEMENTWISE)
    errors.update({f"{name}:{n}": e for n, e in errs.items()})
    for active in range(tp.size):
        arrays = params if tp.rank == active else {n: params[n].copy() for n in split}
        errs = check_gradients(loss, arrays, {n: grads[n] for n in split}, seed=2, max_elementwise=MAX_ELEMENTWISE)
        if tp.rank == active:
            errors.update({f"{name}:rank{active}:{n}": e for n, e in errs.items()})
    return errors


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    comm = make_comm(tp=args.tp)
    errors = {}
    for name, cfg in TINY_CONFIGS.items():
        errors.update(check_config(name, cfg, comm))
    # The control: copy_to_tp's backward (all-reduce) replaced by the identity, a bug no one-process check sees.
    decoder.copy_to_tp_backward = lambda dy, tp: dy  # each rank keeps only its own term of dx
    errors.update(check_config("broken", TINY_CONFIGS["llama"], comm))
    save_npz(Path(args.out) / f"rank{comm.world.rank}.npz", {k: np.array(v) for k, v in errors.items()})


if __name__ == "__main__":
    run_main(main)
