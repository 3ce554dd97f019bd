"""Label-free operating thresholds and the decisions they make.

Thresholds come only from an artifact's own outputs on the *validation normals* (held out of
training, uadc.data.prepare): no test image and no label is ever read to set one. For a target
false-alarm rate ``a`` the threshold estimates the ``q = 1 - a`` quantile of the normal values:

- estimator: the order statistic ``X_(j)`` whose rank makes it a one-sided 95 % upper confidence
  bound of the quantile (distribution-free: smallest ``j`` with ``P(Binomial(n, q) <= j-1) >= 0.95``).
  The margin this adds shrinks as the validation set grows.
- when the validation set is too small for that (``j > n``, e.g. fewer than 299 images at
  ``a = 0.01``), a one-sided normal tolerance bound on the log values (95 % confidence that at
  least ``q`` of normals fall below; the exact noncentral-t k factor), never below the largest value seen.
  For image scores of a unified model a category's log-scale spread is the larger of its own and
  the spread pooled over all categories scored above 0 (within-category variances weighted by degrees
  of freedom), with the degrees of freedom of the one taken: a category with 3 normals within the pooled
  spread borrows it instead of a factor ``k`` of 13 on a spread from 3 values, and no category is given a
  spread narrower than its own (the switch is a step in the threshold). Each category keeps its own mean.
- with ``deploy.threshold_margin: false``: the plain empirical quantile at rank ``q (n + 1)`` (numpy
  "weibull"), the largest value when ``n`` is too small: a new normal exceeds it with probability ``a``
  (numpy's "linear" flagged 1 of 7 validation normals at ``a = 0.01``).

Thresholds are rounded to float32, so ``score >= threshold`` decides the same in numpy, ONNX
Runtime and TensorRT, and sit just above (``TIE_RTOL``) the validation value they land on: a normal
at the threshold, or tied values (a map that is mostly exact zeros, all-equal scores, the one normal
of a category), are decided normal, also when a runtime rounds them an ulp differently. Image
thresholds use image scores; pixel thresholds use anomaly-map values, sampled at random (seeded)
beyond ``MAX_PIXELS``. The pixel bound takes each pixel for an independent draw: pixels of one image
rise and fall together, so it estimates the quantile rather than bounding it with 95 % confidence.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from uadc.core.manifest import GLOBAL, CategoryThresholds, Threshold, Thresholds, normal_span

CONFIDENCE = 0.95
ESTIMATOR = ("one-sided 95% upper confidence bound of the (1 - false_alarm_rate) quantile of validation normals: "
             "distribution-free order statistic, or a lognormal tolerance bound (>= max) when too few values, "
             "image scores with the larger of the category's own and the pooled log spread of all categories")
ESTIMATOR_PLAIN = "empirical (1 - false_alarm_rate) quantile of validation normals (rank q(n+1), numpy weibull)"
MAX_PIXELS = 2_000_000       # pixel values sampled per threshold; quantiles need no more
# A score this close (relative) to its threshold is decided by float rounding, not by the model; verify
# counts such an image as agreeing, and a threshold is set this far above the value it lands on.
TIE_RTOL = 1e-5
F32_MAX = float(np.finfo(np.float32).max)


def _f32(x: float) -> float:
    return float(np.float32(x))


@dataclass(frozen=True)
class PooledSpread:
    """Within-category standard deviation of log values pooled over categories."""

    sd: float
    df: int                 # sum of (n_c - 1)

    def to_dict(self) -> dict:
        return {"log_sd": round(self.sd, 6), "df": self.df}


def pooled_log_spread(groups: list[np.ndarray]) -> PooledSpread | None:
    """The pooled log spread of per-category values, or None where it cannot be formed: fewer than two
    categories with 2+ values, all of them > 0. A category with a value <= 0 (its bound is on the raw values)
    is left out of the pool: it took every other category's pooled spread away."""
    logs = [x for x in (np.log(np.asarray(g, np.float64)) for g in groups if len(g) >= 2) if np.all(np.isfinite(x))]
    if len(logs) < 2:
        return None
    df = sum(len(x) - 1 for x in logs)
    return PooledSpread(math.sqrt(sum((len(x) - 1) * x.var(ddof=1) for x in logs) / df), df)


def tolerance_factor(n: int, q: float, confidence: float = CONFIDENCE, df: int | None = None) -> float:
    """One-sided normal tolerance factor k: mean + k sd covers ``q`` of the population with
    ``confidence``; the mean from ``n`` values, the sd with ``df`` degrees of freedom (default
    ``n - 1``: both from the same values). The exact noncentral-t factor: Natrella's approximation
    was 26 % too large at n = 3 and covered 94.6 %, not 95 %, at n = 10."""
    dof = max(df if df is not None else n - 1, 1)
    return float(stats.nct.ppf(confidence, dof, stats.norm.ppf(q) * math.sqrt(n)) / math.sqrt(n))


def _own_numpy_errors(fn):
    """numpy's floating-point errors handled here, whatever the caller set: log(0) of a zero score and the
    subnormal just above 0.0 raised under a caller's ``np.seterr(all="raise")``; both are checked for."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)
    return wrapper


@_own_numpy_errors
def quantile_threshold(values: np.ndarray, far: float, margin: bool = True,
                       spread: PooledSpread | None = None) -> tuple[float, float]:
    """(threshold, quantile level of the values it sits at) for false-alarm rate ``far``;
    ``spread``: a pooled log spread the tolerance bound uses where it is wider than the values' own."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    n, q = len(v), 1.0 - far
    if n == 0:
        raise ValueError("no validation values")
    if not np.all(np.isfinite(v)):   # a NaN threshold passes every defect
        raise ValueError("validation values must be finite")
    if not 0.0 < far < 1.0 or q == 1.0:   # 1 - 1e-17 is 1.0: a NaN bound, and the threshold fell to the max
        raise ValueError(f"false-alarm rate {far!r} is not in (0, 1) distinctly from 0 in float64")
    if not margin:   # rank q(n+1): a new normal exceeds it with probability `far` ("linear" flagged 1/7 of 7)
        # beyond the largest value it sits at the largest, as the bound's level says there (q read as kept)
        return _above(np.quantile(v, q, method="weibull"), v), q if q * (n + 1) <= n else 1.0
    j = int(stats.binom.ppf(CONFIDENCE, n, q)) + 1      # 1-based rank of the upper bound
    if j <= n:
        return _above(v[j - 1], v), j / n
    return _above(max(_tolerance_bound(v, q, spread), v[-1]), v), 1.0


def _tolerance_bound(v: np.ndarray, q: float, spread: PooledSpread | None) -> float:
    """The lognormal tolerance bound of sorted ``v`` (normal on the raw values where a value is <= 0, or
    where the log-scale bound overflows: scores over many orders of magnitude)."""
    n = len(v)
    own_sd = float(np.log(v).std(ddof=1)) if v[0] > 0 and n >= 2 else None
    if v[0] > 0 and spread is not None and (own_sd is None or own_sd <= spread.sd):
        # never narrower than the category's own spread: borrow only a wider one
        bound = _exp(float(np.log(v).mean()) + tolerance_factor(n, q, df=spread.df) * spread.sd)
    elif own_sd is not None:
        bound = _exp(float(np.log(v).mean()) + tolerance_factor(n, q) * own_sd)
    elif n >= 2:
        bound = float(v.mean()) + tolerance_factor(n, q) * float(v.std(ddof=1))
    else:
        bound = float(v[-1])
    if not abs(bound) < F32_MAX and n >= 2:
        bound = float(v.mean()) + tolerance_factor(n, q) * float(v.std(ddof=1))
    return bound if abs(bound) < F32_MAX else float(v[-1])


def _exp(x: float) -> float:
    return math.exp(min(x, 700.0))   # beyond float32 either way; math.exp raises past ~709


def _above(t: float, v: np.ndarray) -> float:
    """``t`` in float32, moved just above a validation value within ``TIE_RTOL`` of it (``>=`` would
    call that normal, and every value tied with it, a defect)."""
    t32 = np.float32(t)
    if np.isclose(v, t32, rtol=TIE_RTOL, atol=0).any():
        t32 = max(np.float32(t32 + TIE_RTOL * abs(t32)), np.nextafter(t32, np.float32(np.inf)))
    return float(t32)


def _sample_pixels(maps: np.ndarray, k: int = MAX_PIXELS) -> np.ndarray:
    """At most ``k`` values, drawn at random with a fixed seed: a stride aliased with the
    image width (every other column only) and missed column-structured values."""
    flat = np.asarray(maps, np.float32).ravel()
    if len(flat) <= k:
        return flat
    return flat[np.sort(np.random.default_rng(0).choice(len(flat), k, replace=False))]


def _pooled_pixels(maps: list[np.ndarray]) -> np.ndarray:
    """All categories' map values as one sample: each category in proportion to its pixels (capped one by
    one, a category of 4 images counted as much as one of 40 in the global threshold)."""
    total = sum(int(np.size(m)) for m in maps)
    return np.concatenate([_sample_pixels(m, max(1, round(MAX_PIXELS * np.size(m) / total)))
                           if total > MAX_PIXELS else np.asarray(m, np.float32).ravel() for m in maps])


def threshold_of(values: np.ndarray, far: float, margin: bool, spread: PooledSpread | None = None) -> Threshold:
    v = np.asarray(values, np.float32).ravel()
    value, level = quantile_threshold(v, far, margin, spread)
    low, high = _f32(v.min()), _f32(v.max())
    return Threshold(value=value, low=low, high=high, quantile=round(level, 6), n=int(v.size),
                     span=normal_span(value, low, high))


@_own_numpy_errors
def compute_thresholds(val: dict[str, tuple[np.ndarray, np.ndarray]], far: float, margin: bool = True,
                       categories: Sequence[str] = ()) -> Thresholds:
    """``val``: category -> (maps (N,H,W), scores (N,)) of one artifact on its validation normals.
    Per category and ``global`` (all categories' normals together); a category of ``categories``
    without normals takes the global ones (``validation`` 0), so it is still known at run time."""
    cats = {c: (m, s) for c, (m, s) in val.items() if len(s)}
    if not cats:
        raise ValueError("no validation normals")
    spread = pooled_log_spread([s for _, s in cats.values()]) if margin else None
    per = {c: CategoryThresholds(threshold_of(s, far, margin, spread), threshold_of(_sample_pixels(m), far, margin))
           for c, (m, s) in cats.items()}
    all_scores = np.concatenate([s for _, s in cats.values()])
    all_pixels = _pooled_pixels([m for m, _ in cats.values()])
    glob = CategoryThresholds(threshold_of(all_scores, far, margin), threshold_of(all_pixels, far, margin))
    counts = {c: int(len(s)) for c, (_, s) in cats.items()}
    for c in categories:
        if c not in per:
            per[c], counts[c] = glob, 0
    return Thresholds(far, ESTIMATOR if margin else ESTIMATOR_PLAIN, per, glob, counts,
                      spread.to_dict() if spread else None)


# -- decisions on the test sets (labels used to report, never to set) ---------------------------

@dataclass
class Decisions:
    """Verdicts of one artifact on one category's test set at its operating point."""

    labels: np.ndarray          # predicted 0/1 per image
    masks: np.ndarray           # predicted (N,H,W) bool

    @classmethod
    def make(cls, thr: CategoryThresholds, maps: np.ndarray, scores: np.ndarray) -> "Decisions":
        return cls(thr.image.decide(np.asarray(scores, np.float32)).astype(np.int8),
                   thr.pixel.decide(np.asarray(maps, np.float32)))


def rates(pred: np.ndarray, labels: np.ndarray) -> dict:
    """False-reject rate on good test images and escape (miss) rate on defective ones."""
    good, bad = labels == 0, labels == 1
    return {"false_reject_rate": float(pred[good].mean()) if good.any() else None,
            "escape_rate": float(1 - pred[bad].mean()) if bad.any() else None,
            "good": int(good.sum()), "defective": int(bad.sum()),
            "rejected": int(pred.sum())}


def mask_overlap(a: np.ndarray, b: np.ndarray) -> dict:
    """Dice and IoU of two sets of predicted masks over all their pixels (1.0 when both empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    inter, sa, sb = int(np.logical_and(a, b).sum()), int(a.sum()), int(b.sum())
    union = sa + sb - inter
    return {"dice": 1.0 if sa + sb == 0 else 2 * inter / (sa + sb), "iou": 1.0 if union == 0 else inter / union}


def decision_report(fp32: dict[str, Decisions], compiled: dict[str, Decisions], labels: dict[str, np.ndarray]
                    ) -> dict:
    """Per category and overall: FP32 and compiled false-reject / escape rates, and their
    agreement (share of test images with the same verdict; Dice/IoU of the masks)."""
    out: dict = {"categories": {}}
    tot_same = tot_n = 0
    for cat, lab in labels.items():
        f, c = fp32[cat], compiled[cat]
        same = int((f.labels == c.labels).sum())
        tot_same, tot_n = tot_same + same, tot_n + len(lab)
        out["categories"][cat] = {"fp32": rates(f.labels, lab), "compiled": rates(c.labels, lab),
                                  "agreement": same / len(lab), "disagreements": len(lab) - same,
                                  "mask": mask_overlap(f.masks, c.masks)}
    all_f = np.concatenate([fp32[c].labels for c in labels])
    all_c = np.concatenate([compiled[c].labels for c in labels])
    all_l = np.concatenate(list(labels.values()))
    out["overall"] = {"fp32": rates(all_f, all_l), "compiled": rates(all_c, all_l),
                      "agreement": tot_same / max(tot_n, 1), "disagreements": tot_n - tot_same}
    return out


__all__ = ["compute_thresholds", "quantile_threshold", "Decisions", "decision_report", "rates", "mask_overlap",
           "GLOBAL", "ESTIMATOR"]
