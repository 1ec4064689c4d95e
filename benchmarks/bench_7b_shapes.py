"""The real LLaMA-7B layer shapes trained under mpirun, against the same run on one process.

    python benchmarks/bench_7b_shapes.py                 # tp=8 on 8 ranks vs 1 process: --preset 7b --n_layers=1
    python benchmarks/bench_7b_shapes.py --ranks=4 --keep

Runs, through the real command line,

    mpirun -n RANKS python -m npllm.train --preset 7b --n_layers=1 --seq_len=64 --batch_size=1 --steps=2 --tp=RANKS
    python -m npllm.train                 --preset 7b --n_layers=1 --seq_len=64 --batch_size=1 --steps=2

(dim 4096, 32 heads, ffn 11008, vocab 32000: one block of 7B and its full embedding and head, 464,531,456
parameters) and prints, for each: the loss of every step and the validation losses from metrics.jsonl, the step
time (global tokens / tokens per second), the peak memory of the busiest rank (the trainer's "done:" line, the
high-water mark of the resident set) and the wall time; then the relative error between the two runs' losses.
The 7b vocabulary (32000) is larger than the default corpus's 2048-token tokenizer: the extra rows are padding
(see docs/parallelism.md). Each run writes a ~5.5 GB checkpoint (weights and AdamW moments), deleted at the end
unless --keep. Needs ~9 GB of memory for the one-process run; about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "7b", "--n_layers=1", "--seq_len=64", "--batch_size=1", "--steps=2"]
BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def find_mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if found is None:
        raise SystemExit("mpirun not found next to this Python or on PATH (pip install mpich)")
    return found


def run(command: list[str], out_dir: Path) -> dict:
    """Run one training job; its metrics, its peak memory per rank (GiB) and its wall time."""
    env = {k: v for k, v in os.environ.items() if k not in BLAS_THREAD_VARS}  # each rank limits its own threads
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    proc = subprocess.run([*command, f"--out_dir={out_dir}"], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    print(proc.stdout, end="")
    peak = re.search(r"peak memory ([\d.]+) GiB", proc.stdout)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(rows=rows, peak_gib=float(peak.group(1)), wall_s=wall)


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8, help="mpirun -n RANKS with --tp=RANKS (divides 32)")
    parser.add_argument("--keep", action="store_true", help="keep the two run directories (~5.5 GB each)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="npllm-7b-shapes-"))
    try:
        runs = {
            f"tp={args.ranks}": run([find_mpirun(), "-n", str(args.ranks), sys.executable, "-m", "npllm.train",
                                     *COMMON, f"--tp={args.ranks}"], root / f"tp{args.ranks}"),
            "one process": run([sys.executable, "-m", "npllm.train", *COMMON], root / "single"),
        }
        print()
        tokens = 64  # batch 1 x seq_len 64 per step
        for name, r in runs.items():
            steps = [m for m in r["rows"] if "loss" in m]
            step_s = ", ".join(f"{tokens / m['tokens_per_s']:.2f}" for m in steps)
            print(f"{name:>12}: losses {[round(m['loss'], 6) for m in steps]} | step time {step_s} s | "
                  f"peak memory {r['peak_gib']:.2f} GiB per rank | wall {r['wall_s']:.0f} s")
        (a, b) = (runs[f"tp={args.ranks}"]["rows"], runs["one process"]["rows"])
        for key in ("loss", "val_loss", "grad_norm"):
            errs = [rel_err(x[key], y[key]) for x, y in zip(a, b) if key in x]
            print(f"relative error of {key}, tp={args.ranks} vs one process: max {max(errs):.2e} over {len(errs)}")
    finally:
        if args.keep:
            print(f"runs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
