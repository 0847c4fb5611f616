"""Argument checks shared by the facades: each error names the argument and says what was expected."""

from __future__ import annotations

import numbers
from typing import Any

__all__ = ["check_count"]


def check_count(name: str, value: Any, minimum: int = 1, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is an integer (of any integer type, numpy's too) ``>= minimum``.

    A bool is refused: ``k=True`` is a mistake, not 1.

    Args:
        name: how the user spells the argument (``"`k`"``, ``"--k"``).
        value: what was passed.
        minimum: the smallest value allowed.
        error: the exception type (``MisconfigurationException`` in callbacks).

    Example:
        >>> check_count("`k`", 3)
        >>> check_count("`k`", True)
        Traceback (most recent call last):
        ...
        ValueError: `k` must be a positive integer, got True.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {what}, got {value!r}.")
