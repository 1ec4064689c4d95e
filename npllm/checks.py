"""The input checks every module shares: each raises one ValueError line naming the value and what is allowed.

Values are checked once, where they enter (a config's __post_init__, a command-line option, a public function a
user calls); inner loops trust what was checked.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """True for a Python or NumPy integer; False for a bool (True is not the number 1 here) and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = 1, *, optional: bool = False) -> int | None:
    """``value`` as an int when it is an integer >= ``minimum`` (None: any integer); None passes when ``optional``."""
    if optional and value is None:
        return None
    if not is_int(value) or (minimum is not None and value < minimum):
        allowed = "an integer" if minimum is None else (
            "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise ValueError(f"{name}={value!r} is not allowed; use {allowed}" + (" or None" if optional else ""))
    return int(value)


def check_number(name: str, value, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> float | None:
    """``value`` as a float when it is a finite real number in the interval [low, high] (open ends as asked)."""
    if optional and value is None:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = f" in {left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise ValueError(f"{name}={value!r} is not allowed; use a finite number"
                         f"{interval if (low, high) != (None, None) else ''}" + (" or None" if optional else ""))
    return float(value)


def check_choice(name: str, value, allowed) -> object:
    """``value`` when it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    return value
