"""Built-in recipes by name, the shipped demo data, and (opt-in, slow) the wheel in a fresh venv."""

from __future__ import annotations

import re
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from uadc.cli import main
from uadc.config.packaged import packaged_recipe, packaged_recipes, recipes_dir, resolve_recipe_path
from uadc.config.recipe import load_recipe
from uadc.core.errors import UadcError

ROOT = Path(__file__).resolve().parents[1]
DEMO_DATA = ROOT / "examples" / "hazelnut_toy_256"


def test_every_repository_recipe_is_packaged():
    assert recipes_dir().resolve() == (ROOT / "recipes").resolve()
    assert {r.name for r in packaged_recipes()} == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert "demo" in {r.name for r in packaged_recipes()}


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists packages explicitly: a new folder missing there is absent from the wheel."""
    tomllib = pytest.importorskip("tomllib")   # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "uadc").rglob("__init__.py")}
    assert found - listed == set()
    assert {"uadc.recipes", "uadc.examples", "uadc.calibrators"} <= listed


def test_name_resolves_to_packaged_recipe_and_a_path_still_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe("demo")
    assert r.name == "demo" and r.path == packaged_recipe("demo").path
    assert load_recipe("demo.yaml").path == r.path
    # the demo's relative data root resolves against the recipe file, to the shipped data
    assert Path(r.data.sources[0].root) == DEMO_DATA.resolve()
    assert r.artifact_dir() == tmp_path / "artifacts" / "demo"
    local = tmp_path / "demo"
    local.write_text(yaml.safe_dump({"name": "mine", "data": {"sources": [{"root": "x"}]}}))
    assert load_recipe("demo").name == "mine"            # an existing file is never shadowed
    assert resolve_recipe_path("sub/demo") == Path("sub/demo")   # a path is a path


def test_unknown_name_lists_builtins():
    with pytest.raises(UadcError, match=r"recipe not found: nope \(not a file, nor a built-in recipe: .*demo"):
        load_recipe("nope")


def test_missing_data_names_the_recipe_key(tmp_path):
    from uadc.data.prepare import prepare_data
    src = yaml.safe_load(packaged_recipe("quickstart").path.read_text())
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / "q.yaml"
    path.write_text(yaml.safe_dump(src))                  # ../../shared/data/... does not exist here
    with pytest.raises(UadcError, match=r"^data\.sources\[0\]\.root: data folder not found: "):
        prepare_data(load_recipe(path))


def test_demo_data_complete_and_attributed():
    sums = (DEMO_DATA / "SHA256SUMS").read_text().split("\n")
    entries = [line.split(maxsplit=1) for line in sums if line.strip()]
    assert len(entries) == 68
    for digest, name in entries:
        assert hashlib.sha256((DEMO_DATA / name.lstrip("*")).read_bytes()).hexdigest() == digest, name
    assert "Attribution 4.0 International" in (DEMO_DATA / "LICENSE").read_text()
    assert "CC BY 4.0" in (DEMO_DATA / "README.md").read_text()


def test_cli_recipes_list_and_show(tmp_path):
    res = CliRunner().invoke(main, ["recipes", "list"])
    assert res.exit_code == 0, res.output
    demo = next(line for line in res.output.splitlines() if line.startswith("demo "))
    assert "[data found]" in demo
    # its data found, but no weights file: `uadc train stfpm_resnet18` stopped at once (listed "data found")
    resnet = next(line for line in res.output.splitlines() if line.startswith("stfpm_resnet18 "))
    assert resnet.endswith(" model.weights]") or (ROOT / "weights" / "resnet18.pth").is_file()
    # each summary is the header's first sentence, whole (it was the first comment line, cut mid-sentence)
    for r in packaged_recipes():
        assert r.summary.endswith((".", "!", "?")) and r.summary.count("(") == r.summary.count(")"), r.summary
    default = next(r for r in packaged_recipes() if r.name == "stfpm_effnet_lite0")
    assert default.summary.endswith("Magnetic-tile, Hazelnut-Toy).")
    from uadc.config.settings import recipe_file_state   # a listed category gone: it said "data found"
    one = tmp_path / "r.yaml"
    one.write_text(yaml.safe_dump({"data": {"sources": [{"root": str(DEMO_DATA), "categories": ["hazelnut_toy",
                                                                                                 "gone"]}]}}))
    assert recipe_file_state(one) == "files missing: set data.sources[0].categories (gone)"
    res = CliRunner().invoke(main, ["recipes", "show", "demo"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["data"]["sources"][0]["root"] == str(DEMO_DATA.resolve())
    res = CliRunner().invoke(main, ["recipes", "show", "nope"])
    assert res.exit_code == 2 and "error: recipe not found: nope" in res.output


def test_a_shown_recipe_saved_anywhere_reads_the_same_files(tmp_path):
    """`uadc recipes show demo > my.yaml` then `uadc train my.yaml` stopped at `data folder not
    found: ../examples/...` (its relative root resolved against the copy's folder)."""
    for p in packaged_recipes():
        res = CliRunner().invoke(main, ["recipes", "show", p.name])
        assert res.exit_code == 0, res.output
        copy = tmp_path / p.name / "elsewhere.yaml"
        copy.parent.mkdir()
        copy.write_text(res.output)
        shown, original = load_recipe(copy).cfg, load_recipe(p.path).cfg
        assert {**shown, "name": original["name"]} == original, p.name
        named = "name" in yaml.safe_load(p.path.read_text())   # else a header line says how to keep the name
        assert res.output.count("#") == p.path.read_text().count("#") + 2 + (not named)    # comments kept
        assert named or f"add `name: {p.name}` to share" in res.output
        again = CliRunner().invoke(main, ["recipes", "show", str(copy)])   # a copy shown again: headers stacked,
        assert again.exit_code == 0 and again.output.count("# uadc recipe ") == 1, again.output   # naming its stem
        shown_name = yaml.safe_load(p.path.read_text()).get("name") or "elsewhere"
        assert again.output.startswith(f"# uadc recipe {shown_name!r} ({copy})")
    res = CliRunner().invoke(main, ["recipes", "show", str(ROOT / "sweeps" / "default_grid.yaml")])
    assert res.exit_code == 2 and res.output.startswith("error: ")   # printed as a recipe before
    home = tmp_path / "Prüfteil 数据"   # a path to copy and edit by hand: "\u00fc" was printed for ü
    (home / "data").mkdir(parents=True)
    (home / "r.yaml").write_text("data:\n  sources:\n    - root: data\n", encoding="utf-8")
    res = CliRunner().invoke(main, ["recipes", "show", str(home / "r.yaml")])
    assert res.exit_code == 0 and f'root: "{home / "data"}"' in res.output, res.output
    for null in ("null", "~"):   # `weights: null`, as every recipe copy train writes has it, was refused
        (home / "w.yaml").write_text(f"data:\n  sources:\n    - root: data\nmodel:\n  weights: {null}\n", encoding="utf-8")
        res = CliRunner().invoke(main, ["recipes", "show", str(home / "w.yaml")])
        assert res.exit_code == 0 and f"weights: {null}\n" in res.output, res.output


def test_recipes_show_takes_a_recipe_file_too(tmp_path, monkeypatch):
    """`uadc recipes show recipes/x.yaml` said `recipe not found: ... (not a file, ...)` of a file that exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    mine = tmp_path / "sub" / "mine.yaml"
    mine.write_text(packaged_recipe("demo").copy_text().replace(str(DEMO_DATA.resolve()), "../data"))
    res = CliRunner().invoke(main, ["recipes", "show", "sub/mine.yaml"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["data"]["sources"][0]["root"] == str(tmp_path / "data")
    for bad, why in (("sub/none.yaml", "recipe not found: sub/none.yaml"), ("sub", "recipe sub: a folder, not a YAML file")):
        res = CliRunner().invoke(main, ["recipes", "show", bad])
        assert res.exit_code == 2 and f"error: {why}" in res.output, res.output
    # a quoted root with a space is rewritten; a root the line rewrite cannot see (flow style, an anchor)
    # is refused rather than left relative (the copy read other files) or broken (invalid YAML)
    forms = {"quoted": '    - root: "../sub dir/data"  # note\n      categories: [a]\n',
             "flow": "  sources: [{root: ../data, categories: [a]}]\n",
             "anchor": "    - root: &r ../data\n      categories: [a]\n"}
    for name, lines in forms.items():
        (tmp_path / "sub" / f"{name}.yaml").write_text("data:\n" + ("" if name == "flow" else "  sources:\n") + lines)
        res = CliRunner().invoke(main, ["recipes", "show", f"sub/{name}.yaml"])
        if name == "quoted":
            assert res.exit_code == 0 and "# note" in res.output, res.output
            assert yaml.safe_load(res.output)["data"]["sources"][0]["root"] == str(tmp_path / "sub dir" / "data")
        else:
            assert res.exit_code == 2 and "cannot copy it with its paths made absolute (a path not written as a " \
                                          "plain `key: value` line" in res.output, res.output


@pytest.mark.skipif(os.environ.get("UADC_TEST_WHEEL") != "1",
                    reason="slow (builds the wheel, installs it with its dependencies into a fresh venv, runs "
                           "the demo): set UADC_TEST_WHEEL=1 (.ci/run does)")
def test_wheel_runs_demo_in_fresh_venv(tmp_path):
    """`python -m build` (sdist, then the wheel from it), installed outside the source tree."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(dist), str(ROOT)], check=True,
                           capture_output=True, text=True)
    assert "would be ignored" not in built.stdout + built.stderr   # five setuptools boxes about the demo's folders
    wheels, sdists = list(dist.glob("uadc-*.whl")), list(dist.glob("uadc-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    import zipfile
    with zipfile.ZipFile(wheels[0]) as whl:   # PEP 561: without it type checkers read uadc as untyped
        assert "uadc/py.typed" in whl.namelist()
        meta = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        # the CC BY 4.0 demo images it ships: licence scanners read the metadata alone (it said Apache-2.0)
        assert "License-Expression: Apache-2.0 AND CC-BY-4.0" in meta
        assert sum(n.split("/")[1] == "licenses" for n in whl.namelist() if ".dist-info/" in n) == 2
    import tarfile
    with tarfile.open(sdists[0]) as sdist:   # the tests it carries read the example sweep files
        assert any(n.endswith("/sweeps/default_grid.yaml") for n in sdist.getnames())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    subprocess.run(pip + [str(wheels[0])], check=True)
    work = tmp_path / "work"                    # no recipes/, no data, no source tree here
    work.mkdir()
    uadc = shutil.which("uadc", path=str(venv / "bin"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for cmd in (["train", "demo", "--epochs", "2"], ["eval", "demo"],
                ["compile", "demo", "--target", "ort-cpu-int8", "--json"]):
        res = subprocess.run([uadc, *cmd], cwd=work, env=env, capture_output=True, text=True)
        assert res.returncode == 0, (cmd, res.stderr[-2000:])
    doc = json.loads(res.stdout)               # compile --json: one document on stdout
    assert Path(doc["path"]) == work / "artifacts" / "demo" / "ort-cpu-int8"
    assert (Path(doc["path"]) / "model.onnx").is_file()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import uadc.config.packaged as p; "
                            "print(p.recipes_dir())"], cwd=work, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(venv)   # the recipes came from the wheel
    images = subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.resources import files; print(files("
                             "'uadc.examples') / 'hazelnut_toy_256/hazelnut_toy/test')"], cwd=work, env=env,
                            capture_output=True, text=True, check=True).stdout.strip()
    res = subprocess.run([uadc, "predict", doc["path"], images, "--out", "preds", "--json"], cwd=work, env=env,
                         capture_output=True, text=True)   # the README's predict on the installed images
    assert res.returncode == 0 and json.loads(res.stdout)["images"] == 23, res.stderr[-2000:]


@pytest.mark.parametrize("call, found, missing, hint", [
    (load_recipe, "recipes/quickstart.yaml", "recipes/nope.yaml",
     r"recipe not found: recipes/quickstart.yaml \(no such file; built-in recipes go by name, not path: give "
     r"'quickstart'\)$"),
    (load_recipe, "./demo", "sub/nope",   # it said `recipe not found: demo (...: give 'demo')`
     r"recipe not found: \./demo \(no such file; built-in recipes go by name, not path: give 'demo'\)$"),
    ("find_images", "examples/hazelnut_toy_256/hazelnut_toy/test", "examples/nope",
     r"input not found: examples/hazelnut_toy_256/hazelnut_toy/test \(the demo images installed with uadc are at "
     r".*hazelnut_toy_256/hazelnut_toy/test\)$"),
])
def test_the_readmes_checkout_paths_elsewhere_name_what_to_give(call, found, missing, hint, tmp_path, monkeypatch):
    """The README's `recipes/quickstart.yaml` and `examples/...` paths outside a checkout (a wheel install)
    said only `recipe not found` / `input not found`."""
    from uadc.core.images import find_images
    call = find_images if call == "find_images" else call
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UadcError, match=hint):
        call(found)
    with pytest.raises(UadcError, match=f"^[a-z ]+ not found: {re.escape(missing)}"):
        call(missing)


def test_a_built_in_recipe_without_its_data_says_how_to_copy_it(tmp_path, monkeypatch):
    """`uadc train quickstart` from a wheel: "data folder not found: .../site-packages/shared/..." only."""
    import uadc.config.packaged as packaged
    from uadc.data.prepare import prepare_data
    (tmp_path / "quick.yaml").write_text("data:\n  sources: [{root: ../nowhere}]\n")
    monkeypatch.setattr(packaged, "recipes_dir", lambda: tmp_path)
    with pytest.raises(UadcError, match=r"data folder not found: .*; built-in recipe 'quick': `uadc recipes show "
                                        r"quick > my.yaml`, set the key there and run my.yaml$"):
        prepare_data(load_recipe(tmp_path / "quick.yaml"))
