"""Shared fixtures: the array backend a test runs on, and the gradient check every layer test uses.

``backend`` runs a test once on NumPy and once on CuPy; the CuPy run is skipped (with its reason) unless CuPy sees
a GPU. Tests build their inputs with NumPy and move them with ``backend.asarray``, so the very same test body checks
both backends.

``grad_check`` runs ``npllm.gradcheck`` in float64 with the suite's finite-difference settings, asserts that every
relative error is at most ``GRAD_TOL``, and remembers the worst error per label; the worst ones are printed at the
end of the run with the step and stencil that produced them.

The settings: the five-point stencil (order 4, truncation error O(h^4)) with h = 3e-4. The plain central difference
at h = 1e-5 is exact enough for most draws, but its rounding error (~1e-16 |f| / h per entry) is what limits it when
a parameter's gradient is ~1e-5 of the function (a query weight behind a near one-hot softmax, a GELU far in its
flat tail); stress runs of 20x the examples put such draws at 3e-7, too close to the bound. At h = 3e-4 the rounding
error is 30x smaller and the O(h^4) truncation error is ~1e-14 for O(1) inputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

from npllm.backend import cupy_available, xp_for_device
from npllm.gradcheck import check_gradients, check_layer

GRAD_TOL = 1e-6  # the bound on the relative error of every float64 finite-difference check
FD_STEP = 3e-4  # finite-difference step h
FD_ORDER = 4  # five-point central difference

# In CI (CI=true) hypothesis draws the same examples on every run, so a submission's result does not depend on the
# luck of the draw; developers' runs keep drawing new examples. Each test keeps its own max_examples either way.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    settings.load_profile("ci")

_worst_errors: dict[str, tuple[float, str, str]] = {}  # label -> (error, parameter name, "h=..., order ...")


@pytest.fixture(scope="session", params=["numpy", "cupy"])
def backend(request):
    """The array module a test computes with: numpy, or cupy when a GPU is there."""
    if request.param == "cupy":
        if not cupy_available():
            pytest.skip("CuPy backend: CuPy is not installed or sees no GPU")
        return xp_for_device("cuda")
    return np


class GradCheck:
    """npllm.gradcheck with the suite's settings, asserting every relative error <= GRAD_TOL."""

    def layer(self, label, forward, backward, p, x, *, h=FD_STEP, order=FD_ORDER, **kwargs) -> dict:
        """check_layer(forward, backward, p, x) -> {"x" and each name in p: relative error}, asserted."""
        errors = check_layer(forward, backward, p, x, h=h, order=order, **kwargs)
        self.assert_small(errors, label, h, order)
        return errors

    def function(self, label, f, arrays, grads, *, h=FD_STEP, order=FD_ORDER, **kwargs) -> dict:
        """check_gradients(f, arrays, grads) -> {name: relative error}, asserted."""
        errors = check_gradients(f, arrays, grads, h=h, order=order, **kwargs)
        self.assert_small(errors, label, h, order)
        return errors

    @staticmethod
    def assert_small(errors: dict, label: str, h: float | None = None, order: int | None = None) -> None:
        """Assert {name: relative error} <= GRAD_TOL and record the worst (h, order: what produced them, if known)."""
        assert errors, f"{label}: no gradients were checked"
        name = max(errors, key=errors.get)
        step = "step not given" if h is None else f"h={h:.3g}, order {order}"
        if label not in _worst_errors or errors[name] > _worst_errors[label][0]:
            _worst_errors[label] = (errors[name], name, step)
        bad = {n: e for n, e in errors.items() if not e <= GRAD_TOL}
        assert not bad, f"{label}: relative gradient errors above {GRAD_TOL:g}: {bad}"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The trainer tests' token data (tests/helpers.py: make_data_dir), tokenized once per session."""
    from tests.helpers import make_data_dir

    return make_data_dir(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def grad_check():
    return GradCheck()


@pytest.fixture(scope="session")
def assert_grads():
    """assert_grads(errors, label, h=None, order=None): for errors computed elsewhere (e.g. inside an mpirun job)."""
    return GradCheck.assert_small


def pytest_terminal_summary(terminalreporter):
    if not _worst_errors:
        return
    # npllm.gradcheck counts only the part of each error beyond the differences' own rounding bound: 0 means the
    # analytic gradient agrees to within what finite differences can resolve
    terminalreporter.section("worst gradient-check relative errors (float64 finite differences, beyond their "
                             "rounding bound)")
    width = max(len(label) for label in _worst_errors) + 2
    for label, (err, name, step) in sorted(_worst_errors.items()):
        terminalreporter.write_line(f"{label:<{width}} {err:.2e}  ({step}; at {name})")
    overall = max(_worst_errors.values())
    terminalreporter.write_line(f"{'overall':<{width}} {overall[0]:.2e}  (bound {GRAD_TOL:g})")
