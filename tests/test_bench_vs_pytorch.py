"""benchmarks/bench_vs_pytorch.py in its quick mode on a toy LLaMA: the run completes, npllm and PyTorch start from
the same weights (their first-step losses agree), and the output carries the npllm/PyTorch ratio line.

Nothing here depends on timing: the test reads the losses and the shape of the output, never a speed. It runs the
benchmark as a user does (a subprocess whose children import torch and transformers), ~10-25 s on 2 busy cores, and
is skipped when torch or transformers is not installed (found without importing them: the import alone costs
seconds, and the benchmark's PyTorch child imports them itself).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mpi_scripts.mpi_common import find_mpirun

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vs_pytorch.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="needs torch and transformers (the PyTorch side of the benchmark)")


def test_quick_toy_losses_agree_and_ratio_printed():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--shapes", "toy-llama", "--threads", "1"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # the first step's losses of both sides, printed with 6 decimals, and their relative difference (float32)
    check = re.search(r"loss check toy-llama: first step npllm (\S+) PyTorch (\S+) rel\. diff (\S+) \(ok", out.stdout)
    assert check, out.stdout
    npllm_loss, torch_loss, rel = map(float, check.groups())
    assert abs(npllm_loss - torch_loss) <= 1e-5 * abs(torch_loss) + 1e-6  # 1e-6: the printed rounding
    assert rel <= 1e-5
    assert 5.0 < npllm_loss < 6.0  # ln(256) = 5.55: a fresh model's loss on a 256-token vocabulary
    ratio = re.search(r"ratio toy-llama: npllm/PyTorch = (\d+\.\d+)", out.stdout)
    assert ratio and float(ratio.group(1)) > 0, out.stdout
    assert re.search(r"^\| toy-llama \|", out.stdout, re.MULTILINE), out.stdout  # the table's row
    # each child's fastest timed step is no slower than its mean step; the table row has the header's columns
    children = re.search(r"children toy-llama: npllm tok/s (\S+); PyTorch (\S+);", out.stdout)
    fastest = re.search(r"fastest step toy-llama: npllm tok/s (\S+); PyTorch (\S+); ratio of the medians (\S+)",
                        out.stdout)
    assert children and fastest, out.stdout
    for mean_tok_s, fastest_tok_s in zip(children.groups(), fastest.groups()):
        assert float(fastest_tok_s.replace(",", "")) >= float(mean_tok_s.replace(",", ""))
    lines = out.stdout.splitlines()
    head = next(line for line in lines if line.startswith("| shape |"))
    row = next(line for line in lines if line.startswith("| toy-llama |"))
    assert row.count("|") == head.count("|") and "fastest-step ratio" in head


@pytest.mark.mpi
@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or find_mpirun() is None,
                    reason="needs mpirun and mpi4py (npllm's mpi extra) for the data-parallel layout")
def test_two_ranks_layout_trains_the_same_batch():
    """--ranks 2: npllm under mpirun -n 2, each rank half of the batch's rows: the batch's first-step loss is
    PyTorch's (the mean of the two ranks' means), the reported layout names the ranks, and so does the table row."""
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--shapes", "toy-gpt2", "--threads", "2",
                          "--ranks", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    check = re.search(r"loss check toy-gpt2, 2 ranks: first step npllm (\S+) PyTorch (\S+) rel\. diff (\S+) \(ok",
                      out.stdout)
    assert check, out.stdout
    npllm_loss, torch_loss, rel = map(float, check.groups())
    assert abs(npllm_loss - torch_loss) <= 1e-5 * abs(torch_loss) + 1e-6 and rel <= 1e-5
    assert 5.0 < npllm_loss < 6.0
    assert "layout toy-gpt2, 2 ranks: 2 ranks x 1 rows of B=2 (2 rows in all), 1 thread(s) each" in out.stdout
    assert re.search(r"^\| toy-gpt2, 2 ranks \| fast, 2 ranks \|", out.stdout, re.MULTILINE), out.stdout
    assert not re.search(r"^\| toy-gpt2 \|", out.stdout, re.MULTILINE)  # --ranks 2 alone: no one-process row


def test_bad_option_is_refused():
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "0"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2 and "--repeats=0 is not allowed" in out.stderr
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "2", "--ranks", "3"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "--ranks=3 is not allowed with --threads=2: use a divisor of --threads" in out.stderr
