"""`uadc calibrators compare` as a sweep: the matrix files and per-cell folders it always wrote,
values read from the cells' reports, a rerun that reuses finished cells, one-line errors for a
bad calibrator or a float target, the caller's baseline reused, and the same matrix on Ray."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import write_recipe
from uadc.cli import main

HAS_RAY = importlib.util.find_spec("ray") is not None
CELL_KEYS = {"calibrator", "calib_data", "image_auroc", "pixel_auroc", "image_drop", "pixel_drop", "categories",
             "gate_passed"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    import uadc
    d = tmp_path_factory.mktemp("compare")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=d / "art")
    return d, recipe


def _compare(recipe, art, out, *extra):
    return CliRunner().invoke(main, ["-q", "calibrators", "compare", str(recipe), "--calibrators", "minmax,entropy",
                                     "--calib-data", "train,random-normal", "--artifacts", str(art),
                                     "--out", str(out), *extra])


def test_compare_writes_matrix_and_cell_folders_and_reuses_cells(trained, tmp_path):
    d, recipe = trained
    out = tmp_path / "cmp"
    res = _compare(recipe, d / "art", out)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "compare.json").read_text())
    assert set(result) == {"target", "quantized_partitions", "calib_samples", "fp32", "cells", "best", "failed"}
    assert result["failed"] == []
    assert list(result["cells"]) == ["minmax/train", "minmax/random-normal", "entropy/train",
                                     "entropy/random-normal"]
    assert (result["target"], result["quantized_partitions"], result["calib_samples"]) == (
        "ort-cpu-int8", ["student"], 8)
    for name, cell in result["cells"].items():
        assert set(cell) == CELL_KEYS
        report = json.loads((out / name.replace("/", "_") / "report.json").read_text())
        assert (report["calibrator"], report["calib_data"]) == tuple(name.split("/"))
        m = report["metrics"]
        assert cell["image_auroc"] == m["compiled"]["mean"]["image_auroc"]
        assert cell["pixel_drop"] == m["drop"]["mean"]["pixel_auroc"]
        assert result["fp32"]["image_auroc"] == m["fp32"]["mean"]["image_auroc"]
        assert cell["gate_passed"] is report["verification"]["gate"]["passed"]
    # the best cell passes its own regression gate where any cell does (one that failed it was recommended)
    best = min(result["cells"].values(), key=lambda c: (c["gate_passed"] is False, c["image_drop"], c["pixel_drop"]))
    assert result["best"] == f"{best['calibrator']}/{best['calib_data']}"
    md = (out / "compare.md").read_text()
    assert md.strip() == res.stdout.strip() and "| entropy |" in md and result["best"] in md
    assert "(change vs FP32;" in md and "drop vs FP32" not in md     # the cells show compiled - FP32
    # a rerun with the same inputs reuses every cell: no folder is compiled again, same matrix
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")}
    again = _compare(recipe, d / "art", out)
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/report.json")} == stamps
    assert json.loads((out / "compare.json").read_text()) == result


def test_compare_other_inputs_make_records_stale(trained, tmp_path, caplog):
    """Other inputs recompile the same folder, so the first inputs' record no longer names their result."""
    from uadc.pipeline import api
    d, recipe = trained
    run = lambda **kw: api.compare_calibrators(recipe, calibrators=["minmax"], sources=["train"],  # noqa: E731
                                               out=tmp_path / "o", artifacts=d / "art", **kw)
    first = run()
    report = tmp_path / "o" / "minmax_train" / "report.json"
    assert run(calib_samples=4).calib_samples == 4
    assert json.loads((report.parent / "calibration.json").read_text())["samples"] == 4
    stamp = report.stat().st_mtime_ns
    assert run().to_dict() == first.to_dict()
    assert report.stat().st_mtime_ns != stamp   # compiled again, not the 4-sample folder read back
    assert json.loads((report.parent / "calibration.json").read_text())["samples"] == 8
    assert len(list((tmp_path / "o" / "records").glob("*.json"))) == 1
    # another run's record written while this one waited for the folder: it survived, naming the folder this run
    # then filled, and a later rerun reused it (the other run's figures under its settings, exit 0)
    import threading
    import time

    from uadc.core.io import file_lock
    (theirs,) = (tmp_path / "o" / "records").glob("*.json")
    text = theirs.read_text()
    with file_lock(tmp_path / "o"):
        t = threading.Thread(target=lambda: run(calib_samples=4))
        with caplog.at_level("INFO", logger="uadc"):
            t.start()
            for _ in range(600):
                if "waiting for another uadc process writing" in caplog.text:
                    break
                time.sleep(0.1)
            theirs.write_text(text)
    t.join(300)
    assert [p.read_text() != text for p in (tmp_path / "o" / "records").glob("*.json")] == [True]


@pytest.mark.parametrize("extra, text", [
    (["--calibrators", "minmax,no-such-calibrator"], "unknown calibrator 'no-such-calibrator'"),
    (["--target", "ort-cpu-fp32"], "is not quantized"),
    (["--calibrators", "minmax,minmax"], "--calibrators: 'minmax,minmax' lists 'minmax' twice"),   # printed twice
    (["--calibrators", ""], "error: --calibrators: expected a comma-separated list without empty items"),   # which?
])
def test_compare_user_errors_are_one_line(trained, tmp_path, extra, text):
    d, recipe = trained
    res = CliRunner().invoke(main, ["calibrators", "compare", str(recipe), "--calib-data", "train",
                                    "--artifacts", str(d / "art"), "--out", str(tmp_path / "o"), *extra])
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.startswith("error: ") and text in out and len(out.splitlines()) == 1
    assert not (tmp_path / "o" / "compare.json").exists()


def test_a_checkpoint_of_other_settings_is_one_line_before_any_cell(trained, tmp_path, tiny_data):
    """Every cell ran to the same failure, then exit 2 with --out half-written (records, no matrix)."""
    d, _ = trained
    other = write_recipe(d / "tiny48.yaml", tiny_data, train={"epochs": 1, "threads": 1}, data={"image_size": 48})
    (d / "art" / "tiny48").mkdir()                               # the 64 px checkpoint where the 48 px recipe looks
    shutil.copy(d / "art" / "tiny" / "checkpoint.pt", d / "art" / "tiny48")
    try:
        res = _compare(other, d / "art", tmp_path / "o")
    finally:
        shutil.rmtree(d / "art" / "tiny48")
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.startswith("error: ") and len(out.splitlines()) == 1, out
    assert "data.image_size: 64" in out and f"recipe {other}" in out
    assert not (tmp_path / "o").exists()


def test_a_failing_cell_is_marked_and_the_others_still_compared(trained, tmp_path, monkeypatch):
    """One plug-in raising in its cells threw the whole comparison away (no compare.json), exit 2."""
    from uadc.calibrators import Calibrator, base
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))

    class Boom(Calibrator):
        def observe(self, x):
            pass

        def compute_range(self):
            raise RuntimeError("boom from plugin")
    base.register("qa-boom")(Boom)
    d, recipe = trained
    out = tmp_path / "cmp"
    res = CliRunner().invoke(main, ["-q", "calibrators", "compare", str(recipe), "--calibrators", "qa-boom,minmax",
                                    "--calib-data", "random-normal", "--artifacts", str(d / "art"), "--out", str(out)])
    assert res.exit_code == 1, res.output
    result = json.loads((out / "compare.json").read_text())
    assert result["failed"] == ["qa-boom/random-normal"] and result["best"] == "minmax/random-normal"
    assert "boom from plugin" in result["cells"]["qa-boom/random-normal"]["error"]
    assert "| qa-boom | failed: " in res.stdout and "| minmax | " in res.stdout


def test_compare_reuses_the_callers_baseline(trained, tmp_path):
    import uadc
    from uadc.pipeline.compare import compare_calibrators
    from uadc.pipeline.sweep import cells
    d, recipe = trained
    b = uadc.baseline(uadc.load_recipe(recipe), artifacts=d / "art")
    r = uadc.load_recipe(recipe)
    res = compare_calibrators(r, "ort-cpu-int8", ["minmax"], ["train"], None, ["student"], tmp_path / "o",
                              d / "art", baseline=b)
    assert "fp32_simplified" in b.__dict__   # the cell compiled from the caller's export
    assert res.fp32["image_auroc"] == b.fp32_metrics.mean["image_auroc"]
    assert not any(v is b for v in cells._BASELINES.values())   # not kept past the call


@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'uadc[sweep]')")
def test_compare_on_ray_matches_in_process(trained, tmp_path, capfd):
    from uadc.pipeline import api
    d, recipe = trained
    kw = {"calibrators": ["minmax"], "sources": ["random-normal"], "artifacts": d / "art"}
    local = api.compare_calibrators(recipe, out=tmp_path / "local", **kw)
    capfd.readouterr()
    on_ray = api.compare_calibrators(recipe, out=tmp_path / "ray", ray=True, **kw)
    # Ray's start-up notes ("Token authentication is enabled for this Ray cluster...") stay out of stderr
    assert "Ray" not in capfd.readouterr().err
    assert on_ray.cells == local.cells and on_ray.fp32 == local.fp32
    assert (tmp_path / "ray" / "minmax_random-normal" / "report.json").is_file()
    assert not list(tmp_path.rglob("*.uadc-tmp-*"))


def test_changes_print_without_a_negative_zero():
    """report.md and the calibrator / sweep tables printed a drop of -3e-7 as `-0.0000`."""
    from uadc.report.markdown import signed
    assert [signed(-3e-7), signed(3e-7), signed(-0.00051), signed(0.0123), signed(None), signed(None, "")] == \
        ["+0.0000", "+0.0000", "-0.0005", "+0.0123", "-", ""]


def test_verify_and_eval_tables_print_no_negative_zero():
    """`uadc diff` printed `pixel_auroc_drop | -0.0000` (and its per-category table, `uadc eval
    --one-class`'s comparison, the precision search's fidelity cost the same way)."""
    from uadc.evaluation.run import format_comparison
    from uadc.verify.gate import Figure, _row
    row = _row(Figure("pixel_auroc_drop", -3e-6, 0.02, "max", True))
    assert row == "| pixel_auroc_drop | 0.0000 | <= 0.02 | pass |"
    assert Figure("x", -4e-6, 0.5, "abs_max", True).describe().startswith("x = 0.0000")
    metrics = {"image_auroc": 0.91, "pixel_auroc": 0.9, "aupro": 0.8, "pixel_f1": 0.5}
    uni = {"categories": {"a": metrics}, "mean": metrics}
    close = {**metrics, "pixel_auroc": 0.9 + 2e-7}
    table = format_comparison(_Res(uni), _Res({"categories": {"a": close}, "mean": close}))
    assert "-0.0000" not in table and table.splitlines()[2].endswith("+0.0000")
    assert table.splitlines()[-1] == "delta = unified - one-class: positive where the unified model scores higher"


def test_a_tables_change_is_the_difference_of_the_figures_it_shows():
    """FP32 0.98424 and compiled 0.98426 printed as 0.9842 and 0.9843 with a drop of +0.0000 beside them
    (report.md, `uadc eval --one-class`'s comparison, `uadc calibrators`' matrix)."""
    from uadc.evaluation.run import format_comparison
    from uadc.pipeline.compare import render_matrix
    from uadc.report.markdown import _metrics_table
    f, c = {"image_auroc": 0.98424}, {"image_auroc": 0.98426}
    rows = _metrics_table({"fp32": {"categories": {"a": f}, "mean": f},
                           "compiled": {"categories": {"a": c}, "mean": c}, "drop": {}})
    assert rows[2] == "| a | image_auroc | 0.9842 | 0.9843 | -0.0001 |"
    uni, one = ({"categories": {"a": {**m, "pixel_auroc": m["image_auroc"]}}} for m in (f, c))
    assert format_comparison(_Res({**uni, "mean": {}}), _Res({**one, "mean": {}})).splitlines()[1].endswith(
        "0.9842     0.9843  -0.0001")
    cell = {"image_auroc": 0.98426, "pixel_auroc": None, "image_drop": -2e-5, "pixel_drop": None}
    matrix = render_matrix({"fp32": {**f, "pixel_auroc": None}, "target": "t", "quantized_partitions": ["student"],
                            "calib_samples": 8, "cells": {"minmax/train": cell}, "best": "minmax/train"},
                           ["minmax"], ["train"])
    assert "| minmax | 0.9843 / - (+0.0001 / -) |" in matrix


def test_a_matrix_whose_compiles_ran_no_gate_says_so():
    """On TensorRT targets (no gate at compile) compare.md read as if every cell had passed its gate."""
    from uadc.pipeline.compare import render_matrix
    cell = {"image_auroc": 0.9, "pixel_auroc": None, "image_drop": 0.05, "pixel_drop": None}
    doc = {"fp32": {"image_auroc": 0.95, "pixel_auroc": None}, "target": "trt-int8", "quantized_partitions": ["student"],
           "calib_samples": 8, "best": "minmax/train"}
    ungated = render_matrix({**doc, "cells": {"minmax/train": {**cell, "gate_passed": None}}}, ["minmax"], ["train"])
    gated = render_matrix({**doc, "target": "ort-cpu-int8", "cells": {"minmax/train": {**cell, "gate_passed": None}}},
                          ["minmax"], ["train"])   # the target's runtime decides: an ORT cell without a gate record
    assert "No regression gate ran at these compiles" in ungated and ungated.endswith("(smallest image-AUROC drop, "
                                                                                      "no gate ran): **minmax/train**")
    assert "No regression gate ran" not in gated and "passing its regression gate where any does" in gated


class _Res:
    def __init__(self, d):
        self.categories, self.mean = d["categories"], d["mean"]
