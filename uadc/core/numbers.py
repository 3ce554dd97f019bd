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


def fixed_difference(a: float, b: float, places: int = 4) -> str:
    """``a - b`` as the two print at ``places`` decimals: 0.98424 and 0.98426 print 0.9842 and 0.9843,
    and their exact difference printed "+0.0000" beside them."""
    return fixed(round(float(a), places) - round(float(b), places), places, sign=True)


__all__ = ["fixed", "fixed_difference"]


def whole_number(value: Any, name: str, minimum: int = 1) -> int:
    """An API count (epochs, CPUs, samples): a whole number >= ``minimum``, else one UadcError line
    (``epochs=0`` fell back to the recipe's, ``epochs=-2`` wrote a QAT model without fine-tuning)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UadcError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def flags(optional: tuple[str, ...] = (), **values: Any) -> None:
    """API switches are True or False (None too for those in ``optional``, where it means "the
    default"): ``force="no"`` is a non-empty string, which Python reads as true, and replaced an
    artifact folder; ``evaluate=None`` skipped the evaluation whose default is on."""
    for name, value in values.items():
        if not isinstance(value, bool) and not (value is None and name in optional):
            raise UadcError(f"{name}: expected True or False, got {value!r:.60}")
