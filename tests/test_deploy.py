"""Deployment artifacts: the validation split, label-free thresholds, decisions in the report,
the artifact.json manifest (tamper check) and in-graph post-processing."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
import os
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from scipy import stats

from uadc.config.recipe import load_recipe
from uadc.core.errors import UadcError
from uadc.core.manifest import read_manifest
from uadc.data.prepare import prepare_data
from uadc.evaluation.thresholds import compute_thresholds, mask_overlap, quantile_threshold, rates

ROOT = Path(__file__).resolve().parent.parent
PY = str(Path(sys.executable))


# -- thresholds (numpy only) ------------------------------------------------------------------

def test_quantile_estimator_bounds_the_false_alarm_rate():
    rng = np.random.default_rng(0)
    far = 0.01
    hits = []
    for seed in range(40):
        val = np.random.default_rng(seed).lognormal(0, 0.5, 2000)
        t, level = quantile_threshold(val, far)
        assert t >= np.quantile(val, 1 - far) and level > 1 - far
        hits.append((rng.lognormal(0, 0.5, 200_000) >= t).mean())
    # an upper confidence bound: the real false-alarm rate is at most the target in most draws
    assert np.mean(np.asarray(hits) <= far) >= 0.85 and max(hits) < 2 * far


def test_small_validation_sets_get_a_margin_above_the_largest_value():
    val = np.array([1.0, 1.1, 0.9, 1.05, 0.95])
    t, level = quantile_threshold(val, 0.01)
    assert t > val.max() and level == 1.0
    plain, level = quantile_threshold(val, 0.01, margin=False)
    assert plain == pytest.approx(np.quantile(val, 0.99, method="weibull"), rel=2e-5)   # rank q(n+1), just above
    assert level == 1.0   # the largest of 5 values, which it was said to sit at as the 0.99 quantile
    assert quantile_threshold(np.arange(1.0, 101.0), 0.01, margin=False)[1] == 0.99   # rank 99.99 of 100: inside
    assert float(np.float32(t)) == t      # float32-exact: numpy, ORT and TensorRT decide alike
    # fewer false alarms asked for, a higher threshold: 1e-17 fell to the largest value (1 - 1e-17 is 1.0)
    assert quantile_threshold(val, 1e-12)[0] > quantile_threshold(val, 1e-9)[0] > t
    with pytest.raises(ValueError, match="not in \\(0, 1\\) distinctly from 0"):
        quantile_threshold(val, 1e-17)


def test_thresholds_on_tied_few_or_far_apart_values_keep_their_meaning():
    """Found by a metrics review: tied values at the threshold were all defects (`>=`): all-equal scores and
    maps that are mostly exact zeros gave a 100 % false-alarm rate, the single normal of a category was
    judged defective; 2 normals fell back to a factor of 7.3 where the exact one is 37.1 (coverage 0.74, not
    0.95); scores over many orders of magnitude gave an infinite threshold the manifest then refused;
    pixel values sampled at a stride that aliased with the map width saw every other column only."""
    from uadc.evaluation.thresholds import MAX_PIXELS, _sample_pixels, tolerance_factor
    for values in (np.full(500, 0.3), np.r_[np.zeros(995), np.linspace(0.1, 0.5, 5)], np.array([0.5])):
        t, _ = quantile_threshold(values, 0.01)
        assert (values >= t).mean() <= 0.01 and t <= max(values.max(), 0) * 1.0001 + 1e-30
    assert tolerance_factor(2, 0.99) == pytest.approx(stats.nct.ppf(0.95, 1, stats.norm.ppf(0.99) * 2 ** 0.5)
                                                      / 2 ** 0.5)
    rng, covered = np.random.default_rng(0), []
    for _ in range(2000):
        covered.append(quantile_threshold(rng.lognormal(0, 0.5, 2), 0.01)[0] >= np.exp(0.5 * stats.norm.ppf(0.99)))
    assert np.mean(covered) >= 0.93
    t, _ = quantile_threshold(np.array([1e-3, 1, 1e3]), 0.01)
    assert np.isfinite(t) and t >= 1e3
    val = {"a": (np.zeros((3, 2, 2), np.float32), np.array([1e-20, 1, 1e20], np.float32))}
    assert np.isfinite(compute_thresholds(val, 0.01).categories["a"].image.value)
    maps = np.zeros((64, 256, 256), np.float32)
    maps[:, :, 1::2] = 0.5                     # odd columns raised: half the values
    sample = _sample_pixels(maps)
    assert len(sample) == MAX_PIXELS and abs((sample == 0.5).mean() - 0.5) < 0.01
    assert np.array_equal(sample, _sample_pixels(maps))   # deterministic


def test_a_small_category_borrows_the_pooled_log_spread_and_keeps_its_coverage():
    """Four categories of lognormal normals with one log spread (0.5) and their own means, with
    3, 12, 21 and 30 validation normals: the 3-normal category's image threshold still bounds its
    true 99 % quantile in at least about 95 % of draws, at a fraction of the own-spread bound. A
    category whose own spread is the wider keeps its own bound."""
    sizes, mus, q = (3, 12, 21, 30), (0.0, 2.0, -3.0, 1.0), stats.norm.ppf(0.99)
    covered, ratio = [], []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        val = {c: (np.zeros((n, 2, 2), np.float32), rng.lognormal(mus[i], 0.5, n).astype(np.float32))
               for i, (c, n) in enumerate(zip("abcd", sizes))}
        t = compute_thresholds(val, 0.01)
        covered.append(t.categories["a"].image.value >= np.exp(mus[0] + q * 0.5))
        ratio.append(t.categories["a"].image.value / quantile_threshold(val["a"][1], 0.01)[0])
    assert 0.93 <= np.mean(covered) <= 0.995           # a 95 % tolerance bound, neither lax nor vacuous
    assert np.median(ratio) < 0.8                      # the own-spread bound on 3 values is higher (0.71, exact k)
    rng = np.random.default_rng(0)
    wide = {c: (np.zeros((n, 2, 2), np.float32), rng.lognormal(0, sd, n).astype(np.float32))
            for c, n, sd in (("narrow", 30, 0.1), ("wide", 30, 1.5))}
    t = compute_thresholds(wide, 0.01)
    assert t.image_spread["df"] == 58 and 0.1 < t.image_spread["log_sd"] < 1.5
    assert t.categories["wide"].image.value == quantile_threshold(wide["wide"][1], 0.01)[0]
    assert t.categories["narrow"].image.value > quantile_threshold(wide["narrow"][1], 0.01)[0]
    assert compute_thresholds({"a": wide["wide"]}, 0.01).image_spread is None     # one category: nothing to pool
    zero = (np.zeros((3, 2, 2), np.float32), np.zeros(3, np.float32))   # a category scored 0: left out of the pool
    assert compute_thresholds({**wide, "zero": zero}, 0.01).image_spread == t.image_spread   # (it was None for all)


def test_thresholds_normalise_to_one_half_per_category_and_global():
    rng = np.random.default_rng(1)
    val = {"a": (rng.random((30, 8, 8)), rng.normal(1, 0.1, 30)),
           "b": (rng.random((25, 8, 8)) * 3, rng.normal(5, 0.5, 25))}
    thr = compute_thresholds(val, 0.05)
    for key in ("a", "b", None):
        t = thr.get(key)
        assert t.image.normalize(t.image.value) == pytest.approx(0.5)
        assert t.pixel.normalize(t.pixel.value) == pytest.approx(0.5)
        assert 0 <= t.image.normalize(-1e9) <= t.image.normalize(1e9) <= 1
    assert thr.get("b").image.value > thr.get("a").image.value      # per-category operating points
    assert thr.validation == {"a": 30, "b": 25}
    with pytest.raises(UadcError, match="unknown category"):
        thr.get("c")
    # one validation normal (low == high): the normalised score was a step, 0 or 1, around the threshold, also
    # where the threshold is the normal's own value plus a hair (no spread to borrow)
    from uadc.core.manifest import Threshold
    from uadc.evaluation.thresholds import threshold_of
    one = threshold_of(np.array([0.3585324]), 0.01, True)
    assert one.n == 1 and one.span == pytest.approx(abs(one.value))
    v = one.value
    assert one.normalize([0.4 * v, 0.75 * v, v, 1.25 * v, 2 * v]).tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    old = Threshold.from_dict({k: x for k, x in asdict(one).items() if k != "span"})   # an artifact from before
    assert old.span is None and old.normalize([0.99 * v, 1.01 * v]).tolist() == [0.0, 1.0]   # as its graph does
    assert Threshold.from_dict(asdict(one)) == one
    close = threshold_of(np.array([0.9, np.nextafter(np.float32(0.9), np.float32(1))], np.float32), 0.01, True)
    assert close.span == pytest.approx(abs(close.value))   # a float step apart: no spread either


def test_decision_rates_and_mask_overlap():
    r = rates(np.array([1, 0, 1, 1]), np.array([0, 0, 1, 1]))
    assert (r["false_reject_rate"], r["escape_rate"]) == (0.5, 0.0)
    a = np.zeros((2, 4, 4), bool)
    b = a.copy()
    a[0, :2], b[0, :1] = True, True
    o = mask_overlap(a, b)
    assert o["dice"] == pytest.approx(2 * 4 / 12) and o["iou"] == pytest.approx(4 / 8)
    assert mask_overlap(np.zeros(3, bool), np.zeros(3, bool)) == {"dice": 1.0, "iou": 1.0}


# -- validation split -------------------------------------------------------------------------

def test_validation_split_is_seeded_per_category_and_never_trained_on(recipe_factory, caplog):
    r = load_recipe(recipe_factory(data={"val_fraction": 0.25}))
    with caplog.at_level(logging.WARNING, logger="uadc"):
        d = prepare_data(r)
    again = prepare_data(r)
    train = {s.path for s in d.train.samples}
    for cat, ds in d.val.items():
        assert len(ds) == 4 and all(s.category == cat and s.label == 0 for s in ds.samples)
        assert not train & {s.path for s in ds.samples}
        assert [s.path for s in ds.samples] == [s.path for s in again.val[cat].samples]
    assert len(d.train) == 2 * 12
    other = prepare_data(r.with_overrides(seed=1))
    assert [s.path for s in other.val["gray"].samples] != [s.path for s in d.val["gray"].samples]
    assert "validation normals (< 20)" in caplog.text and d.warnings


def test_explicit_validation_folder_and_no_split(recipe_factory, tiny_data):
    folder = str(tiny_data / "stripes" / "test" / "good")
    d = prepare_data(load_recipe(recipe_factory(data={"val": [{"category": "stripes", "folder": folder}]})))
    assert [s.path.parent.name for s in d.val["stripes"].samples] == ["good"] * 4
    assert len([s for s in d.train.samples if s.category == "stripes"]) == 16     # all kept for training
    assert len(d.val["gray"]) == 2                                                  # default 0.1 of 16
    assert any("category 'stripes': 4 of its 4 validation normals (data.val) are test images" in w for w in d.warnings)
    # the category's own train/good as data.val, spelt another way: no training images left (it
    # was trained without the category, silently)
    train_good = tiny_data / "gray" / ".." / "gray" / "train" / "good"
    with pytest.raises(UadcError, match="category 'gray' has no training images left: all 16 of its train/good"):
        prepare_data(load_recipe(recipe_factory("all", data={"val": [{"category": "gray", "folder": str(train_good)}]})))
    none = prepare_data(load_recipe(recipe_factory("none", data={"val_fraction": 0.0})))
    assert all(len(ds) == 0 for ds in none.val.values()) and len(none.train) == 32
    # one folder listed twice (spelt another way): its normals counted twice, the small-sample warning silenced
    twice = [{"category": "stripes", "folder": folder}, {"category": "stripes", "folder": folder + "/."}]
    with pytest.raises(UadcError, match=r"data.val\[1\]: folder .* is data.val\[0\]'s too"):
        prepare_data(load_recipe(recipe_factory("twice", data={"val": twice})))
    with pytest.raises(UadcError, match="data.val: category 'nope'"):
        prepare_data(load_recipe(recipe_factory("bad", data={"val": [{"category": "nope", "folder": folder}]})))
    with pytest.raises(UadcError, match="data.val_fraction"):
        load_recipe(recipe_factory("big", data={"val_fraction": 0.9}))
    with pytest.raises(UadcError, match="deploy.false_alarm_rate"):
        load_recipe(recipe_factory("far", deploy={"false_alarm_rate": 0}))


# -- compiled artifact ------------------------------------------------------------------------

def test_artifact_thresholds_come_from_its_own_validation_outputs(int8_artifact):
    recipe, art, res = int8_artifact
    m = read_manifest(res.path)
    assert (m.target, m.precision, m.categories) == ("ort-cpu-int8", "int8", ["stripes", "gray"])
    assert set(m.files) >= {"model.onnx", "report.json", "report.md", "calibration.json"}
    # recompute from the artifact's outputs on the validation normals alone
    from uadc.backends.ort import make_session, ort_predictor
    from uadc.evaluation.run import load_test_arrays, predict
    data = prepare_data(load_recipe(recipe))
    run = ort_predictor(make_session(res.path / "model.onnx", 1))
    val = {c: predict(run, load_test_arrays(ds)[0], 8) for c, ds in data.val.items()}
    again = compute_thresholds(val, 0.01)
    for c in m.categories:
        assert m.thresholds.get(c).image.value == pytest.approx(again.get(c).image.value, rel=1e-5)
        assert m.thresholds.get(c).pixel.value == pytest.approx(again.get(c).pixel.value, rel=1e-5)
    assert m.thresholds.validation == {"stripes": 4, "gray": 4}
    meta = {p.key: p.value for p in onnx.load(str(res.path / "model.onnx")).metadata_props}
    essentials = json.loads(meta["uadc.deploy"])
    assert essentials["thresholds"] == m.thresholds.to_dict() and essentials["preprocessing"]["image_size"] == 64


def test_report_shows_decisions_fp32_vs_compiled(int8_artifact):
    _, _, res = int8_artifact
    report = json.loads((res.path / "report.json").read_text())
    assert report["schema"] == 3
    dec = report["deploy"]["decisions"]
    for cat in ("stripes", "gray"):
        c = dec["categories"][cat]
        for side in ("fp32", "compiled"):
            assert 0 <= c[side]["false_reject_rate"] <= 1 and 0 <= c[side]["escape_rate"] <= 1
        assert 0 <= c["agreement"] <= 1 and 0 <= c["mask"]["dice"] <= 1
    assert set(report["deploy"]["thresholds"]) == {"fp32", "compiled"}
    md = (res.path / "report.md").read_text()
    assert "## Operating point and decisions" in md and "decision agreement" in md


def test_int8_artifact_has_7_bit_weights_and_the_exact_path_agrees(int8_artifact, capsys):
    """A compiled CPU INT8 artifact records 7-bit weights, and ``bench.int8_exactness`` finds its scores
    and maps the same in the default session and in ORT's exact one (on an AVX2-only CPU an 8-bit
    artifact differs: README "7-bit weights")."""
    from bench import int8_exactness
    recipe, art, res = int8_artifact
    cal = json.loads((res.path / "calibration.json").read_text())
    assert cal["weight_bits"] == 7 and cal["per_channel"] is True   # the weight scheme as written
    int8_exactness.main([str(recipe), "--artifacts", str(art), "--threads", "1", "--cycles", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    row = next(r for r in rows if r["artifact"] == res.path.name)
    assert row["weight_bits"] == 7 and row["identical"] and row["score_max_diff"] == 0.0
    assert row["auroc_this_cpu"] == row["auroc_exact"] and row["b1_p50_ms"]["exact"] > 0


def _tampered(res, tmp_path) -> Path:
    bad = tmp_path / "tampered"
    shutil.copytree(res.path, bad)
    blob = bytearray((bad / "model.onnx").read_bytes())
    blob[-1] ^= 1
    (bad / "model.onnx").write_bytes(bytes(blob))
    return bad


def test_tampered_model_fails_load_and_predict_with_one_line(int8_artifact, tmp_path, tiny_data):
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    bad = _tampered(res, tmp_path)
    with pytest.raises(UadcError) as e:
        Detector.load(bad)
    assert "model.onnx does not match its sha256" in str(e.value) and "\n" not in str(e.value)
    p = subprocess.run([PY, "-m", "uadc.cli", "predict", str(bad), str(tiny_data / "gray" / "test"), "--out",
                        str(tmp_path / "p")], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "does not match" in p.stderr
    assert not (tmp_path / "p").exists()
    (bad / "artifact.json").unlink()
    with pytest.raises(UadcError, match="no artifact.json"):
        Detector.load(bad)


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["thresholds"]["global"]["image"].update(value=float("nan")),
     "threshold value must be a finite number"),
    (lambda d: d["thresholds"]["categories"]["gray"]["pixel"].update(low=float("inf")),
     "threshold low must be a finite"),
    (lambda d: d["thresholds"].update(false_alarm_rate=float("nan")), "false_alarm_rate must be a finite"),
    (lambda d: d["preprocessing"].update(std=[0.0, 0.5, 0.5]), "std must be a finite positive number, got 0.0"),
    # preprocessing the model cannot take: each failed later as a traceback or blamed every image
    (lambda d: d["preprocessing"].update(image_size=d["preprocessing"]["image_size"] * 2),
     "input shape .* does not take"),
    (lambda d: d["preprocessing"].update(image_size=0), "image_size must be a whole number >= 1, got 0"),
    (lambda d: d["preprocessing"].update(image_size=d["preprocessing"]["image_size"] + 0.9), "image_size must be a whole"),
    (lambda d: d["preprocessing"].update(scale=2.0), "scale must be 1/255"),   # ignored: the runtime divides by 255
    # values of the wrong type or out of range were taken as they came (a threshold "0.5", a rate of 2)
    (lambda d: d["thresholds"].update(false_alarm_rate=2), "false_alarm_rate must be 0 to 1"),
    (lambda d: d["thresholds"].update(false_alarm_rate=-0.5), "false_alarm_rate must be 0 to 1"),
    (lambda d: d["thresholds"]["global"]["image"].update(quantile=7), "threshold quantile must be 0 to 1"),
    (lambda d: d["thresholds"]["global"]["image"].update(n=-3), "threshold n must be a whole number >= 0"),
    (lambda d: d["thresholds"]["global"]["image"].update(low=1e9), "threshold low .* is above its high"),
    (lambda d: d["thresholds"]["global"]["image"].update(value="0.5"), "threshold value must be a finite number"),
    (lambda d: d["thresholds"]["global"]["image"].update(value=True), "threshold value must be a finite number"),
    (lambda d: d.update(schema=-1), "schema must be a whole number >= 1"),
    (lambda d: d.update(runtime="tensorflow"), "runtime must be onnxruntime, openvino, tensorrt"),
    # artifact.json alone edited: OpenVINO ran an ONNX Runtime artifact and its thresholds' warning was silenced
    (lambda d: d.update(runtime="openvino"), "target 'ort-cpu-int8' does not run on openvino"),
    (lambda d: d.update(runtime="tensorrt"), "target 'ort-cpu-int8' does not run on tensorrt"),
    (lambda d: d.update(target="no-such-target"), "unknown target 'no-such-target'"),
    (lambda d: d.update(precision="int3"), "precision must be fp32, fp16, bf16, int8, got 'int3'"),
    (lambda d: d.update(postprocess="yes"), "postprocess must be a mapping or null, got 'yes'"),
    (lambda d: d.update(categories=[1, 2]), "categories must be a list of distinct names"),
    (lambda d: d.update(categories="stripes"), "categories must be a list of distinct names"),
    (lambda d: d.update(categories=["gray", "gray"]), "categories must be a list of distinct names"),
    (lambda d: d.update(categories=[]), "thresholds are for \\['gray', 'stripes'\\], categories are \\[\\]"),
    (lambda d: d["thresholds"]["categories"].pop("gray"), "thresholds are for \\['stripes'\\]"),
    (lambda d: d["preprocessing"].update(mean=[0.5, 0.5]), "mean and std need 3 values"),
    (lambda d: d["preprocessing"].update(resize="lanczos"), "resize must be bilinear or nearest or bicubic"),
    (lambda d: d["preprocessing"].update(color="L"), "color must be RGB"),
])
def test_a_manifest_with_non_finite_numbers_is_refused(int8_artifact, tmp_path, edit, why):
    """artifact.json is JSON that Python reads NaN / Infinity from: a NaN threshold marked every
    defect good (`score >= nan` is false), a zero std divided by zero; both loaded and predicted.
    Preprocessing that does not fit the model is refused the same way."""
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    bad = tmp_path / "edited"
    shutil.copytree(res.path, bad)
    doc = json.loads((bad / "artifact.json").read_text())
    edit(doc)
    (bad / "artifact.json").write_text(json.dumps(doc))
    with pytest.raises(UadcError, match=f"not a valid uadc manifest \\(ValueError: {why}"):
        Detector.load(bad)


def test_a_manifest_that_misdescribes_the_model_or_cannot_be_read_is_one_error(int8_artifact, tmp_path):
    """Consistent edits of the input (name, or size and shape together) are caught against the model the
    runtime opened; numbers beyond float range and nesting beyond recursion are invalid manifests."""
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    for edit, why in ((lambda t: t.replace('"name": "image"', '"name": "img"'), "the manifest was edited"),
                      (lambda t: _resized(t, 2), "the manifest was edited"),
                      (lambda t: t.replace('"schema": ', '"schema": 1e400, "x": ', 1), "schema must be a whole number"),
                      (lambda t: t.replace('"n": ', '"n": 1e400, "x": ', 1), "threshold n must be a whole number"),
                      (lambda t: "[" * 100000 + "]" * 100000, "RecursionError"),
                      # informational, so edited unseen by predict, verify and bundle: a line read of pred_* outputs
                      (lambda t: json.dumps({**json.loads(t), "outputs": [*json.loads(t)["outputs"], "pred_label"]}),
                       r"outputs \[.*'pred_label'\] are not the model's \(anomaly_map, score")):
        bad = tmp_path / "edited"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(res.path, bad)
        (bad / "artifact.json").write_text(edit((bad / "artifact.json").read_text()))
        with pytest.raises(UadcError, match=why):
            Detector.load(bad)


def _resized(text: str, factor: int) -> str:
    doc = json.loads(text)
    size = doc["preprocessing"]["image_size"]
    doc["preprocessing"]["image_size"] = size * factor
    doc["input"]["shape"] = [*doc["input"]["shape"][:2], size * factor, size * factor]
    return json.dumps(doc)


def test_in_graph_postprocess_matches_the_runtime(int8_artifact, tmp_path, tiny_data):
    """polygraphy run --onnxrt on real test images: pred_label equals the runtime's label (global
    thresholds by default), and feeding the category index gives the per-category decision."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from uadc.core.ort_session import make_session
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    det = Detector.load(res.path)
    files = [f for c in ("stripes", "gray") for f in sorted((tiny_data / c / "test").rglob("*.png"))]
    images = np.stack([det.preprocess(f) for f in files])
    save_json([{"image": images}], tmp_path / "in.json")
    polygraphy = [PY, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())"]  # its script may live elsewhere
    p = subprocess.run([*polygraphy, "run", str(res.path / "model.onnx"), "--onnxrt",
                        "--load-inputs", str(tmp_path / "in.json"), "--save-outputs", str(tmp_path / "out.json")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    outs = RunResults.load(str(tmp_path / "out.json"))[0][1][0]
    preds = det.predict(files)
    assert [bool(x) for x in outs["pred_label"]] == [bool(q.label) for q in preds]
    assert np.allclose(outs["pred_score"], [q.normalized_score for q in preds], atol=1e-6)
    assert np.array_equal(outs["pred_mask"][:, 0], np.stack([q.mask for q in preds]))
    sess = make_session(res.path / "model.onnx")
    for cat in det.categories:
        idx = det.manifest.postprocess["category_index"][cat]
        label, = sess.run(["pred_label"], {"image": images, "category": np.full(len(images), idx, np.int64)})
        assert [bool(x) for x in label] == [bool(q.label) for q in det.predict(files, category=cat)]


def test_checkpoints_trained_before_the_split_are_flagged():
    from types import SimpleNamespace
    from uadc.pipeline.deploy import _trained_before_split
    assert _trained_before_split(SimpleNamespace(blob={"recipe": {"data": {"image_size": 64}}}))
    assert not _trained_before_split(SimpleNamespace(blob={"recipe": {"data": {"val_fraction": 0.1}}}))
    assert not _trained_before_split(SimpleNamespace(blob={"categories": None}))      # a KDModel: no recipe


def test_bundle_keeps_what_the_line_runs_and_leaves_the_golden_files_out(int8_artifact, tmp_path, tiny_data, caplog):
    """`uadc bundle`: the deployment copy verifies, predicts exactly as the artifact, is byte-for-byte
    reproducible, is judged against the full artifact's golden set, and refuses to overlap or to copy
    a tampered artifact (nothing written)."""
    import uadc
    from uadc.core.constants import GOLDEN_FILES
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    out = tmp_path / "line"
    b = uadc.bundle(res.path, out)
    assert isinstance(b, uadc.BundleResult) and b.bytes < b.source_bytes
    # an artifact that failed its own gate at compile went out without a word
    from uadc.pipeline.bundle import _warn_of_a_failed_gate
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "report.json").write_text(json.dumps(
        {"verification": {"gate": {"passed": False, "failures": ["image_auroc_drop 0.0556 > 0.02"]}}}))
    with caplog.at_level("WARNING", logger="uadc"):
        _warn_of_a_failed_gate(tmp_path / "failed", {"report.json": "x"}, False)
        _warn_of_a_failed_gate(tmp_path / "failed", {"report.json": "x"}, True)   # a bundle's: no golden set in it
    assert "failed its own regression gate at compile (image_auroc_drop 0.0556 > 0.02): the bundle ships it" \
        in caplog.text
    assert [r.getMessage().endswith(f"`uadc verify {tmp_path / 'failed'}{g}` lists the figures")
            for r, g in zip(caplog.records, ("", " --golden FULL_ARTIFACT"))] == [True, True]
    assert sorted(p.name for p in out.iterdir()) == sorted([*b.files, "artifact.json"])
    assert not set(b.files) & set(GOLDEN_FILES) and set(b.left_out) <= set(GOLDEN_FILES) and "golden.json" in b.left_out
    m = read_manifest(out)   # every kept file hashed; provenance recorded
    assert set(m.files) == set(b.files) and m.bundle["left_out"] == b.left_out
    assert m.thresholds.to_dict() == read_manifest(res.path).thresholds.to_dict()
    files = sorted((tiny_data / "gray" / "test").rglob("*.png"))
    full, line = Detector.load(res.path).predict(files), Detector.load(out).predict(files)
    assert [p.score for p in full] == [p.score for p in line] and [p.label for p in full] == [p.label for p in line]
    cli = subprocess.run([PY, "-m", "uadc.cli", "bundle", str(res.path), "--out", str(tmp_path / "again"), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0 and json.loads(cli.stdout)["files"] == b.files, cli.stderr
    assert all((out / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in [*b.files, "artifact.json"])
    with pytest.raises(UadcError, match="a deployment bundle .* leaves them out; pass --golden"):
        uadc.verify(out)
    shutil.copy(res.path / "model.onnx", tmp_path / "bare.onnx")   # not a bundle: "a bundle leaves them out" was said
    with pytest.raises(UadcError, match=r"no golden outputs at \S+: not an artifact folder \(no artifact.json\); "
                                        r"pass --golden ARTIFACT"):
        uadc.verify(tmp_path / "bare.onnx")
    assert uadc.verify(out, golden=res.path).figures
    with pytest.raises(UadcError, match="golden set not found: .*typo"):    # not "a bundle leaves them out"
        uadc.verify(out, golden=tmp_path / "typo")
    damaged = tmp_path / "damaged"                              # an artifact whose listed golden.json is gone: that
    shutil.copytree(res.path, damaged)
    (damaged / "golden.json").unlink()
    with pytest.raises(UadcError, match="golden.json is missing") as gone:
        uadc.verify(damaged)
    assert "leaves them out" not in str(gone.value)
    for bad_out in (res.path / "sub", res.path.parent):
        with pytest.raises(UadcError, match="overlaps the artifact"):
            uadc.bundle(res.path, bad_out, force=True)
    with pytest.raises(UadcError, match="exists; pass --force"):
        uadc.bundle(res.path, out)
    with pytest.raises(UadcError, match="force: expected True or False, got 'no'"):   # "no" read as true: replaced
        uadc.bundle(res.path, out, force="no")
    again = uadc.bundle(out, tmp_path / "of-the-bundle")     # a bundle's bundle keeps what the first left out
    assert read_manifest(again.path).bundle["left_out"] == b.left_out == again.left_out   # it said "nothing"
    bad = _tampered(res, tmp_path)
    p = subprocess.run([PY, "-m", "uadc.cli", "bundle", str(bad), "--out", str(tmp_path / "never")],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and "does not match its sha256" in p.stderr and p.stderr.strip().count("\n") == 0
    assert not (tmp_path / "never").exists()


def test_a_users_files_in_an_output_folder_are_kept_and_a_bundle_stays_out_of_artifacts(int8_artifact, tmp_path):
    """`bundle --force` and a recompile replaced a folder and the images and scripts a user had put in it, without
    a word; a bundle written inside an artifact folder was deleted by that artifact's next compile; `--out .`
    wrote the bundle, then ended in a FileNotFoundError traceback (the working folder was swapped away)."""
    import uadc
    from uadc.core.io import check_replaceable
    _, _, res = int8_artifact
    line = uadc.bundle(res.path, tmp_path / "line").path
    (line / "model.engine").write_bytes(b"built on the device")   # the device's own files are uadc's to replace
    (line / "timing.cache").write_bytes(b"x")
    (line / "model_implicit.engine").write_bytes(b"the README's trtexec line")
    copied = uadc.bundle(line, tmp_path / "again")   # what it did not copy was said under --json only
    assert copied.summary_line().endswith("; not copied (not in its artifact.json): model.engine, "
                                          "model_implicit.engine, timing.cache")
    (line / ".DS_Store").write_bytes(b"a file manager's")
    check_replaceable(line)
    (line / "images").mkdir()
    (line / "images" / "a.png").write_bytes(b"theirs")
    (line / "run_line.sh").write_text("#!/bin/sh\n")
    with pytest.raises(UadcError, match=rf"^output folder {line} holds files its artifact.json does not list "
                                        rf"\(images/a.png and 1 more\): move them out first, or choose another --out"):
        uadc.bundle(res.path, line, force=True)
    assert (line / "images" / "a.png").read_bytes() == b"theirs"
    shutil.rmtree(line / "images")
    (line / "run_line.sh").unlink()
    (line / "photos").mkdir()   # an empty folder of the user's went without a word
    with pytest.raises(UadcError, match=r"holds files its artifact.json does not list \(photos/\)"):
        check_replaceable(line)
    notes = tmp_path / "notes"   # a copy of a report made a folder of notes and photos uadc's: `compile --force`
    notes.mkdir()                # replaced it whole
    shutil.copy(res.path / "report.json", notes)
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(UadcError, match=rf"^output folder {notes} holds a uadc report but no artifact.json of uadc's: "
                                        rf"not an output uadc replaces; choose another --out"):
        check_replaceable(notes)
    grid = tmp_path / "grid"     # a comparison's folder is replaced (its tables, records, cells); a user's file in it
    (grid / "records").mkdir(parents=True)   # or in a cell is named
    (grid / "compare.json").write_text(json.dumps({"cells": [], "target": "ort-cpu-int8", "fp32": {}}))
    (grid / ".minmax_train.lock").write_text("")
    shutil.copytree(res.path, grid / "minmax_train")
    check_replaceable(grid)
    (grid / "minmax_train" / "mine.png").write_bytes(b"theirs")
    (grid / "notes.txt").write_text("mine")
    with pytest.raises(UadcError, match=r"holds files no uadc step writes there \(minmax_train/mine.png and 1 more\)"):
        check_replaceable(grid)
    sweep = tmp_path / "sweep"   # a sweep's: its tables, records, cells/ of locks and artifacts
    (sweep / "records").mkdir(parents=True)
    (sweep / "records" / "k.json").write_text('{"key": "k"}')
    (sweep / "sweep.json").write_text(json.dumps({"cells": [], "pareto": [], "name": "grid"}))
    for name in ("sweep.md", "sweep.csv", "pareto.png"):
        (sweep / name).write_text("x")
    shutil.copytree(res.path, sweep / "cells" / "ort-cpu-int8-0123abcd")
    (sweep / "cells" / ".ort-cpu-int8.lock").write_text("")
    check_replaceable(sweep)   # refused before: "cells/ and 1 more"
    for mine in ("records/thesis.docx", "records/mine.json", ".backup.lock/photo.jpg", "cells/notes.txt", ".mine.lock"):
        (sweep / mine).parent.mkdir(exist_ok=True)
        (sweep / mine).write_text("mine")
        with pytest.raises(UadcError, match=f"holds files no uadc step writes there \\({re.escape(mine.split('/photo')[0])}"):
            check_replaceable(sweep)
        (sweep / mine).unlink()
        if mine.startswith(".backup"):
            (sweep / ".backup.lock").rmdir()
    check_replaceable(sweep)
    shutil.copytree(res.path, sweep / "art")   # a sweep keeps its cells under cells/: an artifact beside is a user's
    with pytest.raises(UadcError, match=r"holds files no uadc step writes there \(art/\)"):
        check_replaceable(sweep)
    (notes / "artifact.json").write_text('{"name": "another tool\'s"}')   # not uadc's: the notes went with it
    with pytest.raises(UadcError, match="holds a uadc report but no artifact.json of uadc's"):
        check_replaceable(notes)
    qat = tmp_path / "qat"       # a QAT run's folder is replaced (its two files)
    qat.mkdir()
    (qat / "qat.json").write_text(json.dumps({"recipe_hash": "r", "model_hash": "m", "target": "ort-cpu-int8"}))
    (qat / "qat_model.onnx").write_bytes(b"x")
    check_replaceable(qat)
    copy = tmp_path / "copy"
    shutil.copytree(res.path, copy)
    with pytest.raises(UadcError, match=f"--out {copy / 'sub'}: inside the artifact folder {copy}"):
        uadc.bundle(res.path, copy / "sub")
    assert not (copy / "sub").exists()
    here = tmp_path / "here"
    here.mkdir()
    p = subprocess.run([PY, "-m", "uadc.cli", "bundle", str(res.path), "--out", ".", "--json"],
                       capture_output=True, text=True, cwd=here, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and json.loads(p.stdout)["path"] == str(here), p.stderr
    p = subprocess.run([PY, "-m", "uadc.cli", "bundle", os.path.relpath(res.path, here), "--out", ".", "--force",
                        "--json"], capture_output=True, text=True, cwd=here, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0 and json.loads(p.stdout)["source"] == str(res.path), p.stderr   # the source relative: exit 1
    assert (here / "artifact.json").is_file()


def test_evaluating_an_artifact_checks_it_takes_the_recipes_input(int8_artifact, tmp_path, tiny_data):
    """An artifact evaluated with another recipe's test sets: a different size used to raise ONNX
    Runtime's own multi-line error; a different normalisation scored silently wrong."""
    import uadc
    from conftest import write_recipe
    recipe, _, res = int8_artifact
    ok = uadc.evaluate(res.path, recipe)
    assert ok.mean["image_auroc"] == pytest.approx(res.image_auroc, abs=1e-6)
    # the document names the model judged, and has the per-defect figures a checkpoint's has
    d = ok.to_dict()
    assert d["model"] == str((res.path / "model.onnx").absolute()) and d["runtime"] == "onnxruntime"
    assert len(d["model_sha256"]) == 64 and set(d["defects"]) == set(d["categories"])
    # the counts the figures rest on (tiny_data: 4 good and 6 defective test images per category)
    assert d["test_images"] == {c: {"good": 4, "defective": 6} for c in d["categories"]}
    assert uadc.EvalResult.from_dict(d).to_dict() == d
    gone = tmp_path / "no-model"   # an artifact folder whose model.onnx was deleted: "give its checkpoint file" before
    shutil.copytree(res.path, gone)
    (gone / "model.onnx").unlink()
    with pytest.raises(UadcError, match=r"^artifact .*no-model: model.onnx is missing \(listed in artifact.json\)$"):
        uadc.evaluate(gone, recipe)
    for name, data, why in (("big", {"image_size": 96}, "takes 64x64 px images; recipe big makes 96 px ones"),
                            ("imagenet", {"normalization": "imagenet"}, "normalises inputs with mean")):
        other = write_recipe(tmp_path / f"{name}.yaml", tiny_data, data={"val_fraction": 0.25, **data})
        with pytest.raises(UadcError, match=why) as e:
            uadc.evaluate(res.path, other)
        assert "\n" not in str(e.value)
    copy = Path(shutil.copytree(res.path, tmp_path / "copy"))
    (copy / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(UadcError, match="does not match its sha256"):
        uadc.evaluate(copy, recipe)


def test_a_product_with_defect_free_images_only_is_trained_compiled_and_given_thresholds(tmp_path, caplog):
    """A new product line has good images and no labelled defects: no `test` folder. Training
    stopped at `missing folder .../test`; now it is trained and gets thresholds, and is not evaluated."""
    import uadc
    data, recipe = _two_products(tmp_path, change=lambda d: [shutil.rmtree(d / "gray" / x) for x in ("test", "ground_truth")])
    art = tmp_path / "art"
    with caplog.at_level(logging.INFO, logger="uadc"):
        uadc.train(recipe, artifacts=art)
    assert "gray: trained and given operating thresholds, not evaluated (no test folder)" in caplog.text
    caplog.clear()
    from conftest import write_recipe
    with caplog.at_level(logging.INFO, logger="uadc"):   # without validation normals it promised thresholds too
        prepare_data(load_recipe(write_recipe(tmp_path / "none.yaml", data, data={"image_size": 32,
                                                                                  "val_fraction": 0.0})))
    assert "gray: trained, not evaluated (no test folder)" in caplog.text
    ev = uadc.evaluate(recipe, artifacts=art, write=False)
    # the document says which category its mean leaves out (a pipeline reading `mean` saw one product's figures)
    assert set(ev.categories) == {"stripes"} and ev.to_dict()["not_evaluated"] == {"gray": "no test folder"}
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, latency_runs=1, threads=1)
    assert set(res.metrics.compiled["categories"]) == {"stripes"}
    assert json.loads((res.path / "report.json").read_text())["metrics"]["not_evaluated"] == {"gray": "no test folder"}
    assert "Not evaluated (not in the mean): gray (no test folder)" in (res.path / "report.md").read_text()
    assert uadc.evaluate(res.path, recipe).to_dict()["not_evaluated"] == {"gray": "no test folder"}
    assert {"stripes", "gray"} <= set(read_manifest(res.path).thresholds.categories)
    shutil.rmtree(data / "stripes" / "test" / "good")   # defective test images only: AUROC undefined
    with caplog.at_level(logging.WARNING, logger="uadc"):
        with pytest.raises(UadcError, match="no labelled test images to evaluate on"):
            uadc.evaluate(recipe, artifacts=art, write=False)
    assert "category 'stripes': its test folder holds defective images only" in caplog.text
    shutil.rmtree(data / "stripes" / "test")      # no category with labels: compiled, not evaluated
    with pytest.raises(UadcError, match="no labelled test images to evaluate on"):
        uadc.evaluate(recipe, artifacts=art, write=False)
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, latency_runs=1, threads=1, out=tmp_path / "no-test")
    assert res.metrics is None and {"stripes", "gray"} <= set(read_manifest(res.path).thresholds.categories)
    pred = uadc.Detector.load(res.path).predict(sorted((data / "gray" / "train" / "good").glob("*.png")), category="gray")
    assert len(pred) == 12


def test_image_level_labels_without_masks_give_image_auroc_only(tmp_path):
    """Test images labelled good / defective with no `ground_truth/` masks (how many lines label
    parts): training stopped at `defect image without mask`; now the category gets image AUROC and
    no pixel metrics, and the mean pixel figures come from the categories with masks."""
    import uadc
    from click.testing import CliRunner
    from uadc.cli import main
    data, recipe = _two_products(tmp_path, change=lambda d: shutil.rmtree(d / "gray" / "ground_truth"))
    art = tmp_path / "art"
    uadc.train(recipe, artifacts=art)
    ev = uadc.evaluate(recipe, artifacts=art, write=False)
    assert set(ev.categories["gray"]) == {"image_auroc"} and "pixel_auroc" in ev.categories["stripes"]
    assert ev.mean["pixel_auroc"] == ev.categories["stripes"]["pixel_auroc"]
    assert set(ev.defects["gray"]["blob"]) == {"count", "image_auroc"}
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, latency_runs=1, threads=1)
    assert "pixel_auroc" not in res.metrics.drop["categories"]["gray"]
    report = (res.path / "report.md").read_text()
    assert "| gray | image_auroc |" in report and "| gray | pixel_auroc |" not in report
    r = CliRunner().invoke(main, ["verify", str(res.path), "--json", str(tmp_path / "v.json")])
    assert r.exit_code == 0, r.output
    lab = json.loads((tmp_path / "v.json").read_text())["labelled"]
    assert set(lab["categories"]["gray"]) == {"image_auroc_drop"} and "pixel_auroc_drop" in lab["all"]
    r = CliRunner().invoke(main, ["eval", str(recipe), "--artifacts", str(art)])
    assert r.exit_code == 0 and "gray: blob" in r.output, r.output
    shutil.rmtree(data / "stripes" / "ground_truth")   # no masks anywhere: image AUROC is the whole table
    ev = uadc.evaluate(recipe, artifacts=art, write=False)
    assert set(ev.mean) == {"image_auroc"}
    with pytest.raises(UadcError, match="defect image without mask: .* with no ground_truth/ folder at all"):
        (data / "gray" / "ground_truth" / "blob").mkdir(parents=True)
        uadc.evaluate(recipe, artifacts=art, write=False)


def test_a_category_without_validation_normals_takes_the_global_thresholds(tmp_path, caplog):
    """One train/good image leaves no validation normal: compile stopped at `unknown category 'gray'`
    (its decisions asked for thresholds it did not get); now it takes the global ones, said at load."""
    import uadc
    data, recipe = _two_products(tmp_path, gray_train=1)
    art = tmp_path / "art"
    with caplog.at_level(logging.WARNING, logger="uadc"):
        uadc.train(recipe, artifacts=art)
    assert "category 'gray' has no validation normals: it is judged at the global thresholds" in caplog.text
    res = uadc.compile(recipe, "ort-cpu-int8", artifacts=art, latency_runs=1, threads=1)
    t = read_manifest(res.path).thresholds
    assert t.validation == {"stripes": 3, "gray": 0} and t.get("gray") == t.global_   # global: stripes alone here
    det = uadc.Detector.load(res.path)
    pred = det.predict(sorted((data / "gray" / "test").rglob("*.png")), category="gray")
    assert {p.threshold for p in pred} == {t.global_.image.value}
    # said where it is used too (at compile only, before), and in the reports; `global` rows have no category
    assert det.warnings == [f"{res.path}: 'gray' had no validation normals and is judged at the global thresholds"]
    assert json.loads((res.path / "report.json").read_text())["deploy"]["validation"] == {"stripes": 3, "gray": 0}
    md = (res.path / "report.md").read_text()
    assert "| gray (no validation normals: the global ones) |" in md and "\n| global |" in md
    assert det.predict(pred[0].source, category="global").category is None
    from uadc.runtime.batch import predict_paths      # `uadc predict --category global`: its rows alike, unwarned
    run = predict_paths(det, pred[0].source, category="global")
    assert run.records[0]["category"] is None and not any("in no folder named" in w for w in run.warnings)


def test_one_validation_normal_without_a_spread_to_borrow_is_a_warning(tmp_path, caplog):
    """Its image threshold is that image's score, without margin: half of the normals called defective, silently."""
    import uadc
    data, recipe = _two_products(tmp_path, gray_train=4)     # gray: 1 normal; stripes: 3 (one spread: none pooled)
    uadc.train(recipe, artifacts=tmp_path / "art")
    with caplog.at_level(logging.WARNING, logger="uadc"):
        res = uadc.compile(recipe, "ort-cpu-fp32", artifacts=tmp_path / "art", latency_runs=1, threads=1)
    assert read_manifest(res.path).thresholds.validation == {"stripes": 3, "gray": 1}
    assert "'gray': one validation normal each and no spread to borrow" in caplog.text


def _two_products(tmp_path: Path, gray_train: int = 12, change=None) -> tuple[Path, Path]:
    """(data root, recipe) of two tiny 32 px products, `change(data)` applied before the recipe is written."""
    from synthetic import make_category
    from conftest import write_recipe
    data = tmp_path / "data"
    make_category(data, "stripes", size=32, n_train=12, seed=1)
    make_category(data, "gray", size=32, n_train=gray_train, seed=2, rgb=False, period=13.0)
    if change:
        change(data)
    return data, write_recipe(tmp_path / "r.yaml", data, data={"image_size": 32, "val_fraction": 0.25},
                              train={"epochs": 1, "threads": 1})


def test_thresholds_are_not_set_on_images_trained_on_after_train_good_changed(tmp_path):
    """The validation split is drawn from train/good's files now: files added after training moved
    trained-on images into it, and the compiled thresholds were set on them without a word."""
    import uadc
    from conftest import write_recipe
    from synthetic import make_category
    make_category(tmp_path / "d", "stripes", size=32, n_train=12, seed=1)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "d", data={
        "sources": [{"root": str(tmp_path / "d"), "categories": ["stripes"]}], "image_size": 32, "val_fraction": 0.25},
        train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=tmp_path / "art")
    assert uadc.baseline(recipe, artifacts=tmp_path / "art").data.val["stripes"].samples   # unchanged: fine
    good = tmp_path / "d" / "stripes" / "train" / "good"
    for i in range(8):
        shutil.copy(good / "000.png", good / f"1{i:02d}.png")
    with pytest.raises(UadcError, match=r"the train/good files changed since training, and the validation normals "
                                        r"drawn now include \d+ it was not holding out"):
        uadc.baseline(recipe, artifacts=tmp_path / "art").data


def test_an_artifact_without_thresholds_is_a_warning_at_compile(recipe_factory, tmp_path, caplog):
    """val_fraction 0 and no data.val: train, eval and compile were silent, and `uadc predict` failed on the line."""
    import uadc
    r = recipe_factory("nothr", data={"val_fraction": 0.0}, train={"epochs": 1, "threads": 1})
    uadc.train(r, artifacts=tmp_path / "art")
    with caplog.at_level("WARNING", logger="uadc"):
        res = uadc.compile(r, "ort-cpu-fp32", artifacts=tmp_path / "art", evaluate=False, latency_runs=1)
    assert "the artifact has no operating thresholds, so `uadc predict` cannot decide with it" in caplog.text
    assert "on validation normals only (no images)" in (res.path / "report.md").read_text()
    assert "(data.val_fraction 0 and no data.val)" in caplog.text
    caplog.clear()   # its bundle went out without a word too
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.bundle(res.path, tmp_path / "b")
    assert "has no operating thresholds (compiled without validation normals): `uadc predict` and Detector refuse " \
           "the bundle" in caplog.text
    # one training image per category and data.val_fraction 0.1: the advice was "set data.val_fraction > 0"
    from conftest import write_recipe
    from synthetic import make_category
    for c, seed in (("stripes", 1), ("gray", 2)):
        make_category(tmp_path / "one", c, size=32, n_train=1, n_good=1, n_defect=1, seed=seed)
    one = write_recipe(tmp_path / "one.yaml", tmp_path / "one", data={"image_size": 32},
                       train={"epochs": 1, "threads": 1})
    uadc.train(one, artifacts=tmp_path / "art")
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        res = uadc.compile(one, "ort-cpu-fp32", artifacts=tmp_path / "art", evaluate=False, latency_runs=1)
    assert "(data.val_fraction 0.1 holds out none of a single training image per category, and no data.val)" \
        in caplog.text and "give data.val (defect-free images per category)" in caplog.text
    with pytest.raises(UadcError, match=r"no operating thresholds \(compiled without validation normals: give "
                                        r"data.val \(defect-free images per category\), or set data.val_fraction"):
        uadc.Detector.load(res.path).thresholds()


def test_force_never_replaces_a_folder_only_named_like_uadcs_and_out_stays_outside_artifacts(int8_artifact, tmp_path):
    """`--force` deleted a user's folder (a photo beside it) because it held a file named report.json; an
    --out inside another artifact was accepted, and that artifact's next compile deleted it without --force."""
    import uadc
    recipe, art, res = int8_artifact
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text('{"mine": 1}')
    (mine / "photo.jpg").write_bytes(b"precious")
    with pytest.raises(UadcError, match=f"output folder {mine} exists and was not written by uadc"):
        uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=mine, force=True, evaluate=False)
    assert sorted(p.name for p in mine.iterdir()) == ["photo.jpg", "report.json"]
    nested = res.path / "nested"
    with pytest.raises(UadcError, match=f"--out {nested}: inside the artifact folder {res.path}; choose a folder"):
        uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=nested, evaluate=False)
    assert not nested.exists()


def test_an_out_written_with_dotdot_past_an_artifact_is_beside_it_and_a_link_into_one_is_in_it(tmp_path):
    """`--out "$ART/../predictions"` (a common script line) was refused as inside the artifact: the path's
    parents as written hold ART."""
    from uadc.core.manifest import MANIFEST_FILE, check_outside_artifacts
    art = tmp_path / "art"
    art.mkdir()
    (art / MANIFEST_FILE).write_text("{}")
    check_outside_artifacts(art / ".." / "predictions")
    (tmp_path / "link").symlink_to(art, target_is_directory=True)
    for inside in (art / "sub", tmp_path / "link" / "sub"):
        with pytest.raises(UadcError, match="inside the artifact folder"):
            check_outside_artifacts(inside)
    (tmp_path / "loopA").symlink_to(tmp_path / "loopB")   # a link loop: RuntimeError from resolve(), not UadcError
    (tmp_path / "loopB").symlink_to(tmp_path / "loopA")
    check_outside_artifacts(tmp_path / "loopA" / "x")


def test_an_artifact_with_external_weights_is_not_run_in_parts_or_bundled(int8_artifact, tmp_path):
    """A model with its weights in a file beside it (uadc writes none), manifest signed: `bundle` shipped it
    with exit 0, and the branch schedule read the weights from the working folder."""
    import onnx
    import uadc
    from conftest import edited_artifact
    from uadc.core.hashing import sha256_file
    _, _, res = int8_artifact
    m = onnx.load(str(res.path / "model.onnx"))
    onnx.external_data_helper.convert_model_to_external_data(m, location="w.bin", size_threshold=1024)
    art = edited_artifact(res.path, tmp_path / "ext", model=m)
    meta = json.loads((art / "artifact.json").read_text())
    meta["files"]["w.bin"] = sha256_file(art / "w.bin")
    (art / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(UadcError, match="keeps weights in external data files, which uadc never writes"):
        uadc.bundle(art, tmp_path / "b")
    with pytest.raises(UadcError, match="no independent teacher and student partitions .* or keeps weights in external"):
        uadc.Detector.load(art, schedule="branches")
    with _without_onnx(), pytest.raises(UadcError, match="keeps weights in external data files, which uadc never writes"):
        uadc.bundle(art, tmp_path / "b")   # the runtime-only install: shipped, exit 0 (the model then did not load)
    assert not (tmp_path / "b").exists()


@contextlib.contextmanager
def _without_onnx():
    """As on the runtime-only install: `import onnx` fails."""
    saved = sys.modules.get("onnx")
    sys.modules["onnx"] = None
    try:
        yield
    finally:
        sys.modules["onnx"] = saved


def test_the_wire_format_reader_sees_what_onnx_sees(int8_artifact, tmp_path):
    """The runtime-only install's checks (no onnx package) read the protobuf itself: the same facts as onnx."""
    from uadc.core.onnx_wire import graph_facts
    _, _, res = int8_artifact
    m = onnx.load(str(res.path / "model.onnx"))
    assert graph_facts(res.path / "model.onnx") == (False, {n.domain for n in m.graph.node})
    m.graph.node.append(onnx.helper.make_node("Evil", [m.graph.input[0].name], ["o"], domain="com.évil"))
    onnx.save(m, str(tmp_path / "e.onnx"), save_as_external_data=True, location="w.bin", size_threshold=1024)
    assert graph_facts(tmp_path / "e.onnx") == (True, {n.domain for n in m.graph.node}) and "com.évil" in \
        graph_facts(tmp_path / "e.onnx")[1]
    data = (res.path / "model.onnx").read_bytes()
    (tmp_path / "g.onnx").write_bytes(b"\xfb\x07\xfc\x07" + data)   # an unknown (empty) group: onnx reads it
    assert onnx.load(str(tmp_path / "g.onnx")).graph.node and graph_facts(tmp_path / "g.onnx") == \
        graph_facts(res.path / "model.onnx")
    for bad in (data[:len(data) // 2], b"\xff" * 40, b"\x0b", b"\x00\x01" + data):   # cut, not protobuf, a group
        (tmp_path / "bad.onnx").write_bytes(bad)
        with pytest.raises(ValueError):
            graph_facts(tmp_path / "bad.onnx")


def test_a_category_named_global_gets_its_own_thresholds():
    """A product folder named `global` got the thresholds over every category instead of its own."""
    from uadc.core.manifest import CategoryThresholds, Threshold, Thresholds
    own, pooled = (CategoryThresholds(Threshold(v, 0.0, 2.0, 0.99, 10), Threshold(v, 0.0, 2.0, 0.99, 10))
                   for v in (1.0, 1.5))
    t = Thresholds(0.01, "quantile", {"global": own, "bottle": pooled}, pooled)
    assert t.get("global") is own and t.get(None) is pooled
    assert Thresholds(0.01, "quantile", {"bottle": own}, pooled).get("global") is pooled   # the global key still works


def test_a_model_with_a_custom_operator_is_refused_by_bundle_too(int8_artifact, tmp_path):
    """A consistent artifact (hashes, uadc.deploy) whose model holds an operator of another domain: predict and
    verify refused it (ONNX Runtime cannot load it), `uadc bundle` shipped it with exit 0."""
    import uadc
    from conftest import edited_artifact
    _, _, res = int8_artifact
    m = onnx.load(str(res.path / "model.onnx"))
    m.graph.node.append(onnx.helper.make_node("Evil", [m.graph.input[0].name], ["evil_out"], domain="com.evil"))
    m.opset_import.append(onnx.helper.make_opsetid("com.evil", 1))
    bad = edited_artifact(res.path, tmp_path / "evil", model=m)
    with pytest.raises(UadcError, match=r"model.onnx: uses operators of domain 'com.evil', which uadc never writes"):
        uadc.bundle(bad, tmp_path / "b")
    with _without_onnx(), pytest.raises(UadcError, match=r"model.onnx: uses operators of domain 'com.evil', which"):
        uadc.bundle(bad, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_device_readme_names_the_models_own_outputs_and_its_builtin_category(int8_artifact, tmp_path):
    """The TensorRT bundle's README said `anomaly_map` and `score` of every model: with in-graph post-processing
    it named neither the pred_* outputs nor that TensorRT builds the category input's default in as a constant."""
    from uadc.backends.tensorrt.bundle import write_build_script
    from uadc.backends.tensorrt.plan import BuildSettings
    _, _, res = int8_artifact
    shutil.copy(res.path / "model.onnx", tmp_path / "model.onnx")
    write_build_script(tmp_path, "model.onnx", BuildSettings(precision="int8"), (3, 64, 64))
    readme = (tmp_path / "README.md").read_text()
    for name in ("anomaly_map", "score", "pred_score", "pred_label", "pred_mask"):
        assert f"`{name}` " in readme
    assert "`pred_label` bool (" in readme and "`category` has a default" in readme
    assert "TensorRT's ONNX parser builds in as a constant" in readme


def test_a_damaged_bundle_says_to_bundle_it_again(int8_artifact, tmp_path):
    """A bundle on a line PC whose file changed said "compile the artifact again", which a line PC cannot."""
    import uadc
    from uadc.runtime import Detector
    _, _, res = int8_artifact
    out = uadc.bundle(res.path, tmp_path / "line").path
    with open(out / "report.md", "a") as f:
        f.write("edited\n")
    with pytest.raises(UadcError, match=r"report.md does not match its sha256 in artifact.json \(changed after "
                                        r"bundle\); bundle it again from its artifact \(or restore the file\)"):
        Detector.load(out)


def test_threshold_factors_plain_quantiles_and_the_pooled_pixels():
    """Found by a metrics review: Natrella's k was 13.33 at n = 3 (exact 10.55) and under-covered from n = 6; the
    plain quantile (numpy "linear") flagged 1 of 7 validation normals at 1 %; a NaN value gave a NaN threshold;
    the global pixel threshold counted a category of 4 images as much as one of 40."""
    from uadc.evaluation.thresholds import MAX_PIXELS, tolerance_factor
    for n, df in ((3, None), (10, None), (30, None), (1, 10)):
        exact = stats.nct.ppf(0.95, df or n - 1, stats.norm.ppf(0.99) * n ** 0.5) / n ** 0.5
        assert tolerance_factor(n, 0.99, df=df) == pytest.approx(exact, rel=1e-9)
    for n in (7, 30, 150, 1000):
        v = np.arange(1, n + 1.0)
        t, _ = quantile_threshold(v, 0.01, margin=False)
        assert (v >= t).mean() <= 0.01 or n < 99, (n, t)   # below 99 normals: above the largest
    with pytest.raises(ValueError, match="finite"):
        quantile_threshold(np.array([1.0, 2.0, np.nan]), 0.01)
    rng = np.random.default_rng(0)
    big, small = rng.uniform(0, 1, (40, 256, 256)), rng.uniform(1, 2, (4, 256, 256))
    glob = compute_thresholds({"a": (big, np.ones(40)), "b": (small, np.ones(4))}, 0.05).global_.pixel.value
    pooled = np.concatenate([big.ravel(), small.ravel()])
    assert len(pooled) > MAX_PIXELS and abs((pooled >= glob).mean() - 0.05) < 0.002, (pooled >= glob).mean()


def test_thresholds_under_a_callers_strict_numpy_errors():
    """All-zero validation values under a caller's np.seterr(all="raise"): the threshold just above 0.0 is
    subnormal, and numpy raised "underflow encountered in nextafter"."""
    with np.errstate(all="raise"):
        thr = compute_thresholds({"a": (np.zeros((3, 2, 2), np.float32), np.zeros(3, np.float32))}, 0.01)
    assert thr.categories["a"].image.value > 0 and thr.categories["a"].pixel.value > 0
