"""Checks of the numbers users pass in, raising errors that name the value and what is allowed."""

from __future__ import annotations

import math
import operator

__all__ = ["as_int", "check_positive", "check_unit_interval"]


def as_int(value, name: str) -> int:
    """``value`` as an int (Python or NumPy integers, 0-d integer tensors); bools and floats raise."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {value!r} ({type(value).__name__})") from None


def check_positive(value, name: str) -> float:
    """``value`` as a float, which must be finite and > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def check_unit_interval(value, name: str, *, closed_low: bool) -> float:
    """``value`` as a float in ``[0, 1]`` (``closed_low``) or ``(0, 1]``."""
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not number or not ((value >= 0 if closed_low else value > 0) and value <= 1):
        interval = "[0, 1]" if closed_low else "(0, 1]"
        raise ValueError(f"{name} must be a number in {interval}; got {value!r}")
    return float(value)
