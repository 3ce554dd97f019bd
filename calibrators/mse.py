"""MSE (L2) calibrator: a numpy port of ``torch.ao.quantization.HistogramObserver``.

Source: PyTorch ``torch/ao/quantization/observer.py`` (``HistogramObserver``; its search follows
caffe2's ``NormMinimization::NonlinearQuantizationParamsSearch``), read in the installed torch
2.13 and re-implemented here with numpy so that calibration needs no torch at run time.

Collection (``forward`` / ``_combine_histograms`` / ``_upscale_histogram``): a 2048-bin
histogram over the exact running ``[min, max]``. When a batch widens the range, the batch is
binned over the new range and the old histogram is mapped into it: every old bin is split into
16 equal sub-bins whose mass goes to the new bin containing the sub-bin's midpoint.

Search (``_non_linear_param_search``): with the cumulative histogram ``c`` and total ``N``,
quantile bounds ``alpha = 0`` and ``beta = 1`` move inward by ``1e-5`` per step; each step
proposes the first bin with ``c >= (alpha + 1e-5) N`` as new start and the last bin with
``c <= (beta - 1e-5) N`` as new end, and moves whichever side gains more bins. Each move is
scored by the L2 error of quantising the histogram (uniform density inside each bin) to 256
levels (quint8) over ``[start, end]`` -- error inside the range only, as in torch -- and the
search stops at the first move whose error increases. Range: ``(min + start * w,
min + (end + 1) * w)``, asymmetric and not forced to contain 0 (the quantizer does that).

Deviations from torch, none of which changes the algorithm: arithmetic is float64 (torch mixes
float32 tensors and Python floats), and runs of steps that cannot move either bound are skipped
in a tight loop instead of re-scanning the cumulative histogram each step (same sequence of
``beta`` values, so the same result).
"""

from __future__ import annotations

import bisect

import numpy as np

from .base import Calibrator, finite_values, register

_STEP = 1e-5  # quantile granularity of the torch search


def histc(x: np.ndarray, bins: int, lo: float, hi: float) -> np.ndarray:
    """``torch.histc``: equal bins over ``[lo, hi]``; an empty range becomes ``[lo-1, hi+1]``."""
    if lo == hi:
        lo, hi = lo - 1.0, hi + 1.0
    try:
        return np.histogram(x, bins=bins, range=(lo, hi))[0].astype(np.float64)
    except ValueError:   # a range too narrow for float32 bins (a tensor of 5 +- 3e-6): the calibration stopped
        return np.histogram(np.asarray(x, dtype=np.float64), bins=bins, range=(lo, hi))[0].astype(np.float64)


def upscale_histogram(hist: np.ndarray, lo: float, hi: float, new_lo: float, new_hi: float,
                      upsample_rate: int = 16) -> np.ndarray:
    """Map ``hist`` over ``[lo, hi]`` onto the same number of bins over ``[new_lo, new_hi]``."""
    bins = len(hist)
    fine = np.repeat(hist, upsample_rate) / upsample_rate
    fine_width = (hi - lo) / (bins * upsample_rate)
    mids = np.linspace(lo, hi, bins * upsample_rate + 1)[:-1] + 0.5 * fine_width
    edges = np.linspace(new_lo, new_hi, bins + 1)
    idx = np.clip(np.searchsorted(edges, mids, side="right") - 1, 0, bins - 1)
    return np.bincount(idx, weights=fine, minlength=bins)


def _l2(begin: np.ndarray | float, end: np.ndarray | float, density: np.ndarray) -> np.ndarray:
    """Integral of ``density * x^2`` over ``[begin, end]`` (uniform mass per source bin)."""
    return density * (end ** 3 - begin ** 3) / 3.0


def quantization_error(hist: np.ndarray, bin_width: float, start: int, end: int,
                       dst_nbins: int = 256) -> float:
    """L2 error of quantising ``hist`` to ``dst_nbins`` levels spanning bins ``start..end``."""
    dst_width = bin_width * (end - start + 1) / dst_nbins
    if dst_width == 0.0:
        return 0.0
    src_begin = (np.arange(len(hist)) - start) * bin_width
    src_end = src_begin + bin_width
    dst_of_begin = np.clip(np.floor(src_begin / dst_width), 0, dst_nbins - 1)
    dst_of_end = np.clip(np.floor(src_end / dst_width), 0, dst_nbins - 1)
    begin_center = (dst_of_begin + 0.5) * dst_width
    end_center = (dst_of_end + 0.5) * dst_width
    density = hist / bin_width
    half = dst_width / 2
    # Same three-part sum as torch (tail of the first dst bin, whole bins, head of the last);
    # for a source bin inside one dst bin the middle term is -1 whole bin, which nets out.
    norm = _l2(src_begin - begin_center, half, density)
    norm += (dst_of_end - dst_of_begin - 1) * _l2(-half, half, density)
    norm += _l2(-half, src_end - end_center, density)
    return float(norm.sum())


def non_linear_param_search(hist: np.ndarray, lo: float, hi: float,
                            dst_nbins: int = 256) -> tuple[float, float]:
    """torch ``_non_linear_param_search``: L2-minimising sub-range of ``hist`` over ``[lo, hi]``."""
    bins = len(hist)
    bin_width = (hi - lo) / bins
    csum = np.cumsum(hist).tolist()
    total = float(np.sum(hist))
    alpha, beta = 0.0, 1.0
    start, end = 0, bins - 1
    norm_min = float("inf")
    while alpha < beta:
        next_alpha, next_beta = alpha + _STEP, beta - _STEP
        # torch scans bin by bin; csum is non-decreasing, so bisect finds the same bins.
        left = min(max(bisect.bisect_left(csum, next_alpha * total), start), end)
        right = min(max(bisect.bisect_right(csum, next_beta * total) - 1, start), end)
        if left - start > end - right:
            next_start, next_end, alpha = left, end, next_alpha
        else:
            next_start, next_end, beta = start, right, next_beta
        if next_start == start and next_end == end:
            if start == end:
                break  # both bounds pinned: every further step is a no-op
            # Only beta moves until its quantile leaves bin `end` (alpha, hence left, is fixed).
            c_end = csum[end]
            while alpha < beta and c_end <= (beta - _STEP) * total:
                beta -= _STEP
            continue
        norm = quantization_error(hist, bin_width, next_start, next_end, dst_nbins)
        if norm > norm_min:
            break
        norm_min, start, end = norm, next_start, next_end
    return lo + bin_width * start, lo + bin_width * (end + 1)


@register("mse")
class MSECalibrator(Calibrator):
    """Asymmetric L2-error calibration, equivalent to torch's ``HistogramObserver`` (quint8).

    Options: ``num_bins`` (2048) histogram bins, ``bits`` (8) of the destination grid
    (``2 ** bits`` levels), ``upsample_rate`` (16) used when re-binning on range growth.
    """

    symmetric = False

    def __init__(self, *, num_bins: int = 2048, bits: int = 8, upsample_rate: int = 16) -> None:
        if num_bins < 1 or bits < 1 or upsample_rate < 1:
            raise ValueError("num_bins, bits and upsample_rate must be >= 1")
        super().__init__(num_bins=num_bins, bits=bits, upsample_rate=upsample_rate)
        self.num_bins = num_bins
        self.dst_nbins = 2 ** bits
        self.upsample_rate = upsample_rate
        self.hist: np.ndarray | None = None
        self.lo = float("inf")
        self.hi = float("-inf")

    def observe(self, x: np.ndarray) -> None:
        a = finite_values(x)
        if a.size == 0:
            return
        x_lo, x_hi = float(a.min()), float(a.max())
        if self.hist is None:
            self.hist = histc(a, self.num_bins, x_lo, x_hi)
            self.lo, self.hi = x_lo, x_hi
            return
        new_lo, new_hi = min(self.lo, x_lo), max(self.hi, x_hi)
        update = histc(a, self.num_bins, new_lo, new_hi)
        if (new_lo, new_hi) == (self.lo, self.hi):
            self.hist += update
            return
        if self.lo == self.hi:  # old data is one value: put all its mass in that value's bin
            old = histc(np.array([self.lo]), self.num_bins, new_lo, new_hi) * self.hist.sum()
        else:
            old = upscale_histogram(self.hist, self.lo, self.hi, new_lo, new_hi,
                                    self.upsample_rate)
        self.hist = update + old
        self.lo, self.hi = new_lo, new_hi

    def compute_range(self) -> tuple[float, float]:
        if self.hist is None:
            raise ValueError("mse calibrator: compute_range() before any observe()")
        if self.lo == self.hi:
            return self.lo, self.hi
        return non_linear_param_search(self.hist, self.lo, self.hi, self.dst_nbins)
