"""Shared fixtures: the array backend a test runs on, and the gradient-check assertion.

``backend`` runs a test once on NumPy and once on CuPy; the CuPy run is skipped (with its reason) unless CuPy sees
a GPU. Tests build their inputs with NumPy and move them with ``backend.asarray``, so the very same test body checks
both backends.

``assert_grads`` asserts that every relative error returned by ``npllm.gradcheck`` is at most ``GRAD_TOL`` and
remembers the worst error seen per label; the worst ones are printed at the end of the run, next to the
finite-difference step that produced them.
"""

from __future__ import annotations

import numpy as np
import pytest

from npllm.backend import cupy_available, xp_for_device
from npllm.gradcheck import DEFAULT_STEP

GRAD_TOL = 1e-6  # the bound on the relative error of every float64 central-difference check

_worst_errors: dict[str, tuple[float, str, str]] = {}  # label -> (error, parameter name, "h=..., order ...")


@pytest.fixture(scope="session", params=["numpy", "cupy"])
def backend(request):
    """The array module a test computes with: numpy, or cupy when a GPU is there."""
    if request.param == "cupy":
        if not cupy_available():
            pytest.skip("CuPy backend: CuPy is not installed or sees no GPU")
        return xp_for_device("cuda")
    return np


@pytest.fixture(scope="session")
def assert_grads():
    """check(errors, label, h=DEFAULT_STEP, order=2): every error in {name: relative error} must be <= GRAD_TOL.

    h and order are only recorded (pass the ones the check used), for the summary at the end of the run.
    """

    def check(errors: dict, label: str, h: float = DEFAULT_STEP, order: int = 2) -> None:
        assert errors, f"{label}: no gradients were checked"
        name = max(errors, key=errors.get)
        if label not in _worst_errors or errors[name] > _worst_errors[label][0]:
            _worst_errors[label] = (errors[name], name, f"h={h:.3g}, order {order}")
        bad = {n: e for n, e in errors.items() if not e <= GRAD_TOL}
        assert not bad, f"{label}: relative gradient errors above {GRAD_TOL:g}: {bad}"

    return check


def pytest_terminal_summary(terminalreporter):
    if not _worst_errors:
        return
    terminalreporter.section("worst gradient-check relative errors (float64 central differences)")
    width = max(len(label) for label in _worst_errors) + 2
    for label, (err, name, step) in sorted(_worst_errors.items()):
        terminalreporter.write_line(f"{label:<{width}} {err:.2e}  ({step}; at {name})")
    overall = max(_worst_errors.values())
    terminalreporter.write_line(f"{'overall':<{width}} {overall[0]:.2e}  (bound {GRAD_TOL:g})")
