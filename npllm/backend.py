"""The array backend: NumPy on the CPU, CuPy on NVIDIA GPUs.

This is the only module that imports CuPy, and it does so only when a CuPy array or ``device="cuda"`` asks for it.
Everything else calls ``xp = get_array_module(x)`` and builds its arrays with that ``xp``: the backend follows the
data, never a global switch.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "cuda")


def _is_cupy_array(x) -> bool:
    # Decide by the type's module so that NumPy-only code never imports CuPy.
    return type(x).__module__.split(".")[0] == "cupy"


def _import_cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError(
            "device 'cuda' needs CuPy: in the npllm checkout, pip install -e '.[gpu]' (CUDA 12) or -e '.[gpu-cuda13]'"
        ) from e
    return cupy


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``."""
    for x in arrays:
        if _is_cupy_array(x):
            return _import_cupy()
    return np


def asnumpy(x) -> np.ndarray:
    """Any array (NumPy, CuPy or a Python scalar/list) as a NumPy array on the host."""
    if _is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)}")
    return device


def to_device(x, device: str):
    """Place an array (or a dict of arrays) on ``device`` ("cpu" or "cuda")."""
    check_device(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if device == "cpu":
        return asnumpy(x)
    return _import_cupy().asarray(x)


def xp_for_device(device: str):
    """The array module that ``device`` computes with."""
    return np if check_device(device) == "cpu" else _import_cupy()


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU. Never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def scatter_add(xp, out, indices, values) -> None:
    """out[indices[i]] += values[i] with repeated indices summed (the adjoint of a gather).

    NumPy: rows of a C-contiguous 2-D ``out`` (an embedding's gradient) are added as single elements through flat
    indices, indices[i] * C + c; NumPy's ufunc.at is about twice as fast on 1-D operands, and it adds in the same
    order (index by index, i ascending), so the result has the same bits."""
    if xp is np:
        if out.ndim == 2 and out.flags.c_contiguous and values.shape == (len(indices), out.shape[1]):
            C = out.shape[1]
            flat = (np.asarray(indices).reshape(-1, 1) * C + np.arange(C)).reshape(-1)  # (N * C,)
            np.add.at(out.reshape(-1), flat, np.ascontiguousarray(values).reshape(-1))
            return
        np.add.at(out, indices, values)
    else:  # CuPy's ufunc.at is spelled cupyx.scatter_add
        import cupyx

        cupyx.scatter_add(out, indices, values)


def cupy_special():
    """cupyx.scipy.special (erf, erfc on CuPy arrays); only called with a CuPy array in hand, so CuPy is there."""
    import cupyx.scipy.special

    return cupyx.scipy.special
