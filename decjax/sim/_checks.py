"""Argument checks shared by the ``decjax.sim`` modules; errors name the argument."""

import math
import operator


def count(value, name: str) -> int:
    """``value`` as a positive int; bools and non-integers are rejected."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {n}")
    return n


def nonneg(value, name: str) -> float:
    """``value`` as a finite float >= 0."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return x


def positive(value, name: str) -> float:
    """``value`` as a finite float > 0."""
    x = nonneg(value, name)
    if x == 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


def index(value, name: str, size: int) -> int:
    """``value`` as an integer index in ``[0, size)``; bools and non-integers are rejected."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer index, got {value!r}")
    try:
        i = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer index, got {value!r}") from None
    if not 0 <= i < size:
        raise ValueError(f"{name} must be in [0, {size}), got {i}")
    return i
