"""Percentile calibrator: symmetric range ``(-t, t)`` with ``t`` the ``percentile`` of ``|x|``.

As pytorch-quantization's ``HistogramCalibrator`` with ``method="percentile"`` (and ONNX
Runtime's ``CalibrationMethod.Percentile`` on ``|x|``): a streaming 2048-bin histogram of ``|x|``
(:class:`calibrators.base.AbsHistogram`, range grown by appending bins), then the value where the
cumulative count reaches ``percentile / 100`` of the total. Within the bin that crosses it the
value is interpolated linearly (counts assumed uniform in the bin) instead of taking the bin's
right edge as pytorch-quantization does; the error is below one bin width either way, and ``t``
never exceeds the exact ``max|x|``.
"""

from __future__ import annotations

import numpy as np

from .base import AbsHistogram, Calibrator, finite_values, register


def histogram_percentile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which ``q`` percent of the histogram's mass lies (linear inside a bin)."""
    cum = np.cumsum(counts, dtype=np.float64)
    target = q / 100.0 * cum[-1]
    k = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    below = cum[k - 1] if k > 0 else 0.0
    frac = (target - below) / counts[k] if counts[k] > 0 else 1.0
    return float(edges[k] + frac * (edges[k + 1] - edges[k]))


@register("percentile")
class PercentileCalibrator(Calibrator):
    """Options: ``percentile`` (99.99) of ``|x|``, in ``(0, 100]``; ``num_bins`` (2048)."""

    symmetric = True

    def __init__(self, *, percentile: float = 99.99, num_bins: int = 2048) -> None:
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        super().__init__(percentile=percentile, num_bins=num_bins)
        self.percentile = float(percentile)
        self.hist = AbsHistogram(num_bins)

    def observe(self, x: np.ndarray) -> None:
        self.hist.add(np.abs(finite_values(x)))

    def compute_range(self) -> tuple[float, float]:
        if self.hist.total == 0:
            raise ValueError("percentile calibrator: compute_range() before any observe()")
        if self.hist.counts is None:  # only zeros seen
            return 0.0, 0.0
        t = histogram_percentile(self.hist.counts, self.hist.edges, self.percentile)
        t = min(t, self.hist.max_abs)
        return -t, t
