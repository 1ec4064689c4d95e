"""benchmarks/bench_chunk_size.py runs whole training steps with the pool's chunk sizes taken in turn."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_chunk_size.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_toy_sizes_in_turn_report_paired_ratios():
    out = run("--shapes", "toy-gpt2", "toy-llama", "--sizes", "512", "4096", "--pairs", "2")
    assert out.returncode == 0, out.stderr
    lines = [l for l in out.stdout.splitlines() if "paired ratio" in l]
    assert len(lines) == 4  # 2 shapes x 2 sizes
    ratios = [float(re.search(r"paired ratio to 512: ([0-9.]+)$", l).group(1)) for l in lines]
    assert ratios[0] == ratios[2] == 1.0  # the first size against itself
    assert all(r > 0 for r in ratios)
    assert "chunk    4,096 elements" in lines[1] and "2 row groups" in lines[1]


def test_compare_leaves_the_pool_as_it_was():
    sys.path.insert(0, str(SCRIPT.parent))
    import bench_chunk_size
    from npllm.fast import pool

    before = pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS
    groups, times = bench_chunk_size.compare(bench_chunk_size.bench.CASES["toy-llama"], [256, 1024], 1)
    assert (pool.CHUNK_ELEMENTS, pool.MIN_PARALLEL_ELEMENTS) == before
    assert groups >= 1 and sorted(times) == [256, 1024] and all(len(t) == 1 for t in times.values())


def test_bad_sizes_and_pairs_name_the_value():
    out = run("--sizes", "0", "--pairs", "1")
    assert out.returncode == 2 and "--sizes 0: a chunk size must be at least 1 element" in out.stderr
    out = run("--pairs", "0")
    assert out.returncode == 2 and "--pairs 0: at least 1 counted round is needed" in out.stderr
