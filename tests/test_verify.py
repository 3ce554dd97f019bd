"""`uadc verify` / `uadc diff`: golden outputs in Polygraphy's formats (the Polygraphy CLI reads
them), label-free fidelity figures, budgets, exit codes 0/1/2, stable JSON keys, the API."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import uadc
from uadc.cli import main
from uadc.core.errors import UadcError
from uadc.core.manifest import read_manifest
from uadc.verify import fidelity
from uadc.verify.gate import BUDGET_KEYS, RULES, budgets, parse_budget_args

ROOT = Path(__file__).resolve().parent.parent
POLYGRAPHY = Path(sys.executable).parent / "polygraphy"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("verify")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 2, "threads": 1},
                          data={"val_fraction": 0.25}, compile={"calib_samples": 4})
    art = d / "artifacts"
    uadc.train(recipe, artifacts=art)
    b = uadc.baseline(recipe, artifacts=art)
    fp32 = uadc.compile(b, "ort-cpu-fp32", evaluate=False, latency_runs=1, artifacts=art).path
    int8 = uadc.compile(b, "ort-cpu-int8", evaluate=False, latency_runs=1, artifacts=art).path
    return recipe, fp32, int8


def _scaled_copy(src: Path, dst: Path, factor: float, rehash: bool = True) -> Path:
    """The artifact with every student conv weight scaled (an injected regression), its sha256 in
    artifact.json updated to match (``rehash``: else a file changed after compile)."""
    from uadc.core.hashing import sha256_file
    shutil.copytree(src, dst)
    m = onnx.load(str(dst / "model.onnx"))
    from uadc.export.partitions import partition_of
    weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv" and partition_of(n) == "student"}
    for init in m.graph.initializer:
        if init.name in weights:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(m, str(dst / "model.onnx"))
    if rehash:
        meta = json.loads((dst / "artifact.json").read_text())
        meta["files"]["model.onnx"] = sha256_file(dst / "model.onnx")
        (dst / "artifact.json").write_text(json.dumps(meta))
    return dst


# ------------------------------------------------------------------------------ figures (unit)

def test_identical_outputs_give_perfect_figures():
    rng = np.random.default_rng(0)
    scores, maps = rng.random(20) + 1, rng.random((20, 16, 16))
    cats = np.array(["a"] * 10 + ["b"] * 10)
    thr = fidelity.reference_thresholds(scores, maps, cats)
    f = fidelity.figures(scores, maps, scores, maps, cats, thr)
    assert f["all"] == {"spearman": 1.0, "decision_agreement": 1.0, "map_dice": 1.0, "map_iou": 1.0,
                        "top1_overlap": 1.0, "score_ratio": 1.0, "score_shift": 0.0}
    assert set(f["categories"]) == {"a", "b"}
    zeros = np.r_[np.zeros(12), scores[12:]]        # scores of 0 on both sides: no drift (score_ratio was 0)
    assert fidelity.figures(zeros, maps, zeros.copy(), maps, cats, thr)["all"]["score_ratio"] == 1.0


def test_a_score_on_its_threshold_is_not_a_disagreement_by_float_noise():
    """With one validation normal the threshold is that image's score: an FP32 rebuild 4e-7 below it
    'disagreed' and failed its own gate; a real move across the threshold still counts."""
    scores, maps = np.array([0.4, 0.9, 1.3]), np.random.default_rng(0).random((3, 8, 8))
    cats = np.array(["a"] * 3)
    thr = {c: {"image": 0.9, "pixel": 0.5, "score_std": 0.3} for c in ("global", "a")}
    noisy = scores + np.array([0.0, -4e-7, 0.0])
    assert fidelity.figures(scores, maps, noisy, maps, cats, thr)["all"]["decision_agreement"] == 1.0
    moved = scores + np.array([0.6, 0.0, 0.0])     # image 0 crosses its threshold
    assert fidelity.figures(scores, maps, moved, maps, cats, thr)["all"]["decision_agreement"] == pytest.approx(2 / 3)


def test_too_few_images_leave_a_figure_unjudged_not_failed():
    """Two images (same order, INT8-sized differences) gave spearman 0.0 and a REGRESSION; one
    reference normal gave score_shift 1e9 (a float difference over 1e-12)."""
    from uadc.verify.gate import budgets, judge_all
    scores, maps = np.array([9.55e-5, 8.18e-5]), np.random.default_rng(0).random((2, 8, 8))
    cats = np.array(["a", "a"])
    thr = {c: {"image": 1.0, "pixel": 2.0, "score_std": 0.0} for c in ("global", "a")}
    f = fidelity.figures(scores, maps, scores * 1.07, maps, cats, thr)
    assert f["all"]["spearman"] is None and f["all"]["score_shift"] is None and f["all"]["decision_agreement"] == 1.0
    figs = judge_all(f, None, budgets(), per_category=False)
    judged = [x for x in figs if x.judged]
    assert {x.name for x in judged} == {"decision_agreement", "map_dice", "map_iou", "top1_overlap", "score_ratio"}
    assert all(x.passed for x in judged if x.name != "score_ratio")
    # reported as null, not left out (a script reading figures.spearman got a KeyError)
    assert {(x.name, x.value) for x in figs if not x.judged} == {("spearman", None), ("score_shift", None)}


def test_figures_see_reordering_and_drift():
    rng = np.random.default_rng(1)
    scores, maps = rng.random(30) + 1, rng.random((30, 16, 16))
    cats = np.array(["a"] * 30)
    thr = fidelity.reference_thresholds(scores, maps, cats)
    rev = fidelity.figures(scores, maps, -scores + 5, maps[:, ::-1], cats, thr)["all"]
    assert rev["spearman"] == pytest.approx(-1.0) and rev["top1_overlap"] < 0.2
    up = fidelity.figures(scores, maps, scores * 1.5, maps * 1.5, cats, thr)["all"]
    assert up["spearman"] == pytest.approx(1.0) and up["score_ratio"] == pytest.approx(1.5)
    assert up["score_shift"] > 1 and up["decision_agreement"] < 0.9 and up["map_dice"] < 0.5


def test_score_shift_is_judged_only_where_the_normals_can_estimate_a_spread(artifacts):
    """score_shift is in units of a category's normal-score spread: with 3 normals that spread is no
    estimate, so the category's score_shift is reported, not judged; 12 normals are judged."""
    from uadc.verify.gate import judge_all
    rng = np.random.default_rng(2)
    cats = np.array(["few"] * 3 + ["many"] * 12)
    scores, maps = rng.random(15) + 1, rng.random((15, 8, 8))
    thr = fidelity.reference_thresholds(scores, maps, cats)
    few = fidelity.too_few_normals(thr, ["few", "many"])
    assert few == {"few": 3}
    fid = fidelity.figures(scores, maps, scores + 1.0, maps, cats, thr)   # drift on both
    judged = {(f.name, f.scope): f.passed for f in judge_all(fid, None, budgets(), True, {"few": {"score_shift"}})}
    assert ("score_shift", "few") not in judged and judged[("spearman", "few")]
    assert judged[("score_shift", "many")] is False and judged[("score_shift", "all")] is False
    # end to end: the tiny fixture holds out 4 normals per category, 8 in all: the overall score_shift, in
    # units of 8 normals' spread, is reported and not judged either (2 normals made a sound INT8 compile fail)
    v = uadc.verify(artifacts[2])
    assert set(fidelity.too_few_normals(v.thresholds["reference"], v.categories)) == {"stripes", "gray", "global"}
    assert all(v.figure("score_shift", c) is None and v.figure("spearman", c) is not None for c in v.categories)
    assert sum("score_shift[" in n for n in v.notes) == 2 and any(n.startswith("score_shift not judged: 8 ")
                                                                  for n in v.notes)
    overall = v.figure("score_shift")
    assert overall.value is not None and not overall.judged and overall.passed
    assert v.to_dict()["figures"]["score_shift"]["judged"] is False
    assert "budget" not in v.to_dict()["categories"]["gray"]["score_shift"]


def test_budgets_defaults_overrides_and_errors():
    b = budgets()
    assert set(b) == set(BUDGET_KEYS) and b["spearman_min"] == 0.9
    assert budgets({"spearman_min": 0.5}, {"map_dice_min": "0.8"}) == {**b, "spearman_min": 0.5, "map_dice_min": 0.8}
    with pytest.raises(UadcError, match=r"budget \w+ \(--budget\): unknown"):
        budgets(None, {"spearman": "1"})
    with pytest.raises(UadcError, match="expected a number"):
        budgets(None, {"spearman_min": "high"})
    with pytest.raises(UadcError, match=r"budget spearman_min=True \(--budget\): expected a number"):
        budgets(None, {"spearman_min": True})   # a budget of 1.0
    for typed in ("0_5", "\uff11", "0.5.1"):   # float() read `0_5` as 5.0 (a check switched off) and fullwidth digits
        with pytest.raises(UadcError, match=f"budget score_ratio_tol={typed} \\(--budget\\): expected a number"):
            budgets(None, {"score_ratio_tol": typed})
    assert budgets(None, {"score_ratio_tol": " .5 "})["score_ratio_tol"] == 0.5
    with pytest.raises(UadcError, match="verify budget spearman_min: 3.0 is above the maximum 1"):
        budgets(None, {"spearman_min": "3"})
    with pytest.raises(UadcError, match="KEY=VALUE"):
        parse_budget_args(["spearman_min"])
    with pytest.raises(UadcError, match=r"--budget spearman_min given twice \(0.95 and 0.9\)"):   # the last won
        parse_budget_args(["spearman_min=0.95", "map_dice_min=0.8", " spearman_min = 0.9"])


def test_a_figure_at_its_budget_passes_whatever_the_last_bit():
    """Five scores with one adjacent swap: Spearman 0.9 exactly, scipy's 0.8999999999999998 failed
    `spearman = 0.9000 (budget >= 0.9)` and the gate exited 1."""
    from scipy.stats import spearmanr
    from uadc.verify.gate import judge
    rho = float(spearmanr([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])[0])
    assert rho != 0.9 and abs(rho - 0.9) < 1e-12                       # the case as scipy computes it
    b = budgets()
    assert judge("spearman", rho, b).passed and not judge("spearman", 0.8999, b).passed
    assert judge("spearman", rho, b).describe() == "spearman = 0.9000 (budget >= 0.9)"
    for name, (key, rule) in RULES.items():   # every rule: at the budget up to rounding passes, a bit beyond fails
        inside = {"min": b[key] * (1 - 1e-15), "max": b[key] * (1 + 1e-15), "abs_max": -b[key] * (1 + 1e-15),
                  "tol": 1 + b[key] * (1 + 1e-15)}[rule]
        outside = {"min": b[key] - 1e-4, "max": b[key] + 1e-4, "abs_max": -b[key] - 1e-4, "tol": 1 + b[key] + 1e-4}[rule]
        assert judge(name, inside, b).passed and not judge(name, outside, b).passed, name


# ------------------------------------------------------------------------------ golden outputs

def test_golden_files_are_polygraphy_formats_and_the_polygraphy_cli_passes(artifacts):
    _, fp32, int8 = artifacts
    for art in (fp32, int8):
        meta = json.loads((art / "golden.json").read_text())
        kinds = {im["kind"] for im in meta["images"]}
        assert kinds == {"normal", "random", "test"} and meta["thresholds"]["global"]["n"] > 0
        assert (art / meta["reference_model"]).is_file()
    assert json.loads((int8 / "golden.json").read_text())["reference_model"] == "golden_reference.onnx"
    # the FP32 artifact's model is the export itself (shape annotations aside): no second copy of it
    assert json.loads((fp32 / "golden.json").read_text())["reference_model"] == "model.onnx"
    assert not (fp32 / "golden_reference.onnx").exists()
    if not POLYGRAPHY.is_file():
        pytest.skip(f"polygraphy CLI not installed next to {sys.executable}")
    r = subprocess.run([str(POLYGRAPHY), "run", str(fp32 / "model.onnx"), "--onnxrt",
                        "--load-inputs", str(fp32 / "golden_inputs.json"),
                        "--load-outputs", str(fp32 / "golden_outputs.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "PASSED" in r.stdout + r.stderr


def test_golden_option_given_another_json_file_is_one_line(artifacts):
    """`--golden ART/golden_inputs.json` (a list) ended in an AttributeError traceback;
    `--golden ART/report.json` said `golden schema 3, expected 1`."""
    _, fp32, _ = artifacts
    for name in ("golden_inputs.json", "report.json"):
        r = CliRunner().invoke(main, ["verify", str(fp32), "--golden", str(fp32 / name)])
        assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == \
            f"error: {fp32 / name} is not a golden set's golden.json; pass an artifact folder or its golden.json"


# ------------------------------------------------------------------------------ verify / diff

def test_compile_judges_its_artifact_by_its_own_regression_gate(artifacts, tiny_data, tmp_path):
    """A compile whose artifact `uadc verify` then failed (full INT8 at 256 px: 26 figures out of
    budget) said only `artifact written`; the gate's verdict is now in report.json and a warning."""
    from conftest import write_recipe
    _, fp32, int8 = artifacts
    for folder in (fp32, int8):
        gate = json.loads((folder / "report.json").read_text())["verification"]["gate"]
        assert gate["passed"] and gate["failures"] == [] and uadc.verify(folder).passed
        assert "regression gate (`uadc verify` on the golden set, stored budgets): **PASS**" in \
            (folder / "report.md").read_text()
        read_manifest(folder)                    # report.json rewritten with the gate: the hashes still hold
    strict = write_recipe(tmp_path / "tiny.yaml", tiny_data, train={"epochs": 2, "threads": 1},
                          data={"val_fraction": 0.25}, compile={"calib_samples": 4},
                          verify={"score_ratio_tol": 0.0, "score_shift_max": 0.0})   # no INT8 model meets these
    out = tmp_path / "strict"
    r = CliRunner().invoke(main, ["compile", str(strict), "--target", "ort-cpu-int8", "--artifacts",
                                  str(fp32.parent.parent), "--out", str(out), "--no-eval"])
    assert r.exit_code == 0, r.output        # what was asked for is written, and said to fail
    gate = json.loads((out / "report.json").read_text())["verification"]["gate"]
    assert not gate["passed"] and gate["failures"] and "; regression gate: REGRESSION" in r.output
    assert f"{out} fails its own regression gate: {len(gate['failures'])} figure(s) out of budget " \
           f"({gate['failures'][0]}" in r.output and f"`uadc verify {out}` lists them" in r.output
    v = CliRunner().invoke(main, ["verify", str(out), "--json", "-"])
    assert v.exit_code == 1 and json.loads(v.stdout)["failures"] == gate["failures"]


def test_verify_passes_on_the_artifact_itself_and_json_keys_are_stable(artifacts, tmp_path):
    _, fp32, _ = artifacts
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["verify", str(fp32), "--json", str(out), "--markdown", str(tmp_path / "v.md")])
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert d["passed"] and d["exit_code"] == 0 and d["polygraphy"]["passed"]
    assert set(d["figures"]) == set(RULES)  # labelled drops included: the golden set has test images
    for fig in d["figures"].values():
        assert set(fig) == {"value", "budget", "rule", "passed", "judged"}
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Regression gate"):]
    for key in d:
        assert f"`{key}`" in section, f"JSON key {key!r} not documented in README's Regression gate section"
    assert (tmp_path / "v.md").read_text().startswith("# uadc verify: PASS")
    ref, cand = d["thresholds"]["reference"], d["thresholds"]["candidate"]   # one order on both sides
    assert all(list(ref[c]) == list(cand[c]) for c in ref), (ref, cand)
    # `--json -`: the JSON alone on stdout, for a pipeline to read (it wrote a file named '-' before)
    r = CliRunner().invoke(main, ["verify", str(fp32), "--json", "-"])
    assert r.exit_code == 0 and json.loads(r.stdout).keys() == d.keys() and not (Path.cwd() / "-").exists()


def test_verify_fails_an_injected_regression_with_exit_1(artifacts, tmp_path):
    _, fp32, _ = artifacts
    bad = _scaled_copy(fp32, tmp_path / "bad", 3.0)
    r = CliRunner().invoke(main, ["verify", str(bad), "--normal-only", "--json", str(tmp_path / "bad.json")])
    assert r.exit_code == 1, r.output
    d = json.loads((tmp_path / "bad.json").read_text())
    assert not d["passed"] and d["failures"] and d["labelled"] is None
    assert "REGRESSION: " in r.output and re.search(r"REGRESSION: \w+(\[\w+\])? = ", r.output)
    # the same artifact passes once the failing budgets are relaxed to the limit
    relax = [f"--budget={RULES[n][0]}={-1 if n == 'spearman' else 0 if RULES[n][1] == 'min' else 100 if n == 'score_shift' else 10}" for n in d["figures"]]
    r2 = CliRunner().invoke(main, ["verify", str(bad), "--normal-only", *relax])
    assert r2.exit_code == 0, r2.output
    # an edit that leaves artifact.json's sha256 behind is refused as loading refuses it (it passed a x1.001 edit)
    tampered = _scaled_copy(fp32, tmp_path / "tampered", 1.001, rehash=False)
    for args in (["verify", str(tampered)], ["diff", str(fp32), str(tampered)]):
        r3 = CliRunner().invoke(main, args)
        assert r3.exit_code == 2 and "model.onnx does not match its sha256" in r3.output, r3.output


def test_golden_files_are_checked_not_trusted(artifacts, tmp_path):
    """A missing or damaged golden_masks.npz was a traceback and exit 1 (a "regression" to CI); budgets
    edited in another folder's golden.json passed a failing artifact through --golden; a damaged
    golden_outputs.json was blamed on golden.json."""
    _, fp32, int8 = artifacts
    gone = tmp_path / "gone"
    shutil.copytree(int8, gone)
    (gone / "golden_masks.npz").unlink()
    r = CliRunner().invoke(main, ["verify", str(gone), "--json", "-"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == \
        f"artifact {gone}: golden_masks.npz is missing (listed in artifact.json)"
    edited = tmp_path / "edited"
    shutil.copytree(fp32, edited)
    g = json.loads((edited / "golden.json").read_text())
    g["verify"]["image_auroc_drop_max"] = 0.5
    (edited / "golden.json").write_text(json.dumps(g))
    r = CliRunner().invoke(main, ["verify", str(int8), "--golden", str(edited)])
    assert r.exit_code == 2 and "golden.json does not match its sha256 in artifact.json" in r.output
    loose = tmp_path / "loose"            # a golden set without its artifact.json: each file named when damaged
    shutil.copytree(fp32, loose)
    (loose / "artifact.json").unlink()
    (loose / "golden_outputs.json").write_text("{")
    with pytest.raises(UadcError, match=f"unreadable golden set file {loose / 'golden_outputs.json'}: "):
        uadc.verify(int8, golden=loose)
    (loose / "golden_outputs.json").write_text("[" * 100_000 + "]" * 100_000)   # a RecursionError traceback
    with pytest.raises(UadcError, match=f"unreadable golden set file {loose / 'golden_outputs.json'}: nested too deeply"):
        uadc.verify(int8, golden=loose)
    (loose / "golden_outputs.json").write_text("{}")         # valid JSON, no RunResults: Polygraphy's own error
    with pytest.raises(UadcError, match=f"unreadable golden set file {loose / 'golden_outputs.json'}: "):
        uadc.verify(int8, golden=loose)
    (loose / "golden_outputs.json").write_bytes((fp32 / "golden_outputs.json").read_bytes())
    (loose / "golden_masks.npz").write_text("hi")
    with pytest.raises(UadcError, match=f"unreadable golden set file {loose / 'golden_masks.npz'}: "):
        uadc.verify(int8, golden=loose)
    # the files golden.json names stay in its folder, regular and bounded: an edited one read any file (its
    # text in the error), or /dev/zero until the machine ran out of memory
    (loose / "golden_masks.npz").write_bytes((fp32 / "golden_masks.npz").read_bytes())
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "TOPSECRET"}')
    (loose / "link.json").symlink_to(secret)     # a link is followed (`cp -rs`, DVC), to a regular file only
    (loose / "zero.json").symlink_to("/dev/zero")
    meta = json.loads((fp32 / "golden.json").read_text())
    for key, name, why in (("outputs", str(secret), "is not a file name in its folder"),
                           ("inputs", "../secret.json", "is not a file name in its folder"),
                           ("inputs", "/dev/zero", "is not a file name in its folder"),
                           ("inputs", "zero.json", "is missing or not a regular file"),
                           ("outputs", "link.json", "link.json: not in Polygraphy's format"),
                           ("masks", 5, "is not a file name in its folder")):
        (loose / "golden.json").write_text(json.dumps({**meta, key: name}))
        with pytest.raises(UadcError, match=why) as e:
            uadc.verify(int8, golden=loose)
        assert "TOPSECRET" not in str(e.value)
    # records and thresholds edited: KeyError / ValueError / TypeError tracebacks (exit 1)
    first = dict(meta["images"][0])
    test = next(i for i, im in enumerate(meta["images"]) if im["kind"] == "test")
    for edit, why in ((lambda m: m["images"][0].pop("kind"), "image record 0 is not one golden.json holds"),
                      (lambda m: m["images"][test].update(label="x"), f"image record {test} is not one golden.json"),
                      (lambda m: m["images"][0].update(category=["a"]), "image record 0 is not one golden.json holds"),
                      (lambda m: m["thresholds"].pop("global"), "no global thresholds"),
                      (lambda m: m["thresholds"]["global"].update(image="1"), "thresholds of 'global' are not numbers"),
                      # numpy's isfinite: a TypeError traceback (exit 1, a "regression") on an int past 64 bits
                      (lambda m: m["thresholds"]["global"].update(image=10 ** 400), "thresholds of 'global' are not"),
                      (lambda m: m["thresholds"]["global"].update(n="x"), "n 'x' is not a count of normals"),
                      (lambda m: m["thresholds"]["global"].update(n=None), "n None is not a count of normals"),
                      (lambda m: m.update(runner=["x"]), r"runner \['x'\] is not what compile writes there"),
                      (lambda m: m.update(verify="x"), "verify 'x' is not what compile writes there"),
                      (lambda m: m.update(reference_model=5), "reference_model 5 is not what compile writes"),
                      (lambda m: m.update(reference_model="../x.onnx"), "reference_model '../x.onnx' is not a file")):
        m = json.loads(json.dumps(meta))
        edit(m)
        (loose / "golden.json").write_text(json.dumps(m))
        with pytest.raises(UadcError, match=why):
            uadc.verify(int8, golden=loose)
    assert first == meta["images"][0]
    (loose / "golden.json").write_text(json.dumps(meta))   # a crafted mask shape asked for 35 TiB: MemoryError
    with np.load(fp32 / "golden_masks.npz") as z:
        np.savez(loose / "golden_masks.npz", masks=z["masks"], shape=np.asarray([3, 32, 10 ** 11]))
    with pytest.raises(UadcError, match=r"golden_masks.npz: ValueError: shape \[3, 32, 100000000000\] is not that of"):
        uadc.verify(int8, golden=loose)
    # the masks' own .npy header claiming (10**7, 10**7): numpy allocated it first (MemoryError, 90 TiB)
    lie = io.BytesIO()
    np.lib.format.write_array_header_1_0(lie, {"descr": "|u1", "fortran_order": False, "shape": (10 ** 7, 10 ** 7)})
    with zipfile.ZipFile(loose / "golden_masks.npz", "w") as z:
        z.writestr("masks.npy", lie.getvalue() + bytes(100))
        with io.BytesIO() as buf:
            np.save(buf, np.asarray([3, 32, 32]))
            z.writestr("shape.npy", buf.getvalue())
    with pytest.raises(UadcError, match=r"golden_masks.npz: ValueError: masks: its header claims shape \[10000000, "
                                        r"10000000\] of uint8, more than its"):
        uadc.verify(int8, golden=loose)
    # honest headers over deflated zeros: far more masks than the golden images have (GBs of memory before)
    with zipfile.ZipFile(loose / "golden_masks.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with io.BytesIO() as buf:
            np.save(buf, np.zeros((4000, 32, 4), np.uint8))
            z.writestr("masks.npy", buf.getvalue())
            buf.seek(0), buf.truncate()
            np.save(buf, np.asarray([4000, 32, 32]))
            z.writestr("shape.npy", buf.getvalue())
    with pytest.raises(UadcError, match=r"golden_masks.npz: ValueError: masks: 512128 bytes inflated, more than the "
                                        r"golden images' masks take"):
        uadc.verify(int8, golden=loose)
    with np.load(fp32 / "golden_masks.npz") as z, zipfile.ZipFile(loose / "golden_masks.npz", "w",
                                                                 zipfile.ZIP_DEFLATED) as out:
        out.writestr("masks.npy", z.zip.read("masks.npy"))
        with io.BytesIO() as buf:   # its shape member a deflated million numbers
            np.save(buf, np.zeros(10 ** 6, np.int64))
            out.writestr("shape.npy", buf.getvalue())
    with pytest.raises(UadcError, match=r"golden_masks.npz: ValueError: shape: 8000128 bytes inflated, more than three "):
        uadc.verify(int8, golden=loose)
    (loose / "golden_masks.npz").write_bytes((fp32 / "golden_masks.npz").read_bytes())
    feeds = json.loads((fp32 / "golden_inputs.json").read_text())   # an .npz or a torch tensor in a feed
    with io.BytesIO() as buf:
        np.savez_compressed(buf, x=np.zeros((64, 3, 32, 32), np.float32))
        feeds[0]["image"]["array"] = base64.b64encode(buf.getvalue()).decode()
    legacy = json.loads(json.dumps(feeds))   # Polygraphy's older tags: the same decoder, unchecked
    legacy[0]["image"] = {"__polygraphy_encoded_ndarray": "polygraphy_serialized_json_type",
                          "array": feeds[0]["image"]["array"]}
    both = json.loads(json.dumps(legacy))    # a tensor under the older tag beside an array's current one
    both[0]["image"] = {**json.loads((fp32 / "golden_inputs.json").read_text())[0]["image"],
                        "__polygraphy_encoded_Tensor": "polygraphy_serialized_json_type", "tensor": "AA=="}
    for payload, why in ((feeds, "an array that is not a plain .npy"), (legacy, "an array that is not a plain .npy"),
                         (both, "a Tensor / ndarray payload"),
                         ([{"image": {"polygraphy_class": "LazyArray", "values": None}}], "a LazyArray payload"),
                         ([{"image": {"tensor": "AA==", "polygraphy_class": "Tensor"}}], "a Tensor payload")):
        (loose / "golden_inputs.json").write_text(json.dumps(payload))
        with pytest.raises(UadcError, match=f"golden_inputs.json: ValueError: {why}"):
            uadc.verify(int8, golden=loose)
    (loose / "golden_inputs.json").write_bytes((fp32 / "golden_inputs.json").read_bytes())
    assert uadc.verify(int8, golden=loose).figures
    linked = tmp_path / "linked"          # a golden set of links to its files still judges
    linked.mkdir()
    for f in fp32.iterdir():
        (linked / f.name).symlink_to(f)
    assert uadc.verify(int8, golden=linked).figures


def test_a_side_without_a_categorys_thresholds_is_named_in_the_notes(artifacts, tmp_path):
    """A side decided 'gray' at its global thresholds, reported as `source: artifact.json`, with no note.
    (A candidate without gray is refused now; a reference without it is judged, and named.)"""
    _, fp32, _ = artifacts
    from conftest import edited_artifact
    thresholds = json.loads((fp32 / "artifact.json").read_text())["thresholds"]
    del thresholds["categories"]["gray"]
    edited_artifact(fp32, tmp_path / "a", thresholds=thresholds, categories=["stripes"])
    a = tmp_path / "a"
    d = json.loads(CliRunner().invoke(main, ["diff", str(a), str(fp32), "--json", "-"]).stdout)
    assert d["thresholds"]["reference"]["gray"]["source"].startswith("artifact.json global")
    assert d["thresholds"]["reference"]["stripes"]["source"] == d["thresholds"]["candidate"]["gray"]["source"] == \
        "artifact.json"
    assert "the reference has no thresholds of its own for gray: decided at its global thresholds" in d["notes"]


def test_a_golden_set_of_another_recipe_is_named_in_the_notes(artifacts, tmp_path):
    """Every figure out of budget, "REGRESSION", and nothing said the golden set was another recipe's. Not
    refused: a copy of the recipe under another name (or with other verify budgets) is the same model."""
    _, fp32, int8 = artifacts
    from conftest import edited_artifact
    other = edited_artifact(int8, tmp_path / "other", recipe="tiny2", recipe_hash="0" * 16)
    meta = json.loads((int8 / "artifact.json").read_text())
    r = CliRunner().invoke(main, ["verify", str(other), "--golden", str(fp32), "--json", "-"])
    assert r.exit_code in (0, 1) and json.loads(r.stdout)["notes"][0] == (
        f"the golden set is recipe tiny's (hash {meta['recipe_hash']}), the artifact recipe tiny2's (hash "
        f"0000000000000000): if they are different models, the figures measure that difference (`uadc diff A B` "
        f"compares two models)")
    own = CliRunner().invoke(main, ["verify", str(int8), "--golden", str(fp32), "--json", "-"])
    assert not any("golden set is recipe" in n for n in json.loads(own.stdout)["notes"])


def test_usage_errors_exit_2(artifacts, tmp_path):
    _, fp32, _ = artifacts
    for args in (["verify", str(tmp_path / "missing")], ["verify", str(fp32), "--budget", "nope=1"],
                 ["verify", str(fp32), "--golden", str(tmp_path)], ["diff", str(fp32)]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, (args, r.output)


def test_report_paths_replace_only_earlier_reports_and_are_checked_before_the_work(artifacts, tmp_path, monkeypatch):
    """`--json ART/model.onnx` once overwrote the artifact's model with the report, after the work."""
    from uadc.pipeline import api
    _, fp32, int8 = artifacts
    model = int8 / "model.onnx"
    notes = tmp_path / "notes.md"
    notes.write_text("my notes")
    before = {f: f.read_bytes() for f in (model, notes)}
    calls = []
    monkeypatch.setattr(api, "verify", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(api, "diff", lambda *a, **k: calls.append(a))
    for cmd in (["verify", str(int8)], ["diff", str(fp32), str(int8)]):
        for out, why in ((["--json", str(model)], "was not written by uadc verify or diff"),
                         (["--markdown", str(notes)], "was not written by uadc verify or diff"),
                         (["--json", str(tmp_path)], "was not written by uadc verify or diff"),
                         (["--json", str(tmp_path / "x"), "--markdown", str(tmp_path / "x")], "name the same file"),
                         (["--json", str(tmp_path / "x"), "--markdown", str(tmp_path / "d" / ".." / "x")],
                          "name the same file"),   # the Markdown was written over the JSON, exit 0
                         (["--markdown", "-"], "the Markdown report is on stdout already"),
                         # a report beside the artifact's files: its next compile refused the folder
                         (["--json", str(int8 / "v.json")], f"--json {int8 / 'v.json'}: inside the artifact folder"),
                         # x/ missing: the check looked at nothing, then the writer made x/ and the path the model
                         (["--json", str(int8 / "x" / ".." / "model.onnx")], "'..' follows"),
                         # a folder asked for: a file named `new` was written (pathlib dropped the '/')
                         (["--json", str(tmp_path / "new") + "/"], "new/ names a folder (it ends in '/', '.' or '..'); "
                                                                   "give a file's path"),
                         (["--markdown", str(tmp_path / "new") + "/"], "names a folder"),
                         (["--json", str(tmp_path / "new") + "/."], "names a folder")):
            r = CliRunner().invoke(main, cmd + out)
            assert r.exit_code == 2 and why in r.output, (cmd, out, r.output)
    assert not calls and {f: f.read_bytes() for f in before} == before and not (tmp_path / "new").exists()
    monkeypatch.undo()
    # an earlier report of either kind is replaced, and so is an empty file
    (tmp_path / "empty.json").touch()
    for _ in range(2):
        r = CliRunner().invoke(main, ["diff", str(fp32), str(fp32), "--normal-only", "--json", str(tmp_path / "v.json"),
                                      "--markdown", str(tmp_path / "v.md")])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify", str(fp32), "--normal-only", "--json", str(tmp_path / "v.json"),
                                  "--markdown", str(tmp_path / "empty.json")])
    assert r.exit_code == 0 and json.loads((tmp_path / "v.json").read_text())["kind"] == "verify", r.output


def test_a_run_that_stops_replaces_the_earlier_reports_with_its_error(artifacts, tmp_path):
    """After exit 2 the --json / --markdown files held the previous run's PASS, which a pipeline read."""
    _, fp32, _ = artifacts
    rep, md = tmp_path / "v.json", tmp_path / "v.md"
    r = CliRunner().invoke(main, ["verify", str(fp32), "--normal-only", "--json", str(rep), "--markdown", str(md)])
    assert r.exit_code == 0 and json.loads(rep.read_text())["passed"], r.output
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "gone"), "--json", str(rep), "--markdown", str(md)])
    doc = json.loads(rep.read_text())
    assert r.exit_code == 2 and doc["exit_code"] == 2 and not doc["passed"] and "gone" in doc["error"], r.output
    assert md.read_text().startswith("# uadc verify: ERROR") and "gone" in md.read_text()
    r = CliRunner().invoke(main, ["diff", str(fp32), str(fp32), "--normal-only", "--json", str(rep)])
    assert r.exit_code == 0 and json.loads(rep.read_text())["kind"] == "diff", r.output   # still replaceable


def test_a_model_whose_map_has_another_shape_is_one_line_and_a_crash_replaces_the_reports(artifacts, tmp_path,
                                                                                          monkeypatch):
    """A candidate with a 2x smaller anomaly map ended in an AttributeError traceback (exit 1), and the
    --json / --markdown files kept the previous run's PASS."""
    from onnx import helper
    _, fp32, _ = artifacts
    m = onnx.load(str(fp32 / "model.onnx"))
    for node in m.graph.node:
        node.output[:] = ["am_raw" if o == "anomaly_map" else o for o in node.output]
        node.input[:] = ["am_raw" if i == "anomaly_map" else i for i in node.input]
    m.graph.node.append(helper.make_node("MaxPool", ["am_raw"], ["anomaly_map"], kernel_shape=[2, 2], strides=[2, 2]))
    out = next(o for o in m.graph.output if o.name == "anomaly_map")
    for d in out.type.tensor_type.shape.dim[2:]:
        d.Clear()
        d.dim_param = "half"
    onnx.save(m, str(tmp_path / "small_map.onnx"))
    rep, md = tmp_path / "v.json", tmp_path / "v.md"
    r = CliRunner().invoke(main, ["verify", str(fp32), "--normal-only", "--json", str(rep), "--markdown", str(md)])
    assert r.exit_code == 0 and json.loads(rep.read_text())["passed"], r.output
    for args in (["verify", str(tmp_path / "small_map.onnx"), "--golden", str(fp32)],
                 ["diff", str(fp32), str(tmp_path / "small_map.onnx")]):
        r = CliRunner().invoke(main, [*args, "--json", str(rep), "--markdown", str(md)])
        assert r.exit_code == 2 and "output anomaly_map has other shapes" in r.output, r.output
        assert "Traceback" not in r.output and not json.loads(rep.read_text())["passed"]
    r = CliRunner().invoke(main, ["verify", str(fp32), "--normal-only", "--json", str(rep), "--markdown", str(md)])
    assert r.exit_code == 0 and json.loads(rep.read_text())["passed"], r.output
    from uadc.pipeline import api

    def crash(*args, **kwargs):
        raise AttributeError("'bool' object has no attribute 'max_absdiff'")

    monkeypatch.setattr(api, "verify", crash)   # a bug: its traceback stands, the old PASS does not
    r = CliRunner().invoke(main, ["verify", str(fp32), "--json", str(rep), "--markdown", str(md)])
    assert isinstance(r.exception, AttributeError)
    assert json.loads(rep.read_text())["error"] == "internal error: AttributeError: 'bool' object has no attribute " \
                                                  "'max_absdiff'" and md.read_text().startswith("# uadc verify: ERROR")


def test_a_category_without_validation_normals_passes_its_own_gate(tmp_path):
    """The golden set fitted that category a threshold of its own on the training normals it drew, the
    artifact decides it at its global one: an FP32 artifact failed its own gate on identical outputs."""
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import make_tiny_recipe
    recipe = make_tiny_recipe(tmp_path, "one", epochs=1)
    for f in sorted((tmp_path / "data" / "gray" / "train" / "good").iterdir())[1:]:
        f.unlink()
    art = tmp_path / "art"
    uadc.train(recipe, artifacts=art)
    fp32 = uadc.compile(recipe, "ort-cpu-fp32", evaluate=False, latency_runs=1, artifacts=art).path
    res = uadc.verify(fp32)
    assert res.passed, res.failures
    thr = res.to_dict()["thresholds"]
    assert thr["candidate"]["gray"]["source"].startswith("artifact.json global")
    assert thr["reference"]["gray"]["image"] == thr["reference"]["global"]["image"]
    assert thr["reference"]["gray"]["n"] == 0   # the global spread is not this category's own (it said 5 normals)


def test_an_fp32_artifact_decides_as_its_reference_with_more_validation_normals_than_the_golden_set(tmp_path,
                                                                                                  tiny_data):
    """The reference's thresholds were fitted on the golden set's normals (at most verify.golden_normals a category),
    the artifact's on every validation normal: an FP32 artifact failed its own gate on identical outputs
    (decision_agreement 0.92), or passed with map_dice 0.977 for 1.0."""
    from conftest import write_recipe
    recipe = write_recipe(tmp_path / "gn.yaml", tiny_data, data={"val_fraction": 0.5},
                          train={"epochs": 1, "threads": 1}, verify={"golden_normals": 2})
    art = tmp_path / "art"
    uadc.train(recipe, artifacts=art)
    fp32 = uadc.compile(recipe, "ort-cpu-fp32", evaluate=False, latency_runs=1, artifacts=art).path
    res = uadc.verify(fp32)
    assert res.polygraphy["max_abs"] == 0 and res.passed, res.failures
    for name in ("decision_agreement", "map_dice", "map_iou"):
        assert res.figure(name).value == 1.0, (name, res.figure(name))
    ref, cand = res.thresholds["reference"], res.thresholds["candidate"]
    assert all(ref[c]["image"] == pytest.approx(cand[c]["image"], rel=1e-6) for c in ("stripes", "gray", "global"))
    assert ref["stripes"]["n"] == 8 and res.images["normal"] == 4   # the validation normals, not the golden two


def test_models_that_take_another_input_are_refused_before_any_work(artifacts, tmp_path):
    """A 128 px artifact diffed against a 256 px one ended in Polygraphy's shape-error traceback."""
    from uadc.export.onnx_export import get_metadata, set_metadata
    _, fp32, int8 = artifacts
    m = onnx.load(str(int8 / "model.onnx"))
    meta = get_metadata(m)
    for name, change, why in (("big", {"image_size": 96}, "takes 64 px inputs and .* 96 px"),
                              ("norm", {"normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}}, "normalise inputs differently")):
        set_metadata(m, {**meta, **change})
        other = tmp_path / f"{name}.onnx"
        onnx.save(m, str(other))
        for args in (["diff", str(fp32), str(other)], ["diff", str(fp32), str(other), "--images", str(tmp_path)],
                     ["verify", str(other), "--golden", str(fp32)]):
            r = CliRunner().invoke(main, args)
            assert r.exit_code == 2 and re.search(why, r.output) and "Traceback" not in r.output, (args, r.output)
    bare = onnx.load(str(int8 / "model.onnx"))   # no uadc metadata: its graph's input size is read
    del bare.metadata_props[:]
    for d in bare.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_value = 96
    onnx.save(bare, str(tmp_path / "bare96.onnx"))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "bare96.onnx"), "--golden", str(fp32)])
    assert r.exit_code == 2 and re.search("takes 64 px inputs and .* 96 px", r.output), r.output


def test_diff_int8_against_fp32_reports_every_figure(artifacts, tmp_path):
    _, fp32, int8 = artifacts
    res = uadc.diff(fp32, int8)
    assert isinstance(res, uadc.DiffResult) and res.kind == "diff"
    names = {f.name for f in res.figures if f.scope == "all"}
    assert names == set(RULES)
    assert set(res.categories) == {"stripes", "gray"}
    assert res.to_dict()["polygraphy"]["max_abs"] > 0  # INT8 differs from FP32 tensor-wise
    v = uadc.verify(int8, budgets={"spearman_min": -1})
    assert isinstance(v, uadc.VerifyResult) and v.budgets["spearman_min"] == -1
    # every Markdown row has its header's cells: `|x| <=` (score_shift) and a category "a|b" split rows
    res.categories = {"a|b" if c == "gray" else c: v for c, v in res.categories.items()}
    for table in re.findall(r"(?:^\|.*\n)+", res.to_markdown(), re.M):
        cells = [len(re.findall(r"(?<!\\)\|", row)) for row in table.splitlines()]
        assert len(set(cells)) == 1, table
    assert "| a\\|b |" in res.to_markdown() and "\\|x\\| <=" in res.to_markdown()


def test_a_golden_set_of_another_checkpoint_of_the_recipe_is_noted(artifacts, tmp_path):
    """Retrained (same recipe), its artifact verified against the old artifact's golden set failed with no hint."""
    recipe, fp32, _ = artifacts
    uadc.train(recipe, artifacts=tmp_path / "art", epochs=1)
    new = uadc.compile(recipe, "ort-cpu-fp32", evaluate=False, latency_runs=1, artifacts=tmp_path / "art").path
    notes = uadc.verify(new, golden=fp32).notes
    assert any(n.startswith("the golden set is of another checkpoint of recipe tiny than the artifact's") for n in notes)
    assert not any("another checkpoint" in n for n in uadc.verify(fp32).notes)


def test_diff_refuses_a_candidate_that_does_not_cover_the_images_categories(artifacts, tiny_data, tmp_path):
    """A stripes-only model diffed against the unified one was judged on gray too and called a REGRESSION."""
    from conftest import write_recipe
    recipe, fp32, _ = artifacts
    one = write_recipe(tmp_path / "one.yaml", tiny_data, train={"epochs": 1, "threads": 1}, data={
        "val_fraction": 0.25, "sources": [{"root": str(tiny_data), "categories": ["stripes"]}]})
    uadc.train(one, artifacts=tmp_path / "art")
    stripes = uadc.compile(one, "ort-cpu-fp32", evaluate=False, latency_runs=1, artifacts=tmp_path / "art").path
    with pytest.raises(UadcError, match=rf"^{re.escape(str(stripes))} covers stripes only; the images include gray, "
                                        r"which it was not trained on: pass --images"):
        uadc.diff(fp32, stripes)
    with pytest.raises(UadcError, match=r"covers stripes only; the images include gray"):   # another's golden set
        uadc.verify(stripes, golden=fp32)
    assert uadc.verify(stripes).images   # its own golden set: judged
    d = uadc.diff(fp32, stripes, images=[tiny_data / "stripes" / "test" / "good"])   # the shared category: judged
    assert set(d.categories) == {"stripes"}
    # images of a category A has no thresholds for: A decides them at global, and B did at its own gray ones
    # while the note said both decide at global
    d = uadc.diff(stripes, fp32, images=[tiny_data / "gray"])
    assert any("both sides decide them at the global thresholds" in n for n in d.notes), d.notes
    ours = json.loads((fp32 / "artifact.json").read_text())["thresholds"]
    cand = d.thresholds["candidate"]["gray"]
    assert cand["image"] == pytest.approx(ours["global"]["image"]["value"]) and cand["source"] != "artifact.json", cand
    # `uadc eval RECIPE --checkpoint ARTIFACT` scored gray under the stripes model's name, exit 0
    for given in (stripes, stripes / "model.onnx"):
        with pytest.raises(UadcError, match=r"was compiled for stripes; recipe \w+'s test data holds gray, which it "
                                            r"was not trained on"):
            uadc.evaluate(given, recipe)
    from uadc.config.recipe import load_recipe
    from uadc.pipeline.api import _check_compiled_for
    m = onnx.load(str(stripes / "model.onnx"))
    for bad in ('{"categories": 5}', '{"categories": [["x"]]}', "[" * 100000 + "]" * 100000):   # a traceback
        next(p for p in m.metadata_props if p.key == "uadc.deploy").value = bad
        onnx.save(m, str(tmp_path / "bad.onnx"))
        _check_compiled_for(tmp_path / "bad.onnx", "bad.onnx", {"gray": None}, load_recipe(recipe))   # judged as before


def test_verify_and_diff_on_an_image_folder(artifacts, tiny_data):
    _, fp32, int8 = artifacts
    folder = tiny_data / "stripes" / "test" / "good"
    v = uadc.verify(int8, images=[folder])
    assert v.images == {"user": len(list(folder.iterdir()))} and v.labelled is None
    # the FP32 artifact against its own reference on normal images: both sides decide at deployment
    # thresholds of the category the folder path names (not the reference at thresholds fitted on
    # these very images against the artifact at its artifact.json ones)
    own = uadc.verify(fp32, images=[folder])
    assert own.passed, own.failures
    assert set(own.categories) == {"stripes"} and own.thresholds["reference"]["stripes"]["source"] == "golden set"
    from uadc.pipeline.verify import load_image_dirs
    x, records, notes = load_image_dirs([folder], fp32 / "model.onnx", limit=2)
    assert len(x) == len(records) == 2 and notes == [f"--images {folder}: judged the first 2 of its "
                                                     f"{len(list(folder.iterdir()))} images (sorted by path)"]
    bare = uadc.diff(fp32 / "model.onnx", int8, images=[folder])
    assert bare.thresholds["candidate"] == bare.thresholds["reference"] and "no operating thresholds" in bare.notes[0]
    bare_b = uadc.diff(fp32, fp32 / "model.onnx", images=[folder])   # said its borrowed thresholds were its own
    assert all(t["source"] == "the reference's (none of its own)" for t in bare_b.thresholds["candidate"].values())
    assert "the candidate has no operating thresholds of its own (a bare model, or compiled without validation normals)" in " ".join(bare_b.notes)
    d = uadc.diff(fp32, fp32, images=[folder])
    assert d.passed and d.figure("spearman").value == pytest.approx(1.0)
    assert not any("no folder named after a category" in n for n in own.notes + d.notes)
    # a folder that names no category is judged at the global thresholds, and the report says so
    cam = tiny_data.parent / f"cam1-{os.getpid()}"
    shutil.copytree(folder, cam)
    try:
        v = uadc.verify(int8, images=[cam])
    finally:
        shutil.rmtree(cam)
    assert any(f"images under {cam.name} are in no folder named after a category" in n for n in v.notes)
    assert not any("has no thresholds of its own" in n for n in v.notes)   # the note above says it, once
    assert v.thresholds["candidate"][cam.name]["image"] == read_manifest(int8).thresholds.global_.image.value


def test_uadc_verify_is_callable_whatever_was_imported_first():
    code = "import uadc.verify.gate, uadc; assert callable(uadc.verify) and callable(uadc.diff)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_model_that_fails_as_it_runs_is_one_line(artifacts, tiny_data, tmp_path):
    """A bare ONNX whose node fails at run time gave ONNX Runtime's traceback, exit 1."""
    from onnx import TensorProto, helper
    _, fp32, _ = artifacts
    m = onnx.load(str(fp32 / "model.onnx"))
    size = m.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    g = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["bad"]), helper.make_node("ReduceSum", ["bad"], ["score"], keepdims=0),
         helper.make_node("Identity", ["image"], ["anomaly_map"])], "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 3, size, size]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([-1, 7], np.int64), "shape")])   # 3 x size^2 is no multiple of 7
    bad = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    bad.metadata_props.extend(m.metadata_props)
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    r = CliRunner().invoke(main, ["diff", str(fp32), str(tmp_path / "bad.onnx"), "--images", str(tiny_data / "gray" / "test")])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith(
        "error: a model could not run on the verification images:"), r.output


def test_an_edited_manifest_or_an_unlisted_golden_file_is_refused_by_the_gate_and_bundle(artifacts, tiny_data,
                                                                                        tmp_path):
    """verify / diff / bundle judged (and shipped) an artifact.json whose thresholds were edited, which
    predict refused; a reference model swapped in and struck from the manifest was used unchecked; bundle
    --force replaced a compiled artifact; a spread from 2 images was judged with the artifact's count."""
    _, fp32, int8 = artifacts
    edited = tmp_path / "edited"
    shutil.copytree(fp32, edited)
    meta = json.loads((edited / "artifact.json").read_text())
    meta["thresholds"]["categories"]["stripes"]["image"]["value"] *= 1.001
    (edited / "artifact.json").write_text(json.dumps(meta))
    said = "is not the model artifact.json was written for (its uadc.deploy metadata differs: thresholds)"
    for run in (lambda: uadc.verify(edited), lambda: uadc.diff(fp32, edited), lambda: uadc.diff(edited, fp32),
                lambda: uadc.bundle(edited, tmp_path / "b")):
        with pytest.raises(UadcError, match=re.escape(said)):
            run()
    swapped = tmp_path / "swapped"
    shutil.copytree(int8, swapped)
    meta = json.loads((swapped / "artifact.json").read_text())
    reference = json.loads((swapped / "golden.json").read_text()).get("reference_model", "model.onnx")
    del meta["files"][reference]
    (swapped / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(UadcError, match=f"{reference}: not listed in {swapped / 'artifact.json'}"):
        uadc.verify(swapped)
    with pytest.raises(UadcError, match="a compiled artifact, not a bundle; bundles replace only earlier bundles"):
        uadc.bundle(int8, edited, force=True)
    assert (edited / "golden.json").is_file()
    for marker, doc in (("sweep.json", {"cells": [], "pareto": [], "name": "s"}),   # it wiped every cell's artifact
                        ("compare.json", {"cells": [], "target": "ort-cpu-int8", "fp32": {}})):
        outputs = tmp_path / marker.split(".")[0]
        shutil.copytree(int8, outputs / "cells" / "a")
        (outputs / marker).write_text(json.dumps(doc))
        with pytest.raises(UadcError, match=r"a uadc output folder \(a sweep, a comparison, a QAT run\), not a bundle"):
            uadc.bundle(int8, outputs, force=True)
        assert (outputs / "cells" / "a" / "golden.json").is_file()
    two = tmp_path / "two" / "stripes"
    two.mkdir(parents=True)
    for f in sorted((tiny_data / "stripes" / "test" / "good").iterdir())[:2]:
        shutil.copy(f, two / f.name)
    d = uadc.diff(fp32, int8, images=[two.parent])
    assert d.thresholds["reference"]["stripes"]["n"] == 2


def test_the_gate_judges_each_categorys_drops_and_its_stored_budgets_with_images(artifacts, tiny_data, tmp_path,
                                                                                 monkeypatch):
    """Found by a review: one category losing 11 points of image AUROC passed (the overall drop is the mean over
    categories); `verify --images` judged at the default budgets, not those stored with the golden set; a folder
    without artifact.json (its golden budgets edited to pass anything) passed a constant model; a NaN candidate was
    exit 2, a usage error, where it is a regression."""
    from onnx import helper
    from uadc.verify.gate import judge_all
    _, fp32, int8 = artifacts
    lab = {"all": {"image_auroc_drop": 0.015}, "categories": {"a": {"image_auroc_drop": 0.11},
                                                               "b": {"image_auroc_drop": -0.08}}}
    figs = judge_all({"all": {}, "categories": {}}, lab, budgets({}), True)
    assert [(f.name, f.scope, f.passed) for f in figs] == [("image_auroc_drop", "all", True),
                                                             ("image_auroc_drop", "a", False),
                                                             ("image_auroc_drop", "b", True)]
    # the golden set's stored budgets reach the --images path
    import uadc.pipeline.verify as pv
    real = pv.read_golden

    def strict(path):
        g = real(path)
        g.meta["verify"] = {**g.meta["verify"], "spearman_min": 0.99, "map_dice_min": 0.95}
        return g
    monkeypatch.setattr(pv, "read_golden", strict)
    v = uadc.verify(int8, images=[tiny_data / "stripes" / "test" / "good"])
    assert v.budgets["spearman_min"] == 0.99 and v.budgets["map_dice_min"] == 0.95
    monkeypatch.setattr(pv, "read_golden", real)
    # a folder without artifact.json is no artifact; a golden set outside one lends no budgets
    loose = tmp_path / "loose"
    shutil.copytree(fp32, loose)
    (loose / "artifact.json").unlink()
    with pytest.raises(UadcError, match=r"loose has no artifact.json: not a uadc artifact folder"):
        uadc.verify(loose)
    for pair in ((loose, int8), (int8, loose)):   # diff read its golden budgets, labels and masks unchecked
        with pytest.raises(UadcError, match=r"loose has no artifact.json: not a uadc artifact folder \(`uadc verify "
                                            r"CANDIDATE --golden .*loose` judges against the golden set it holds\)$"):
            uadc.diff(*pair)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(loose / "model.onnx", bare / "model.onnx")
    with pytest.raises(UadcError, match=r"bare has no artifact.json: not a uadc artifact folder \(give its "
                                        r"model.onnx with --images\)$"):
        uadc.diff(bare, int8)
    v = uadc.verify(int8, golden=loose, budgets={"spearman_min": -1})
    assert any("is in no artifact folder (artifact.json): nothing checks its files" in n for n in v.notes)
    assert v.budgets["map_dice_min"] == budgets({})["map_dice_min"] and v.budgets["spearman_min"] == -1
    # a candidate whose scores are NaN: a regression, naming it
    m = onnx.load(str(fp32 / "model.onnx"))
    out = next(o for o in m.graph.output if o.name == "score")
    for n in m.graph.node:
        n.output[:] = ["score_raw" if x == "score" else x for x in n.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_c"))
    m.graph.node.append(helper.make_node("Mul", ["score_raw", "nan_c"], [out.name]))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    r = CliRunner().invoke(main, ["verify", str(tmp_path / "nan.onnx"), "--golden", str(fp32), "--json", "-",
                                  "--markdown", str(tmp_path / "nan.md")])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["exit_code"] == 1 and doc["passed"] is False
    assert doc["error"].startswith(f"REGRESSION: the candidate ({tmp_path / 'nan.onnx'}) produced non-finite")
    # its line is a REGRESSION line, as the README says (it was `error: REGRESSION: ...`: `^REGRESSION:` missed it)
    assert r.stderr.splitlines()[-1].startswith("REGRESSION: the candidate (") and "error: " not in r.stderr
    assert (tmp_path / "nan.md").read_text().startswith("# uadc verify: REGRESSION\n")
    with pytest.raises(uadc.NonFiniteOutputs) as caught:   # README's class: it was a plain UadcError subclass
        uadc.verify(tmp_path / "nan.onnx", golden=fp32)
    assert caught.value.exit_code == 1
    with pytest.raises(uadc.NonFiniteOutputs) as caught:   # the reference's NaN: a plain UadcError
        uadc.diff(tmp_path / "nan.onnx", fp32, images=[tiny_data / "gray" / "train" / "good"])
    assert caught.value.exit_code == 2 and "the reference" in str(caught.value)


def test_a_masks_folder_given_as_images_is_refused(artifacts, tiny_data):
    """`--images data/gray/ground_truth` judged the masks as normal images and passed."""
    _, fp32, _ = artifacts
    with pytest.raises(UadcError, match=r"ground_truth/ folder of masks; give a folder of images"):
        uadc.verify(fp32, images=[tiny_data / "gray" / "ground_truth"])


def test_images_with_normal_only_nested_folders_and_score_shift_agree_with_diff(artifacts, tiny_data):
    """`--images DIR --normal-only` was refused ("the golden set has no normal images"; --images are taken as
    normals); nested --images folders judged their common images twice; verify --images measured score_shift in
    the golden normals' spread, diff --images in the images', so the two disagreed on one pair; --normal-only said
    "no labelled images" of a golden set full of them."""
    _, fp32, int8 = artifacts
    good, test = tiny_data / "stripes" / "test" / "good", tiny_data / "stripes" / "test"
    n_good, n_test = len(list(good.iterdir())), len(list(test.rglob("*.png")))
    v = uadc.verify(int8, images=[good], normal_only=True)
    assert v.images == {"user": n_good}
    assert uadc.diff(fp32, int8, images=[good], normal_only=True).images == {"user": n_good}
    nested = uadc.verify(int8, images=[test, good])
    assert nested.images == {"user": n_test} and any(f"{n_good} of its images are under another" in n
                                                     for n in nested.notes)
    import os   # a hard-linked copy (cp -al) holds the same images
    linked = tiny_data.parent / f"linked-{os.getpid()}" / "stripes"
    if not linked.exists():
        shutil.copytree(good, linked, copy_function=os.link)
    assert uadc.verify(int8, images=[good, linked]).images == {"user": n_good}
    d = uadc.diff(fp32, int8, images=[test])
    assert uadc.verify(int8, images=[test]).figure("score_shift").value == pytest.approx(d.figure("score_shift").value)
    notes = uadc.verify(int8, normal_only=True).notes
    assert any(n.startswith("--normal-only: the labelled test images are left out") for n in notes), notes


def test_a_damaged_or_missing_model_is_said_as_predict_says_it(artifacts, tmp_path):
    """`diff` read a truncated model.onnx before its manifest ("not an ONNX model (DecodeError)"), and
    verify / diff called a folder whose model.onnx was deleted "not a uadc artifact folder"."""
    _, fp32, int8 = artifacts
    bad = tmp_path / "bad"
    shutil.copytree(int8, bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:1000])
    for call in (lambda: uadc.diff(fp32, bad), lambda: uadc.verify(bad)):
        with pytest.raises(UadcError, match=r"model.onnx does not match its sha256 in artifact.json \(changed after "
                                            r"compile\)"):
            call()
    (bad / "model.onnx").unlink()
    for call in (lambda: uadc.diff(fp32, bad), lambda: uadc.verify(bad)):
        with pytest.raises(UadcError, match=r"model.onnx is missing \(listed in artifact.json\)"):
            call()


def test_forged_metadata_and_json_nested_too_deeply_are_one_line(artifacts, tiny_data, tmp_path):
    """An edited `uadc.image_size` of 200000 made `diff --images` take 23 GB (0 blamed every image); JSON nested
    100k deep (a report.json, a model's metadata) was a RecursionError traceback, exit 1, where verify, diff
    and bundle read it."""
    from uadc.core.hashing import sha256_file
    from uadc.export.onnx_export import set_metadata
    _, fp32, _ = artifacts
    model = onnx.load(str(fp32 / "model.onnx"))
    set_metadata(model, {"image_size": 200000})
    onnx.save(model, str(tmp_path / "big.onnx"))
    with pytest.raises(UadcError, match=r"big.onnx: its metadata's image_size 200000 is not 1 to 8192$"):
        uadc.diff(tmp_path / "big.onnx", tmp_path / "big.onnx", images=tiny_data / "gray" / "train")
    for size, said in ((float("inf"), "inf is not a whole number"), (True, "True is not a whole number")):
        set_metadata(model, {"image_size": size})     # an OverflowError traceback; `true` read as 1
        onnx.save(model, str(tmp_path / "odd.onnx"))
        with pytest.raises(UadcError, match=f"odd.onnx: its metadata's image_size {said}$"):
            uadc.diff(tmp_path / "odd.onnx", tmp_path / "odd.onnx", images=tiny_data / "gray" / "train")
    deep = "[" * 100000 + "]" * 100000
    set_metadata(model, {"image_size": 64, "partitions": deep})
    onnx.save(model, str(tmp_path / "deep.onnx"))
    from uadc.export.onnx_export import get_metadata
    assert get_metadata(model)["partitions"] == deep   # kept as text, as any value that is no JSON
    forged = Path(shutil.copytree(fp32, tmp_path / "forged"))   # uadc.deploy nested deep, its sha256 updated
    m = onnx.load(str(forged / "model.onnx"))
    for p in m.metadata_props:
        if p.key == "uadc.deploy":
            p.value = deep
    onnx.save(m, str(forged / "model.onnx"))
    doc = json.loads((forged / "artifact.json").read_text())
    doc["files"]["model.onnx"] = sha256_file(forged / "model.onnx")
    (forged / "artifact.json").write_text(json.dumps(doc))
    with pytest.raises(UadcError):   # a RecursionError traceback, exit 1 (verify's "regression")
        uadc.Detector.load(forged)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text(deep)           # a user's folder: not uadc's, refused in one line
    with pytest.raises(UadcError, match="not written by|holds files|not uadc"):
        uadc.bundle(fp32, mine)


def test_golden_batches_hold_as_many_pixels_at_any_image_size():
    """Batches of 8 at every image size: a 1024-px compile peaked at 12 GB running the golden set through
    ONNX Runtime (the training itself at 9.3)."""
    from uadc.pipeline import verify as pv
    assert [pv.feed_batch(s) for s in (32, 256, 320, 512, 1024)] == [8, 8, 5, 2, 1]
