"""Time of the fused, all-core elementwise fast paths (npllm/fast) against the NumPy reference and PyTorch eager.

    python benchmarks/bench_elementwise.py                    # every case, best of 7, float32
    python benchmarks/bench_elementwise.py --repeats 15 --cases gelu loss
    python benchmarks/bench_elementwise.py --threads 1        # the pool on one thread (the fusion's share alone)
    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_elementwise.py --threads 1 --clock cpu   # one core's work
    python benchmarks/bench_elementwise.py --tune             # chunk sizes x threads, and the serial/parallel cutoff

The shapes are the profile's (GPT-2-style, V=8192, C=256, L=4, NH=4, B=8, T=256): N = B*T = 2048 rows, float32.
  gelu      the GELU (tanh) MLP with biases, C=256, F=1024: forward (x -> y) and backward (dy -> dx and 4 grads)
  swiglu    the SwiGLU MLP without biases, C=256, F=704
  layernorm, rmsnorm   over C=256
  loss      the vocabulary-parallel softmax cross-entropy on one rank (N, V=8192): forward, backward (dloss=1)
  loss_ip   the same, fast path with in_place=True (the logits given away; the reference is the same as for loss)
  adamw     one AdamW step over every parameter of the profile's model (npllm.models.param_shapes)
Each case's implementations run in turn inside each repeat (a disturbance from other processes hits all alike);
the table gives the best time in ms, the median in brackets (the spread: other processes share the 2 cores), and
the speedups reference/fast and torch/fast (> 1: the fast path is faster). The MLP rows also give "gemm", the time
of the layer's matmuls alone in NumPy: what is left above it is elementwise work. torch: the same layer in eager
PyTorch (torch.nn.functional; backward by autograd; for adamw torch.optim.AdamW(fused=True), and its default, the
for-loop over tensors), torch.set_num_threads to the pool's thread count. "no grad": torch's forward under
torch.no_grad(), as a forward-only pass (validation) runs.

The loss's peak memory (tracemalloc: NumPy reports its allocations to it) is printed below the table, as a
multiple of one (N, V) logits array, for the forward and the backward separately, beyond the logits themselves.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np

from npllm import optim as ref_optim
from npllm.config import ModelConfig
from npllm.fast import loss as fast_loss
from npllm.fast import mlp as fast_mlp
from npllm.fast import norm as fast_norm
from npllm.fast import optim as fast_optim
from npllm.fast import pool
from npllm.layers import mlp as ref_mlp
from npllm.layers import norm as ref_norm
from npllm.models import param_shapes
from npllm.parallel import tensor as ref_tensor
from npllm.parallel.comm import LocalComm

N, C, F_GELU, F_SWIGLU, V = 2048, 256, 1024, 704, 8192
EPS = 1e-5
CASES = ("gelu", "swiglu", "layernorm", "rmsnorm", "loss", "loss_ip", "adamw")
PROFILE = ModelConfig(vocab_size=V, dim=C, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=F_GELU, max_seq_len=256,
                      norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)

try:
    import torch
    import torch.nn.functional as TF
except ImportError:  # torch is optional here
    torch = None


def rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# one step per implementation: each maker returns {phase: callable}; a callable may need a fresh input (prep)


def mlp_case(kind, rng):
    F = F_GELU if kind == "gelu" else F_SWIGLU
    p = {"w1": rand(rng, C, F, scale=C**-0.5), "w2": rand(rng, F, C, scale=F**-0.5)}
    if kind == "swiglu":
        p["w3"] = rand(rng, C, F, scale=C**-0.5)
    else:
        p.update(b1=rand(rng, F, scale=0.1), b2=rand(rng, C, scale=0.1))
    x, dy = rand(rng, N, C), rand(rng, N, C)
    ref_f, ref_b = ref_mlp.MLP_KINDS[kind]
    fast_f, fast_b = fast_mlp.MLP_KINDS[kind]
    ref_cache = ref_f(p, x)[1]
    fast_cache = fast_f(p, x)[1]
    impls = {
        "reference": {"forward": lambda: ref_f(p, x), "backward": lambda: ref_b(dy, ref_cache)},
        "fast": {"forward": lambda: fast_f(p, x), "backward": lambda: fast_b(dy, fast_cache)},
    }
    a = rand(rng, N, F)

    def gemm_forward():  # the forward's matmuls alone
        x @ p["w1"]
        if kind == "swiglu":
            x @ p["w3"]
        return a @ p["w2"]

    def gemm_backward():  # the backward's matmuls alone
        a.T @ dy
        da = dy @ p["w2"].T
        x.T @ da
        if kind == "swiglu":
            x.T @ da
            da @ p["w3"].T
        return da @ p["w1"].T

    impls["gemm"] = {"forward": gemm_forward, "backward": gemm_backward}
    if torch is not None:
        tp = {n: torch.from_numpy(w).requires_grad_() for n, w in p.items()}
        tx, tdy = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)

        def t_forward():
            if kind == "swiglu":
                return (TF.silu(tx @ tp["w1"]) * (tx @ tp["w3"])) @ tp["w2"]
            return TF.gelu(tx @ tp["w1"] + tp["b1"], approximate="tanh") @ tp["w2"] + tp["b2"]

        impls["torch"] = torch_phases(t_forward, tdy, [tx, *tp.values()])
    return impls


def norm_case(kind, rng):
    p = {"w": 1 + rand(rng, C, scale=0.1)}
    if kind == "layernorm":
        p["b"] = rand(rng, C, scale=0.1)
    x, dy = rand(rng, N, C, scale=2.0) + 0.5, rand(rng, N, C)
    ref_f, ref_b = getattr(ref_norm, f"{kind}_forward"), getattr(ref_norm, f"{kind}_backward")
    fast_f, fast_b = getattr(fast_norm, f"{kind}_forward"), getattr(fast_norm, f"{kind}_backward")
    ref_cache, fast_cache = ref_f(p, x, EPS)[1], fast_f(p, x, EPS)[1]
    impls = {
        "reference": {"forward": lambda: ref_f(p, x, EPS), "backward": lambda: ref_b(dy, ref_cache)},
        "fast": {"forward": lambda: fast_f(p, x, EPS), "backward": lambda: fast_b(dy, fast_cache)},
    }
    if torch is not None:
        tp = {n: torch.from_numpy(w).requires_grad_() for n, w in p.items()}
        tx, tdy = torch.from_numpy(x).requires_grad_(), torch.from_numpy(dy)
        def t_forward():
            if kind == "layernorm":
                return TF.layer_norm(tx, (C,), tp["w"], tp["b"], EPS)
            return TF.rms_norm(tx, (C,), tp["w"], EPS)
        impls["torch"] = torch_phases(t_forward, tdy, [tx, *tp.values()])
    return impls


def loss_case(in_place, rng):
    logits = rand(rng, N, V, scale=2.0)  # (N, V)
    targets = rng.integers(0, V, size=N)  # (N,)
    targets[rng.random(N) < 0.05] = -100
    comm = LocalComm()
    ref_cache = ref_tensor.vocab_parallel_cross_entropy_forward(logits, targets, comm)[1]
    scratch = logits.copy()  # the in-place forward's victim, refilled (untimed) before each forward

    def fast_forward():
        z = scratch if in_place else logits
        return fast_loss.vocab_parallel_cross_entropy_forward(z, targets, comm, in_place=in_place)

    def fast_backward():
        return fast_loss.vocab_parallel_cross_entropy_backward(1.0, fast_phase_cache[0])

    fast_phase_cache = [None]

    def prep_forward():
        if in_place:
            np.copyto(scratch, logits)

    def prep_backward():
        prep_forward()
        fast_phase_cache[0] = fast_forward()[1]

    impls = {
        "reference": {"forward": lambda: ref_tensor.vocab_parallel_cross_entropy_forward(logits, targets, comm),
                      "backward": lambda: ref_tensor.vocab_parallel_cross_entropy_backward(1.0, ref_cache)},
        "fast": {"forward": (prep_forward, fast_forward), "backward": (prep_backward, fast_backward)},
    }
    if torch is not None:
        tz, tt = torch.from_numpy(logits).requires_grad_(), torch.from_numpy(targets)
        impls["torch"] = torch_phases(lambda: TF.cross_entropy(tz, tt, ignore_index=-100), None, [tz])
    return impls


def adamw_case(rng):
    shapes = param_shapes(PROFILE)
    params = {n: rand(rng, *s, scale=0.02) for n, s in shapes.items()}
    grads = {n: rand(rng, *s, scale=1e-3) for n, s in shapes.items()}
    ref_params = {n: p.copy() for n, p in params.items()}
    ref_state, fast_state = ref_optim.adamw_init(ref_params), ref_optim.adamw_init(params)
    kw = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}
    impls = {
        "reference": {"step": lambda: ref_optim.adamw_update(ref_params, grads, ref_state, **kw)},
        "fast": {"step": lambda: fast_optim.adamw_update(params, grads, fast_state, **kw)},
    }
    if torch is not None:
        tparams = [torch.from_numpy(p.copy()).requires_grad_() for p in params.values()]
        for tp, g in zip(tparams, grads.values()):
            tp.grad = torch.from_numpy(g.copy())
        for label, options in (("torch", {"fused": True}), ("torch default", {})):
            opt = torch.optim.AdamW(tparams, lr=kw["lr"], betas=(kw["beta1"], kw["beta2"]), eps=kw["eps"],
                                    weight_decay=kw["weight_decay"], **options)
            impls[label] = {"step": opt.step}
    return impls, sum(math.prod(s) for s in shapes.values())


def torch_phases(forward, dy, leaves):
    """{"forward": f, "backward": (prep, b)}: the forward alone, and the backward of a fresh forward (untimed)."""
    out = [None]

    def prep():
        for leaf in leaves:
            leaf.grad = None
        out[0] = forward()

    def backward():
        if dy is None:
            out[0].backward()
        else:
            out[0].backward(dy)

    def timed_forward():
        with torch.no_grad():  # what a forward whose backward never comes costs; autograd's bookkeeping is in backward
            return forward()

    return {"forward": lambda: forward(), "backward": (prep, backward), "forward (no grad)": timed_forward}


def make_case(name, rng):
    if name in ("gelu", "swiglu"):
        return mlp_case(name, rng), None
    if name in ("layernorm", "rmsnorm"):
        return norm_case(name, rng), None
    if name in ("loss", "loss_ip"):
        return loss_case(name == "loss_ip", rng), None
    return adamw_case(rng)


# ----------------------------------------------------------------------------------------------------------
# timing


CLOCK = time.perf_counter  # --clock cpu: time.process_time, the CPU time of all the process's threads


def run_timed(step):
    """Seconds of one call on CLOCK; step is a callable or (prep, callable) with prep untimed."""
    prep, fn = step if isinstance(step, tuple) else (None, step)
    if prep is not None:
        prep()
    start = CLOCK()
    fn()
    return CLOCK() - start


def time_case(impls, repeats):
    """{(impl, phase): [seconds per repeat]}, the implementations taking turns inside each repeat."""
    times = {(impl, phase): [] for impl, phases in impls.items() for phase in phases}
    for (impl, phase) in times:  # warm-up: pages, pools, torch's kernels
        run_timed(impls[impl][phase])
    for _ in range(repeats):
        for (impl, phase), ts in times.items():
            ts.append(run_timed(impls[impl][phase]))
    return times


def ms(ts):
    return f"{1e3 * min(ts):7.2f} ({1e3 * statistics.median(ts):6.2f})"


def report(name, times, extra=""):
    phases = [p for p in ("forward", "backward", "step") if ("fast", p) in times]
    for phase in phases:
        ref, fast = times["reference", phase], times["fast", phase]
        line = f"{name + ' ' + phase:20s} ref {ms(ref)} | fast {ms(fast)} | ref/fast {min(ref) / min(fast):5.2f}"
        if ("torch", phase) in times:
            tt = times["torch", phase]
            line += f" | torch {ms(tt)} | torch/fast {min(tt) / min(fast):5.2f}"
        if ("torch", "forward (no grad)") in times and phase == "forward":
            line += f" (no grad: {1e3 * min(times['torch', 'forward (no grad)']):.2f})"
        if ("torch default", phase) in times:
            line += f" | torch default (for-loop) {ms(times['torch default', phase])}"
        if ("gemm", phase) in times:
            line += f" | gemm {1e3 * min(times['gemm', phase]):6.2f}"
        print(line + extra, flush=True)


def loss_memory(rng):
    """Peak bytes beyond the logits, as multiples of one (N, V) float32 array, of each loss's forward and backward."""
    logits = rand(rng, N, V, scale=2.0)
    targets = rng.integers(0, V, size=N)
    comm = LocalComm()
    nv = logits.nbytes
    rows = []
    variants = {
        "reference": (ref_tensor.vocab_parallel_cross_entropy_forward, ref_tensor.vocab_parallel_cross_entropy_backward,
                      {}),
        "fast": (fast_loss.vocab_parallel_cross_entropy_forward, fast_loss.vocab_parallel_cross_entropy_backward, {}),
        "fast in_place": (fast_loss.vocab_parallel_cross_entropy_forward,
                          fast_loss.vocab_parallel_cross_entropy_backward, {"in_place": True}),
    }
    for label, (fwd, bwd, kw) in variants.items():
        z = logits.copy()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        _, cache = fwd(z, targets, comm, **kw)
        after_forward, peak_forward = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        dz, _ = bwd(1.0, cache)
        after_backward, peak_backward = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(f"  {label:14s} forward peak {(peak_forward - base) / nv:5.2f}, "
                    f"kept {(after_forward - base) / nv:5.2f}"
                    f" | backward peak {(peak_backward - base) / nv:5.2f}, kept (dlogits + cache) "
                    f"{(after_backward - base) / nv:5.2f}   (x {nv / 2**20:.0f} MiB)")
        del dz, cache, z
    print("loss memory beyond the logits (tracemalloc), in (N, V) float32 arrays:")
    print("\n".join(rows))


# ----------------------------------------------------------------------------------------------------------
# tuning: chunk sizes and the serial/parallel cutoff


def handoff_round_trip(trials=2000):
    """min / median / 90th percentile of submitting a no-op to a one-thread pool and waiting for it, in us."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as executor:
        executor.submit(lambda: None).result()
        ts = []
        for _ in range(trials):
            start = time.perf_counter()
            executor.submit(lambda: None).result()
            ts.append(time.perf_counter() - start)
    ts.sort()
    return f"min {1e6 * ts[0]:.1f}, median {1e6 * ts[trials // 2]:.1f}, 90% {1e6 * ts[9 * trials // 10]:.1f}"


def tune(repeats):
    """Print the fast paths' times over CHUNK_ELEMENTS x threads, and the serial/parallel crossover."""
    rng = np.random.default_rng(0)
    steps = {}
    for name in ("gelu", "rmsnorm", "loss", "adamw"):
        impls, _ = make_case(name, rng)
        for phase, step in impls["fast"].items():
            steps[f"{name} {phase}"] = step
    print("fast paths' best time in ms over CHUNK_ELEMENTS (rows: step; columns: chunk elements x threads)")
    sizes = [1 << k for k in (14, 15, 16, 17, 18, 19, 20)]
    header = "".join(f"{f'{s // 1024}K x{t}':>10s}" for s in sizes for t in (1, 2))
    print(f"{'':22s}{header}")
    old = pool.CHUNK_ELEMENTS, pool.THREADS
    try:
        for label, step in steps.items():
            cells = []
            for size in sizes:
                for threads in (1, 2):
                    pool.CHUNK_ELEMENTS, pool.THREADS = size, threads
                    run_timed(step)
                    cells.append(min(run_timed(step) for _ in range(repeats)))
            print(f"{label:22s}" + "".join(f"{1e3 * c:10.2f}" for c in cells), flush=True)
        pool.CHUNK_ELEMENTS = old[0]
        print("\nthe pool's hand-off: submit a no-op to one pool thread and wait for it (us, over 2000 trials): "
              + handoff_round_trip())
        print("map_rows over (rows, 256) float32 with no BLAS (MIN_PARALLEL_ELEMENTS = 0), serial vs 2 threads, us "
              "(best of repeats): a cheap chain (4 ufuncs) and a tanh chain (3 ufuncs, one tanh)")
        old_min = pool.MIN_PARALLEL_ELEMENTS
        pool.MIN_PARALLEL_ELEMENTS = 0
        for total in (1 << 15, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20):
            x = rand(rng, total // C, C)
            o, t = np.empty_like(x), np.empty_like(x)

            def cheap(r, x=x, o=o):
                np.multiply(x[r], x[r], out=o[r])
                o[r] += 1.0
                np.multiply(o[r], x[r], out=o[r])
                o[r] *= 0.5

            def tanh_chain(r, x=x, o=o, t=t):
                np.multiply(x[r], x[r], out=o[r])
                np.tanh(o[r], out=t[r])
                o[r] *= t[r]

            cells = []
            for fn in (cheap, tanh_chain):
                for threads in (1, 2):
                    pool.THREADS = threads
                    step = functools.partial(pool.map_rows, fn, x.shape[0], C)
                    run_timed(step)
                    cells.append(min(run_timed(step) for _ in range(repeats)))
            print(f"  {total:8d} elements: cheap serial {1e6 * cells[0]:8.1f} 2 threads {1e6 * cells[1]:8.1f} | tanh "
                  f"serial {1e6 * cells[2]:8.1f} 2 threads {1e6 * cells[3]:8.1f}", flush=True)
        pool.MIN_PARALLEL_ELEMENTS = old_min
    finally:
        pool.CHUNK_ELEMENTS, pool.THREADS = old


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--threads", type=int, default=None, help="the pool's threads (default: its own rule)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: CPU time of the process's threads (with --threads 1 and "
                             "OPENBLAS_NUM_THREADS=1: the work of one core, whatever other processes do)")
    parser.add_argument("--tune", action="store_true", help="chunk sizes and the serial/parallel cutoff")
    args = parser.parse_args()
    global torch, CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.no_torch:
        torch = None
    pool.THREADS = args.threads
    threads = args.threads or pool.default_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    if args.tune:
        tune(args.repeats)
        return
    print(f"N={N} C={C} F={F_GELU} (gelu) / {F_SWIGLU} (swiglu) V={V} float32 | pool threads {threads}, "
          f"CHUNK_ELEMENTS {pool.CHUNK_ELEMENTS}, MIN_PARALLEL_ELEMENTS {pool.MIN_PARALLEL_ELEMENTS} | "
          f"best of {args.repeats} in ms (median), {args.clock} clock")
    rng = np.random.default_rng(0)
    for name in args.cases:
        impls, n_params = make_case(name, rng)
        times = time_case(impls, args.repeats)
        report(name, times, f"   ({n_params:,} parameters)" if n_params else "")
        del impls
    if "loss" in args.cases or "loss_ip" in args.cases:
        loss_memory(rng)


if __name__ == "__main__":
    main()
