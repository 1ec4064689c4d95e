"""Parameter specs: each architecture's one list of (name, shape, tensor-parallel split axis, init rule).

An architecture's ``param_specs(cfg)`` is the single source of truth for its parameters. Everything else is read
off it: the ordered shapes, each rank's shard shapes, the split axis that sharding, checkpoints and the gradient
norm use, and the initial values. Nothing else lists parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..parallel.tensor import shard_array, shard_shape

INITS = ("normal", "uniform", "ones", "zeros")


@dataclass(frozen=True)
class ParamSpec:
    name: str  # e.g. "layers.0.attn.wq"
    shape: tuple[int, ...]  # the full tensor's shape, weights (in, out)
    split_axis: int | None  # the axis tensor-parallel ranks split it along; None: a full copy on every rank
    init: str  # "normal": N(0, std^2); "uniform": U(-sqrt(3) std, sqrt(3) std); "ones"; "zeros"
    std: float = 0.0  # the standard deviation of "normal" and "uniform" (torch's xavier_uniform_ is
    #                   "uniform" with std = sqrt(2 / (fan_in + fan_out)): bound sqrt(6 / (fan_in + fan_out)))


def shapes_of(specs: list[ParamSpec]) -> dict[str, tuple[int, ...]]:
    """{name: full shape}, in spec order."""
    return {s.name: s.shape for s in specs}


def split_axes_of(specs: list[ParamSpec]) -> dict[str, int | None]:
    """{name: tensor-parallel split axis or None}, in spec order."""
    return {s.name: s.split_axis for s in specs}


def shard_shapes_of(specs: list[ParamSpec], tp_size: int) -> dict[str, tuple[int, ...]]:
    """{name: the shape of one tensor-parallel rank's shard}, in spec order."""
    return {s.name: shard_shape(s.shape, s.split_axis, tp_size) for s in specs}


def count_of(specs: list[ParamSpec]) -> int:
    """The number of parameters (nothing is allocated)."""
    return sum(math.prod(s.shape) for s in specs)


def initial_value(spec: ParamSpec, seed: int, index: int) -> np.ndarray:
    """One full parameter's initial value in float64 NumPy, drawn from its own stream (seed, index in the specs):
    a parameter depends only on (seed, its place), so a tensor-parallel rank can draw one full tensor at a time and
    keep its slice, and every layout starts from the same numbers."""
    if spec.init == "ones":
        return np.ones(spec.shape)
    if spec.init == "zeros":
        return np.zeros(spec.shape)
    rng = np.random.default_rng([seed, index])
    if spec.init == "uniform":
        bound = math.sqrt(3.0) * spec.std  # U(-a, a) has variance a^2 / 3
        return rng.uniform(-bound, bound, size=spec.shape)
    return rng.normal(0.0, spec.std, size=spec.shape)


def init_from_specs(specs: list[ParamSpec], seed: int = 0, dtype=np.float32, xp=np, *, tp_rank: int = 0,
                    tp_size: int = 1) -> dict:
    """{name: initial value} in spec order, as ``dtype`` arrays of the array module ``xp``; with tp_size > 1 rank
    tp_rank's shards (each full tensor is drawn on the host in float64, then only its slice is kept)."""
    return {s.name: xp.asarray(shard_array(initial_value(s, seed, i), s.split_axis, tp_rank, tp_size), dtype=dtype)
            for i, s in enumerate(specs)}
