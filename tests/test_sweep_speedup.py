"""bench/sweep_speedup.py (cheap parts only; the timed runs are the bench itself): its cells are the
sweep's own plan, a sweep over several models is refused, and AUROC mismatches across runs are listed."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from bench import sweep_speedup as S
from uadc.pipeline.sweep.plan import make_plan
from uadc.pipeline.sweep.spec import load_sweep


def _sweep(tmp_path, recipe, **axes):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "axes": {
        "target": ["ort-cpu-fp32", "ort-cpu-int8"], "calibrator": ["minmax", "entropy"], **axes}}))
    return path


def test_dry_run_lists_the_sweeps_own_cells(tmp_path, recipe_factory):
    sweep = _sweep(tmp_path, recipe_factory())
    res = CliRunner().invoke(S.main, ["--sweep", str(sweep), "--dry-run", "--order", "c,a"])
    assert res.exit_code == 0, res.output
    ids = [c.id for c in make_plan(*load_sweep(sweep)).cells]
    assert len(ids) == 3 and [ln.strip() for ln in res.output.splitlines()[1:4]] == ids
    assert "--num-cpus 2" in res.output and "--presweep-worker" in res.output and "--sequential" not in res.output


def test_sweep_over_several_models_is_refused(tmp_path, recipe_factory):
    res = CliRunner().invoke(S.main, ["--sweep", str(_sweep(tmp_path, recipe_factory(), seed=[0, 1])), "--dry-run"])
    assert res.exit_code == 2 and "plans 2 models" in res.output


def test_mismatches_are_listed():
    same = {"x": {"status": "ok", "image_auroc": 0.9, "pixel_auroc": 0.8}}
    assert S.compare_cells(["x"], {"a": same, "b": same}) == []
    other = {"x": {"status": "ok", "image_auroc": 0.9, "pixel_auroc": 0.80001}}
    assert S.compare_cells(["x"], {"a": same, "c": other}) == [
        {"cell": "x", "figure": "pixel_auroc", "values": {"a": 0.8, "c": 0.80001}}]
    assert {m["figure"] for m in S.compare_cells(["x"], {"a": same, "b": {}})} == {"status", "image_auroc",
                                                                                  "pixel_auroc"}


def test_a_failed_run_gives_no_ratio():
    """Run a exited 2 with 0 of 1 cells (Ray not installed), and the table said `3.88× (target met)`, exit 0."""
    cell = {"status": "ok", "image_auroc": 0.9, "pixel_auroc": 0.8}
    runs = {"a": {"wall_seconds": 2.0, "rc": 2, "cells_ok": 0, "cells": {}},
            "b": {"wall_seconds": 7.8, "rc": 0, "cells_ok": 1, "cells": {"x": cell}}}
    result = {"runs": runs}
    S._summarize(result, ["x"])
    assert result["ratios"] == {} and result["failed_runs"] == ["a"]
    runs["a"].update(rc=0, cells_ok=1, cells={"x": cell})
    S._summarize(result, ["x"])
    assert result["ratios"] == {"b_over_a": 3.9} and result["failed_runs"] == []
