"""`uadc sweep`: plan (cells, shared trainings, keys), sequential and Ray execution on a tiny
synthetic recipe, resume from records, failed cells, exit codes, the install hint without Ray."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import write_recipe
from uadc.cli import main
from uadc.config.recipe import load_recipe
from uadc.core.errors import UadcError
from uadc.pipeline.sweep.plan import cell_key, make_plan
from uadc.pipeline.sweep.spec import load_sweep
from uadc.pipeline.sweep.store import record_path

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'uadc[sweep]')")
REPO = Path(__file__).resolve().parents[1]


def _sweep_file(folder: Path, recipe: Path, **extra) -> Path:
    doc = {"recipe": str(recipe), "axes": {"target": ["ort-cpu-fp32", "ort-cpu-int8"],
                                           "calibrator": ["minmax", "no-such-calibrator"]},
           "run": {"latency_runs": 3}, **extra}
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_data):
    """A tiny recipe (2 epochs) and its artifacts root; the sweep trains the model itself."""
    d = tmp_path_factory.mktemp("sweep")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 2, "threads": 1})
    return d, recipe


def test_plan_cells_collapse_float_targets_and_share_models(tiny):
    d, recipe = tiny
    spec, base, name = load_sweep(_sweep_file(d, recipe, axes={
        "target": ["ort-cpu-fp32", "ort-cpu-int8"], "calibrator": ["minmax", "entropy"],
        "calib_data": ["train", "mixed"], "seed": [0, 1]}))
    plan = make_plan(spec, base, name)
    # per seed: 1 fp32 cell (calibration axes do not apply) + 2 x 2 int8 cells; one model per seed
    assert len(plan.cells) == 2 * (1 + 4)
    assert sorted(m.name for m in plan.models.values()) == ["tiny", "tiny-seed1"]
    assert len({c.id for c in plan.cells}) == len(plan.cells)
    fp32 = [c for c in plan.cells if c.options["target"] == "ort-cpu-fp32"]
    assert all(c.options["calibrator"] is None for c in fp32)
    # precision auto over every partition: its id names them ("/8//auto" before)
    spec, base, name = load_sweep(_sweep_file(d, recipe, axes={"target": ["ort-cpu-int8"], "calibrator": ["minmax"],
                                                               "precision": ["auto"]}))
    ids = [c.id for c in make_plan(spec, base, name).cells]
    assert ids == ["tiny/ort-cpu-int8/minmax/random-normal/8/all/auto"]


def test_plan_fills_recipe_defaults_and_one_class_models(tiny):
    d, recipe = tiny
    spec, base, name = load_sweep(_sweep_file(d, recipe, axes={
        "target": ["ort-cpu-int8"], "calibrator": [None, "minmax"], "one_class": [True]}))
    plan = make_plan(spec, base, name)
    # the recipe's default calibrator is minmax: None and "minmax" are one cell per model
    assert sorted(m.name for m in plan.models.values()) == ["tiny-oc-gray", "tiny-oc-stripes"]
    assert len(plan.cells) == 2
    m = next(iter(plan.models.values()))
    assert [s["categories"] for s in m.cfg["data"]["sources"]] == [[m.category]]


def test_model_checkpoint_path_is_trainings(tiny, tmp_path):
    from uadc.training.checkpoint import checkpoint_path
    d, recipe = tiny
    spec, base, name = load_sweep(_sweep_file(d, recipe, axes={"image_size": [48]}))
    for m in make_plan(spec, base, name).models.values():
        assert m.checkpoint(tmp_path) == checkpoint_path(m.recipe(), tmp_path)
        assert m.name == "tiny-48px"


def test_cell_key_follows_inputs(tiny):
    d, recipe = tiny
    spec, base, name = load_sweep(_sweep_file(d, recipe))
    plan = make_plan(spec, base, name)
    a, b = plan.cells[1], plan.cells[2]
    model = plan.models[a.model]
    assert cell_key(a, model, "x", spec.run) == cell_key(a, model, "x", spec.run)
    assert cell_key(a, model, "x", spec.run) != cell_key(a, model, "y", spec.run)   # another checkpoint
    assert cell_key(a, model, "x", spec.run) != cell_key(b, model, "x", spec.run)   # another option


@pytest.mark.parametrize("doc, msg", [
    ({"axes": {}}, "exactly one of 'recipe' or 'recipes'"),
    ({"recipe": "r.yaml", "axes": {"calibratr": ["minmax"]}}, "axes.calibratr: unknown key"),
    ({"recipe": "r.yaml", "axes": {"target": []}}, "axes.target: must not be empty"),
    ({"recipes": [{"overrides": {}}]}, r"recipes\[0\]\.path: required"),     # "recipes[0].RecipeEntry.path"
    # failed in each cell after the FP32 baseline, two rows with one label
    ({"recipe": "r.yaml", "axes": {"calib_samples": [0, -1]}}, r"axes.calib_samples\[0\]: 0 is below the minimum 1"),
    ({"recipe": "r.yaml", "axes": {"target": "ort-cpu-int8"}}, "axes.target: expected list, got 'ort-cpu-int8'"),
    ({"recipe": "r.yaml", "run": {"latency_runs": -1}}, "run.latency_runs: -1 is below the minimum 1"),
    ({"recipe": "r.yaml", "axes": {"target": ["ort-cpu-fp32", "ort-cpu-fp32"]}},   # one cell twice in the table
     "axes: target lists 'ort-cpu-fp32' twice"),
    ({"recipe": "r.yaml", "axes": {"quantize": [["student"], ["student"]]}}, r"axes: quantize lists \['student'\] twice"),
    ({"recipe": "r.yaml", "axes": {"quantize": [["student", "teacher"], ["teacher", "student"]]}},   # one cell, run twice
     r"axes: quantize lists \['student', 'teacher'\] twice (the same partitions in another order)"),
    # converted where a recipe refuses them: seed 1 (a new model), False, 8, 64
    ({"recipe": "r.yaml", "axes": {"seed": [True]}}, r"axes.seed\[0\]: expected int, got true"),
    ({"recipe": "r.yaml", "axes": {"one_class": ["no"]}}, r"axes.one_class\[0\]: expected bool, got 'no'"),
    ({"recipe": "r.yaml", "axes": {"calib_samples": ["8"]}}, r"axes.calib_samples\[0\]: expected int, got '8'"),
    ({"recipe": "r.yaml", "run": {"evaluate": "off"}}, r"run.evaluate: expected bool, got 'off'"),
    ({"recipe": "r.yaml", "axes": {"quantize": [[]]}}, r"axes.quantize\[0\]: must not be empty"),   # a failed cell
    ({"recipe": "r.yaml", "axes": {"quantize": [["student", "student"]]}},   # a trained model, then a failed cell
     r"axes: quantize\[0\] lists 'student' twice"),
    # the sweep's folder under <artifacts>/sweeps/: a newline made two lines of every listing
    ({"name": "a\nb", "recipe": "r.yaml", "axes": {"target": ["ort-cpu-fp32"]}}, r"name 'a\\nb' is not a plain folder name"),
    ({"name": " grid", "recipe": "r.yaml"}, r"name ' grid' is not a plain folder name .* space at either end"),
    # the file's stem was used, or the sweep file's own folder read as the recipe ("a folder, not a YAML file")
    ({"name": "", "recipe": "r.yaml"}, "name: must not be empty"),
    ({"recipe": ""}, "recipe: must not be empty"),
    ({"recipes": [{"path": ""}]}, r"recipes\[0\]\.path: must not be empty"),
    ({"recipes": [""]}, r"recipes\[0\]: must not be empty"),   # said "expected a mapping, got ''"
])
def test_bad_sweep_file_is_one_line_error(tmp_path, doc, msg):
    """Worded as recipe errors are (pydantic's own "List should have at least 1 item after validation" before)."""
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(UadcError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_sweep(p)
    with pytest.raises(UadcError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        load_sweep(doc)   # a dict (the API) is held to the same rules
    odd = tmp_path / "c\nd.yaml"   # a newline in the file's name read as a space
    odd.write_text(yaml.safe_dump(doc))
    with pytest.raises(UadcError, match=r"^\S+/c\\x0ad\.yaml: "):
        load_sweep(odd)


@pytest.mark.parametrize("axes, msg", [
    ({"target": ["ort-cpu-fp32", "ort-cpu-int9"]}, "axes.target: unknown target 'ort-cpu-int9'; expected one of ort-cpu-fp32"),
    ({"calib_data": ["training"]}, "axes.calib_data: unknown calib_data 'training'"),
    ({"quantize": [["student", "techer"]]}, "axes.quantize: unknown quantize 'techer'"),
    # read as the recipe's own mistake
    ({"image_size": [64, 0]}, "axes.image_size 0: data.image_size: 0 is below the minimum 32"),
])
def test_misspelt_names_stop_the_sweep_before_any_work(tiny, axes, msg):
    """A misspelt target ran every cell of it to a failure (exit 1 after the work); now exit 2 first."""
    d, recipe = tiny
    spec, base, name = load_sweep(_sweep_file(d, recipe, axes=axes))
    with pytest.raises(UadcError, match=msg):
        make_plan(spec, base, name)


def test_a_recipe_without_its_data_is_named_among_several(tiny, tmp_path):
    """With two recipes, a missing data root was one line naming a data.sources key, not which recipe."""
    from uadc.pipeline.sweep.run import run_sweep
    d, recipe = tiny
    doc = yaml.safe_load(recipe.read_text())
    doc.update(name="nodata", data={**doc["data"], "sources": [{"root": str(tmp_path / "gone"),
                                                                "categories": ["stripes"]}]})
    other = tmp_path / "nodata.yaml"
    other.write_text(yaml.safe_dump(doc))
    sweep = tmp_path / "two.yaml"
    sweep.write_text(yaml.safe_dump({"recipes": [str(recipe), str(other)], "axes": {"target": ["ort-cpu-fp32"]}}))
    with pytest.raises(UadcError, match=r"^sweep two: recipe nodata: data.sources\[0\].root: data folder not found"):
        run_sweep(sweep, out=tmp_path / "out", artifacts=tmp_path / "art", sequential=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "art" / "tiny").exists()   # before any work


def test_two_recipes_of_one_name_and_other_settings_are_refused(tiny, tmp_path):
    """Both trained into artifacts/tiny/: one model trained, and the second recipe's cells ran its checkpoint."""
    d, recipe = tiny
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "tiny.yaml"
    doc = yaml.safe_load(recipe.read_text())
    doc["train"]["epochs"] = 3
    other.write_text(yaml.safe_dump(doc))
    sweep = tmp_path / "dup.yaml"
    sweep.write_text(yaml.safe_dump({"recipes": [str(recipe), str(other)], "axes": {"target": ["ort-cpu-fp32"]}}))
    with pytest.raises(UadcError, match=r"^sweep dup: two recipes train as 'tiny' with different settings"):
        make_plan(*load_sweep(sweep))
    doc["name"] = "tiny3"
    other.write_text(yaml.safe_dump(doc))
    assert sorted(m.name for m in make_plan(*load_sweep(sweep)).models.values()) == ["tiny", "tiny3"]


@pytest.mark.parametrize("extra, msg", [
    ({"overrides": {"compile": {"calib_sampls": 8}}}, "sweep grid: overrides: compile.calib_sampls: unknown key"),
    ({"overrides": {"compile.calib_samples": 8}}, "sweep grid: overrides: 'compile.calib_samples': write it nested, "
                                                  "{compile: {calib_samples: ...}}"),   # "unknown key" of a real one
])
def test_override_errors_say_they_come_from_the_sweep_file(tiny, tmp_path, extra, msg):
    d, recipe = tiny
    path = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]}, **extra)
    spec, base, name = load_sweep(path)
    with pytest.raises(UadcError, match="^" + re.escape(msg)):
        make_plan(spec, base, name)
    # the command names the file too: a sweep's `name: exp1` was all it said where the mistake was
    path.write_text(path.read_text() + "name: exp1\n")
    res = CliRunner().invoke(main, ["sweep", str(path), "--sequential", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith(f"error: {path}: sweep exp1: "), res.output


def test_sequential_sweep_records_failures_and_resumes(tiny, tmp_path):
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe)
    args = ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art"), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output   # one cell has an unknown calibrator
    table = json.loads((tmp_path / "o" / "sweep.json").read_text())
    status = {c["cell"]: (c["status"], c["error"]) for c in table["cells"]}
    assert len(status) == 3
    bad = [s for s in status.values() if s[0] == "failed"]
    assert len(bad) == 1 and bad[0][1].startswith("unknown calibrator 'no-such-calibrator'")
    # the precision shipped; a failed cell shipped none (its axis value, `target`, read as one)
    assert sorted(str(c["precision"]) for c in table["cells"]) == ["None", "fp32", "int8"]
    ok = [c for c in table["cells"] if c["status"] == "ok"]
    assert all(0 <= c["image_auroc"] <= 1 and c["latency_ms"] > 0 and c["model_bytes"] > 0 for c in ok)
    assert all((tmp_path / "o" / c["artifact"] / "report.json").is_file() for c in ok)
    assert all(record_path(tmp_path / "o", c["key"]).is_file() for c in table["cells"])
    for f in ("sweep.md", "sweep.csv", "pareto.png"):
        assert (tmp_path / "o" / f).stat().st_size > 0
    assert table["best"]["image_auroc"] in {c["cell"] for c in ok}
    first = (tmp_path / "o" / "sweep.csv").read_text()
    # rerun: finished cells are read back, only the failed one runs again; same table
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 1
    again = json.loads(res.stdout)
    assert (again["reused"], again["executed"], len(again["failed"]), again["trained"]) == (2, 1, 1, 0)
    assert again["failed"] == json.loads((tmp_path / "o" / "sweep.json").read_text())["failed"]   # int vs list
    assert again["cells"] == json.loads((tmp_path / "o" / "sweep.json").read_text())["cells"]   # named as there
    assert again["latency"] == json.loads((tmp_path / "o" / "sweep.json").read_text())["latency"]   # how it was timed
    assert (tmp_path / "o" / "sweep.csv").read_text() == first
    # a finished cell whose artifact folder was deleted is computed again
    import shutil
    shutil.rmtree(tmp_path / "o" / ok[0]["artifact"])
    again = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert (again["reused"], again["executed"]) == (1, 2)
    (tmp_path / "o" / ok[1]["artifact"] / "model.onnx").unlink()   # only its model gone: it was "reused"
    again = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert (again["reused"], again["executed"]) == (1, 2)
    assert (tmp_path / "o" / ok[1]["artifact"] / "model.onnx").is_file()
    # a record naming a folder outside the sweep's cells, or another target's cell, was reused as the cell's
    shutil.copytree(tmp_path / "o" / ok[0]["artifact"], tmp_path / "elsewhere")
    for rec, artifact in ((ok[0], str(tmp_path / "elsewhere")), (ok[1], ok[0]["artifact"])):
        doc = json.loads(record_path(tmp_path / "o", rec["key"]).read_text())
        record_path(tmp_path / "o", rec["key"]).write_text(json.dumps({**doc, "artifact": artifact}))
    again = json.loads(CliRunner().invoke(main, [*args, "--json"]).stdout)
    assert (again["reused"], again["executed"]) == (0, 3)


def test_a_rerun_reusing_every_cell_of_another_grid_redraws_the_plot(tiny, tmp_path):
    """A rerun whose cells were all reused kept pareto.png, though the last run had plotted another
    grid into the same folder: the plot showed cells the table beside it did not hold."""
    d, recipe = tiny
    out = tmp_path / "o"
    plots = []
    for targets in (["ort-cpu-fp32"], ["ort-cpu-fp32", "ort-cpu-int8"], ["ort-cpu-fp32"]):
        sweep = _sweep_file(tmp_path, recipe, axes={"target": targets, "calibrator": ["minmax"]})
        res = CliRunner().invoke(main, ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art"),
                                        "--out", str(out), "--json"])
        assert res.exit_code == 0, res.output
        plots.append((out / "pareto.png").read_bytes())
    assert json.loads(res.stdout)["executed"] == 0
    assert plots[2] != plots[1] and (out / "pareto.png").stat().st_mtime_ns <= (out / "sweep.json").stat().st_mtime_ns
    png, table = (out / "pareto.png").read_bytes(), (out / "sweep.json").read_text()
    assert CliRunner().invoke(main, ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art"),
                                     "--out", str(out)]).exit_code == 0
    assert (out / "pareto.png").read_bytes() == png and (out / "sweep.json").read_text() == table   # same grid: kept
    # a run stopped while it drew the plot had written the new sweep.json: its rerun kept the old plot
    import uadc.pipeline.sweep.table as table_module

    def stopped(*a, **k):
        raise KeyboardInterrupt
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32", "ort-cpu-int8"], "calibrator": ["minmax"]})
    args = ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art"), "--out", str(out)]
    real = table_module.write_pareto_png
    table_module.write_pareto_png = stopped
    try:
        assert CliRunner().invoke(main, args).exit_code == 130
    finally:
        table_module.write_pareto_png = real
    assert CliRunner().invoke(main, args).exit_code == 0 and (out / "pareto.png").read_bytes() != png
    # a plot that fails: the tables are still written (drawn first, it took them along), the stale plot removed
    (out / "sweep.json").unlink()

    def broken(*a, **k):
        raise RuntimeError("matplotlib")
    table_module.write_pareto_png = broken
    try:
        assert CliRunner().invoke(main, args).exit_code != 0
    finally:
        table_module.write_pareto_png = real
    assert (out / "sweep.json").is_file() and not (out / "pareto.png").exists()
    # nothing to plot (no evaluation): the last run's plot of other cells stayed beside the new table
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]}, run={"latency_runs": 2, "evaluate": False})
    res = CliRunner().invoke(main, ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art"),
                                    "--out", str(out), "--json"])
    assert res.exit_code == 0 and "pareto" not in json.loads(res.stdout)["files"], res.output
    assert not (out / "pareto.png").exists()


def test_a_grid_out_in_the_data_or_artifacts_through_a_file_is_refused_before_any_work(tiny, tmp_path, tiny_data):
    """The cells refused such an --out one by one after the FP32 baseline (exit 1), leaving records, tables and a
    lock file in the user's dataset; an --artifacts that is a file failed every cell and wrote a table of failures."""
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]})
    before = sorted(p.relative_to(tiny_data) for p in tiny_data.rglob("*"))
    inside = tiny_data / "gray" / "test" / "good" / "results"
    for args, said in ((["--artifacts", str(d / "art"), "--out", str(inside)], "inside the recipe's data folder"),
                       (["--artifacts", str(recipe), "--out", str(tmp_path / "o")], "not a folder")):
        res = CliRunner().invoke(main, ["-q", "sweep", str(sweep), "--sequential", *args])
        assert res.exit_code == 2 and said in res.output, res.output
    res = CliRunner().invoke(main, ["-q", "calibrators", "compare", str(recipe), "--artifacts", str(d / "art"),
                                    "--calibrators", "minmax", "--calib-data", "train", "--out", str(inside)])
    assert res.exit_code == 2 and "inside the recipe's data folder" in res.output, res.output
    assert sorted(p.relative_to(tiny_data) for p in tiny_data.rglob("*")) == before and not (tmp_path / "o").exists()


@needs_ray
def test_ray_sweep_matches_sequential(tiny, tmp_path):
    import ray
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32", "ort-cpu-int8"],
                                                "calibrator": ["minmax", "mse"]})
    from uadc.pipeline import api
    seq = api.sweep(sweep, artifacts=d / "art", out=tmp_path / "seq", sequential=True)
    import signal
    from uadc.core.process import signal_stack_kept
    on_sigterm = signal.getsignal(signal.SIGTERM)   # ray.init (this test's own) replaces it, and the signal stack
    with signal_stack_kept():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)   # never a `ray start` one
    try:
        on_ray = api.sweep(sweep, artifacts=d / "art", out=tmp_path / "ray")
        assert ray.is_initialized()   # a Ray the caller started is left running
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, on_sigterm)
    assert on_ray.ok and on_ray.executed == 3 and on_ray.trained == 0
    fields = ("cell", "status", "image_auroc", "pixel_auroc", "image_drop", "model_bytes")
    assert [[r[f] for f in fields] for r in on_ray.rows] == [[r[f] for f in fields] for r in seq.rows]
    assert not list(tmp_path.rglob("*.uadc-tmp-*"))


@needs_ray
def test_a_ray_uadc_starts_leaves_the_process_as_it_was(tiny, tmp_path, monkeypatch):
    """Ray sets environment variables (PYTHONBREAKPOINT, RAY_*), replaces sys.excepthook and seeds
    Python's random: after the sweep they are the caller's again. An address Ray cannot parse is one line."""
    import os
    import random
    from uadc.pipeline import api
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]})
    with pytest.raises(UadcError, match="cannot connect to the Ray cluster at nonsense"):   # a raw ValueError before
        api.sweep(sweep, artifacts=d / "art", out=tmp_path / "bad", address="nonsense")
    with pytest.raises(UadcError, match="address: expected a Ray address"):      # a TypeError inside ray.init
        api.sweep(sweep, artifacts=d / "art", out=tmp_path / "bad5", address=5)
    assert not (tmp_path / "bad5").exists()          # refused before the folder was made
    for kw, text in (({"address": "127.0.0.1:1"}, "address"), ({"num_cpus": 2}, "num_cpus")):   # were ignored
        with pytest.raises(UadcError, match=f"{text} .*sets up Ray; a sequential run uses none"):
            api.sweep(sweep, artifacts=d / "art", out=tmp_path / "seq", sequential=True, **kw)
    random.seed(3)
    here = tmp_path / "cwd"   # a module in the folder uadc runs in, named like a dependency: it ran in Ray's workers
    here.mkdir()
    (here / "onnxruntime.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\nraise ImportError('shadowed')\n")
    monkeypatch.chdir(here)
    # as a `ray job submit --working-dir` entrypoint: the job's package, which this local Ray cannot fetch
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip", '
                                                      '"py_modules": ["gcs://_ray_pkg_4567.zip"]}}')
    env, hook, state = dict(os.environ), sys.excepthook, random.getstate()
    import signal
    import warnings

    def mine(signum, frame):
        pass
    import faulthandler
    previous, filters, faults = signal.signal(signal.SIGTERM, mine), warnings.filters[:], faulthandler.is_enabled()
    faulthandler.disable()   # pytest turns it on; Ray's driver turned it on for good
    try:   # Ray's own SIGTERM handler stayed: the caller's next SIGTERM ended the process
        assert api.sweep(sweep, artifacts=d / "art", out=tmp_path / "own", num_cpus=1).ok
        assert signal.getsignal(signal.SIGTERM) is mine and warnings.filters == filters
        assert not faulthandler.is_enabled()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if faults:
            faulthandler.enable(file=sys.__stderr__)
    assert dict(os.environ) == env and sys.excepthook is hook and random.getstate() == state
    assert not (tmp_path / "ran").exists()


@needs_ray
@pytest.mark.parametrize("run, said", [({"threads": 3}, "run.threads: each cell asks for 3 CPUs, but no Ray node "
                                        "has more than 2; lower run.threads or raise --num-cpus"),
                                       ({"gpus": 1}, "run.gpus: each cell asks for 1 GPUs, but no Ray node has more "
                                        "than 0; this machine has none Ray can use: set run.gpus: 0")])
def test_a_cell_asking_more_than_the_local_ray_has_is_refused_not_a_hang(tiny, tmp_path, run, said):
    """run.threads above the local Ray's CPUs (or run.gpus without a GPU) waited for ever, printing nothing."""
    from uadc.pipeline import api
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]}, run={"latency_runs": 3, **run})
    with pytest.raises(UadcError, match="^" + re.escape(said) + "$"):
        api.sweep(sweep, artifacts=d / "art", out=tmp_path / "o", num_cpus=2)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.json"))


def test_best_cells_and_the_front_skip_gate_failures_and_emulated_latencies():
    """An emulated TensorRT latency (ONNX Runtime on the CPU) was ranked with real ones, and a cell
    failing its own regression gate could be named best; neither was marked in sweep.md."""
    from uadc.pipeline.sweep.table import best_cells, pareto_front, render_markdown
    def row(cell, auroc, ms, **kw):
        return {"cell": cell, "status": "ok", "image_auroc": auroc, "pixel_auroc": auroc, "latency_ms": ms,
                "model_bytes": 10, "compile_seconds": 1.0, "image_drop": 0.0, "pixel_drop": 0.0, "decision_agreement": 1.0,
                "speedup_vs_fp32": 1.0, "gate_passed": True, "emulated": False, **kw}
    rows = [row("fp32", 0.90, 2.0), row("int8", 0.89, 1.0), row("trt", 0.89, 0.3, emulated=True, gate_passed=None),
            row("bad", 0.99, 0.5, gate_passed=False)]
    best = best_cells(rows)
    assert best["image_auroc"] == "fp32" and best["latency"] == "int8"
    assert pareto_front(rows) == ["fp32", "int8"]
    md = render_markdown("g", rows, best, pareto_front(rows))
    timed = render_markdown("g", rows, best, pareto_front(rows), {"threads": 2, "runs": 10, "warmup": 5})
    assert "latency p50 at batch 1, 2 threads, 10 timed runs after 5 warm-up; speed-up" in timed
    assert "| trt | ok |" in md and "| 0.30* |" in md and "| bad | ok, REGRESSION |" in md
    assert "*: emulated by ONNX Runtime" in md and "never a best cell" in md
    # "x FP32" read as the README's latency ratios (0.37 "x FP32": faster), for a cell 2.7 times slower
    assert "| speed-up vs ORT FP32 |" in md and "speed-up = ORT FP32's p50 / the cell's (below 1: slower)" in md
    # a one-class cell (its own category's figures) beat the unified mean over every category
    oc = [row("tiny-oc-a/fp32", 0.999, 0.1, category="a"), row("tiny-oc-b/fp32", 0.95, 0.1, category="b")]
    assert best_cells(rows + oc)["image_auroc"] == "fp32" and "tiny-oc-a/fp32" not in pareto_front(rows + oc)
    assert best_cells(oc[:1])["image_auroc"] == "tiny-oc-a/fp32" and best_cells(oc)["image_auroc"] is None
    assert "never ranked against cells judged on other images" in render_markdown("g", oc, {}, [])
    named_none = [row("x/fp32", 0.9, 0.1, category="none"), row("y/fp32", 0.99, 0.1, category="gray")]
    assert best_cells(named_none)["image_auroc"] is None   # a category called "none" was taken for the sentinel


def test_two_sweeps_into_one_folder_take_turns_and_the_second_reuses(tiny, tmp_path):
    """Both runs compiled every cell (the record check was not under a lock), and the sweep.json left
    behind disagreed with the cells' own report.json."""
    import subprocess
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32", "ort-cpu-int8"], "calibrator": ["minmax"]})
    cmd = [sys.executable, "-m", "uadc.cli", "sweep", str(sweep), "--artifacts", str(d / "art"), "--out",
           str(tmp_path / "o"), "--sequential", "--json"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in (0, 1)]
    docs = [json.loads(p.communicate(timeout=300)[0]) for p in runs]
    assert sorted((doc["executed"], doc["reused"]) for doc in docs) == [(0, 2), (2, 0)], docs
    table = json.loads((tmp_path / "o" / "sweep.json").read_text())
    # the tiny INT8 cell's own gate may fail on a CPU whose INT8 kernels round otherwise (AMX: gray's decision
    # agreement 0.90): the table must say what each cell's report says, and the FP32 cell passes everywhere
    assert table["cells"][0]["gate_passed"] is True and not any(r["emulated"] for r in table["cells"])
    for row in table["cells"]:
        report = json.loads((tmp_path / "o" / row["artifact"] / "report.json").read_text())
        assert row["latency_ms"] == report["latency_ms"]["compiled"]["p50"], (row, report["latency_ms"])
        assert row["gate_passed"] == report["verification"]["gate"]["passed"], row


@needs_ray
def test_sigterm_during_a_ray_sweep_exits_143_not_with_rays_abort(tiny, tmp_path):
    """Ray's SIGTERM handler, installed by ray.init, replaced uadc's: `docker stop` aborted the process
    (SIGABRT, a C++ stack dump) instead of exit 143 and its one line."""
    import signal
    import subprocess
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-int8"], "calibrator": ["minmax", "mse", "percentile",
                                                                                           "entropy"]})
    p = subprocess.Popen([sys.executable, "-m", "uadc.cli", "sweep", str(sweep), "--artifacts", str(d / "art"), "--out",
                          str(tmp_path / "o"), "--num-cpus", "2"], stderr=subprocess.PIPE, text=True, cwd=REPO)
    lines = []
    for line in p.stderr:   # the first cell done: Ray runs the others
        lines.append(line)
        if line.startswith("[1/"):
            p.send_signal(signal.SIGTERM)
            break
    rest = p.communicate(timeout=120)[1]
    assert p.returncode == 143, "".join(lines) + rest
    assert rest.strip().splitlines()[-1].startswith("terminated (SIGTERM)") and "SIGTERM received" not in rest


@needs_ray
def test_an_address_where_nothing_answers_is_one_line_not_a_hang(tiny, tmp_path):
    """`--address 127.0.0.1:1` hung for ever: Ray retries its connection and never raises."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]               # free, and closed once the block ends
    d, recipe = tiny
    res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, recipe)), "--artifacts", str(d / "art"),
                                    "--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{port}"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"error: cannot connect to the Ray cluster at 127.0.0.1:{port}: nothing answers " \
                                 f"there ({res.stderr.split('there (')[1].strip()}"
    assert not (tmp_path / "o").exists()   # a new --out Ray could not fill was left behind, empty
    # a port that answers but is no Ray (an HTTP server, Ray's dashboard): ray.init retried for ever
    import http.server
    import threading
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):   # the server's log lines would reach the command's stderr
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, recipe)), "--artifacts", str(d / "art"),
                                        "--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 2 and res.stderr.startswith(f"error: cannot connect to the Ray cluster at 127.0.0.1:"
                                                        f"{server.server_port}: something answers there but not as "
                                                        f"Ray's gRPC server does (it answered b'"), res.output
    # --num-cpus sizes a local Ray only: with a cluster's address it was silently ignored
    res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, recipe)), "--artifacts", str(d / "art"),
                                    "--out", str(tmp_path / "o"), "--address", "10.0.0.5:6379", "--num-cpus", "2"])
    assert res.exit_code == 2 and res.stderr.startswith("error: num_cpus (--num-cpus) sizes a Ray instance of this "
                                                        "run's own; the cluster at 10.0.0.5:6379"), res.output
    assert not (tmp_path / "o").exists()


def test_a_grid_of_millions_of_combinations_is_refused_before_planning(tiny, tmp_path):
    """A float target folds its calibration axes into one cell, so 300 calibrators x 4096 sample counts x 3
    sources planned 3.7 million combinations, for minutes, before any cell limit could be reached."""
    import time
    d, recipe = tiny
    axes = {"target": ["ort-cpu-fp32"], "calibrator": [f"c{i}" for i in range(300)],
            "calib_samples": list(range(1, 4097)), "calib_data": ["train", "random-normal", "mixed"]}
    spec, base, name = load_sweep(_sweep_file(tmp_path, recipe, axes=axes))
    t0 = time.perf_counter()
    with pytest.raises(UadcError, match=r"^sweep .*: 3686400 combinations of recipes and axis values \(at most 100000;"):
        make_plan(spec, base, name)
    assert time.perf_counter() - t0 < 10


def test_without_ray_one_line_install_hint(tiny, tmp_path, monkeypatch):
    d, recipe = tiny
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    res = CliRunner().invoke(main, ["sweep", str(_sweep_file(tmp_path, recipe)), "--artifacts", str(d / "art")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "pip install 'uadc[sweep]'" in res.stderr


def test_example_sweep_files_are_valid():
    files = sorted((REPO / "sweeps").glob("*.yaml"))
    assert files
    for f in files:
        spec, base, name = load_sweep(f)
        assert len(make_plan(spec, base, name).cells) >= 1
        with pytest.raises(UadcError, match=r": a sweep file \(its (recipe|recipes) and axes keys\), not a recipe: run it "
                                            r"with `uadc sweep "):   # "recipe: unknown key", as if mistyped
            load_recipe(f)


@pytest.mark.parametrize("one_class", [False, True])
def test_a_sweep_names_category_folders_laid_out_otherwise(tiny_data, tmp_path, one_class, caplog):
    """Only data preparation said it: a sweep on Ray (its cells' lines reach no terminal) and a one-class sweep
    (its cells name their categories) said nothing of a `Train/` folder left out."""
    shutil.copytree(tiny_data, tmp_path / "data")
    (tmp_path / "data" / "Bad" / "Train" / "good").mkdir(parents=True)
    recipes = [write_recipe(tmp_path / f"{n}.yaml", tmp_path / "data", data={"sources": [{"root": str(tmp_path / "data")}]},
                            train={"epochs": i + 1}) for i, n in enumerate(("r", "r2"))]   # one data root: said once
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"recipes": [str(r) for r in recipes],
                                                     "axes": {"target": ["ort-cpu-fp32"], "one_class": [one_class]}}))
    with caplog.at_level("WARNING", logger="uadc"):
        make_plan(*load_sweep(tmp_path / "s.yaml"))
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path / 'data' / 'Bad'} has Train/ but no train/good/: "
                                                        f"left out (uadc reads <category>/train/good/*.png: rename "
                                                        f"the folders so)"]


def test_the_keys_that_mark_a_sweep_file_are_a_sweep_files_only(tmp_path):
    from uadc.config.packaged import SWEEP_FILE_KEYS
    from uadc.config.recipe import RecipeConfig
    from uadc.pipeline.sweep.spec import SweepSpec
    assert set(SWEEP_FILE_KEYS) <= set(SweepSpec.model_fields) - set(RecipeConfig.model_fields)
    assert set(SweepSpec.model_fields) & set(RecipeConfig.model_fields) == {"name"}   # the one key of both
    (tmp_path / "my sweep.yaml").write_text("name: g\nrecipe: r.yaml\naxes: {target: [ort-cpu-fp32]}\n")
    with pytest.raises(UadcError, match=r"run it with `uadc sweep '.*/my sweep.yaml'`"):   # pasted, it split in two
        load_recipe(tmp_path / "my sweep.yaml")
    (tmp_path / "r.yaml").write_text("data: {sources: [{root: d}]}\nrecipe: tiny\n")   # a recipe's stray key
    with pytest.raises(UadcError, match=r"r.yaml: recipe: unknown key"):   # not "a sweep file ... run uadc sweep"
        load_recipe(tmp_path / "r.yaml")


def test_a_sweep_names_a_builtin_recipe_as_the_command_line_does(tmp_path):
    """`recipe: demo` in a sweep file said `recipe not found: <sweep folder>/demo`."""
    from uadc.config.packaged import packaged_recipe
    (tmp_path / "mine.yaml").write_text(packaged_recipe("demo").copy_text())
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"recipes": ["demo", "mine.yaml"], "axes": {"target": ["ort-cpu-fp32"]}}))
    spec, base, _ = load_sweep(p)
    assert [e.path for e in spec.recipe_entries(base)] == [str(packaged_recipe("demo").path.resolve()),
                                                         str(tmp_path / "mine.yaml")]
    p.write_text(yaml.safe_dump({"recipe": "demoo", "axes": {"target": ["ort-cpu-fp32"]}}))
    spec, base, _ = load_sweep(p)
    with pytest.raises(UadcError, match="recipe not found: demoo \\(not a file, nor a built-in recipe: .*demo"):
        spec.recipe_entries(base)


def test_a_grid_never_writes_into_a_folder_it_did_not_make(tiny, tmp_path):
    """`uadc sweep --out .` overwrote a user's sweep.md / sweep.csv, `--out ART/<recipe>` put cells beside the
    checkpoint, a symlink was written through; `calibrators compare --out` overwrote a user's compare.md."""
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.md").write_text("MY REPORT")
    (tmp_path / "art" / "tiny").mkdir(parents=True)
    (tmp_path / "art" / "tiny" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "lnk").symlink_to(tmp_path / "elsewhere")
    compiled = tmp_path / "compiled"   # every cell failed after the FP32 baseline, its records left in the artifact
    compiled.mkdir()
    (compiled / "artifact.json").write_text("{}")
    for out, said in ((mine, "a folder that no uadc grid wrote (it holds sweep.md)"),
                      (tmp_path / "art" / "tiny", "a recipe's artifact folder (it holds checkpoint.pt)"),
                      (tmp_path / "lnk", "a symlink; give the folder it points to"),
                      (compiled / "cmp", f"inside the artifact folder {compiled}; choose a folder outside it")):
        for args in (["sweep", str(sweep), "--sequential"], ["calibrators", "compare", str(recipe)]):
            res = CliRunner().invoke(main, [*args, "--out", str(out), "--artifacts", str(d / "art")])
            assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == f"error: --out {out}: {said}" + (
                "; choose an empty or new folder (nothing was changed)" if out == mine else
                "; choose another" if "artifact folder (it holds" in said else ""), res.output
    assert sorted(p.name for p in compiled.iterdir()) == ["artifact.json"]
    assert (mine / "sweep.md").read_text() == "MY REPORT" and not (tmp_path / "elsewhere").exists()


def test_a_recipe_listed_twice_is_refused_as_an_axis_value_is(tiny, tmp_path):
    """`recipes: [r.yaml, r.yaml]` merged into one model's cells without a word."""
    d, recipe = tiny
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump({"recipes": [str(recipe), str(recipe)], "axes": {"target": ["ort-cpu-fp32"]}}))
    spec, base, name = load_sweep(path)
    with pytest.raises(UadcError, match=f"^sweep twice: recipes: {recipe} is listed twice"):   # the sweep named
        make_plan(spec, base, name)
    path.write_text(yaml.safe_dump({"recipes": [str(recipe)], "axes": {"one_class": [True, True]}}))
    with pytest.raises(UadcError, match="axes: one_class lists true twice"):   # as the file writes it, not True
        load_sweep(path)
    from uadc.config.validation import short
    assert short([True, None, 2]) == "[true, null, 2]"   # inside a list too


def test_two_entries_of_one_model_with_other_compile_settings_are_refused(tiny, tmp_path):
    """A second entry of the same recipe with other compile / verify settings (per_channel false, a budget) was
    dropped: its cells were taken as duplicates of the first's, and `1 cells: 1 run` said nothing."""
    d, recipe = tiny
    path = tmp_path / "pc.yaml"
    path.write_text(yaml.safe_dump({"recipes": [str(recipe), {"path": str(recipe), "overrides": {
        "compile": {"per_channel": False}, "verify": {"decision_agreement_min": 0.5}}}],
        "axes": {"target": ["ort-cpu-int8"]}}))
    spec, base, name = load_sweep(path)
    with pytest.raises(UadcError, match=r"two recipe entries train the same model 'tiny' and differ in compile, "
                                        r"verify only, so one's cells would run the other's settings"):
        make_plan(spec, base, name)


def test_a_cell_key_follows_the_data_files(tmp_path, tiny_data):
    """Test images removed since: a rerun reused every finished cell with the old AUROC (sweep and compare)."""
    import shutil
    from uadc.pipeline.sweep.plan import cell_key
    shutil.copytree(tiny_data, tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "data", train={"epochs": 1, "threads": 1})

    def keys():
        spec, base, name = load_sweep(_sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-int8"]}))
        plan = make_plan(spec, base, name)
        return [cell_key(c, plan.models[c.model], "sha", plan.run) for c in plan.cells]
    before = keys()
    assert keys() == before
    next((tmp_path / "data" / "gray" / "test").glob("*/*.png")).unlink()
    assert keys() != before
    # a test folder linked from elsewhere is read by the loader: its files count too (os.walk did not follow it)
    blob = tmp_path / "data" / "stripes" / "test" / "blob"
    shutil.move(blob, tmp_path / "store")
    blob.symlink_to(tmp_path / "store")
    (blob / "loop").symlink_to(tmp_path / "data")   # a link back up is walked once, not forever
    linked = keys()
    next((tmp_path / "store").glob("*.png")).unlink()
    assert keys() != linked


def test_a_sweep_stopped_in_its_first_cell_resumes_in_its_folder(tiny, tmp_path, monkeypatch):
    """Stopped while its first cell ran, a sweep left only cells/ (and a cell's lock) in --out: its rerun, and a
    second sweep started meanwhile, refused the folder as "a folder that no uadc grid wrote"."""
    import uadc
    from uadc.pipeline.sweep import run as sweep_run
    d, recipe = tiny
    sweep = _sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]})

    def stopped(plan, out, artifacts, done, note):   # the first cell's lock taken, then Ctrl-C
        (out / "cells").mkdir()
        (out / "cells" / ".tiny__ort-cpu-fp32.lock").write_text("")
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep_run, "run_sequential", stopped)
    with pytest.raises(KeyboardInterrupt):
        uadc.sweep(sweep, sequential=True, artifacts=d / "art", out=tmp_path / "o")
    monkeypatch.undo()
    res = uadc.sweep(sweep, sequential=True, artifacts=d / "art", out=tmp_path / "o")
    assert [r["status"] for r in res.rows] == ["ok"]


def test_overrides_merge_nested_keys_and_read_paths_from_the_sweep_file(tiny, tmp_path, tiny_data):
    """`{model: {image_knn: {k: 3}}}` reset the kNN's other keys (weight 0: the kNN silently off);
    a relative `root` in the sweep file was read from the recipe's folder (another folder's data)."""
    d, recipe = tiny
    import shutil
    shutil.copytree(tiny_data, tmp_path / "mine")
    knn = {"weight": 0.5, "taps": ["blocks.3"], "k": 1}
    base_recipe = write_recipe(d / "knn.yaml", tiny_data, model={"image_knn": knn})
    over = {"model": {"image_knn": {"k": 3}}, "data": {"sources": [{"root": "mine", "categories": ["gray"]}]}}
    spec, base, name = load_sweep(_sweep_file(tmp_path, base_recipe, axes={"target": ["ort-cpu-fp32"]},
                                              overrides=over))
    model = next(iter(make_plan(spec, base, name).models.values())).recipe()
    assert model.model.image_knn.model_dump() == {**knn, "k": 3, "max_bank": model.model.image_knn.max_bank}
    assert Path(model.data.sources[0].root) == tmp_path / "mine"


def test_sweep_csv_cells_are_inert_and_no_best_cell_says_none():
    """A recipe named `=1+2` wrote a sweep.csv row a spreadsheet runs as a formula (predictions.csv made such
    names inert); with no eligible cell sweep.md said `Best cell per objective: ` and nothing."""
    from uadc.pipeline.sweep import table
    text = table._csv([{"cell": "=1+2/ort-cpu-fp32", "status": "ok"}])
    assert "\n'=1+2/ort-cpu-fp32,ok," in text
    assert "Best cell per objective: none" in table.render_markdown("s", [], {"image_auroc": None}, [])


@pytest.mark.parametrize("sequential", [True, pytest.param(False, marks=needs_ray)])
def test_a_checkpoint_of_other_training_settings_fails_its_cells_naming_them(tmp_path, tiny_data, sequential):
    """train.epochs edited in the recipe since its checkpoint was trained: the sweep ran every cell on the old
    model and reported them as fresh results ("3 run, 0 models trained"). On Ray the refusal then ended the
    whole sweep (exit 2, no table), where sequential fails that model's cells and runs the others."""
    import uadc
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, data={"image_size": 32}, train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=tmp_path / "art")
    recipe.write_text(recipe.read_text().replace("epochs: 1", "epochs: 2"))
    res = uadc.sweep({"recipe": str(recipe), "axes": {"target": ["ort-cpu-fp32"]}, "run": {"latency_runs": 1}},
                     artifacts=tmp_path / "art", out=tmp_path / "out", sequential=sequential)
    assert not res.ok and res.trained == 0
    (rec,) = json.loads((tmp_path / "out" / "sweep.json").read_text())["cells"]
    assert rec["status"] == "failed"
    assert "was trained with other training settings than r's recipe (train.epochs: 1 in the checkpoint, 2 in the " \
           "recipe); a sweep trains missing models only" in rec["error"]


def test_two_sweeps_missing_one_model_train_it_once(tmp_path, tiny_data, monkeypatch):
    """Two sweeps (other --out, one --artifacts) both trained the missing model; the second replaced the
    checkpoint that the first's records name. Now the second waits, then uses the first's checkpoint."""
    import shutil
    import threading
    import time
    import uadc
    from uadc.pipeline import api
    from uadc.pipeline.sweep import cells as C
    from uadc.pipeline.sweep.plan import make_plan
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, data={"image_size": 32}, train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=tmp_path / "ready")       # a real checkpoint the fake training puts in place
    spec, base, name = load_sweep(_sweep_file(tmp_path, recipe, axes={"target": ["ort-cpu-fp32"]}))
    (model,) = make_plan(spec, base, name).models.values()
    calls = []

    def slow_train(r, artifacts):
        calls.append(1)
        time.sleep(0.5)                                     # the other sweep arrives meanwhile
        (artifacts / "r").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "ready" / "r" / "checkpoint.pt", artifacts / "r" / "checkpoint.pt")
    monkeypatch.setattr(api, "train", slow_train)
    infos = []
    threads = [threading.Thread(target=lambda: infos.append(C.ensure_model(model, tmp_path / "art", True)))
               for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and len(infos) == 2 and infos[0].sha256 == infos[1].sha256
    assert sorted(i.trained for i in infos) == [False, True]
    from dataclasses import replace   # a worker reading the checkpoint after a retrain: its cells were recorded
    from uadc.pipeline.sweep.spec import RunConfig  # under the sweep's checkpoint, with the new one's latency
    with pytest.raises(UadcError, match="was trained again since the sweep read it; run the sweep again"):
        C._baseline(model, replace(infos[0], sha256="0" * 64), RunConfig(threads=1), None).checkpoint_sha256
    b = api.baseline(Path(infos[0].checkpoint), model.recipe())   # a caller's Baseline (calibrators compare) too
    with pytest.raises(UadcError, match="was trained again since the sweep read it; build a new Baseline"):
        with C.given_baseline(replace(infos[0], sha256="0" * 64), RunConfig(threads=1), b):
            pass
    from uadc.training.checkpoint import load_checkpoint   # a model in memory: recorded as the checkpoint file's
    kd = api.baseline(load_checkpoint(Path(infos[0].checkpoint))[0], model.recipe())
    with pytest.raises(UadcError, match="^baseline: built from a model in memory"):
        with C.given_baseline(infos[0], RunConfig(threads=1), kd):
            pass


def test_a_sweeps_bad_recipe_and_empty_axis_value_are_named(tiny, tmp_path):
    """`recipes: [a.yaml, bad.yaml]` said `train.epoch: unknown key` without naming the file; `calibrator: [""]`
    ran the target's default calibrator without a word."""
    d, recipe = tiny
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text() + "\nseeds: 1\n")
    sweep = tmp_path / "grid.yaml"
    for doc, said in (({"recipes": [str(recipe), str(bad)]}, f"sweep grid: recipe {bad}: seeds: unknown key (did you mean 'seed'?)"),
                      ({"recipe": str(recipe), "axes": {"calibrator": [""]}}, "axes.calibrator[0]: must not be empty")):
        sweep.write_text(yaml.safe_dump(doc))
        res = CliRunner().invoke(main, ["-q", "sweep", str(sweep), "--sequential", "--artifacts", str(d / "art")])
        assert res.exit_code == 2 and said in res.output, res.output


def test_a_cell_that_shipped_no_calibrated_model_lists_no_calibration(tmp_path):
    """A `precision: auto` cell that kept every group FP32 was listed with the calibrator, data and sample
    count of its axes (four rows of one FP32 model), while its report.json said none."""
    from types import SimpleNamespace
    from uadc.pipeline.sweep.cells import summarize
    lat = SimpleNamespace(compiled={"p50": 1.0}, ort_fp32={"p50": 1.0}, speedup_vs_ort_fp32=1.0, emulated=False)
    res = SimpleNamespace(path=tmp_path / "c", target="ort-cpu-int8", precision="fp32", latency=lat, model_bytes=1,
                          compile_seconds=1.0, verification={"fp32_vs_compiled": {"max_abs": 0.0}}, metrics=None,
                          calibrator=None, quantized_partitions=[])
    row = summarize(res, tmp_path)
    assert (row["calibrator"], row["calib_data"], row["calib_samples"], row["quantize"]) == (None, None, None, None)
    res.calibrator, res.quantized_partitions = "minmax", ["student"]
    assert "calibrator" not in summarize(res, tmp_path)   # calibrated: the cell's axes say how
    # a record written before that (reused on a rerun: the cell key is unchanged) is listed the same way
    from uadc.pipeline.sweep.plan import Cell, Model, Plan
    from uadc.pipeline.sweep.table import make_rows
    axes = {"target": "ort-cpu-int8", "calibrator": "minmax", "calib_data": "train", "calib_samples": 4,
            "quantize": ["student"], "precision": "auto"}
    plan = Plan("s", {"m": Model("m", "tiny", {"data": {"image_size": 32}, "seed": 0})},
                [Cell("c", "m", axes, {})], None)
    row = make_rows(plan, [{"status": "ok", "precision": "fp32"}])[0]
    assert (row["calibrator"], row["calib_data"], row["calib_samples"], row["quantize"]) == (None, None, None, None)


def test_a_model_name_the_sweep_makes_too_long_says_what_made_it(tmp_path, tiny_data):
    """A recipe `uadc train --one-class` trains was refused by a sweep with `name: must be a plain folder
    name`, a key the user never wrote: the sweep's own `<name>-oc-<category>` passed 128 bytes."""
    import shutil
    long = "c" * 125
    shutil.copytree(tiny_data / "gray", tmp_path / "data" / long)
    recipe = write_recipe(tmp_path / "oc.yaml", tmp_path / "data", train={"epochs": 1})
    cfg = yaml.safe_load(recipe.read_text())
    cfg["data"]["sources"][0]["categories"] = [long]
    recipe.write_text(yaml.safe_dump({**cfg, "name": "tiny"}))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "axes": {"one_class": [True]}}))
    with pytest.raises(UadcError, match=r"^sweep s: recipe .*oc.yaml: the one-class model of 'c{60}' trains as "
                                        r"'tiny-oc-c{52}'\.\.\., 133 bytes, and a model's folder name takes at most "
                                        r"128: shorten the recipe's name or the category's folder$"):
        make_plan(*load_sweep(path))
    cfg["data"]["sources"][0]["categories"] = ["gray "]   # trains with --one-class; no folder name with the space
    shutil.copytree(tiny_data / "gray", tmp_path / "data" / "gray ")
    recipe.write_text(yaml.safe_dump({**cfg, "name": "tiny"}))
    with pytest.raises(UadcError, match=r"the one-class model of 'gray ' trains as 'tiny-oc-gray ', no plain folder "
                                        r"name \(no space at either end, no control character\); rename or the "
                                        r"category's folder$"):
        make_plan(*load_sweep(path))
    recipe = write_recipe(tmp_path / "named.yaml", tiny_data, train={"epochs": 1})
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "name": "n" * 126}))
    path.write_text(yaml.safe_dump({"recipe": str(recipe), "axes": {"image_size": [32, 64]}}))
    with pytest.raises(UadcError, match=r"axes.image_size 32: the model of these axis values trains as 'n{60}'"
                                        r"\.\.\., 131 bytes, .*shorten the recipe's name$"):
        make_plan(*load_sweep(path))


def test_a_ray_jobs_own_working_dir_is_not_given_a_second_one(monkeypatch):
    """Run as `ray job submit --working-dir` entrypoint, uadc's empty working_dir (which keeps the folder it runs in
    off the workers' sys.path) clashed with the job's: ray.init refused to merge them ("cannot connect ... at None")."""
    from uadc.pipeline.sweep.ray_exec import _job_working_dir
    for value, has in (('{"runtime_env": {"working_dir": "gcs://_ray_pkg_0.zip"}}', True), ('{"runtime_env": {}}', False),
                       ('{"runtime_env": ["x"]}', False), ("[1]", False), ("not json", False), ("", False)):
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", value)
        assert _job_working_dir() is has, value
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _job_working_dir() is False
