"""Forward+backward time and peak memory of self-attention: the NumPy reference, the flash fast path, PyTorch SDPA.

    python benchmarks/bench_attention.py                     # the target shapes, best of 5, float32, 2 threads
    python benchmarks/bench_attention.py --repeats 9 --shapes 8x256 1x2048
    python benchmarks/bench_attention.py --tune              # the fast path over tile sizes and thread counts
    python benchmarks/bench_attention.py --core              # the attention core alone: fast vs torch sdpa

Each case is one attention layer, C=256, NH=4, hs=64, float32: "llama" (NKV=2, RoPE, no biases) and "gpt2" (NKV=4,
biases, no RoPE), at B x T = 8x256, 2x1024, 1x2048. All three implementations compute the whole layer: the q/k/v
projections, RoPE, attention, the output projection, and the backward of all of it (dx and every weight gradient).
  reference  npllm.layers.attention.attention_forward / attention_backward (the full P per head)
  fast       npllm.fast.attention.flash_attention_forward / flash_attention_backward
  torch      the same layer in eager PyTorch with torch.nn.functional.scaled_dot_product_attention(is_causal=True,
             enable_gqa=NKV<NH) and its backward by autograd, torch.set_num_threads(--threads)
The three run in turn inside each repeat (so a disturbance from other work hits all of them alike) and the best of
--repeats is reported, with the ratios reference/fast and torch/fast (> 1: the fast path is faster).

Peak memory of one forward+backward beyond its inputs and parameters:
  numpy (reference, fast): tracemalloc's peak (NumPy reports its allocations to it), in a separate untimed run.
  torch: the growth of the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) during one
         forward+backward after a warm-up, in a fresh subprocess per case whose glibc returns every freed block of
         64 KiB or more to the system (MALLOC_MMAP_THRESHOLD_=65536), so that the resident set follows the live
         memory; it includes the kernels' own working memory.
The two are not the same measure; compare the fast path's numbers across shapes (at fixed B*T only the tiles depend
on T), and the reference's against the fast path's.

--core times only the attention core, q, k, v (after RoPE) -> o and back: flash_core_forward + flash_core_backward
against scaled_dot_product_attention and its autograd backward.

--tune prints the fast path's time for each (q_tile, k_tile, threads); the default tile sizes in
npllm/fast/attention.py were chosen from it (the comment above Q_TILES_PER_SEQUENCE gives the numbers).

Other processes on the machine distort the 2-thread numbers, torch's most (its OpenMP threads meet at a barrier in
every parallel region): with another process busy on one of the 2 cores, torch's llama 8x256 step took 539 ms with
2 threads and 82 ms with 1, against 63 ms at a quieter moment. Run on an idle machine, or compare single-threaded:
OPENBLAS_NUM_THREADS=1 python benchmarks/bench_attention.py --threads 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from npllm.fast import attention as fast  # noqa: E402
from npllm.layers.attention import attention_backward, attention_forward  # noqa: E402
from npllm.layers.rope import rope_tables  # noqa: E402

C, NH, HS = 256, 4, 64
VARIANTS = {"llama": dict(NKV=2, bias=False, rope=True), "gpt2": dict(NKV=4, bias=True, rope=False)}
SHAPES = ("8x256", "2x1024", "1x2048")


def make_case(variant, B, T, seed=0):
    """params, x, dy, rope tables (float32) for one case."""
    spec = VARIANTS[variant]
    NKV = spec["NKV"]
    rng = np.random.default_rng(seed)
    shapes = {"wq": (C, NH * HS), "wk": (C, NKV * HS), "wv": (C, NKV * HS), "wo": (NH * HS, C)}
    if spec["bias"]:
        shapes.update(bq=(NH * HS,), bk=(NKV * HS,), bv=(NKV * HS,), bo=(C,))
    p = {n: (rng.standard_normal(s) * (0.02 if len(s) == 1 else 1 / math.sqrt(s[0]))).astype(np.float32)
         for n, s in shapes.items()}
    x = rng.standard_normal((B, T, C)).astype(np.float32)  # (B, T, C)
    dy = rng.standard_normal((B, T, C)).astype(np.float32)  # (B, T, C)
    rope = rope_tables(np.arange(T), HS, 10000.0) if spec["rope"] else None  # (T, hs) float32 each
    return p, x, dy, rope, NKV


def numpy_step(forward, backward, p, x, dy, rope, NKV, **kw):
    y, cache = forward(p, x, NH, NKV, rope=rope, **kw)
    return y, backward(dy, cache)


def torch_setup(p, x, dy, rope, NKV, threads):
    import torch

    torch.set_num_threads(threads)
    tp = {n: torch.from_numpy(a.copy()).requires_grad_(True) for n, a in p.items()}
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    tdy = torch.from_numpy(dy)
    trope = None if rope is None else tuple(torch.from_numpy(t) for t in rope)
    B, T, _ = x.shape

    def rotate(t, cos, sin):  # rotate-half RoPE, t (B, H, T, hs)
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    def step():
        for t in (*tp.values(), tx):
            t.grad = None
        q = tx @ tp["wq"] + tp["bq"] if "bq" in tp else tx @ tp["wq"]
        k = tx @ tp["wk"] + tp["bk"] if "bk" in tp else tx @ tp["wk"]
        v = tx @ tp["wv"] + tp["bv"] if "bv" in tp else tx @ tp["wv"]
        q = q.view(B, T, NH, HS).transpose(1, 2)  # (B, NH, T, hs)
        k = k.view(B, T, NKV, HS).transpose(1, 2)  # (B, NKV, T, hs)
        v = v.view(B, T, NKV, HS).transpose(1, 2)  # (B, NKV, T, hs)
        if trope is not None:
            q, k = rotate(q, *trope), rotate(k, *trope)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NKV < NH)
        y = o.transpose(1, 2).reshape(B, T, NH * HS) @ tp["wo"]
        if "bo" in tp:
            y = y + tp["bo"]
        y.backward(tdy)
        return y

    return step


def best_times(cases, repeats, threads):
    """{(variant, shape): {impl: best seconds}}; the implementations alternate inside each repeat."""
    results = {}
    for variant, shape in cases:
        B, T = map(int, shape.split("x"))
        p, x, dy, rope, NKV = make_case(variant, B, T)
        impls = {
            "reference": lambda: numpy_step(attention_forward, attention_backward, p, x, dy, rope, NKV),
            "fast": lambda: numpy_step(fast.flash_attention_forward, fast.flash_attention_backward, p, x, dy, rope,
                                       NKV, threads=threads),
            "torch": torch_setup(p, x, dy, rope, NKV, threads),
        }
        y_ref = impls["reference"]()[0]
        y_fast = impls["fast"]()[0]  # warm-ups, and a check that the fast path computes the same layer
        y_torch = impls["torch"]().detach().numpy()
        assert np.allclose(y_fast, y_ref, rtol=1e-4, atol=1e-5) and np.allclose(y_torch, y_ref, rtol=1e-4, atol=1e-5)
        best = dict.fromkeys(impls, float("inf"))
        for _ in range(repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        results[variant, shape] = best
    return results


def numpy_peak_bytes(variant, shape, impl, threads, **tiles):
    """tracemalloc's peak during one forward+backward, above what was allocated before it (inputs, params)."""
    B, T = map(int, shape.split("x"))
    p, x, dy, rope, NKV = make_case(variant, B, T)
    fns = {"reference": (attention_forward, attention_backward),
           "fast": (fast.flash_attention_forward, fast.flash_attention_backward)}[impl]
    kw = dict(threads=threads, **tiles) if impl == "fast" else {}
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        numpy_step(*fns, p, x, dy, rope, NKV, **kw)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def torch_peak_child(variant, shape, threads):
    """In a fresh process: peak RSS growth (bytes) during one torch forward+backward, after one warm-up."""
    B, T = map(int, shape.split("x"))
    step = torch_setup(*make_case(variant, B, T), threads)
    step()  # warm-up: the first call loads kernels and grows the allocator's pools
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def torch_peak_bytes(variant, shape, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--torch_peak_child", variant, shape, str(threads)],
                         check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def core_times(cases, repeats, threads):
    """{(variant, shape): {"fast core": s, "torch sdpa": s}}: the attention core alone, forward + backward."""
    import torch

    torch.set_num_threads(threads)
    results = {}
    for variant, shape in cases:
        B, T = map(int, shape.split("x"))
        p, x, dy, rope, NKV = make_case(variant, B, T)
        _, cache = fast.flash_attention_forward(p, x, NH, NKV, rope=rope)
        qg, k, v, scale = cache["qs"], cache["k"], cache["v"], 1.0  # (B, NKV, G, T, hs), (B, NKV, T, hs); qs scaled
        do = np.random.default_rng(1).standard_normal(qg.shape).astype(np.float32)  # (B, NKV, G, T, hs)
        tq = torch.from_numpy(np.ascontiguousarray(qg).reshape(B, NH, T, HS)).requires_grad_(True)
        tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (k, v))
        tdo = torch.from_numpy(do.reshape(B, NH, T, HS))

        def fast_core():
            o, L = fast.flash_core_forward(qg, k, v, scale, threads=threads)
            return fast.flash_core_backward(do, qg, k, v, o, L, scale, threads=threads)

        def torch_core():
            for t in (tq, tk, tv):
                t.grad = None
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, scale=1.0,
                                                                 enable_gqa=NKV < NH)
            o.backward(tdo)

        impls = {"fast core": fast_core, "torch sdpa": torch_core}
        best = dict.fromkeys(impls, float("inf"))
        for fn in impls.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in impls.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        results[variant, shape] = best
    return results


def tune(cases, repeats, threads_list, q_tiles, k_tiles):
    for variant, shape in cases:
        B, T = map(int, shape.split("x"))
        p, x, dy, rope, NKV = make_case(variant, B, T)
        configs = [(qt, kt, th) for th in threads_list for qt in q_tiles for kt in k_tiles
                   if (qt <= T or qt == min(q_tiles)) and (kt <= T or kt == min(k_tiles))]
        best = {c: float("inf") for c in configs}
        for _ in range(repeats):
            for qt, kt, th in configs:
                start = time.perf_counter()
                numpy_step(fast.flash_attention_forward, fast.flash_attention_backward, p, x, dy, rope, NKV,
                           q_tile=qt, k_tile=kt, threads=th)
                best[qt, kt, th] = min(best[qt, kt, th], time.perf_counter() - start)
        print(f"{variant} B x T = {shape}:")
        for (qt, kt, th), t in sorted(best.items(), key=lambda item: item[1]):
            print(f"  q_tile {qt:5d}  k_tile {kt:5d}  threads {th}  {1e3 * t:8.2f} ms")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="B x T, e.g. 8x256")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and for the fast path's core")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--tune", action="store_true", help="time the fast path over tile sizes and threads")
    parser.add_argument("--core", action="store_true", help="time only the attention core (fast vs torch sdpa)")
    parser.add_argument("--q_tiles", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--k_tiles", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--torch_peak_child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.torch_peak_child:
        variant, shape, threads = args.torch_peak_child
        print(json.dumps(torch_peak_child(variant, shape, int(threads))))
        return
    cases = [(v, s) for v in args.variants for s in args.shapes]
    if args.tune:
        tune(cases, args.repeats, sorted({1, args.threads}), args.q_tiles, args.k_tiles)
        return
    if args.core:
        print(f"attention core only (q, k, v -> o -> dq, dk, dv), float32, {args.threads} threads, "
              f"best of {args.repeats}")
        for (variant, shape), best in core_times(cases, args.repeats, args.threads).items():
            print(f"{variant + ' ' + shape:<18} fast core {1e3 * best['fast core']:7.1f}ms   torch sdpa "
                  f"{1e3 * best['torch sdpa']:7.1f}ms   torch/fast {best['torch sdpa'] / best['fast core']:5.2f}")
        return

    print(f"C={C} NH={NH} hs={HS} float32, {args.threads} threads (torch and the fast path), best of {args.repeats}; "
          f"{len(os.sched_getaffinity(0))} cores available")
    print(f"{'case':<18} {'reference':>10} {'fast':>8} {'torch':>8}   {'ref/fast':>8} {'torch/fast':>10}   "
          f"peak MB: {'reference':>9} {'fast':>6} {'torch':>6}")
    times = best_times(cases, args.repeats, args.threads)
    for (variant, shape), best in times.items():
        line = (f"{variant + ' ' + shape:<18} {1e3 * best['reference']:8.1f}ms {1e3 * best['fast']:6.1f}ms "
                f"{1e3 * best['torch']:6.1f}ms   {best['reference'] / best['fast']:8.2f} "
                f"{best['torch'] / best['fast']:10.2f}")
        if not args.no_memory:
            mb = [numpy_peak_bytes(variant, shape, "reference", args.threads) / 2**20,
                  numpy_peak_bytes(variant, shape, "fast", args.threads) / 2**20,
                  torch_peak_bytes(variant, shape, args.threads) / 2**20]
            line += f"            {mb[0]:9.1f} {mb[1]:6.1f} {mb[2]:6.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
