"""Tests for npllm/backend.py: the backend follows the data, and the NumPy path never imports CuPy."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from npllm.backend import (
    asnumpy,
    check_device,
    cupy_available,
    get_array_module,
    scatter_add,
    to_device,
    xp_for_device,
)

REPO = Path(__file__).resolve().parents[1]

# import every core module and run a forward/backward and a gradient check on NumPy arrays
CORE_WORK = """
import numpy as np
import npllm, npllm.backend, npllm.config, npllm.gradcheck, npllm.models.decoder
from npllm.layers import attention, embedding, linear, loss, mlp, norm, rope
from npllm.config import get_preset
from npllm.gradcheck import check_layer
from npllm.models import init_params
from npllm.models.decoder import loss_and_grads
for preset in ("nano", "nano-gpt2"):
    cfg = get_preset(preset, vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8, max_seq_len=4)
    tokens = np.arange(8).reshape(2, 4) % 16
    loss_value, grads = loss_and_grads(init_params(cfg), tokens, tokens, cfg)
    assert np.isfinite(loss_value) and set(grads) == set(init_params(cfg))
errors = check_layer(linear.linear_forward, linear.linear_backward, {"w": np.ones((2, 2))}, np.ones((1, 2)))
assert max(errors.values()) < 1e-6
"""


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_numpy_path_works_with_cupy_unimportable():
    # sys.modules["cupy"] = None makes every `import cupy` raise ImportError: any import on the way would fail loudly
    block = "import sys\nsys.modules['cupy'] = None\nsys.modules['cupyx'] = None\n"
    done = run_python(block + CORE_WORK + "assert npllm.backend.cupy_available() is False\nprint('ok')\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_numpy_path_leaves_cupy_unimported():
    # where CuPy is installed, the same NumPy work still must not import it
    done = run_python("import sys\n" + CORE_WORK
                      + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cupy', 'cupyx')))\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_get_array_module_follows_the_data(backend):
    x = backend.asarray(np.ones(3))
    assert get_array_module(x) is backend
    assert get_array_module(np.ones(2), x) is backend  # any device array decides
    assert get_array_module(1.0, [1, 2], np.float64(3)) is np


def test_device_round_trips(backend):
    device = "cpu" if backend is np else "cuda"
    host = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones(2, dtype=np.float32)}
    placed = to_device(host, device)
    assert all(get_array_module(v) is backend for v in placed.values())
    back = to_device(placed, "cpu")
    for name in host:
        np.testing.assert_array_equal(back[name], host[name])
        assert back[name].dtype == host[name].dtype
    assert xp_for_device(device) is backend
    np.testing.assert_array_equal(asnumpy(placed["a"]), host["a"])


def test_asnumpy_of_plain_values():
    np.testing.assert_array_equal(asnumpy([1, 2]), np.array([1, 2]))
    assert asnumpy(2.5) == 2.5


@pytest.mark.parametrize("device", ["gpu", "CUDA", "", "tpu"])
def test_unknown_device_is_refused(device):
    with pytest.raises(ValueError, match=f"unknown device {device!r}; allowed: cpu, cuda"):
        check_device(device)
    with pytest.raises(ValueError, match="unknown device"):
        to_device(np.ones(1), device)
    with pytest.raises(ValueError, match="unknown device"):
        xp_for_device(device)


def test_cupy_available_is_a_bool():
    assert isinstance(cupy_available(), bool)


def test_scatter_add_sums_repeated_indices(backend):
    out = backend.zeros((4, 2))
    idx = backend.asarray(np.array([1, 3, 1, 1]))
    values = backend.asarray(np.arange(8.0).reshape(4, 2))
    scatter_add(backend, out, idx, values)
    np.testing.assert_array_equal(asnumpy(out), [[0, 0], [0 + 4 + 6, 1 + 5 + 7], [0, 0], [2, 3]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_of_rows_has_the_bits_of_ufunc_at(dtype):
    """The flat-index path for rows (an embedding's gradient) adds in np.add.at's order: the same bits, also onto a
    non-zero out with many repeats, and a non-contiguous out takes np.add.at itself."""
    rng = np.random.default_rng(0)
    for vocab in (3, 50, 1000):
        idx = rng.integers(0, vocab, 700)
        values = rng.standard_normal((700, 33)).astype(dtype)
        base = rng.standard_normal((vocab, 33)).astype(dtype)
        want = base.copy()
        np.add.at(want, idx, values)
        got = base.copy()
        scatter_add(np, got, idx, values)
        assert np.array_equal(got, want)
        got_t = np.asfortranarray(base)  # not C-contiguous
        scatter_add(np, got_t, idx, values)
        assert np.array_equal(got_t, want)
