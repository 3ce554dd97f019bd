"""Entropy (KL-divergence) calibrator: TensorRT's ``IInt8EntropyCalibrator2`` algorithm.

Source: Szymon Migacz, "8-bit Inference with TensorRT" (NVIDIA, GTC 2017), slides "Entropy
Calibration - pseudocode", and the TensorRT developer guide (INT8 calibration). Written
from that description; pytorch-quantization's ``_compute_amax_entropy`` was only used to
cross-check behaviour. Algorithm on a histogram ``hist`` of ``|x|`` with ``n`` (2048) bins of
width ``w`` over ``[0, max|x|]``, quantising to ``L = 128`` levels (int8 magnitude)::

    for i in L .. n:
        P = hist[0 .. i-1];  P[i-1] += sum(hist[i:])      # clip outliers into the last bin
        Q = hist[0 .. i-1] merged into L groups             # group k = bins j with j*L // i == k
            and expanded back: each non-zero bin j of group k gets
            sum(group k) / nonzero(group k), empty bins stay 0
        KL[i] = KL(P / sum P || Q / sum Q)
    m = argmin KL
    threshold = (m + 0.5) * w ;  range = (-threshold, threshold)

Conventions chosen where the slides are silent (the tests' reference implementation follows the
same ones):

* Q is built from the *unclipped* bins ``hist[:i]`` (as the slides' pseudocode), so the outlier
  mass only enters P.
* Group of bin ``j`` is ``floor(j * L / i)``: groups differ by at most one bin when ``L`` does
  not divide ``i`` (same split as ``np.digitize(j, linspace(0, i, L + 1))``).
* KL terms with ``P == 0`` contribute 0; a bin with ``P > 0`` and ``Q == 0`` (possible only for
  bin ``i-1`` when it is empty but outliers were folded into it) makes ``KL = inf``, i.e. that
  candidate is rejected -- what ``scipy.stats.entropy`` gives in pytorch-quantization. No epsilon
  smoothing (that is MXNet/TVM's variant).
* Ties: the smallest ``i`` with the minimal KL (pytorch-quantization takes the largest).
* Threshold ``(m + 0.5) * w``, the slides' formula (pytorch-quantization returns ``m * w``, the
  right edge of bin ``m-1``). With no clipping (``m = n``) this is half a bin above ``max|x|``.
* No ``hist[0] = hist[1]`` replacement of the zero bin (a pytorch-quantization-only tweak).

Streaming: see :class:`calibrators.base.AbsHistogram` (range grows by appending bins of the
same width, so the candidate loop then runs up to the grown bin count).
"""

from __future__ import annotations

import numpy as np

from .base import AbsHistogram, Calibrator, finite_values, register


def _kl_candidate(hist: np.ndarray, i: int, levels: int, outliers: float) -> float:
    """KL(P || Q) for keeping the first ``i`` bins."""
    h = hist[:i]
    nonzero = h > 0
    group = (np.arange(i) * levels) // i
    group_sum = np.bincount(group, weights=h, minlength=levels)
    group_nonzero = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, group_sum[group] / np.maximum(group_nonzero[group], 1), 0.0)
    p = h.copy()
    p[-1] += outliers
    q_total = q.sum()
    if q_total == 0.0:
        return float("inf")
    p /= p.sum()
    q /= q_total
    keep = p > 0
    if np.any(q[keep] == 0.0):
        return float("inf")
    return float(np.sum(p[keep] * np.log(p[keep] / q[keep])))


def kl_divergences(hist: np.ndarray,
                   num_quantized_bins: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Candidate bin counts ``i`` (``L .. len(hist)``) and their KL(P || Q)."""
    hist = np.asarray(hist, dtype=np.float64)
    n = len(hist)
    if n < num_quantized_bins:
        raise ValueError(f"histogram has {n} bins, fewer than {num_quantized_bins} levels")
    cumsum = np.cumsum(hist)
    total = cumsum[-1]
    candidates = np.arange(num_quantized_bins, n + 1)
    kl = np.array([_kl_candidate(hist, i, num_quantized_bins, total - cumsum[i - 1])
                   for i in candidates])
    return candidates, kl


def optimal_bin_count(hist: np.ndarray, num_quantized_bins: int = 128) -> int:
    """The ``m`` minimising KL: the threshold is ``(m + 0.5) * bin_width``."""
    candidates, kl = kl_divergences(hist, num_quantized_bins)
    return int(candidates[np.argmin(kl)])  # argmin: first of equal minima


@register("entropy")
class EntropyCalibrator(Calibrator):
    """Symmetric KL-divergence calibration (TensorRT entropy calibrator 2).

    Options: ``num_bins`` (2048) histogram bins over ``[0, max|x|]``; ``num_quantized_bins``
    (128) quantised levels of the magnitude, i.e. ``2 ** (bits - 1)`` for signed int8.
    """

    symmetric = True

    def __init__(self, *, num_bins: int = 2048, num_quantized_bins: int = 128) -> None:
        if num_quantized_bins < 1 or num_bins < num_quantized_bins:
            raise ValueError(f"need 1 <= num_quantized_bins <= num_bins, got "
                             f"{num_quantized_bins} and {num_bins}")
        super().__init__(num_bins=num_bins, num_quantized_bins=num_quantized_bins)
        self.num_quantized_bins = num_quantized_bins
        self.hist = AbsHistogram(num_bins)

    def observe(self, x: np.ndarray) -> None:
        self.hist.add(np.abs(finite_values(x)))

    def compute_range(self) -> tuple[float, float]:
        if self.hist.total == 0:
            raise ValueError("entropy calibrator: compute_range() before any observe()")
        if self.hist.counts is None:  # only zeros seen
            return 0.0, 0.0
        m = optimal_bin_count(self.hist.counts, self.num_quantized_bins)
        t = (m + 0.5) * self.hist.width
        return -t, t
