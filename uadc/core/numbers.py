"""Numbers as uadc's tables print them."""

from __future__ import annotations


def fixed(value: float, places: int = 4, sign: bool = False) -> str:
    """``value`` to ``places`` decimals (with its sign when ``sign``); a rounding-size negative
    prints as zero, never ``-0.0000``, which reads as a loss where there is none."""
    v = round(float(value), places) + 0.0
    return f"{v:+.{places}f}" if sign else f"{v:.{places}f}"


__all__ = ["fixed"]
