"""Numbers as a person reads them on a terminal: 4 significant digits.

``train.lr=0.0037829563842536234`` prints as ``train.lr=0.003783``; integers, text and lists
of integers print as they are. MLflow keeps the full values (params, metrics, trials.csv).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

DIGITS = 4


def short(value: Any) -> str:
    """A float (or text that reads as one, with a point or an exponent) to 4 significant
    digits; anything else unchanged."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return _g(value)
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            return _g(float(value))
        except ValueError:
            return value
    if isinstance(value, list | tuple):
        return "[" + ", ".join(short(v) for v in value) + "]"
    return str(value)


def _g(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{DIGITS}g}"


def pairs(values: Mapping[str, Any], sep: str = ", ") -> str:
    """``k=v`` pairs with the values shortened."""
    return sep.join(f"{k}={short(v)}" for k, v in values.items())
