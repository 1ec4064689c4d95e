"""Tokens/s and peak memory of one full training step: npllm against PyTorch eager on the same model and weights.

    python benchmarks/bench_vs_pytorch.py                    # every shape, both layouts, 2 threads, 5 repeats (~11 min)
    python benchmarks/bench_vs_pytorch.py --quick            # a 1-minute smoke run (two shapes, 1 repeat, 1 step)
    python benchmarks/bench_vs_pytorch.py --threads 1 --shapes llama-8x256 gpt2-8x256 --repeats 5
    python benchmarks/bench_vs_pytorch.py --impl reference   # npllm's plain layers even once the fast paths exist
    python benchmarks/bench_vs_pytorch.py --ranks 1          # npllm as one process only (no mpirun layout)

One step is the trainer's (npllm/train.py): forward + backward (``accumulate_loss_and_grads``), the global-norm clip
(``reduce_and_clip``, max norm 1) and AdamW (``apply_update`` with the trainer's ``ops(cfg).adamw_update``: lr 3e-4,
betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on the 2-D weights). PyTorch runs the same step on the Hugging Face
model that ``npllm.hf`` maps the parameters to (GPT2LMHeadModel or LlamaForCausalLM, attn_implementation="sdpa",
float32, train mode, no dropout): logits -> F.cross_entropy against the same targets -> backward ->
clip_grad_norm_(1.0) -> torch.optim.AdamW with the same hyperparameters and the same decay rule (p.dim() >= 2),
foreach left at torch's default. Both start from npllm's init_params(cfg, seed=0) and see the same batch every step;
the first step's losses must agree to 1e-5 relative (float32), else the run exits 1: a benchmark of two different
models is worthless. The GPT-2 side uses transformers' "gelu_pytorch_tanh" (torch's fused tanh-GELU; the same function
as the "gelu_new" that config_to_hf writes, which HF computes in several eager ops), so PyTorch is not handicapped.

Method. Every measurement is a fresh child process (this file with --child), npllm and PyTorch alternating (which goes
first alternates between repeats), each: imports, the model and the batch, then one warm-up step and --steps timed
steps; tok/s = steps * B * T / (time of the timed steps). Reported: the median and the best over --repeats children,
and the median of the paired ratios (each repeat's npllm child over the PyTorch child run right before or after it:
the two saw the same state of a machine whose speed drifts, so this ratio moves less between runs). Also each child's
fastest timed step (B * T / its time): another process slowing the machine for a second only ever adds time, so the
fastest of a child's steps is the one least disturbed; the "fastest-step ratio" is the median of npllm's children's
fastest-step tok/s over the median of PyTorch's. OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS are set to --threads in both children, and torch.set_num_threads(--threads).
The npllm child also gets OPENBLAS_THREAD_TIMEOUT=4 unless the environment sets it, as `python -m npllm.train` does
(npllm/parallel/threads.py; torch's MKL does not read it), and it calls npllm.allocator.keep_freed_memory() first, as
the trainer does (malloc serves every array from its heap, one arena for all threads, and keeps freed memory for
the next step; unless the environment tunes malloc). Other settings of the environment (OPENBLAS_CORETYPE, ...)
pass through unchanged.

Peak memory, the same quantity on both sides: the growth of the process's resident set over the whole run of steps,
VmHWM at the end minus VmRSS just before the warm-up step, after imports, parameters and the batch are in place and
malloc_trim has returned free heap pages (the peak is reset to the current resident set through
/proc/self/clear_refs first). It counts everything a training step adds to the weights: the gradients, AdamW's two
moments (npllm allocates them before the warm-up step, torch during it), activations, temporaries, and the libraries'
working memory. glibc's allocator runs with its defaults in the PyTorch child and with keep_freed_memory's settings in
npllm's (above).

MFU: npllm's model FLOPs per second (``flops_per_token``: matmuls, forward + backward) over the float32 sgemm rate
of npllm.metrics.measure_peak_flops (a 1024 x 1024 NumPy matmul, best of 8) measured in the same child after the
steps; the PyTorch column is the same against a 1024 x 1024 torch.mm in its child.

npllm's layouts (--ranks). Each shape runs npllm as one process of --threads threads, as ``python -m npllm.train``
runs it: the batch's rows cut into the trainer's default row groups (one per thread, at most B; B=1: one) whose
forward/backward passes run side by side with BLAS on one thread each, and the rest of the step (clip, AdamW) on
BLAS's and npllm's own thread pools. By default when mpirun and mpi4py are installed (npllm's mpi extra), it also runs
as ``mpirun -n R`` with R = --threads, each rank one thread: data parallel, as ``mpirun -n 2 python -m npllm.train``
on a 2-core laptop. Rank r takes rows [r B / R, (r + 1) B / R) of the same batch, the gradients are averaged over the
ranks before the clip (``reduce_and_clip``), and every rank runs the same AdamW, so the step is the one-process step
up to the order of sums; the loss printed is the batch's (the mean of the ranks' means, each over B T / R tokens). Its
tok/s counts the whole batch over the slowest rank's time, its peak memory is the sum of the ranks' peaks, its sgemm
rate the sum of the ranks' one-thread rates measured side by side. Why it exists: NumPy releases the GIL inside each
operation, but a thread needs the GIL back between operations, and at the 10-300 us operations of a 2-core step two
threads ran the elementwise work ~1.4x faster than one, not 2x (benchmarks/RESULTS.md); ranks share no GIL, and whole
passes side by side (the row groups) meet at it only between their operations. A shape whose B the ranks cannot split
(B=1) runs as one process only. Both layouts are compared with the same PyTorch children.

--impl selects npllm's implementation (fast: the fast paths of npllm/fast, reference: the plain layers), passed to
npllm as the ModelConfig field ``impl``. A checkout whose ModelConfig has no such field has only the reference
layers; the output then says "reference ran" whatever was asked. Each row of the table names what ran.

The memory check of the fast attention: at a fixed B*T = 2048, npllm's peak memory of llama 1x2048 over llama 8x256
(target <= 1.3 once flash attention is wired in); printed when both shapes ran.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import numpy as np  # noqa: E402 (after the sys.path line)

from npllm.parallel.comm import find_mpirun  # noqa: E402
from npllm.parallel.threads import IDLE_SPIN_EXPONENT, IDLE_SPIN_VAR, stop_idle_blas_spinning  # noqa: E402

LR, BETAS, EPS, WEIGHT_DECAY, MAX_NORM = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
LOSS_RTOL = 1e-5  # float32: both sides' first-step losses are the same sum in a different order
SEED = 0

LLAMA = dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=2048,
             norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)
GPT2 = dict(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=1024, max_seq_len=256,
            norm="layernorm", mlp="gelu", pos="learned", bias=True, tie_embeddings=True)
TOY_LLAMA = dict(LLAMA, vocab_size=256, dim=32, n_layers=2, ffn_dim=64, max_seq_len=16)
TOY_GPT2 = dict(GPT2, vocab_size=256, dim=32, n_layers=2, ffn_dim=128, max_seq_len=16)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: dict | str  # ModelConfig fields, or a preset's name
    B: int
    T: int
    steps: int  # timed steps per child in the default run


CASES = {c.name: c for c in (
    Case("llama-8x256", LLAMA, 8, 256, 3),
    Case("llama-2x1024", LLAMA, 2, 1024, 2),
    Case("llama-1x2048", LLAMA, 1, 2048, 2),
    Case("gpt2-8x256", GPT2, 8, 256, 3),
    Case("nano-16x128", "nano", 16, 128, 3),
    Case("toy-llama", TOY_LLAMA, 2, 16, 2),  # tests only (tests/test_bench_vs_pytorch.py)
    Case("toy-gpt2", TOY_GPT2, 2, 16, 2),
)}
DEFAULT_SHAPES = ["llama-8x256", "llama-2x1024", "llama-1x2048", "gpt2-8x256", "nano-16x128"]
QUICK_SHAPES = ["llama-8x256", "gpt2-8x256"]
MEMORY_CHECK = ("llama-8x256", "llama-1x2048")  # the same B*T, T = 256 and 2048
MEMORY_TARGET = 1.3
# Children per side and shape. On the shared 2-core VM of benchmarks/RESULTS.md one child's tok/s moved by up to 30%
# within a run; 5 (up from 3) steadies the medians at ~7 minutes for the default shapes (~11 with the ranks layout).
REPEATS = 5


def model_config(case: Case):
    from npllm.config import ModelConfig, get_preset

    return get_preset(case.model) if isinstance(case.model, str) else ModelConfig(**case.model)


def batch(cfg, B: int, T: int):
    """tokens, targets: int64 (B, T) each, the same in both children."""
    rng = np.random.default_rng(SEED)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))  # (B, T) each


# ----------------------------------------------------------------------------------------------------------------
# the process's memory and the BLAS it runs


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start_peak_window() -> int:
    """Return free heap pages to the system, reset VmHWM to the current resident set, and return that (bytes)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one
    return status_kib("VmRSS") * 1024


def numpy_blas() -> str:
    """The BLAS numpy was built with and the kernel (core type) it selected on this processor."""
    blas = np.__config__.CONFIG.get("Build Dependencies", {}).get("blas", {})
    text = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    libs = glob.glob(str(Path(np.__file__).parent.parent / "numpy.libs" / "libscipy_openblas*.so"))
    if libs:  # what threadpoolctl reads: scipy-openblas' own answer
        lib = ctypes.CDLL(libs[0])
        for suffix in ("64_", ""):
            fn = getattr(lib, f"scipy_openblas_get_corename{suffix}", None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                text += f", kernel {fn().decode()}"
                break
    return text


# ----------------------------------------------------------------------------------------------------------------
# npllm's step


def npllm_impl(cfg, requested: str):
    """(cfg, the implementation that will run): ``requested`` goes into the config's ``impl`` field when npllm has
    one; without it npllm has one implementation, the reference layers."""
    if "impl" in {f.name for f in dataclasses.fields(cfg)}:
        return dataclasses.replace(cfg, impl=requested), requested
    return cfg, "reference"


def npllm_functions():
    """(init_params, split_axes, loss_and_grads(params, tokens, targets, cfg, tp), row_groups(rows, tp)) of the npllm
    in this checkout; row_groups: how many groups of rows the trainer runs side by side by default (1 before there
    were any)."""
    try:  # the architecture-dispatching functions of npllm.models (the models/ refactor)
        from npllm.models import accumulate_loss_and_grads, init_params, split_axes
    except ImportError:  # before it: the decoder's own
        from npllm.models.decoder import accumulate_loss_and_grads, init_params, split_axes

        def loss_and_grads(params, x, y, cfg, tp):
            return accumulate_loss_and_grads(params, x, y, cfg, 1, tp=tp)
        return init_params, split_axes, loss_and_grads, lambda rows, tp: 1
    try:  # the trainer's default: the batch's rows in groups side by side, one per core
        from npllm.models import default_row_groups
    except ImportError:
        def row_groups(rows, tp):
            return 1
    else:
        def row_groups(rows, tp):
            return default_row_groups(rows, "cpu", tp.size)

    def loss_and_grads(params, x, y, cfg, tp):
        groups = row_groups(len(x), tp)
        keywords = {"row_groups": groups} if groups > 1 else {}
        return accumulate_loss_and_grads(params, {"tokens": x, "targets": y}, cfg, 1, tp=tp, **keywords)
    return init_params, split_axes, loss_and_grads, row_groups


def npllm_child(case: Case, steps: int, impl: str, ranks: int = 1) -> dict:
    """One npllm child; ranks > 1: this is one rank of ``mpirun -n ranks`` (data parallel, see the module's
    docstring), and only rank 0 returns the result (the job's), the others None."""
    try:  # what `python -m npllm.train` does first (npllm/allocator.py); a checkout before it has no such module
        from npllm.allocator import keep_freed_memory
    except ImportError:
        pass
    else:
        keep_freed_memory()
    init_params, split_axes, loss_and_grads, row_groups = npllm_functions()
    from npllm.metrics import measure_peak_flops
    from npllm.parallel.comm import make_comm, one_process_comm
    from npllm.parallel.data import init_optimizer

    cfg, ran = npllm_impl(model_config(case), impl)
    params = init_params(cfg, seed=SEED)
    comm, axes = (one_process_comm() if ranks == 1 else make_comm(1, use_mpi=True)), split_axes(cfg)
    dp, rank = comm.dp.size, comm.dp.rank
    if dp != ranks:
        raise RuntimeError(f"the npllm child expected {ranks} ranks and found {dp}")
    rows = slice(rank * case.B // dp, (rank + 1) * case.B // dp)  # this rank's rows of the batch
    x, y = (a[rows] for a in batch(cfg, case.B, case.T))  # (B / dp, T) each
    groups = row_groups(len(x), comm.tp)  # this process's rows in groups side by side (the trainer's default)
    try:  # the trainer's AdamW: the implementation's own (npllm/train.py passes ops(cfg).adamw_update)
        from npllm.models import ops
        update = {"update": ops(cfg).adamw_update}
    except ImportError:  # a checkout before the fast paths: apply_update's one AdamW
        update = {}

    def step():
        loss, grads = loss_and_grads(params, x, y, cfg, comm.tp)  # forward + backward
        clip_and_update(params, grads, state, comm, axes, update)
        return comm.dp.allreduce_scalar(float(loss)) / dp  # the batch's loss: every rank has B / dp of its rows

    base = start_peak_window()
    state = init_optimizer(params, comm, 0)
    out = measure_steps(step, steps)
    peak = status_kib("VmHWM") * 1024 - base
    comm.world.barrier()  # the ranks measure sgemm side by side: the machine's rate with every rank busy
    sgemm = measure_peak_flops(np, np.float32)
    total = comm.world.allreduce_scalar
    out = dict(out, seconds=total(out["seconds"], "max"), base=total(base), peak=total(peak), sgemm=total(sgemm),
               impl=", ".join([ran] + [f"{ranks} ranks"] * (ranks > 1) + [f"{groups} row groups"] * (groups > 1)),
               blas=numpy_blas(),
               rows=int(total(len(x))), rows_per_rank=int(total(len(x), "max")))  # the batch's split
    return out if rank == 0 else None


def clip_and_update(params, grads, state, comm, axes, update: dict) -> None:
    """The step after forward + backward, as the trainer runs it: one global-norm clip, then AdamW in place (the
    benchmark's settings; ``update``: {"update": the implementation's AdamW}, or {} for apply_update's own)."""
    from npllm.parallel.data import apply_update, reduce_and_clip

    grads, _, _ = reduce_and_clip(grads, axes, comm, zero=0, max_norm=MAX_NORM)  # one global norm
    apply_update(params, grads, state, comm, zero=0, lr=LR, beta1=BETAS[0], beta2=BETAS[1], eps=EPS,
                 weight_decay=WEIGHT_DECAY, **update)  # AdamW, in place


def measure_steps(step, steps: int) -> dict:
    first = step()  # warm-up; its loss is the one both sides must agree on
    losses, times, start = [], [], time.perf_counter()
    for _ in range(steps):
        before = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - before)
    return dict(seconds=time.perf_counter() - start, fastest=min(times), first_loss=first, last_loss=losses[-1])


# ----------------------------------------------------------------------------------------------------------------
# PyTorch's step


def torch_child(case: Case, steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    from npllm.hf import config_to_hf, hf_model_type, to_hf_state

    torch.set_num_threads(threads)
    cfg = model_config(case)
    hf = config_to_hf(cfg, "float32")
    if hf_model_type(cfg) == "gpt2":
        hf["activation_function"] = "gelu_pytorch_tanh"  # the same tanh-GELU, fused
        config = GPT2Config(**hf)
    else:
        config = LlamaConfig(**hf)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    params = npllm_functions()[0](cfg, seed=SEED)  # the npllm child's initial parameters
    state = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in to_hf_state(params, cfg).items()}
    result = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise RuntimeError(f"the HF model's state does not match npllm's: missing {result.missing_keys}, "
                           f"unexpected {result.unexpected_keys}")
    if cfg.tie_embeddings and model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        raise RuntimeError("tie_embeddings: the HF model's lm_head is not its token embedding")
    del params, state, result
    model.train()
    x, y = (torch.from_numpy(a) for a in batch(cfg, case.B, case.T))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=BETAS, eps=EPS)

    def step():
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    base = start_peak_window()
    out = dict(measure_steps(step, steps), base=base, peak=status_kib("VmHWM") * 1024 - base)
    a = torch.from_numpy(np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32))  # (n, n)
    best = float("inf")
    for _ in range(8):
        start = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - start)
    try:  # what foreach=None (the default) chose for these parameters
        from torch.optim.optimizer import _default_to_fused_or_foreach

        foreach = _default_to_fused_or_foreach(decay, False, False)[1]
    except (ImportError, TypeError):
        foreach = "default"
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return dict(out, sgemm=2.0 * 1024**3 / best,
                impl=f"HF {type(model).__name__}, sdpa, AdamW foreach={foreach}, torch {torch.__version__} {blas}")


# ----------------------------------------------------------------------------------------------------------------
# the parent: children, the table


def npllm_side(ranks: int) -> str:
    return "npllm" if ranks == 1 else f"npllm {ranks} ranks"


def run_child(side: str, case: Case, steps: int, threads: int, impl: str, ranks: int = 1) -> dict:
    """One child: ``side`` "npllm" or "torch" with ``threads`` threads; "npllm" with ranks > 1: ``mpirun -n ranks``
    children of threads // ranks threads each."""
    per_rank = threads // ranks
    env = dict(os.environ, OMP_NUM_THREADS=str(per_rank), OPENBLAS_NUM_THREADS=str(per_rank),
               MKL_NUM_THREADS=str(per_rank))
    if side == "npllm":  # what `python -m npllm.train` sets before NumPy loads (unless the user set it)
        stop_idle_blas_spinning(env)
    spec = json.dumps(dict(side=side, case=case.name, steps=steps, threads=per_rank, impl=impl, ranks=ranks))
    command = [sys.executable, __file__, "--child", spec]
    if ranks > 1:
        command = [find_mpirun(), "-n", str(ranks), *command]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    side = npllm_side(ranks) if side == "npllm" else side
    if out.returncode != 0:
        raise RuntimeError(f"{side} child for {case.name} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["tok_s"] = steps * case.B * case.T / result["seconds"]
    result["tok_s_fastest"] = case.B * case.T / result["fastest"]  # the child's fastest timed step
    return result


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def summarize(case: Case, runs: dict) -> dict:
    from npllm.models.decoder import flops_per_token

    cfg = model_config(case)
    flops = flops_per_token(cfg, case.T)  # per token, forward + backward
    row = {"first": (runs["npllm"][0]["first_loss"], runs["torch"][0]["first_loss"]),
           "last": (runs["npllm"][0]["last_loss"], runs["torch"][0]["last_loss"])}
    for side, rs in runs.items():
        tok_s = [r["tok_s"] for r in rs]
        sgemm = statistics.median(r["sgemm"] for r in rs)
        row[side] = dict(median=statistics.median(tok_s), best=max(tok_s), sgemm=sgemm,
                         peak=statistics.median(r["peak"] for r in rs), impl=rs[0]["impl"],
                         mfu=statistics.median(tok_s) * flops / sgemm,
                         fastest=statistics.median(r["tok_s_fastest"] for r in rs))
    row["ratio"] = row["npllm"]["median"] / row["torch"]["median"]
    row["fastest_ratio"] = row["npllm"]["fastest"] / row["torch"]["fastest"]
    # each repeat ran one child per side back to back: their ratio sees the same state of the machine (a shared VM
    # whose speed drifts over minutes), so the median of these paired ratios moves less between runs
    row["pairs"] = [n["tok_s"] / t["tok_s"] for n, t in zip(runs["npllm"], runs["torch"])]
    row["paired"] = statistics.median(row["pairs"])
    row["loss_rel"] = rel_diff(*row["first"])
    return row


TABLE_HEAD = ("| shape | npllm impl | npllm tok/s median (best) | PyTorch tok/s median (best) | npllm/PyTorch | "
              "paired ratio, median | fastest-step ratio | npllm peak MB | PyTorch peak MB | npllm MFU (sgemm GF/s) | "
              "PyTorch MFU (sgemm GF/s) | first-step loss rel. diff | load |")


def per_child(runs: dict, side: str, key: str) -> dict:
    """{"npllm": the npllm ``side``'s children's ``key`` values, "torch": PyTorch's}, each printed as "1,234, ..."."""
    return {name: ", ".join(f"{r[key]:,.0f}" for r in runs[run]) for name, run in (("npllm", side), ("torch", "torch"))}


def table_row(name: str, r: dict, load_after: str) -> str:
    n, t = r["npllm"], r["torch"]
    return (f"| {name} | {n['impl']} | {n['median']:,.0f} ({n['best']:,.0f}) | {t['median']:,.0f} ({t['best']:,.0f}) | "
            f"{r['ratio']:.3f} | {r['paired']:.3f} | {r['fastest_ratio']:.3f} | {n['peak'] / 2**20:,.0f} | "
            f"{t['peak'] / 2**20:,.0f} | "
            f"{n['mfu']:.3f} ({n['sgemm'] / 1e9:.0f}) | {t['mfu']:.3f} ({t['sgemm'] / 1e9:.0f}) | "
            f"{r['loss_rel']:.1e} | {load_after} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(CASES), help=f"default: {' '.join(DEFAULT_SHAPES)}")
    parser.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    parser.add_argument("--repeats", type=int, help="children per side and shape (default 5; --quick 1)")
    parser.add_argument("--steps", type=int, help="timed steps per child (default: per shape, 2-3; --quick 1)")
    parser.add_argument("--impl", choices=("fast", "reference"), default="fast", help="npllm's implementation")
    parser.add_argument("--ranks", type=int, nargs="+",
                        help="npllm's layouts: 1 = one process of --threads threads, R > 1 = mpirun -n R of "
                             "--threads / R threads each, data parallel (default: 1 and --threads, when mpirun and "
                             "mpi4py are installed)")
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run: 2 shapes, 1 repeat, 1 step")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        case = CASES[spec["case"]]
        if spec["side"] == "npllm":
            result = npllm_child(case, spec["steps"], spec["impl"], spec.get("ranks", 1))
        else:
            result = torch_child(case, spec["steps"], spec["threads"])
        if result is not None:  # ranks > 1: rank 0 prints the job's result
            print(json.dumps(result))
        return 0
    for name in ("threads", "repeats", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name}={value} is not allowed; use an integer >= 1")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    repeats = args.repeats or (1 if args.quick else REPEATS)
    mpi = find_mpirun() is not None and importlib.util.find_spec("mpi4py") is not None
    ranks_list = args.ranks or ([1, args.threads] if args.threads > 1 and mpi else [1])
    for ranks in ranks_list:
        if ranks < 1 or args.threads % ranks:
            parser.error(f"--ranks={ranks} is not allowed with --threads={args.threads}: use a divisor of --threads "
                         f"(each rank runs --threads / ranks threads)")
        if ranks > 1 and not mpi:
            parser.error(f"--ranks={ranks} needs mpirun and mpi4py: pip install 'npllm[mpi]'")

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')} | {cpu_model()}, "
          f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable) | Python {platform.python_version()} | "
          f"numpy {np.__version__} ({numpy_blas()}) | torch {version('torch')} | "
          f"transformers {version('transformers')}")
    blas_env = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_") and not k.endswith("NUM_THREADS")}
    print(f"environment: {' '.join(f'{k}={v}' for k, v in sorted(blas_env.items())) or 'no OPENBLAS_* settings'}; "
          f"OMP/OPENBLAS/MKL_NUM_THREADS={args.threads} in both children; npllm's: "
          f"{IDLE_SPIN_VAR}={os.environ.get(IDLE_SPIN_VAR, IDLE_SPIN_EXPONENT)}")
    print(f"command: python benchmarks/bench_vs_pytorch.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{args.threads} threads, {repeats} repeat(s) per side, float32, step = forward + backward + clip "
          f"{MAX_NORM} + AdamW; load average at start {load()}", flush=True)

    rows, failed = {}, []
    for name in shapes:
        case = CASES[name]
        steps = args.steps or (1 if args.quick else case.steps)
        layouts = [r for r in ranks_list if case.B % r == 0]  # data parallel splits the batch's rows
        for ranks in sorted(set(ranks_list) - set(layouts)):
            print(f"{name}: B={case.B} rows cannot be split over {ranks} ranks; {npllm_side(ranks)} not run")
        sides = {npllm_side(r): ("npllm", r) for r in layouts} | {"torch": ("torch", 1)}  # name: (child, ranks)
        runs = {side: [] for side in sides}
        for r in range(repeats):
            for side in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                child, ranks = sides[side]
                runs[side].append(run_child(child, case, steps, args.threads, args.impl, ranks))
        for ranks in layouts:
            side = npllm_side(ranks)
            label = name if ranks == 1 else f"{name}, {ranks} ranks"
            row = rows[label] = summarize(case, {"npllm": runs[side], "torch": runs["torch"]})
            row["load"] = load().split("/")[0]
            ok = row["loss_rel"] <= LOSS_RTOL
            if not ok:
                failed.append(label)
            print(f"{label}: B={case.B} T={case.T}, {steps} timed step(s) | npllm ({row['npllm']['impl']} ran, "
                  f"--impl {args.impl}) vs PyTorch ({row['torch']['impl']})")
            if ranks > 1:
                first = runs[side][0]
                print(f"  layout {label}: {ranks} ranks x {first['rows_per_rank']} rows of B={case.B} "
                      f"({first['rows']} rows in all), {args.threads // ranks} thread(s) each")
            print(f"  loss check {label}: first step npllm {row['first'][0]:.6f} PyTorch {row['first'][1]:.6f} rel. "
                  f"diff {row['loss_rel']:.1e} ({'ok' if ok else 'MISMATCH'}, <= {LOSS_RTOL:g}); after {steps + 1} "
                  f"steps npllm {row['last'][0]:.6f} PyTorch {row['last'][1]:.6f} rel. diff "
                  f"{rel_diff(*row['last']):.1e}")
            print(f"  ratio {label}: npllm/PyTorch = {row['ratio']:.3f} (median tok/s {row['npllm']['median']:,.0f} / "
                  f"{row['torch']['median']:,.0f}); peak MB npllm {row['npllm']['peak'] / 2**20:,.0f} PyTorch "
                  f"{row['torch']['peak'] / 2**20:,.0f}; npllm MFU {row['npllm']['mfu']:.3f} of "
                  f"{row['npllm']['sgemm'] / 1e9:.0f} GFLOP/s sgemm; load {load()}")
            tok_s = per_child(runs, side, "tok_s")
            pairs = ", ".join(f"{x:.3f}" for x in row["pairs"])
            print(f"  children {label}: npllm tok/s {tok_s['npllm']}; PyTorch {tok_s['torch']}; paired ratios "
                  f"{pairs} (median {row['paired']:.3f})")
            fastest = per_child(runs, side, "tok_s_fastest")
            print(f"  fastest step {label}: npllm tok/s {fastest['npllm']}; PyTorch {fastest['torch']}; ratio of the "
                  f"medians {row['fastest_ratio']:.3f}", flush=True)

    print()
    print(TABLE_HEAD)
    print("|" + " --- |" * TABLE_HEAD.count(" |"))
    for name, row in rows.items():
        print(table_row(name, row, row["load"]))
    short, long_ = MEMORY_CHECK
    if short in rows and long_ in rows:
        n = rows[long_]["npllm"]["peak"] / rows[short]["npllm"]["peak"]
        t = rows[long_]["torch"]["peak"] / rows[short]["torch"]["peak"]
        impls = sorted({rows[long_]["npllm"]["impl"], rows[short]["npllm"]["impl"]})
        print(f"\nmemory check (B*T = 2048, npllm {' and '.join(impls)}): npllm peak {long_} / {short} = {n:.2f} "
              f"(target <= {MEMORY_TARGET} with flash attention: {'met' if n <= MEMORY_TARGET else 'not met'}); "
              f"PyTorch {t:.2f}")
    print(f"load average at end {load()}")
    if failed:
        print(f"FAILED: the first-step losses differ by more than {LOSS_RTOL:g} for {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
