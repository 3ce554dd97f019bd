"""Tests for uadc.evaluation.metrics.  Expected values are derived by hand in the comments."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy import ndimage

from uadc.evaluation.metrics import (
    aupro,
    compute_all,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    summarize,
)

# --------------------------------------------------------------------------- fixtures


def two_region_case() -> tuple[np.ndarray, np.ndarray]:
    """2 images of 2x4; region A (2 px) in image 0, region B (2x2 block, 4 px) in image 1.

    Normal pixels (10): 0.5 x1, 0.3 x4, 0.1 x5.  Region A: 0.9, 0.9.
    Region B: 0.9, 0.9 (top row) and 0.3, 0.3 (bottom row, tied with 4 normals).

    Curve points (FPR, PRO) per distinct threshold t (score >= t):
      start          (0.0, 0.0)
      t=0.9          (0.0, (1 + 2/4)/2 = 0.75)    # A fully covered, B half covered
      t=0.5          (0.1, 0.75)                  # 1 of 10 normals
      t=0.3          (0.5, 1.0)                   # 4 more normals AND B's other half, together
      t=0.1          (1.0, 1.0)
    """
    masks = np.array(
        [
            [[1, 1, 0, 0], [0, 0, 0, 0]],
            [[1, 1, 0, 0], [1, 1, 0, 0]],
        ],
        dtype=np.uint8,
    )
    maps = np.array(
        [
            [[0.9, 0.9, 0.5, 0.3], [0.3, 0.1, 0.1, 0.1]],
            [[0.9, 0.9, 0.3, 0.3], [0.3, 0.3, 0.1, 0.1]],
        ],
        dtype=np.float32,
    )
    return masks, maps


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Slow, obvious AUPRO: loop over every distinct threshold, MVTec-style trapezoid."""
    masks = masks.astype(bool)
    regions = []  # boolean index masks of each connected component (8-connectivity)
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))  # as MVTec's compute_pro
        for r in range(1, n + 1):
            full = np.zeros(masks.shape, dtype=bool)
            full[i] = lab == r
            regions.append(full)
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.count_nonzero(above & normal) / np.count_nonzero(normal))
        overlaps = [np.count_nonzero(above & r) / np.count_nonzero(r) for r in regions]
        pros.append(float(np.mean(overlaps)))
    x, y = np.array(fprs), np.array(pros)
    # Trapezoid up to fpr_limit, interpolating y at fpr_limit (MVTec reference `trapezoid`).
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect(list(x), fpr_limit)
        slope = (y[ins] - y[ins - 1]) / (x[ins] - x[ins - 1])
        y_interp = y[ins - 1] + slope * (fpr_limit - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x, y = x[keep], y[keep]
    return (float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction) / fpr_limit


def random_blob_case(seed: int, quantize: bool) -> tuple[np.ndarray, np.ndarray]:
    """4 images of 16x16: random rectangles + isolated pixels; image 3 is good."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 16, 16), dtype=bool)
    for i in range(3):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, 13, size=2)
            h, w = rng.integers(1, 5, size=2)
            masks[i, r : r + h, c : c + w] = True
        masks[i][rng.random((16, 16)) < 0.02] = True  # scattered single-pixel regions
    maps = rng.random(masks.shape).astype(np.float32) + 0.6 * masks
    if quantize:  # heavy ties, including ties between normal and anomalous pixels
        maps = np.round(maps * 8) / 8
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------- AUPRO


def test_aupro_perfect_map_is_one() -> None:
    masks, _ = two_region_case()
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape) * 0.5 + 0.5 * masks  # anomalous in [0.5, 1), normal in [0, 0.5)
    maps[masks.astype(bool)] += 0.01  # strictly above every normal pixel
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_inverted_map_is_zero() -> None:
    masks, _ = two_region_case()
    maps = 1.0 - masks.astype(np.float32)  # every normal pixel scores above every anomalous one
    # Curve: (0,0) -> (1, 0) -> (1, 1): zero area below FPR 0.3.
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-12)


def test_aupro_two_regions_by_hand() -> None:
    masks, maps = two_region_case()
    # Integrate the curve of two_region_case() to FPR 0.3:
    #   [0, 0.1]:   flat at 0.75                           -> 0.1 * 0.75 = 0.075
    #   [0.1, 0.3]: on segment (0.1, 0.75)->(0.5, 1.0); PRO(0.3) = 0.75 + 0.25 * 0.2/0.4 = 0.875
    #               trapezoid 0.2 * (0.75 + 0.875) / 2 = 0.1625
    #   total 0.2375, normalised by 0.3 -> 0.791666...
    assert aupro(masks, maps, fpr_limit=0.3) == pytest.approx(0.2375 / 0.3, abs=1e-9)


@pytest.mark.parametrize(
    ("fpr_limit", "expected"),
    [
        (0.05, 0.75),  # inside the flat first segment: 0.05 * 0.75 / 0.05
        (0.1, 0.75),  # 0.075 / 0.1
        (0.5, 0.85),  # 0.075 + 0.4 * (0.75 + 1.0) / 2 = 0.425 -> / 0.5
        (1.0, 0.925),  # 0.425 + 0.5 * 1.0 = 0.925 -> / 1.0
    ],
)
def test_aupro_fpr_limit(fpr_limit: float, expected: float) -> None:
    masks, maps = two_region_case()
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_ties_enter_together_and_order_does_not_matter() -> None:
    masks, maps = two_region_case()
    # Same pixels, permuted within each image: the tied 0.3 group (4 normals + 2 of B) must
    # still enter at once; a cut inside the tie would give a different (not 0.791666) value.
    perm = np.random.default_rng(1).permutation(8)
    flat_m = masks.reshape(2, 8)[:, perm].reshape(2, 2, 4)
    flat_s = maps.reshape(2, 8)[:, perm].reshape(2, 2, 4)
    # Permutation changes the region structure, so compare against the slow reference too.
    assert aupro(flat_m, flat_s) == pytest.approx(reference_aupro(flat_m, flat_s, 0.3), abs=1e-9)
    assert aupro(masks, maps) == pytest.approx(0.2375 / 0.3, abs=1e-9)


def test_aupro_all_equal_scores() -> None:
    masks, _ = two_region_case()
    maps = np.full(masks.shape, 0.42, dtype=np.float32)
    # One threshold: curve (0,0) -> (1,1); area to 0.3 = 0.3^2 / 2 = 0.045 -> / 0.3 = 0.15.
    assert aupro(masks, maps) == pytest.approx(0.15, abs=1e-9)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-9)


def test_aupro_uses_8_connectivity_as_the_mvtec_reference() -> None:
    """MVTec's compute_pro labels regions with a 3x3 structure of ones; uadc used scipy's default
    (4-connectivity) and counted a diagonal crack's pieces as separate defects."""
    # Diagonal neighbours are one region: {(0,0), (1,1), (1,2)} (size 3).
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    # t=1.0: (0, PRO=1/3); t=0.5: (1, 1/3) -> AUPRO = 1/3.  (4-connectivity: (1+0)/2 = 0.5.)
    assert aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_regions_do_not_span_images() -> None:
    # Pixel (2,0) of image 0 and pixels (0,0),(0,1) of image 1 touch along the stack axis.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 2, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.full(masks.shape, 0.5)
    maps[0, 2, 0] = 1.0
    maps[1, 0, 0] = maps[1, 0, 1] = 0.0
    # Two regions -> PRO 0.5 at t=1.0 -> AUPRO 0.5 (one merged region would give 1/3).
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_slow_reference(quantize: bool, fpr_limit: float) -> None:
    masks, maps = random_blob_case(seed=7, quantize=quantize)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert 0.0 < expected < 1.0
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_num_thresholds() -> None:
    masks, maps = two_region_case()
    # Every pixel's value is a quantile threshold -> identical to the exact curve.
    assert aupro(masks, maps, num_thresholds=masks.size) == pytest.approx(0.2375 / 0.3, abs=1e-9)
    # Two thresholds = {max 0.9, min 0.1}: curve (0,0) -> (0, 0.75) -> (1, 1).
    # PRO(0.3) = 0.75 + 0.25 * 0.3 = 0.825; area = 0.3 * (0.75 + 0.825) / 2 = 0.23625 -> / 0.3.
    assert aupro(masks, maps, num_thresholds=2) == pytest.approx(0.7875, abs=1e-9)


def test_aupro_errors() -> None:
    masks, maps = two_region_case()
    with pytest.raises(ValueError, match="no anomalous pixels"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="shape"):
        aupro(masks, maps[:, :, :3])


# --------------------------------------------------------------------------- other metrics


def test_pixel_f1_max_by_hand() -> None:
    masks = np.array([[[1, 1, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.4, 0.6, 0.2, 0.1]]])
    # t=0.9: P=1,   R=0.5 -> 0.667 | t=0.6: P=0.5, R=0.5 -> 0.5 | t=0.4: P=2/3, R=1 -> 0.8
    # t=0.2: P=0.5, R=1 -> 0.667   | t=0.1: P=0.4, R=1 -> 0.571            => max 0.8
    assert pixel_f1_max(masks, maps) == pytest.approx(0.8)


def test_image_auroc_trivial_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    assert image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == pytest.approx(1.0)
    assert image_auroc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == pytest.approx(0.0)
    # (pos, neg) pairs: 0.3>0.1 yes, 0.3>0.4 no, 0.2>0.1 yes, 0.2>0.4 no -> 2/4
    assert image_auroc(labels, np.array([0.1, 0.4, 0.3, 0.2])) == pytest.approx(0.5)
    assert isinstance(image_auroc(labels, np.array([0.1, 0.2, 0.3, 0.4])), float)


def test_image_auroc_single_class_raises() -> None:
    with pytest.raises(ValueError, match="only one class"):
        image_auroc(np.array([1, 1, 1]), np.array([0.1, 0.2, 0.3]))


def test_pixel_auroc_trivial_cases() -> None:
    masks = np.array([[[1, 0], [0, 1]]])
    assert pixel_auroc(masks, np.array([[[0.9, 0.1], [0.2, 0.8]]])) == pytest.approx(1.0)
    # positives 0.9, 0.15 vs negatives 0.1, 0.2: wins 0.9>0.1, 0.9>0.2, 0.15>0.1 -> 3/4
    assert pixel_auroc(masks, np.array([[[0.9, 0.1], [0.2, 0.15]]])) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no anomalous"):
        pixel_auroc(np.zeros_like(masks), np.array([[[0.9, 0.1], [0.2, 0.8]]]))


def test_compute_all_keys_and_values() -> None:
    masks, maps = two_region_case()
    labels = np.array([0, 1, 1])
    scores = np.array([0.2, 0.7, 0.9])
    all_masks = np.concatenate([np.zeros_like(masks[:1]), masks])
    all_maps = np.concatenate([np.full_like(maps[:1], 0.1), maps])
    result = compute_all(labels, scores, all_masks, all_maps)
    assert list(result) == ["image_auroc", "pixel_auroc", "aupro", "pixel_f1"]
    assert all(type(v) is float for v in result.values())
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["aupro"] == pytest.approx(aupro(all_masks, all_maps))


def test_summarize_mean() -> None:
    per_category = {
        "bottle": {"image_auroc": 1.0, "aupro": 0.9},
        "cable": {"image_auroc": 0.8, "aupro": 0.6},
    }
    summary = summarize(per_category)
    assert summary["mean"] == pytest.approx({"image_auroc": 0.9, "aupro": 0.75})
    assert summary["categories"] == per_category


def test_one_class_comparison_uses_only_this_recipes_unified_eval(tmp_path):
    """`uadc eval --one-class` compares with the unified eval.json beside it: one of another recipe
    (a category added since) raised KeyError in the table, a damaged one JSONDecodeError."""
    import json

    from uadc.config.recipe import recipe_from_dict
    from uadc.data.sources import data_fingerprint
    from uadc.evaluation.run import EvalResult, _unified_eval
    recipe = recipe_from_dict({"data": {"sources": [{"root": str(tmp_path), "categories": ["a", "b"]}]}})
    per_cat = {c: {"image_auroc": 0.9, "pixel_auroc": 0.8} for c in ("a", "b")}
    path = tmp_path / "eval.json"
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"weights")
    from uadc.core.hashing import sha256_file
    sha = sha256_file(ckpt)

    def written(cats, recipe_hash=recipe.hash, checkpoint_sha=sha, data=data_fingerprint(recipe)) -> EvalResult | None:
        doc = EvalResult({"image_auroc": 0.9}, {c: dict(per_cat["a"]) for c in cats}, {},
                         {"recipe_hash": recipe_hash, "checkpoint_sha256": checkpoint_sha, "data_fingerprint": data})
        path.write_text(json.dumps(doc.to_dict()))
        return _unified_eval(path, recipe, per_cat, ckpt)

    assert written(["a", "b"]).categories["b"]["pixel_auroc"] == 0.8
    assert written(["a"]) is None                            # an earlier recipe without category b
    assert written(["a", "b"], recipe_hash="other") is None  # the same categories, other settings
    assert written(["a", "b"], checkpoint_sha="0" * 64) is None   # a model retrained since
    assert written(["a", "b"], data="0" * 16) is None   # test images removed since: 8 images' figures against 4's
    path.write_text('{"mean": ')
    assert _unified_eval(path, recipe, per_cat, ckpt) is None
    path.unlink()
    assert _unified_eval(path, recipe, per_cat, ckpt) is None


def test_a_defect_type_whose_masks_cover_the_image_has_no_pixel_auroc():
    """A colour cast marked over the whole image is legitimate data: its breakdown's pixel AUROC (no normal
    pixel among that type's images) raised ValueError, and `uadc eval` ended in a traceback."""
    from uadc.evaluation.run import defect_breakdown
    rng = np.random.default_rng(0)
    kinds = np.array(["good"] * 3 + ["color"] * 2 + ["scratch"] * 2)
    labels = (kinds != "good").astype(int)
    masks = np.zeros((7, 8, 8), np.float32)
    masks[3:5] = 1
    masks[5:, 2:4, 2:4] = 1
    maps = rng.random((7, 8, 8)).astype(np.float32)
    out = defect_breakdown(kinds, labels, rng.random(7), masks, maps)
    assert "pixel_auroc" not in out["color"] and "image_auroc" in out["color"]
    assert 0 <= out["scratch"]["pixel_auroc"] <= 1
    assert [type(k) for k in out] == [str, str]   # numpy's str_: EvalResult.to_dict() did not dump to YAML


def test_infinite_scores_and_no_images_are_refused_alike():
    """AUPRO took an infinite map value and returned a figure while the AUROCs refused it in sklearn's words;
    `image_auroc([], [])` said the labels held "only one class (good)"."""
    from uadc.evaluation.metrics import aupro, image_auroc, pixel_auroc
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    maps = np.random.default_rng(0).random((1, 8, 8))
    maps[0, 0, 0] = np.inf
    for metric in (aupro, pixel_auroc):
        with pytest.raises(ValueError, match="maps contains infinite values"):
            metric(masks, maps)
    with pytest.raises(ValueError, match="no images"):
        image_auroc(np.array([]), np.array([]))


def test_metrics_in_two_threads_leave_the_warning_filters_as_found(monkeypatch):
    """scikit-learn's type_of_target sets an `error` filter inside catch_warnings; two evaluations in
    two threads each put back the copy they saved, and the other's `error` filter stayed for good."""
    import threading
    import time
    import warnings

    from uadc.evaluation import metrics as m
    real = m.roc_auc_score

    def sklearn_like(y, s):
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.VisibleDeprecationWarning)
            time.sleep(0.2)   # the other thread enters meanwhile
            return real(y, s)
    monkeypatch.setattr(m, "roc_auc_score", sklearn_like)
    before = warnings.filters[:]
    y, s = np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(m.image_auroc(y, s))) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(10)
    assert out == [1.0, 1.0] and warnings.filters == before
