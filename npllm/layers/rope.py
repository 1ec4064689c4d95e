"""Rotary position embedding, rotate-half convention (GPT-NeoX, Hugging Face LLaMA).

Pair dimension i with i + hs/2 and rotate each pair by the angle pos * theta^(-2i/hs):
    y = x * cos + rotate_half(x) * sin,    rotate_half([x1, x2]) = [-x2, x1].
It is a rotation, so its backward is the transposed rotation: dx = dy * cos + rotate_half_T(dy * sin),
with rotate_half_T([z1, z2]) = [z2, -z1].  Derivation: docs/derivations/rope.md
"""

import numpy as np

from ..backend import get_array_module


def rope_tables(positions, head_dim, theta, xp=np, dtype=np.float32):
    """cos, sin tables (T, hs) for integer ``positions`` (T,). Computed in float64, then cast."""
    half = head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)  # (hs/2,)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
    angles = np.concatenate([angles, angles], axis=-1)  # (T, hs): pair i and i + hs/2 share an angle
    return xp.asarray(np.cos(angles), dtype=dtype), xp.asarray(np.sin(angles), dtype=dtype)


def _rotate_half(x, xp):
    half = x.shape[-1] // 2
    return xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _rotate_half_transposed(z, xp):
    half = z.shape[-1] // 2
    return xp.concatenate([z[..., half:], -z[..., :half]], axis=-1)


def rope_forward(x, cos, sin):
    """x (B, H, T, hs), cos/sin (T, hs) -> y (B, H, T, hs).  No parameters."""
    xp = get_array_module(x)
    y = x * cos + _rotate_half(x, xp) * sin  # (B, H, T, hs)
    cache = (cos, sin)  # the tables are all backward needs: the map is linear in x
    return y, cache


def rope_backward(dy, cache):
    """forward was y = x * cos + R x * sin (R = rotate_half), so dx = dy * cos + R^T (dy * sin)."""
    cos, sin = cache
    xp = get_array_module(dy)
    dx = dy * cos + _rotate_half_transposed(dy * sin, xp)  # (B, H, T, hs)
    return dx, {}
