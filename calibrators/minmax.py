"""Min-max calibrator: the range is the exact ``(min, max)`` over all observed batches.

The usual baseline (ONNX Runtime ``CalibrationMethod.MinMax``, torch ``MinMaxObserver``). With
``symmetric=True`` it returns ``(-m, m)`` with ``m = max |x|`` (TensorRT's "max" calibration).
"""

from __future__ import annotations

import numpy as np

from .base import Calibrator, finite_values, register


@register("minmax")
class MinMaxCalibrator(Calibrator):
    """Exact running min/max. Option ``symmetric`` (False): return ``(-max|x|, max|x|)``."""

    symmetric = False

    def __init__(self, *, symmetric: bool = False) -> None:
        super().__init__(symmetric=symmetric)
        self.symmetric = bool(symmetric)  # type: ignore[misc]  # per-instance override
        self.lo = float("inf")
        self.hi = float("-inf")

    def observe(self, x: np.ndarray) -> None:
        a = finite_values(x)
        if a.size:
            self.lo = min(self.lo, float(a.min()))
            self.hi = max(self.hi, float(a.max()))

    def compute_range(self) -> tuple[float, float]:
        if self.lo > self.hi:
            raise ValueError("minmax calibrator: compute_range() before any observe()")
        if self.symmetric:
            m = max(abs(self.lo), abs(self.hi))
            return -m, m
        return self.lo, self.hi
