"""Numbers as uadc's tables print them, and counts as its API takes them."""

from __future__ import annotations

import numbers
from typing import Any

from uadc.core.errors import UadcError


def fixed(value: float, places: int = 4, sign: bool = False) -> str:
    """``value`` to ``places`` decimals (with its sign when ``sign``); a rounding-size negative
    prints as zero, never ``-0.0000``, which reads as a loss where there is none."""
    v = round(float(value), places) + 0.0
    return f"{v:+.{places}f}" if sign else f"{v:.{places}f}"


__all__ = ["fixed"]


def whole_number(value: Any, name: str, minimum: int = 1) -> int:
    """An API count (epochs, CPUs, samples): a whole number >= ``minimum``, else one UadcError line
    (``epochs=0`` fell back to the recipe's, ``epochs=-2`` wrote a QAT model without fine-tuning)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UadcError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def flags(**values: Any) -> None:
    """API switches are True or False (or None where "the default" is meant): ``force="no"`` is a
    non-empty string, which Python reads as true, and replaced an artifact folder."""
    for name, value in values.items():
        if value is not None and not isinstance(value, bool):
            raise UadcError(f"{name}: expected True or False, got {value!r:.60}")
