"""Anomaly-detection fidelity of a candidate's outputs against reference outputs on the same
images, without labels (and AUROC/AUPRO deltas where labels exist).

Figures (all computed on the same images, reference first):

* ``spearman``: rank correlation of the image scores (does the candidate order images alike?);
* ``decision_agreement``: share of images on the same side of the operating threshold;
* ``map_dice`` / ``map_iou``: overlap of the maps thresholded at the pixel operating threshold,
  pooled over images (1.0 when neither flags a pixel);
* ``top1_overlap``: mean share of each reference map's top-1 % pixels that are also in the
  candidate's top-1 % (where the candidate looks, regardless of scale);
* ``score_ratio``: median over images of candidate / reference score (1.0 = no drift);
* ``score_shift``: median of (candidate - reference) scores in units of the reference normals'
  score spread (standard deviation), the drift that moves images across a threshold. A category
  with fewer than ``MIN_SPREAD_NORMALS`` reference normals has no usable spread (from 3 values
  the 95 % interval of the standard deviation spans a factor of 12), so its ``score_shift`` is
  reported but not judged there; the overall figure still is.

Operating thresholds are per category; each side decides at its own: an artifact's
``artifact.json`` thresholds when it has them, otherwise the reference's, which are set
label-free from the reference's outputs on the normal images (``reference_thresholds``).
"""

from __future__ import annotations

import numpy as np

from uadc.evaluation.thresholds import TIE_RTOL   # a score this close to its threshold is a tie

FIGURES = ("spearman", "decision_agreement", "map_dice", "map_iou", "top1_overlap", "score_ratio", "score_shift")
LABELLED = ("image_auroc_drop", "pixel_auroc_drop", "aupro_drop")
FALSE_ALARM_RATE = 0.01     # default of the recipe's deploy.false_alarm_rate
MIN_SPREAD_NORMALS = 10    # fewer reference normals in a category: its score_shift is not judged
MIN_RANK_IMAGES = 3        # fewer images: no ranking to correlate (spearman is None, not judged)
_EPS = 1e-12


def reference_thresholds(scores: np.ndarray, maps: np.ndarray, categories: np.ndarray,
                         false_alarm_rate: float = FALSE_ALARM_RATE, margin: bool = True) -> dict[str, dict]:
    """Per category (and ``global``): the operating thresholds uadc.evaluation.thresholds sets
    from these outputs on normal images (label-free; the estimator ``uadc compile`` uses for
    ``artifact.json``), plus the normals' score spread for ``score_shift``."""
    from uadc.evaluation.thresholds import compute_thresholds
    categories = np.asarray(categories)
    cats = sorted(set(categories.tolist()))
    t = compute_thresholds({c: (maps[categories == c], scores[categories == c]) for c in cats},
                           false_alarm_rate, margin)
    out = {}
    for cat in [*cats, "global"]:
        sel = np.ones(len(scores), bool) if cat == "global" else categories == cat
        ct = t.get(None if cat == "global" else cat)
        out[cat] = {"image": ct.image.value, "pixel": ct.pixel.value, "score_std": float(scores[sel].std()),
                    "n": int(sel.sum()), "quantile": ct.image.quantile, "source": "reference outputs"}
    return out


def too_few_normals(thresholds: dict[str, dict], categories) -> dict[str, int]:
    """``{category: n}`` for the categories (among ``categories``; ``global``: all of them together, the
    overall figure's unit) whose reference normals are too few to estimate the score spread
    ``score_shift`` is measured in."""
    return {c: int(t.get("n", 0)) for c, t in thresholds.items()
            if (c == "global" or c in categories) and int(t.get("n", 0)) < MIN_SPREAD_NORMALS}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation; 1.0/0.0 for equal/unequal constant inputs."""
    from scipy.stats import spearmanr
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float(np.array_equal(a, b))  # constant inputs: equal or not, no ranking to compare
    return float(spearmanr(a, b).statistic)


def _top_mask(maps: np.ndarray, share: float = 0.01) -> np.ndarray:
    flat = maps.reshape(len(maps), -1)
    k = max(1, int(round(flat.shape[1] * share)))
    idx = np.argpartition(-flat, k - 1, axis=1)[:, :k]
    mask = np.zeros_like(flat, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def label_free(ref_scores: np.ndarray, ref_maps: np.ndarray, cand_scores: np.ndarray, cand_maps: np.ndarray,
               thr: dict[str, np.ndarray], score_std: float) -> dict[str, float]:
    """The label-free figures for one group of images; ``thr``: per-image ``image``/``pixel``
    thresholds of the reference and ``cand_image``/``cand_pixel`` of the candidate."""
    ref_scores, cand_scores = ref_scores.astype(np.float64), cand_scores.astype(np.float64)
    ref_maps = ref_maps.reshape(len(ref_maps), -1)
    cand_maps = cand_maps.reshape(len(cand_maps), -1)
    r_px, c_px = ref_maps >= thr["pixel"][:, None], cand_maps >= thr["cand_pixel"][:, None]
    inter, union, total = (r_px & c_px).sum(), (r_px | c_px).sum(), r_px.sum() + c_px.sum()
    r_top, c_top = _top_mask(ref_maps), _top_mask(cand_maps)
    zero = np.abs(ref_scores) < _EPS      # both zero: no drift (0 / 1e-12 read as a ratio of 0)
    ratio = np.where(zero & (np.abs(cand_scores) < _EPS), 1.0, cand_scores / np.where(zero, _EPS, ref_scores))
    return {
        "spearman": spearman(ref_scores, cand_scores) if len(ref_scores) >= MIN_RANK_IMAGES else None,
        "decision_agreement": _agreement(ref_scores, thr["image"], cand_scores, thr["cand_image"]),
        "map_dice": float(2 * inter / total) if total else 1.0,
        "map_iou": float(inter / union) if union else 1.0,
        "top1_overlap": float(np.mean((r_top & c_top).sum(1) / r_top.sum(1))),
        "score_ratio": float(np.median(ratio)),
        # no spread (one reference normal): a shift in its units is float noise over 1e-12, not a figure
        "score_shift": float(np.median(cand_scores - ref_scores) / score_std) if score_std > _EPS else None,
    }


def _agreement(ref: np.ndarray, ref_thr: np.ndarray, cand: np.ndarray, cand_thr: np.ndarray) -> float:
    """Share of images both sides decide alike; a score within ``TIE_RTOL`` of its threshold is a tie."""
    tie = np.isclose(ref, ref_thr, rtol=TIE_RTOL, atol=0) | np.isclose(cand, cand_thr, rtol=TIE_RTOL, atol=0)
    return float(np.mean(((ref >= ref_thr) == (cand >= cand_thr)) | tie))


def figures(ref_scores: np.ndarray, ref_maps: np.ndarray, cand_scores: np.ndarray, cand_maps: np.ndarray,
            categories: np.ndarray, thresholds: dict[str, dict[str, float]],
            cand_thresholds: dict[str, dict[str, float]] | None = None) -> dict:
    """``{"all": figures, "categories": {cat: figures}}``. Each side decides at its own
    operating thresholds (``cand_thresholds``, default: the reference's); a category without its
    own thresholds uses the ``global`` ones."""
    if ref_scores.shape != cand_scores.shape or ref_maps.shape != cand_maps.shape:
        raise ValueError(f"reference and candidate outputs differ in shape: {ref_maps.shape} vs {cand_maps.shape}")
    categories = np.asarray(categories)
    cand_thresholds = cand_thresholds or thresholds
    ref_t = [thresholds.get(c, thresholds["global"]) for c in categories]
    cand_t = [cand_thresholds.get(c, cand_thresholds["global"]) for c in categories]
    thr = {"image": np.array([t["image"] for t in ref_t]), "pixel": np.array([t["pixel"] for t in ref_t]),
           "cand_image": np.array([t["image"] for t in cand_t]), "cand_pixel": np.array([t["pixel"] for t in cand_t])}
    out = {"all": label_free(ref_scores, ref_maps, cand_scores, cand_maps, thr, thresholds["global"]["score_std"]),
           "categories": {}}
    for cat in sorted(set(categories.tolist())):
        sel = categories == cat
        std = thresholds.get(cat, thresholds["global"])["score_std"]
        out["categories"][cat] = label_free(ref_scores[sel], ref_maps[sel], cand_scores[sel], cand_maps[sel],
                                            {k: v[sel] for k, v in thr.items()}, std)
    return out


def labelled(ref_scores: np.ndarray, ref_maps: np.ndarray, cand_scores: np.ndarray, cand_maps: np.ndarray,
             labels: np.ndarray, masks: np.ndarray, categories: np.ndarray) -> dict | None:
    """Mean over categories of reference - candidate image AUROC, pixel AUROC and AUPRO
    (positive = the candidate lost accuracy); None when no category has both classes."""
    from uadc.evaluation import metrics
    drops: dict[str, list[float]] = {k: [] for k in LABELLED}
    per_cat = {}
    for cat in sorted(set(categories.tolist())):
        sel = categories == cat
        if len(set(labels[sel].tolist())) < 2:
            continue
        ref = metrics.compute_all(labels[sel], ref_scores[sel], masks[sel], ref_maps[sel])
        cand = metrics.compute_all(labels[sel], cand_scores[sel], masks[sel], cand_maps[sel])
        per_cat[cat] = {f"{k}_drop": float(ref[k] - cand[k]) for k in ("image_auroc", "pixel_auroc", "aupro")
                        if k in ref}        # pixel drops only where masks mark defect pixels
        for k, v in per_cat[cat].items():
            drops[k].append(v)
    if not per_cat:
        return None
    return {"all": {k: float(np.mean(v)) for k, v in drops.items() if v}, "categories": per_cat,
            "images": int(len(labels)), "defects": int(np.sum(labels))}
