"""The public Python API: the README example runs, results are typed, nothing trains implicitly,
process-wide state is left alone, checkpoints cannot run code, the layout holds."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import uadc
from uadc.core.errors import UadcError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    from conftest import write_recipe
    d = tmp_path_factory.mktemp("api")
    recipe = write_recipe(d / "tiny.yaml", tiny_data, train={"epochs": 3, "threads": 1})
    art = d / "artifacts"
    res = uadc.train(recipe, artifacts=art)
    assert isinstance(res, uadc.TrainResult) and res.checkpoints[0].is_file()
    # each category's 16 train/good images: learned from or held out as validation normals, counted
    images = res.to_dict()["models"][0]["images"]
    assert set(images) == {"stripes", "gray"} and all(
        n["train"] + n["validation"] == 16 and n["validation"] >= 1 for n in images.values()), images
    return recipe, art


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S)
    assert m, "README has no Python API example"
    return m.group(1)


_TYPED_USE = """
from pathlib import Path
from typing_extensions import assert_type   # Python 3.10 too (typing has it from 3.11)
import uadc
from uadc import verify

def figures(recipe: uadc.Recipe) -> float:
    return uadc.evaluate(recipe).mean["image_auroc"]          # EvalResult, not "EvalResult | OneClassResult"

assert_type(uadc.evaluate("r.yaml", one_class=True), uadc.OneClassResult)
assert_type(verify("artifacts/r/ort-cpu-int8", images="test"), uadc.VerifyResult)   # the function, not the package
assert_type(uadc.diff("a", Path("b")), uadc.DiffResult)       # paths as str or Path, as at run time
assert_type(uadc.bundle("a", "b"), uadc.BundleResult)
assert_type(uadc.train("r.yaml", artifacts="art"), uadc.TrainResult)
det = uadc.Detector.load("artifacts/r/ort-cpu-int8")
assert_type(det.predict("part.png", category="c"), uadc.Prediction)
assert_type(det.predict(["a.png", "b.png"]), list[uadc.Prediction])
with det as d:
    assert_type(d, uadc.Detector)
"""


def test_the_public_api_type_checks(tmp_path):
    """`py.typed` promised types, yet every `uadc.X` was Any to a type checker (names resolved at run time
    only), `from uadc import verify` was the package (`Module not callable`), str paths the calls take were
    errors, and README's own example did not type-check (Optional fields, a predict result's union)."""
    pytest.importorskip("mypy", reason="mypy not installed (dev extra)")
    (tmp_path / "use.py").write_text(_TYPED_USE)
    (tmp_path / "readme.py").write_text(_readme_example())
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--warn-return-any",
                        "--cache-dir", str(tmp_path / "cache"), "use.py", "readme.py"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-1000:]
    # a misspelt name is an error, not Any (the lazy module __getattr__ answered every name)
    (tmp_path / "typo.py").write_text("import uadc\nfrom uadc import trian\nuadc.evalute('r.yaml')\n")
    p = subprocess.run([sys.executable, "-m", "mypy", "--follow-imports=silent", "--cache-dir", str(tmp_path / "cache"),
                        "typo.py"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 1 and '"trian"' in p.stdout and '"evalute"' in p.stdout, p.stdout[-3000:]


def test_readme_python_api_example_runs(trained, monkeypatch):
    recipe, art = trained
    code = _readme_example()
    assert "uadc.compile(" in code and "baseline" in code
    # The example uses the quickstart recipe and ./artifacts; run it on the tiny recipe instead.
    code = code.replace('"recipes/quickstart.yaml"', repr(str(recipe)))
    monkeypatch.chdir(art.parent)  # ./artifacts is the fixture's artifacts root
    threads, stdout = torch.get_num_threads(), sys.stdout
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert torch.get_num_threads() == threads and sys.stdout is stdout
    int8, jetson = namespace["int8"], namespace["jetson"]
    assert isinstance(int8, uadc.CompileResult) and int8.path.is_dir()
    assert int8.to_dict()["metrics"]["compiled"]["mean"]["image_auroc"] == int8.image_auroc
    assert jetson.latency.emulated and "emulating tensorrt" in jetson.latency.runtime
    assert not int8.latency.emulated


def test_training_is_deterministic_whatever_the_callers_random_state(tiny_data, tmp_path):
    from conftest import write_recipe
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_data, train={"epochs": 1, "threads": 1})
    weights = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        ckpt = uadc.train(recipe, artifacts=tmp_path / f"art{caller_seed}").checkpoints[0]
        weights.append(torch.load(ckpt, weights_only=False)["state_dict"])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_compile_without_checkpoint_is_one_line_error_and_trains_nothing(recipe_factory, tmp_path):
    art = tmp_path / "art"
    with pytest.raises(UadcError) as e:
        uadc.compile(recipe_factory(), "ort-cpu-int8", artifacts=art)
    msg = str(e.value)
    assert "uadc train" in msg and "\n" not in msg
    assert not art.exists() or not any(art.rglob("checkpoint.pt"))


def test_each_compile_uses_its_own_latency_settings(trained, tmp_path):
    recipe, art = trained
    threads, stdout = torch.get_num_threads(), sys.stdout
    b = uadc.baseline(recipe, artifacts=art)
    a = uadc.compile(b, "ort-cpu-fp32", out=tmp_path / "a", latency_runs=3, threads=1, evaluate=False)
    assert torch.get_num_threads() == threads and sys.stdout is stdout
    c = uadc.compile(b, "ort-cpu-fp32", out=tmp_path / "c", latency_runs=7, threads=2, evaluate=False)
    assert torch.get_num_threads() == threads and sys.stdout is stdout
    assert (a.latency.ort_fp32["runs"], a.latency.compiled["runs"], a.latency.threads) == (3, 3, 1)
    assert (c.latency.ort_fp32["runs"], c.latency.torch_fp32["runs"], c.latency.threads) == (7, 7, 2)
    assert c.environment["threads"] == 2
    import yaml   # plain types: torch's version was a TorchVersion, which yaml.safe_dump refused (MLflow's YAML)
    assert yaml.safe_load(yaml.safe_dump(c.to_dict()))["environment"]["torch"] == torch.__version__
    # the compiled model as `uadc predict` runs it: on 2 threads teacher and student run at once
    assert a.latency.deployed is None and c.latency.deployed["schedule"] == "branches"
    assert c.latency.deployed["runs"] == 7 and c.to_dict()["latency_ms"]["deployed"]["p50"] > 0
    assert "uadc runtime (branches)" in (tmp_path / "c" / "report.md").read_text()
    ev = uadc.evaluate(recipe, artifacts=art, write=False)
    assert isinstance(ev, uadc.EvalResult) and set(ev.categories) == {"stripes", "gray"}
    assert torch.get_num_threads() == threads and sys.stdout is stdout


def test_user_calibration_images(trained, tmp_path, monkeypatch):
    recipe, art = trained
    import numpy as np
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((3, 64, 64)).astype(np.float32) for _ in range(4)]
    res = uadc.compile(recipe, "ort-cpu-int8", calibration=iter(images), out=tmp_path / "own", artifacts=art,
                       evaluate=False, latency_runs=2)
    import json
    cal = json.loads((res.path / "calibration.json").read_text())
    assert cal["calib_data"] == "user" and cal["samples"] == 4 == cal["distinct_samples"]
    # wrong shape; 0..255 pixels, as uint8 or as float, would calibrate ranges no real input reaches; one value
    # throughout calibrated the input at scale 1 (a few levels); calib_samples was taken, and ignored
    pixels = rng.integers(0, 256, (3, 64, 64))
    import uadc.pipeline.baseline as bl

    def exported(*a, **k):
        raise AssertionError("exported before the images were checked")   # 8-14 s on the default recipe
    monkeypatch.setattr(bl, "export_model", exported)
    for bad, why, extra in (([np.zeros((3, 8, 8), np.float32)], "expected shape", {}),
                            ([pixels.astype(np.uint8)], "calibration image 0: uint8 pixels; give float images", {}),
                            ([pixels.astype(np.float32)], "calibration images reach 255, far outside", {}),
                            ([np.zeros((2, 3, 64, 64), np.float32)], r"are all one value \(0\): the input's range", {}),
                            (images, "calib_samples: given with calibration images, which are all used",
                             {"calib_samples": 2})):
        with pytest.raises(UadcError, match=why):
            uadc.compile(recipe, "ort-cpu-int8", calibration=bad, out=tmp_path / "bad", artifacts=art, evaluate=False,
                         **extra)
    assert not (tmp_path / "bad").exists()


def test_one_array_as_calibration_is_one_image_or_one_batch():
    """A bare (3,H,W) array was iterated as three (H,W) images: 'expected (3,H,W) ..., got (H,W)'."""
    import numpy as np
    from uadc.pipeline.baseline import own_calibration_images
    rng = np.random.default_rng(0)
    one = rng.standard_normal((3, 16, 16)).astype(np.float32)
    assert own_calibration_images(one, 16).shape == (1, 3, 16, 16)
    batch = rng.standard_normal((5, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(own_calibration_images(batch, 16), batch)
    assert own_calibration_images([one, batch], 16).shape == (6, 3, 16, 16)
    with pytest.raises(UadcError, match=r"got \(1, 3, 8, 8\)"):
        own_calibration_images(np.zeros((3, 8, 8), np.float32), 16)


def test_the_model_given_is_the_model_judged(trained, tmp_path, tiny_data):
    """evaluate(Baseline, recipe) scored the recipe's checkpoint; an artifact's model.onnx skipped the
    normalisation check its folder gets; a checkpoint alone was read as a recipe file; recipe= beside
    a Baseline was ignored; user calibration images were reported as the recipe's calib_data."""
    import numpy as np
    from conftest import write_recipe
    recipe, art = trained
    other = tmp_path / "e2"
    uadc.train(recipe, epochs=1, artifacts=other)         # another model of the same recipe
    ckpt = other / "tiny" / "checkpoint.pt"
    own = uadc.evaluate(ckpt, recipe, write=False)
    b = uadc.baseline(ckpt, recipe)
    via_baseline = uadc.evaluate(b, write=False)
    assert via_baseline.extra["checkpoint"] == str(ckpt) and via_baseline.mean == own.mean
    assert uadc.evaluate(ckpt, write=False).mean == own.mean                 # its own recipe, as compile reads it
    dotted = tmp_path / "x" / ".." / "e2" / "tiny" / "checkpoint.pt"   # eval.json's bytes changed with the spelling
    (tmp_path / "x").mkdir()
    assert uadc.evaluate(dotted, recipe, write=False).extra["checkpoint"] == str(ckpt)
    (tmp_path / "lnk").symlink_to(other / "tiny")   # a `..` after a link: the path it names, not one beside the link
    assert uadc.evaluate(tmp_path / "lnk" / ".." / "tiny" / "checkpoint.pt", recipe,
                         write=False).extra["checkpoint"] == str(ckpt)
    by_model = uadc.evaluate(b.model, recipe, write=False)   # a KDModel's lacked the per-defect figures and the hash
    assert by_model.defects and by_model.defects == own.defects and by_model.mean == own.mean
    assert by_model.extra["recipe_hash"] == own.extra["recipe_hash"]
    imagenet = write_recipe(tmp_path / "imagenet.yaml", tiny_data, train={"epochs": 1, "threads": 1})
    imagenet.write_text(imagenet.read_text().replace("data:\n", "data:\n  normalization: imagenet\n"))
    for call in (lambda: uadc.baseline(b, imagenet), lambda: uadc.evaluate(b, imagenet),
                 lambda: uadc.compile(b, "ort-cpu-fp32", recipe=imagenet, out=tmp_path / "x"),
                 lambda: uadc.qat(imagenet, "ort-cpu-int8", source=b, compile_after=False, artifacts=tmp_path / "q")):
        with pytest.raises(UadcError, match="the Baseline was built from recipe 'tiny' and recipe= gives other data"):
            call()
    calibrator = tmp_path / "mse.yaml"   # only compile settings differ: the Baseline's calibrator ran, silently
    calibrator.write_text(recipe.read_text().replace("compile:\n", "compile:\n  calibrator: mse\n"))
    assert "calibrator: mse" in calibrator.read_text()
    for call in (lambda: uadc.compile(b, "ort-cpu-int8", recipe=calibrator, out=tmp_path / "x"),
                 lambda: uadc.evaluate(b, calibrator)):
        with pytest.raises(UadcError, match="the Baseline was built from recipe 'tiny' and recipe= gives other "
                                            "compile settings; drop recipe="):
            call()
    assert uadc.evaluate(b, recipe, write=False).mean == own.mean   # its own recipe is taken
    with pytest.raises(UadcError, match="one_class judges the recipe's per-category checkpoints"):
        uadc.evaluate(b, one_class=True)
    images = [np.random.default_rng(0).standard_normal((3, 64, 64)).astype(np.float32) for _ in range(4)]
    c = uadc.compile(b, "ort-cpu-int8", calibration=images, out=tmp_path / "c", evaluate=False, latency_runs=1)
    assert c.calib_data == "user" and json.loads((c.path / "report.json").read_text())["calib_data"] == "user"
    for bad in ([str(tiny_data / "gray" / "test" / "good" / "000.png")], ["train"], {"a": 1}):
        with pytest.raises(UadcError, match="calibration image 0: expected an image array, got str"):
            uadc.compile(b, "ort-cpu-int8", calibration=bad, out=tmp_path / "bad", evaluate=False)
    with pytest.raises(UadcError, match="normalises inputs with mean"):
        uadc.evaluate(c.path / "model.onnx", imagenet)
    import typing
    assert typing.get_type_hints(uadc.evaluate)["recipe"] == typing.Optional[uadc.pipeline.api.RecipeLike]
    for name in uadc.__all__:     # Sphinx, typeguard and pydantic's validate_call read them
        if callable(f := getattr(uadc, name)) and not isinstance(f, type):
            typing.get_type_hints(f)
    # each in a process of its own: a forward reference resolved by an earlier one hid `bundle`'s NameError
    for name in ("bundle", "read_manifest", "Detector.load", "Detector.predict", "verify"):
        p = subprocess.run([sys.executable, "-c", f"import typing, uadc; typing.get_type_hints(uadc.{name})"],
                           capture_output=True, text=True)
        assert p.returncode == 0, (name, p.stderr[-500:])


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_wrong_argument_types_are_one_line_errors(trained, tmp_path, tiny_data):
    """What an embedding pipeline gets wrong: a raw TypeError, ValueError or torch RuntimeError
    before; now one UadcError each, before any work."""
    import torch
    recipe, art = trained
    threads = torch.get_num_threads()
    for call, why in (
            (lambda: uadc.compile(recipe, "ort-cpu-fp32", threads=-1, artifacts=art, out=tmp_path / "a"), "threads: expected"),
            (lambda: uadc.compile(recipe, "ort-cpu-fp32", threads="2", artifacts=art, out=tmp_path / "b"), "threads: expected"),
            (lambda: uadc.compile(recipe, ["ort-cpu-int8"], artifacts=art, out=tmp_path / "c"), "target: expected a target"),
            (lambda: uadc.load_recipe(5), "recipe: expected a path, a built-in recipe's name, a dict or a Recipe, got int"),
            # a pathlib TypeError, a count silently replaced by the recipe's, a string iterated letter by letter
            (lambda: uadc.verify(None), "artifact: expected a path, got NoneType"),
            (lambda: uadc.diff(art, None), "b: expected a path"),
            (lambda: uadc.Detector.load(5), "artifact: expected a path, got int"),
            (lambda: uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=5), "out: expected a path"),
            (lambda: uadc.compile(recipe, "", artifacts=art), "target: expected a target's name"),
            (lambda: uadc.compile(recipe, "ort-cpu-int8", calibrator=["mse"], artifacts=art),
             r"calibrator: expected a calibrator's name \(entropy, mse, ...\), got \['mse'\]"),
            (lambda: uadc.compile(recipe, "ort-cpu-int8", calibration="bogus", artifacts=art, out=tmp_path / "d"),
             r"calibration: 'bogus' is not one of train, random-normal, mixed"),
            (lambda: uadc.compile(recipe, "ort-cpu-int8", artifacts=art, quantize=5), "quantize: expected names"),
            (lambda: uadc.compile(recipe, "ort-cpu-int8", artifacts=art, calib_samples="4"), "calib_samples: expected a whole"),
            (lambda: uadc.compile(recipe, "ort-cpu-int8", artifacts=art, qat_model="junk", out=tmp_path / "q0"),
             "qat_model: expected the onnx.ModelProto"),
            (lambda: uadc.train(recipe, epochs=0, artifacts=art), "epochs: expected a whole number >= 1, got 0"),
            (lambda: uadc.qat(recipe, "ort-cpu-int8", epochs=-2, artifacts=art), "epochs: expected a whole number >= 1"),
            (lambda: uadc.evaluate(5, recipe), "evaluate: expected a recipe, a checkpoint"),
            (lambda: uadc.compile(5), r"compile: expected a recipe, a checkpoint, a KDModel or a Baseline, got int"),
            (lambda: uadc.compile(tmp_path / "x.onnx", "ort-cpu-fp32"), r"x.onnx is a compiled model; compile "
             r"starts from its recipe or checkpoint"),     # it read "recipe not found"
            (lambda: uadc.verify(art, budgets=["x"]), "budgets: expected {key: value}"),
            (lambda: uadc.compare_calibrators(recipe, calibrators="minmax,nope", sources="train", artifacts=art,
                                              out=tmp_path / "cc"), "unknown calibrator 'nope'"),   # 'm' before
            (lambda: uadc.sweep(None), "sweep: expected a sweep file's path"),
            (lambda: uadc.compare_calibrators(recipe, None, artifacts=art, out=tmp_path / "cn"),
             "target: expected a target name, one of ort-cpu-fp32")):   # "unknown target 'None'"
        with pytest.raises(UadcError, match=why):
            call()
    assert torch.get_num_threads() == threads and not any(tmp_path.iterdir())
    with pytest.raises(UadcError, match=r"one_class.*run `uadc train --one-class` first"):
        uadc.evaluate(recipe, one_class=True, artifacts=art)
    with pytest.raises(UadcError, match="bundle: out: expected a path, got NoneType"):
        uadc.bundle(tmp_path, None)
    compiled = uadc.compile(recipe, "ort-cpu-fp32", artifacts=art, out=tmp_path / "ok", evaluate=False, latency_runs=1)
    for kw, why in (({"batch_size": 0}, "batch_size: expected"), ({"threads": -2}, "threads: expected")):
        with pytest.raises(UadcError, match=why):
            uadc.Detector.load(compiled.path, **kw)
    # one folder as a string is that folder (it was read as one folder per character: "not a folder: /")
    good = tiny_data / "gray" / "test" / "good"
    assert uadc.verify(compiled.path, images=str(good)).images == {"user": len(list(good.glob("*.png")))}
    q = uadc.compile(recipe, "ort-cpu-int8", quantize="student,teacher", artifacts=art, out=tmp_path / "q",
                     evaluate=False, latency_runs=1, precision="target")
    assert sorted(q.quantized_partitions) == ["student", "teacher"]


def test_crafted_checkpoint_runs_nothing(trained, tmp_path):
    recipe, art = trained
    marker = tmp_path / "pwned"
    _Boom.marker = marker
    evil = tmp_path / "evil.pt"
    blob = torch.load(art / "tiny" / "checkpoint.pt", weights_only=True)
    blob["payload"] = _Boom()
    with open(evil, "wb") as f:
        torch.save(blob, f, pickle_module=pickle)
    with pytest.raises(UadcError) as e:
        uadc.evaluate(evil, recipe, artifacts=art)
    assert "refused" in str(e.value) and "\n" not in str(e.value)
    # a recipe's model.weights file alike: torch's advice to retry with weights_only=False (running it) was quoted
    from uadc.models.backbones import load_state_dict_file
    with pytest.raises(UadcError, match=r"^weights file .*evil.pt holds objects other than tensors") as e:
        load_state_dict_file(torch.nn.Linear(1, 1), evil, "x")
    assert "weights_only" not in str(e.value) and not marker.exists()
    import pathlib
    torch.save({"w": pathlib.PurePosixPath("x")}, tmp_path / "odd.pt")     # torch's allow-list advice, cut mid-word
    with pytest.raises(UadcError, match=r"\(Unsupported global: GLOBAL pathlib.PurePosixPath\)$"):
        load_state_dict_file(torch.nn.Linear(1, 1), tmp_path / "odd.pt", "x")
    # weights of another dtype were cast silently (int64: truncated to whole numbers)
    blob = torch.load(art / "tiny" / "checkpoint.pt", weights_only=True)
    name = next(k for k, v in blob["state_dict"].items() if v.dtype == torch.float32)
    blob["state_dict"][name] = blob["state_dict"][name].long()
    torch.save(blob, tmp_path / "int.pt")
    with pytest.raises(UadcError, match=f"int.pt: weight {re.escape(name)} is torch.int64, the model's is torch.float32"):
        uadc.evaluate(tmp_path / "int.pt", recipe, artifacts=art)
    # a sparse or meta tensor: NotImplementedError / RuntimeError tracebacks in the NaN check
    for kind, tensor in (("sparse_coo", blob["state_dict"][name].float().to_sparse()),
                         ("strided", torch.empty(blob["state_dict"][name].shape, device="meta"))):
        blob["state_dict"][name] = tensor
        torch.save(blob, tmp_path / "odd.pt")
        with pytest.raises(UadcError, match=f"odd.pt: weight {re.escape(name)} is a {kind} tensor on .*not a dense one"):
            uadc.evaluate(tmp_path / "odd.pt", recipe, artifacts=art)


def test_no_top_level_calibrators_module_and_plugin_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": ""}
    r = subprocess.run([sys.executable, "-c", "import calibrators"], cwd=tmp_path, env=env, capture_output=True)
    assert r.returncode != 0 and b"ModuleNotFoundError" in r.stderr
    # A dummy plug-in distribution registering under the "uadc.calibrators" entry-point group.
    site = tmp_path / "site"
    (site / "dummy_cal").mkdir(parents=True)
    (site / "dummy_cal" / "__init__.py").write_text(textwrap.dedent("""
        from uadc.calibrators.minmax import MinMaxCalibrator
        class HalfRange(MinMaxCalibrator):
            pass
    """))
    dist = site / "dummy_cal-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy-cal\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[uadc.calibrators]\nhalf = dummy_cal:HalfRange\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))  # uadc may come from there
    r = subprocess.run([sys.executable, "-m", "uadc.cli", "calibrators", "list"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {"entropy", "mse", "minmax", "percentile", "half"} <= set(r.stdout.split())
    r = subprocess.run([sys.executable, "-c", "from uadc.calibrators import get_calibrator as g; "
                        "print(type(g('half')).__name__)"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.stdout.strip() == "HalfRange", r.stderr


def test_layers_and_module_size():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    r = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "0 broken" in r.stdout, r.stdout[-2000:]
    big = {str(p.relative_to(ROOT)): n for p in list((ROOT / "uadc").rglob("*.py")) + list((ROOT / "calibrators").rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > 520}
    assert not big, big
    # calibrators (installed as uadc.calibrators, outside uadc/) import nothing else of uadc
    for p in (ROOT / "calibrators").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) uadc\.(?!calibrators)", p.read_text(), re.M), p


def test_library_never_prints():
    offenders = [f"{p}:{i}" for p in (ROOT / "uadc").rglob("*.py") if "cli" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.match(r"\s*print\(", line)]
    assert not offenders, offenders


def test_artifacts_root_may_be_a_string(recipe_factory, tmp_path):
    """`uadc.compile("demo", ..., artifacts="artifacts")` ended in `TypeError: unsupported operand
    type(s) for /: 'str' and 'str'`; a str path is a path, as everywhere else in the API."""
    import uadc
    with pytest.raises(uadc.UadcError, match=r"no checkpoint for recipe 'tiny' at .*art/tiny/checkpoint.pt"):
        uadc.compile(recipe_factory(), "ort-cpu-fp32", artifacts=str(tmp_path / "art"))
    assert uadc.load_recipe(recipe_factory()).artifact_dir(str(tmp_path)) == tmp_path / "tiny"


def test_every_public_function_shows_its_typed_signature():
    """`uadc.verify` is also the name of a package (the verify layer): once that package is imported,
    `inspect.signature(uadc.verify)` read `(*args, **kwargs)`."""
    import inspect
    import uadc.verify.gate  # noqa: F401  (binds the package to the name uadc.verify)
    from uadc.pipeline import api
    from uadc.pipeline import bundle
    for name in ("train", "evaluate", "compile", "verify", "diff", "qat", "baseline"):
        assert inspect.signature(getattr(uadc, name)) == inspect.signature(getattr(api, name)), name
    assert inspect.signature(uadc.bundle) == inspect.signature(bundle.bundle)     # torch-free, as the CLI's
    assert "artifact" in inspect.signature(uadc.verify).parameters
    import pydoc   # help() showed the package's docstring ("Polygraphy comparisons...") with no parameters
    text = pydoc.render_doc(uadc.verify, renderer=pydoc.plaintext)
    assert "normal_only" in text and inspect.getdoc(api.verify).splitlines()[0] in text, text


def test_the_first_api_name_in_an_app_without_numpy_leaves_the_warning_filters_alone():
    """`uadc.UadcError` in an app that never imported numpy left numpy's four import-time filters in place
    (uadc.core.scoped imported numpy before the filters were kept)."""
    import subprocess
    code = ("import sys, warnings\nfilters = warnings.filters[:]\nimport uadc\nuadc.UadcError\n"
            "assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-500:]


def test_the_api_leaves_the_callers_random_stream_and_root_logger_alone(trained, tmp_path):
    """Two promises of the README broken by libraries uadc imports or calls: the first `uadc.<name>` in a
    process imported sklearn, whose `rich` draws from Python's `random` at import; ORT's quantizer calls
    `logging.info`, which gave the caller's root logger a handler (`WARNING:uadc...` lines after)."""
    import logging
    import subprocess
    recipe, art = trained
    # nor the environment (scikit-learn's KMP_DUPLICATE_LIB_OK, which children inherit; torch's
    # TORCHINDUCTOR_CACHE_DIR at the first optimizer and export) or the warning filters (scipy, sympy)
    code = ("import os, random, warnings, numpy, uadc\nrandom.seed(0); a = random.random()\nrandom.seed(0)\n"
            "env, filters = dict(os.environ), warnings.filters[:]\n"
            "uadc.train, uadc.compile, uadc.evaluate, uadc.Detector\nassert random.random() == a, 'stream moved'\n"
            # a compile first: its export imported sympy (a filter) outside the block that keeps them
            f"uadc.compile({str(recipe)!r}, 'ort-cpu-int8', artifacts={str(art)!r}, out={str(tmp_path / 'c')!r}, "
            "evaluate=False, latency_runs=1)\n"
            "assert warnings.filters == filters, [f for f in warnings.filters if f not in filters]\n"
            f"uadc.train({str(recipe)!r}, artifacts={str(tmp_path / 'env')!r}, epochs=1)\n"
            "assert dict(os.environ) == env, set(os.environ) ^ set(env)\nassert warnings.filters == filters\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-500:]
    root = logging.getLogger()
    kept = root.handlers[:]
    root.handlers[:] = []            # as in a script: pytest's own capture handlers put aside
    try:
        uadc.compile(recipe, "ort-cpu-int8", artifacts=art, out=tmp_path / "i8", quantize="student,teacher",
                     latency_runs=1, threads=1, evaluate=False)
        assert root.handlers == []
    finally:
        root.handlers[:] = kept


def test_a_stop_during_onnx_export_is_a_stop_not_an_export_failure(monkeypatch):
    """torch turned a Ctrl-C / SIGTERM landing in its lazy imports into an AttributeError inside the
    exporter's error: `uadc compile` reported "ONNX export failed" (exit 2, ANSI colour codes in the line)."""
    from uadc.export import onnx_export
    from uadc.models import KDModel

    def stopped(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'")

    monkeypatch.setattr(onnx_export.torch.onnx, "export", stopped)
    import contextlib
    model = KDModel.__new__(KDModel)
    monkeypatch.setattr(onnx_export, "eval_mode", contextlib.nullcontext)   # a bare model has no modules
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_model(model, 32, {})

    def failed(*a, **k):
        raise RuntimeError("Failed to export. \x1b[96mThis is step 1/3\x1b[0m of exporting")
    monkeypatch.setattr(onnx_export.torch.onnx, "export", failed)
    with pytest.raises(UadcError, match=r"^ONNX export failed: RuntimeError: Failed to export. This is step 1/3 of"):
        onnx_export.export_model(model, 32, {})


def test_two_compiles_of_one_model_write_the_same_files_but_reports(trained, tmp_path):
    """calibration.json held the calibration's seconds: two INT8 compiles of one checkpoint never had the
    same files (and so never the same artifact.json or bundle); only report.json / report.md time things."""
    recipe, art = trained
    b = uadc.baseline(recipe, artifacts=art, threads=1)
    paths = [uadc.compile(b, "ort-cpu-int8", out=tmp_path / n, latency_runs=1, threads=1, evaluate=False,
                          precision="target").path for n in ("a", "b")]
    files = [json.loads((p / "artifact.json").read_text())["files"] for p in paths]
    differ = sorted(k for k in files[0] if files[0][k] != files[1].get(k))
    assert differ == ["report.json", "report.md"], differ


def test_ort_fp32_and_the_artifact_are_timed_in_turns(trained, tmp_path, monkeypatch):
    """The FP32 latency was measured once per baseline and every artifact's later: in a sweep an FP32 cell read
    1.48x faster than FP32 itself. Each compile now times ORT FP32 and its artifact interleaved."""
    from uadc.backends import ort
    calls = []
    real = ort.paired_latency_ms
    monkeypatch.setattr("uadc.pipeline.compile.paired_latency_ms",
                        lambda fns, runs: calls.append(len(fns)) or real(fns, runs))
    recipe, art = trained
    b = uadc.baseline(recipe, artifacts=art, threads=1)
    res = uadc.compile(b, "ort-cpu-fp32", out=tmp_path / "f", latency_runs=5, threads=1, evaluate=False)
    assert calls == [2] and res.latency.ort_fp32["runs"] == res.latency.compiled["runs"] == 5
    order = []
    ort.paired_latency_ms([lambda: order.append("a"), lambda: order.append("b")], runs=2, warmup=0)
    assert order == ["a", "b", "a", "b"]


def test_wrong_argument_types_are_one_line_each(trained, tmp_path):
    """Found by an API review: each raised a TypeError from deep inside (or, `latency_runs=2.5`, after the
    whole compile; `ray="no"` started Ray; `threads=-1` was taken by `baseline` and failed a later call)."""
    recipe, art = trained
    b = uadc.baseline(recipe, artifacts=art, threads=1)
    for call, why in ((lambda: uadc.evaluate(recipe, artifacts=5), "artifacts: expected a path"),
                      (lambda: uadc.baseline(recipe, artifacts=5), "artifacts: expected a path"),
                      (lambda: uadc.qat(recipe, artifacts=5), "artifacts: expected a path"),
                      # "checkpoint not found: FILE/tiny/checkpoint.pt" for a file given as the root
                      (lambda: uadc.evaluate(recipe, artifacts=recipe), f"artifacts: not a folder: {recipe}"),
                      (lambda: uadc.baseline(recipe, artifacts=art, threads=-1), "threads: expected a whole number"),
                      (lambda: uadc.compile(b, "ort-cpu-fp32", latency_runs="5"), "latency_runs: expected a whole"),
                      (lambda: uadc.compile(b, "ort-cpu-fp32", latency_runs=2.5), "latency_runs: expected a whole"),
                      (lambda: uadc.compile(b, "ort-cpu-int8", calibration=5), "calibration: expected train"),
                      (lambda: uadc.compare_calibrators(recipe, calib_samples="4"), "calib_samples: expected"),
                      (lambda: uadc.compare_calibrators(recipe, ray="no"), "ray: expected True or False"),
                      (lambda: uadc.Detector.load(tmp_path, verify="no"), "verify: expected True or False")):
        with pytest.raises(UadcError, match=why):
            call()
    assert repr(b).startswith("Baseline(recipe=tiny, checkpoint=")
    # no logging set up by the caller: uadc's warnings go nowhere (logging's last resort printed them)
    p = subprocess.run([sys.executable, "-c", "import logging, uadc\nlogging.getLogger('uadc.x').warning('w')"],
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "", p.stderr


def test_every_public_name_is_documented_and_every_result_prints_as_json():
    """The README says results have to_dict() / to_json(); six had no to_json, QatRunResult neither
    (nor a docstring, nor a place in __all__), uadc.doctor no docstring."""
    for name in uadc.__all__[1:]:
        obj = getattr(uadc, name)
        assert (getattr(obj, "__doc__", None) or "").strip(), name
        if isinstance(obj, type) and hasattr(obj, "to_dict"):
            assert callable(getattr(obj, "to_json", None)), name
    assert "QatRunResult" in uadc.__all__ and json.loads(uadc.doctor().to_json())["uadc"] == uadc.__version__
    assert sorted(uadc.__all__) == sorted(["__version__", *uadc._API])   # the literal list and the lazy table agree


def test_the_types_of_public_results_fields_are_public():
    """TrainResult.models, CompileResult.metrics and .latency were uadc.training.run.TrainedModel and
    uadc.report.results.Metrics / Latency: a pipeline could not annotate them from uadc."""
    import dataclasses
    import typing

    def classes(hint):
        if isinstance(hint, type):
            yield hint
        for arg in typing.get_args(hint):
            yield from classes(arg)

    public = [getattr(uadc, n) for n in uadc.__all__[1:]]
    missing, seen = set(), set()
    todo = [obj for obj in public if isinstance(obj, type) and dataclasses.is_dataclass(obj)]
    while todo:   # fields of fields too (Manifest.thresholds -> Thresholds -> CategoryThresholds -> Threshold)
        cls = todo.pop()
        seen.add(cls)
        for hint in typing.get_type_hints(cls).values():
            for c in classes(hint):
                if c.__module__.startswith("uadc.") and dataclasses.is_dataclass(c):
                    missing |= {c.__name__} if all(c is not p for p in public) else set()
                    todo += [c] if c not in seen else []
    assert not missing, missing


def test_a_writer_that_fails_like_a_full_disk_is_one_line_and_leaves_no_temp(tmp_path):
    """torch.save reports ENOSPC as a RuntimeError of its zip writer: `uadc train` on a full disk was a traceback."""
    from uadc.core.io import atomic_save

    def save(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 34240 vs 34136\nmore")
    with pytest.raises(uadc.UadcError, match=r"cannot write .*checkpoint.pt: \[enforce fail.*34136 \([\d,]+ bytes free "
                                             r"where it goes\)$"):
        atomic_save(tmp_path / "checkpoint.pt", save)
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_changed_in_place_is_checked_again(recipe_factory, tmp_path):
    """`r.train.epochs = -1` trained an empty checkpoint over a good one, which nothing could load after;
    `r.data.sources = []` and `r.train.batch_size = 0` were tracebacks deep inside."""
    r = uadc.load_recipe(recipe_factory(train={"epochs": 1, "threads": 1}))
    # each names the key as a recipe file would (`train.epochs`, it said `epochs`); a mistyped one is an unknown key
    for section, key, value, text in (("train", "epochs", -1, "train.epochs: -1 is below the minimum 1"),
                                      ("train", "batch_size", 0, "train.batch_size: 0 is below the minimum 1"),
                                      ("train", "epochs", "x", "train.epochs: expected int"),
                                      ("eval", "batch_size", 0, "eval.batch_size: 0 is below the minimum 1"),
                                      ("train", "epoch", 3, r"train.epoch: unknown key \(did you mean 'epochs'\?\)"),
                                      ("train", "train_epochs", 3, r"train.train_epochs: unknown key"),
                                      ("model", "image_knn", {"k": 0}, "model.image_knn.k: 0 is below the minimum 1")):
        with pytest.raises(uadc.UadcError, match=f"^{text}"):
            setattr(getattr(r, section), key, value)
    with pytest.raises(uadc.UadcError, match=r"^train.dcam.kl_weight: -1 is below the minimum 0"):
        r.train.dcam.kl_weight = -1
    r.train.epochs = 2                      # a valid change is taken
    assert r.train.epochs == 2 and uadc.load_recipe(r).train.epochs == 2
    for name in ("train", "seed", "colour"):   # a whole section was Python's AttributeError (no setter)
        with pytest.raises(uadc.UadcError, match=rf"recipe.{name} cannot be replaced: set recipe.config.{name}"):
            setattr(r, name, {"epochs": 3})
    r.config.train = {"epochs": 3}          # the way it names is checked and taken
    assert r.train.epochs == 3
    import warnings
    taps = list(r.model.taps)
    r.model.taps.append(3)                  # pydantic's serializer warned (printed; raised under -W error) first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(uadc.UadcError, match=r"model.taps\[2\]: expected str, got 3"):
            uadc.load_recipe(r)
    r.model.taps[:] = taps
    r.data.sources.clear()                  # a list changed in place escapes the assignment check
    with pytest.raises(uadc.UadcError, match="data.sources: must not be empty"):
        uadc.train(r, artifacts=tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_eval_and_qat_check_where_they_write_before_the_work(trained, monkeypatch):
    """On a read-only artifacts folder both ran to the end (QAT's epochs too) and only then failed."""
    import uadc.evaluation.run as ev
    import uadc.quant.qat.run as qr
    recipe, art = trained
    readonly = (art / "tiny").absolute()

    def check(folder):
        if readonly in (Path(folder).absolute(), *Path(folder).absolute().parents):
            raise uadc.UadcError(f"folder is not writable: {readonly}")
    work = []
    for mod in (ev, qr):
        monkeypatch.setattr(mod, "check_writable", check)
    monkeypatch.setattr(ev, "load_checkpoint", lambda *a, **k: work.append("eval"))
    monkeypatch.setattr(qr, "ptq_init", lambda *a, **k: work.append("qat"))
    for call in (lambda: uadc.evaluate(recipe, artifacts=art), lambda: uadc.evaluate(recipe, one_class=True, artifacts=art),
                 lambda: uadc.qat(recipe, "ort-cpu-int8", artifacts=art, compile_after=False)):
        with pytest.raises(uadc.UadcError, match="folder is not writable"):
            call()
    assert work == []


def test_a_baselines_compiles_go_where_its_checkpoint_is(trained, tmp_path, monkeypatch):
    """`uadc.compile(uadc.baseline(r, artifacts=A), ...)` read A's checkpoint and wrote into ./artifacts."""
    recipe, art = trained
    monkeypatch.chdir(tmp_path)
    b = uadc.baseline(recipe, artifacts=art, threads=1)
    res = uadc.compile(b, "ort-cpu-fp32", evaluate=False, latency_runs=1)
    assert res.path.absolute() == (art / "tiny" / "ort-cpu-fp32").absolute() and not (tmp_path / "artifacts").exists()
    # read from ./artifacts, then the caller moved: its compiles went to the new folder's ./artifacts
    monkeypatch.chdir(art.parent)
    b = uadc.baseline(recipe, artifacts=Path(art.name), threads=1)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    res = uadc.compile(b, "ort-cpu-fp32", evaluate=False, latency_runs=1, force=True)
    assert res.path == (art / "tiny" / "ort-cpu-fp32").absolute() and not list((tmp_path / "elsewhere").iterdir())
    for bad in ("4", -1, 2.5, True):   # a Baseline source skipped the check: a TypeError, or clamped silently
        with pytest.raises(UadcError, match=r"threads: expected a whole number from 1 to 1024"):
            uadc.compile(b, "ort-cpu-fp32", evaluate=False, threads=bad, out=tmp_path / "t")


def test_a_checkpoint_follows_its_data_to_another_folder(tmp_path):
    """A moved project (or the demo in another venv's site-packages) refused its own checkpoint: the check
    compared the data's absolute path. Now the same training files at another path are the same data."""
    import shutil
    sys.path.insert(0, str(Path(__file__).parent))
    from synthetic import make_tiny_recipe
    make_tiny_recipe(tmp_path / "p1", "tiny", epochs=1)      # data.sources root: p1/data, absolute in the recipe
    recipe = tmp_path / "p1" / "tiny.yaml"
    recipe.write_text(recipe.read_text().replace(str(tmp_path / "p1" / "data"), "data"))   # as a user writes it
    uadc.train(recipe, artifacts=tmp_path / "p1" / "art")
    shutil.move(tmp_path / "p1", tmp_path / "p2")
    moved = tmp_path / "p2"
    res = uadc.evaluate(moved / "tiny.yaml", artifacts=moved / "art", write=False)
    assert 0 <= res.mean["image_auroc"] <= 1
    good = sorted((moved / "data" / "gray" / "train" / "good").iterdir())[0]
    good.write_bytes(good.read_bytes() + b"\0")               # other training data at the new place: refused
    with pytest.raises(uadc.UadcError, match=r"trained on data elsewhere \(data.sources\[0\].root: .*p1/data.* in "
                                             r"the checkpoint, .*p2/data.* in the recipe\), and its training files differ"):
        uadc.evaluate(moved / "tiny.yaml", artifacts=moved / "art", write=False)


def test_eval_names_the_recipe_its_checkpoint_trained_with(recipe_factory, tmp_path):
    """eval.json's recipe_hash is the evaluating recipe's; after `train --epochs 2` a pipeline joining the
    train and eval documents on it found no match. The training's own is now beside it."""
    import uadc
    r = recipe_factory(data={"image_size": 32}, train={"epochs": 1, "threads": 1})
    trained = uadc.train(r, artifacts=tmp_path, epochs=2)
    res = uadc.evaluate(r, artifacts=tmp_path)
    assert res.extra["trained_recipe_hash"] == trained.recipe_hash != res.extra["recipe_hash"]


def test_quiet_blocks_in_two_threads_leave_the_process_as_found_and_other_threads_heard():
    """Two API calls at once (each muting third-party output) left sys.stdout a buffer for good when
    the first ended before the second, and the app's other threads' prints and logs were swallowed
    meanwhile; a Detector loading in one thread listed another's warnings."""
    import io
    import logging
    import threading
    import warnings
    from uadc.core.scoped import logged_warnings, quiet_third_party
    app, heard = logging.getLogger("some_app"), io.StringIO()
    handler = logging.StreamHandler(heard)
    app.addHandler(handler)
    before = (sys.stdout, sys.stderr, warnings.showwarning)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    said: dict[str, list] = {}

    def first():
        with quiet_third_party(), logged_warnings() as mine:
            a_in.set()
            b_in.wait(10)
            print("muted a")
            logging.getLogger("uadc").warning("a's warning")
        said["a"] = mine
        a_out.set()

    def second():
        a_in.wait(10)
        with quiet_third_party(), logged_warnings() as mine:
            b_in.set()
            a_out.wait(10)    # the first block ends while this one runs
            app.warning("muted b")
        said["b"] = mine

    try:
        threads = [threading.Thread(target=f) for f in (first, second)]
        for t in threads:
            t.start()
        b_in.wait(10)
        app.warning("heard meanwhile")    # this thread is in no quiet block
        for t in threads:
            t.join(10)
        assert (sys.stdout, sys.stderr, warnings.showwarning) == before
        assert heard.getvalue() == "heard meanwhile\n" and not handler.filters
        assert said == {"a": ["a's warning"], "b": []}
    finally:
        app.removeHandler(handler)


def test_ignore_blocks_and_seeded_blocks_in_two_threads_leave_the_process_as_found():
    """Each loaded image and checkpoint ran catch_warnings, which puts back the copy it saved: two threads'
    blocks overlapping left an `ignore` filter for good (every later warning of the app ignored). Two
    trainings in threads seeded and drew from the same global streams: neither was reproducible."""
    import threading
    import time
    import warnings
    import torch
    from uadc.core.scoped import environment_kept, seeded, warnings_ignored
    before = warnings.filters[:]
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with warnings_ignored(UserWarning):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with environment_kept(), warnings_ignored():   # a copy of the filters saved while the first block runs
            b_in.set()
            a_out.wait(10)
    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert warnings.filters == before

    with seeded(0):
        alone = torch.rand(6)
    drawn, started = [], threading.Event()

    def training():
        with seeded(0):
            drawn.append(torch.rand(3))
            started.set()
            time.sleep(0.3)                # another training starts meanwhile
            drawn.append(torch.rand(3))

    def other():
        started.wait(10)
        with seeded(1):
            time.sleep(0.6)                # its draws come from seed 1 until it ends
    threads = [threading.Thread(target=f) for f in (training, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert torch.equal(torch.cat(drawn), alone)


def test_a_seeded_block_leaves_pythons_and_numpys_streams_to_the_app():
    """Training seeded Python's and NumPy's global streams: an app's other threads drew the recipe's numbers
    meanwhile (the same ones every training), then their own draws again once it ended."""
    import random
    import numpy as np
    from uadc.core.scoped import seeded
    random.seed(111)
    np.random.seed(111)
    with seeded(0):
        drawn = (random.random(), float(np.random.rand()), torch.rand(1))
    py, nprs = random.Random(111), np.random.RandomState(111)
    assert drawn[:2] == (py.random(), float(nprs.rand())) and random.random() == py.random()
    torch.manual_seed(0)
    assert torch.equal(drawn[2], torch.rand(1))   # torch's is the recipe's


def test_a_checkpoint_loaded_in_another_thread_leaves_a_trainings_stream_alone(trained):
    """load_checkpoint built its model under a bare fork_rng: saved, drawn, restored while a training in
    another thread drew from its seeded stream, which went back mid-run (weights not reproducible)."""
    import threading
    import time
    from uadc.config.recipe import load_recipe
    from uadc.core.scoped import seeded
    from uadc.training.checkpoint import checkpoint_path, load_checkpoint
    recipe_path, art = trained
    recipe = load_recipe(recipe_path)
    with seeded(0):
        alone = [torch.rand(1) for _ in range(150)]
    drawn, started = [], threading.Event()

    def training():
        with seeded(0):
            for i in range(150):
                drawn.append(torch.rand(1))
                if i == 0:
                    started.set()
                time.sleep(0.002)

    def loading():
        started.wait(10)
        for _ in range(3):
            load_checkpoint(checkpoint_path(recipe, art), recipe)
    threads = [threading.Thread(target=f) for f in (training, loading)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert torch.equal(torch.cat(drawn), torch.cat(alone))


def test_third_party_warnings_in_a_quiet_block_are_kept_whatever_the_callers_filters():
    """Under a caller's `error` filter (pytest's filterwarnings, PYTHONWARNINGS) torch's exporter's
    FutureWarning (attributed to copyreg) became an export failure; the filters are the caller's again."""
    import warnings
    from uadc.core.scoped import environment_kept, quiet_third_party
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = warnings.filters[:]
        with quiet_third_party():
            warnings.warn_explicit("the exporter's", FutureWarning, "copyreg.py", 105, module="copyreg")
            with environment_kept():
                warnings.simplefilter("ignore", UserWarning)   # a library setting a filter as it imports
        assert warnings.filters == before
        with pytest.raises(FutureWarning):
            warnings.warn("the caller's own", FutureWarning)


def test_simplifying_a_graph_leaves_the_apps_other_threads_printing():
    """onnxsim ran under a process-wide redirect_stdout: an embedding app's prints from its other threads
    during a compile were lost."""
    import io
    import threading
    import time
    import numpy as np
    import onnx
    import onnxsim  # noqa: F401 - its first import redirects the process's stdout for a moment (not uadc's doing)
    from onnx import TensorProto, helper
    from uadc.passes.pipeline import _onnxsim
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.ones(108, np.float32))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 8, 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    feeds = {"x": np.ones((1, 3, 8, 8), np.float32)}
    heard, made, stop = io.StringIO(), [0], threading.Event()

    def tick():
        while not stop.is_set():
            print("tick")
            made[0] += 1
            time.sleep(0.001)

    before, sys.stdout = sys.stdout, heard
    t = threading.Thread(target=tick)
    try:
        t.start()
        for _ in range(5):
            assert isinstance(_onnxsim(model, feeds), onnx.ModelProto)
    finally:
        stop.set()
        t.join()
        sys.stdout = before
    assert made[0] and heard.getvalue().count("tick\n") == made[0]


def test_simplifying_a_graph_leaves_the_apps_other_threads_stderr_alone(capfd, caplog, monkeypatch):
    """onnxsim's step pointed the process's fd 2 at a temp file: while a compile ran in one thread, the
    app's log lines and native writes from its other threads went into uadc's DEBUG log, not to stderr.
    Only the command line's own process has its fd 2 caught (ONNX Runtime's lines logged instead)."""
    import threading
    import time
    from click.testing import CliRunner
    from uadc.cli import main
    from uadc.core import scoped
    made, stop = [0], threading.Event()

    def tick():
        while not stop.is_set():
            os.write(2, b"tick\n")
            made[0] += 1
            time.sleep(0.001)

    t = threading.Thread(target=tick)
    t.start()
    try:
        for _ in range(20):
            with scoped.native_stderr_logged():
                time.sleep(0.005)
    finally:
        stop.set()
        t.join()
    assert made[0] and capfd.readouterr().err.count("tick\n") == made[0]
    monkeypatch.setattr(scoped, "_OWNED", True)       # `uadc compile`: the process is uadc's
    with caplog.at_level("DEBUG", logger="uadc"):
        with scoped.native_stderr_logged():
            os.write(2, b"onnxruntime: a graph it cannot run\n")
    assert "onnxruntime: a graph it cannot run" not in capfd.readouterr().err.splitlines()   # not as its own line
    assert "native output: onnxruntime: a graph it cannot run" in caplog.text
    monkeypatch.undo()
    assert CliRunner().invoke(main, ["recipes", "list"]).exit_code == 0   # an app runs a command in-process:
    with scoped.native_stderr_logged():                                  # the claim ended with the command
        os.write(2, b"the app's line\n")
    assert "the app's line" in capfd.readouterr().err.splitlines()


def test_any_path_object_names_the_same_file_as_its_string(trained, tmp_path, tiny_data):
    """A checkpoint given as an os.PathLike that is not pathlib.Path (PurePosixPath, py.path.local, an app's own
    path class) was not taken for a path: compile / evaluate / baseline silently used the recipe's own checkpoint;
    a recipe or an image given so was refused."""
    from pathlib import PurePosixPath
    recipe, art = trained

    class AppPath(os.PathLike):
        def __init__(self, p):
            self.p = str(p)

        def __fspath__(self):
            return self.p
    other = tmp_path / "other"
    uadc.train(recipe, epochs=1, artifacts=other)        # another model of the recipe: not its own checkpoint
    ckpt = other / "tiny" / "checkpoint.pt"
    want = uadc.evaluate(str(ckpt), recipe, write=False).mean
    assert want != uadc.evaluate(recipe, artifacts=art, write=False).mean
    for kind in (AppPath, PurePosixPath):
        assert uadc.baseline(kind(ckpt), recipe).checkpoint == ckpt
        assert uadc.evaluate(kind(ckpt), recipe, write=False).mean == want
        assert uadc.load_recipe(kind(recipe)).name == "tiny"
    c = uadc.compile(AppPath(ckpt), "ort-cpu-fp32", recipe=recipe, out=tmp_path / "c", evaluate=False, latency_runs=1)
    assert json.loads((c.path / "report.json").read_text())["checkpoint"] == str(ckpt)
    image = next((tiny_data / "gray" / "test" / "good").iterdir())
    det = uadc.Detector.load(AppPath(c.path))
    assert det.predict(AppPath(image)).score == det.predict(PurePosixPath(image)).score == det.predict(str(image)).score
    assert det.predict(AppPath(image)).source == det.predict([AppPath(image)])[0].source == str(image)   # was its repr


def test_train_compile_and_predict_leave_no_thread_running(tiny_data, tmp_path):
    """A library call leaves the process as it found it: tqdm's monitor thread (started by a bar that
    drew nothing), OpenVINO's telemetry pool (imported for a version string) and the Detector's workers
    outlived the calls."""
    from conftest import write_recipe
    recipe = write_recipe(tmp_path / "r.yaml", tiny_data, train={"epochs": 1, "threads": 1},
                          data={"val_fraction": 0.25})
    image = sorted((tiny_data / "gray" / "test").rglob("*.png"))[0]
    code = textwrap.dedent(f"""
        import threading, uadc
        before = set(threading.enumerate())
        uadc.train({str(recipe)!r}, artifacts={str(tmp_path / 'a')!r})
        res = uadc.compile({str(recipe)!r}, "ort-cpu-int8", artifacts={str(tmp_path / 'a')!r}, latency_runs=1, threads=2)
        with uadc.Detector.load(res.path, threads=2) as det:
            det.predict([{str(image)!r}] * 3)
        print(sorted(t.name for t in set(threading.enumerate()) - before))
    """)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HOME": str(tmp_path)})
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip().splitlines()[-1] == "[]"


def test_progress_bars_draw_when_asked_and_quiet_ones_start_no_thread(capsys):
    import threading
    from uadc.core.progress import progress, set_progress
    old = set_progress(True)   # as the CLI on a terminal
    try:
        list(progress(range(3), desc="counting"))
    finally:
        set_progress(False)
    assert "counting" in capsys.readouterr().err
    before = {t for t in threading.enumerate() if t.name == "tqdm_monitor"}
    try:
        list(progress(range(3), desc="silent"))
    finally:
        set_progress(old)
    assert capsys.readouterr().err == ""
    assert {t for t in threading.enumerate() if t.name == "tqdm_monitor"} <= before


def test_a_baseline_kept_across_a_retrain_names_the_checkpoint_it_read(recipe_factory, tmp_path):
    """golden.json's checkpoint_sha256 (what `uadc verify` tells a retrain by) hashed the file at compile time:
    a Baseline built before `uadc train` ran again named the new checkpoint for the old model."""
    from uadc.core.hashing import sha256_file
    from uadc.verify.golden import read_golden
    r, art = recipe_factory(train={"epochs": 1, "threads": 1}), tmp_path / "art"
    uadc.train(r, artifacts=art)
    ckpt = next(art.rglob("checkpoint.pt"))
    read = sha256_file(ckpt)
    base = uadc.baseline(r, artifacts=art)
    uadc.train(r, artifacts=art, epochs=2)
    assert sha256_file(ckpt) != read
    res = uadc.compile(base, "ort-cpu-fp32", out=tmp_path / "fp32", latency_runs=1, threads=1, evaluate=False)
    assert read_golden(res.path).meta["checkpoint_sha256"] == read
    with pytest.raises(UadcError, match="the Baseline's checkpoint .* was trained again since the Baseline read it"):
        uadc.evaluate(base)   # it scored the new checkpoint as the Baseline's model


def test_training_over_another_recipes_checkpoint_of_one_name_says_so(tiny_data, tmp_path, caplog):
    """Two recipe files named alike share <artifacts>/<name>: training one replaced the other's model unsaid."""
    from conftest import write_recipe
    (tmp_path / "b").mkdir()
    a = write_recipe(tmp_path / "r.yaml", tiny_data, train={"epochs": 1, "threads": 1})
    b = write_recipe(tmp_path / "b" / "r.yaml", tiny_data, train={"epochs": 1, "threads": 1}, data={"image_size": 32})
    art = tmp_path / "art"
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.train(a, artifacts=art)
        uadc.train(a, artifacts=art, epochs=2)   # the same model trained longer: nothing to say
        assert "replacing a checkpoint" not in caplog.text
        uadc.train(b, artifacts=art)
    assert "replacing a checkpoint trained with other data/model settings (data.image_size: 64 in the checkpoint, " \
           "32 in the recipe); recipes that share the name 'r' share this folder" in caplog.text
    caplog.clear()   # settings the model refuses: nothing is replaced, so nothing is said of replacing
    (tmp_path / "c").mkdir()
    c = write_recipe(tmp_path / "c" / "r.yaml", tiny_data, train={"epochs": 1, "threads": 1},
                     model={"taps": ["blocks.1", "blocks.99"]})
    with caplog.at_level("WARNING", logger="uadc"), pytest.raises(UadcError, match="unknown feature tap 'blocks.99'"):
        uadc.train(c, artifacts=art)
    assert "replacing a checkpoint" not in caplog.text


def test_a_kdmodel_left_on_another_device_is_one_line(recipe_factory, tmp_path):
    """A model trained on a GPU and handed over as it was failed deep inside torch (a device-mismatch
    RuntimeError); uadc evaluates and exports on the CPU. The meta device stands in for the GPU here."""
    from uadc.config.recipe import load_recipe
    from uadc.training.checkpoint import make_model
    recipe = recipe_factory()
    model = make_model(load_recipe(recipe)).to("meta")
    for call in (lambda: uadc.evaluate(model, recipe, write=False),
                 lambda: uadc.baseline(model, recipe),
                 lambda: uadc.compile(model, "ort-cpu-fp32", recipe=recipe, out=tmp_path / "c", latency_runs=1)):
        with pytest.raises(UadcError, match=r"^the KDModel's weights are on meta; uadc evaluates and compiles on "
                                            r"the CPU: pass model.cpu\(\)$"):
            call()
    assert not (tmp_path / "c").exists()


def test_a_kdmodel_of_other_model_settings_than_the_recipe_is_one_line(recipe_factory, tmp_path):
    """A model of taps blocks.1 + blocks.3 compiled with a recipe of taps [blocks.1] was filed as that
    recipe's artifact (artifact.json naming it), and evaluate judged it without a word."""
    from uadc.config.recipe import load_recipe
    from uadc.training.checkpoint import make_model
    model = make_model(load_recipe(recipe_factory("two", model={"taps": ["blocks.1", "blocks.3"]})))
    state = torch.random.get_rng_state()
    for other, said in ((recipe_factory("one", model={"taps": ["blocks.1"]}), r"weight student\.\S+ only in the model"),
                        (recipe_factory("rd", model={"method": "rd"}), "a STFPM, the recipe builds a ReverseDistillation"),
                        (recipe_factory("sum", model={"taps": ["blocks.1", "blocks.3"], "combine": "sum"}),   # no weight
                         "head.combine is 'product', the recipe's 'sum'")):
        for call in (lambda: uadc.evaluate(model, other, write=False), lambda: uadc.baseline(model, other),
                     lambda: uadc.compile(model, "ort-cpu-fp32", recipe=other, out=tmp_path / "c", latency_runs=1)):
            with pytest.raises(UadcError, match=rf"^the KDModel is not what recipe {Path(other).stem}'s model settings "
                                                rf"build \({said}.*\): give the recipe it was trained with$"):
                call()
    assert not (tmp_path / "c").exists() and torch.equal(torch.random.get_rng_state(), state)
    uadc.baseline(model, recipe_factory("two", model={"taps": ["blocks.1", "blocks.3"]}))   # its own recipe fits
    # its weight-free head settings are the recipe's, as a checkpoint's are (the model's own were used, unsaid)
    topk = recipe_factory("two", model={"taps": ["blocks.1", "blocks.3"], "score_reduction": "topk_mean"})
    assert model.head.score_reduction == "max" and uadc.baseline(model, topk).model.head.score_reduction == \
        "topk_mean" and model.head.score_reduction == "max"


@pytest.mark.parametrize("method", ["stfpm", "us"])
def test_training_on_the_cpu_of_a_gpu_machine_leaves_cuda_alone(method, recipe_factory, tmp_path, monkeypatch):
    """Seeding forked every CUDA generator, and US seeded them too: on a GPU machine each CPU training
    (the default) and each checkpoint load started a CUDA context. CUDA is faked here: one device whose
    generators record any use."""
    touched = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, _n=name, **k: touched.append(_n))
    recipe = recipe_factory(model={"method": method, "taps": ["blocks.3"] if method == "us" else ["blocks.1", "blocks.3"]},
                            train={"epochs": 1, "threads": 1})
    before = torch.get_rng_state()
    uadc.train(recipe, artifacts=tmp_path / "art")
    uadc.baseline(recipe, artifacts=tmp_path / "art")   # loads the checkpoint
    assert touched == [] and torch.equal(torch.get_rng_state(), before)


class _PluginRange:
    """A plug-in calibrator's observe / compute_range, misbehaving as ``how`` says."""
    def __init__(self, how: str):
        self.how, self.hi = how, 0.0

    def observe(self, x) -> None:
        import warnings

        import numpy as np
        self.hi = max(self.hi, float(np.abs(x).max()))
        if self.how == "noisy":   # prints, reseeds NumPy, sets a variable and a warning filter
            print("PLUGIN SAYS", self.hi)
            np.random.seed(5)
            os.environ["UADC_QA_PLUGIN"] = "1"
            warnings.simplefilter("ignore", UserWarning)
        elif self.how == "exit":
            sys.exit(3)

    def compute_range(self):
        return {"strings": ("-1", "1"), "bools": (False, True), "below": (-5.0, -1.0),
                "huge": (-1e39, 1e39)}.get(self.how, (-self.hi, self.hi))


@pytest.mark.parametrize("how, why", [
    ("noisy", None),
    ("exit", r"calibrator 'qa-exit': observe of tensor '.+' called sys.exit\(3\)$"),   # it ended uadc without a word
    ("strings", r"calibrator 'qa-strings': compute_range returned \('-1', '1'\) .*expected \(lo, hi\), two numbers"),
    ("bools", r"calibrator 'qa-bools': compute_range returned \(False, True\)"),
    ("below", r"calibrator 'qa-below': compute_range returned \(-5.0, -1.0\) for tensor '.+', whose values were all >= 0"),
    # finite in float64, not in the quantizer's float32: blamed on "NaN/Inf in the model weights", a traceback in qat
    ("huge", r"calibrator 'qa-huge': compute_range returned \(-1e\+39, 1e\+39\) .*each within \+-1.7e\+38 \(float32\)"),
])
def test_a_plugin_calibrator_is_kept_in_its_place(how, why, trained, tmp_path, monkeypatch, capsys):
    """A plug-in's prints reached stdout, its seeds / variables / warning filters outlived the call, its
    sys.exit ended uadc silently, strings and booleans compiled as ranges, and a range below a tensor
    that never went negative was blamed on the qdq pass ('invalid range (0.0, -1.0)')."""
    import warnings

    import numpy as np
    from uadc.calibrators import base
    from uadc.calibrators.base import Calibrator, register
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    register(f"qa-{how}")(type(f"QA{how}", (Calibrator,), {
        "__init__": lambda self, **o: (Calibrator.__init__(self, **o), setattr(self, "p", _PluginRange(how)))[0],
        "observe": lambda self, x: self.p.observe(x), "compute_range": lambda self: self.p.compute_range()}))
    recipe, art = trained
    np.random.seed(1234)
    state, filters = np.random.get_state()[1].copy(), warnings.filters[:]
    compile_it = lambda: uadc.compile(recipe, "ort-cpu-int8", calibrator=f"qa-{how}", artifacts=art,
                                      out=tmp_path / "c", evaluate=False, latency_runs=1)
    if why:
        with pytest.raises(UadcError, match=why):
            compile_it()
        assert not (tmp_path / "c").exists()
    else:
        compile_it()
        assert "PLUGIN" not in capsys.readouterr().out
    assert np.array_equal(np.random.get_state()[1], state) and warnings.filters == filters
    assert "UADC_QA_PLUGIN" not in os.environ


def test_calibration_images_and_qat_epochs_have_the_recipes_bounds(trained, tmp_path):
    """An endless calibration generator was read until the memory ran out; qat(epochs=10**6) ran until killed."""
    import itertools

    import numpy as np
    recipe, art = trained
    endless = itertools.repeat(np.zeros((512, 3, 64, 64), np.float32))
    with pytest.raises(UadcError, match=r"^calibration: more than 4096 images given"):
        uadc.compile(recipe, "ort-cpu-int8", calibration=endless, artifacts=art, out=tmp_path / "c", evaluate=False)
    with pytest.raises(UadcError, match=r"^qat.epochs: 1000000 is above the maximum 10000"):
        uadc.qat(recipe, "ort-cpu-int8", epochs=10**6, artifacts=art)
    assert not any(tmp_path.iterdir())


def test_the_api_under_a_callers_torch_and_process_settings(tmp_path, recipe_factory):
    """Found by an API review: training under the caller's torch.no_grad()/inference_mode() or float64 default dtype
    raised torch's raw errors; evaluate and compile left the caller's model in eval mode, and the exporter fixed
    multiprocessing's start method; threads=10**6 aborted the process; evaluate=None (default on) skipped it."""
    import multiprocessing.context as mpc

    import torch

    import uadc
    r, art = recipe_factory(train={"epochs": 1, "threads": 1}), tmp_path / "art"
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode():
            uadc.train(r, artifacts=art)
        assert torch.get_default_dtype() == torch.float64
        # what it trained then loaded as a float64 model ("weight ... is torch.float32, the model's is torch.float64")
        # and exported float64 constants beside float32 weights (ONNX Runtime refused the model)
        f64 = uadc.evaluate(r, artifacts=art, write=False).mean
        uadc.compile(r, "ort-cpu-fp32", artifacts=art, out=tmp_path / "c64", evaluate=False, latency_runs=1)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)
    assert uadc.evaluate(r, artifacts=art, write=False).mean == f64
    model = uadc.baseline(r, artifacts=art).model.train()
    model.teacher.eval()
    modes = [m.training for m in model.modules()]
    unset = mpc._default_context._actual_context is None
    uadc.evaluate(model, r, write=False)
    uadc.compile(model, "ort-cpu-fp32", recipe=r, artifacts=art, out=tmp_path / "c", evaluate=False, latency_runs=1)
    assert [m.training for m in model.modules()] == modes
    assert (mpc._default_context._actual_context is None) == unset
    with pytest.raises(uadc.UadcError, match="threads: expected a whole number from 1 to 1024"):
        uadc.compile(r, "ort-cpu-fp32", artifacts=art, threads=10 ** 6)
    with pytest.raises(uadc.UadcError, match="evaluate: expected True or False, got None"):
        uadc.compile(r, "ort-cpu-fp32", artifacts=art, evaluate=None)
    with pytest.raises(uadc.UadcError, match="the KDModel's weights are float64; .*pass model.float()"):
        uadc.evaluate(model.double(), r, write=False)


def test_overlapping_float32_blocks_restore_the_callers_default_dtype_once():
    """Two uadc calls in two threads under a caller's float64 default: the second ran in float64 once the
    first ended, and float32 stayed the default after both (each block restored its own saved dtype)."""
    import threading

    import torch
    from uadc.core.scoped import float32_default
    a_in, a_out, seen = threading.Event(), threading.Event(), {}

    def first():
        with float32_default():
            a_in.set()
            a_out.wait(10)

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = threading.Thread(target=first)
        t.start()
        a_in.wait(10)
        with float32_default():
            a_out.set()
            t.join(10)
            seen["inside"] = torch.get_default_dtype()
        seen["after"] = torch.get_default_dtype()
    finally:
        torch.set_default_dtype(dtype)
    assert seen == {"inside": torch.float32, "after": torch.float64}


def test_overlapping_calls_in_worker_threads_leave_new_threads_the_callers_torch_thread_count():
    """Two calls in worker threads (train.threads 1, then 2) each restored their own count: torch's count for
    threads started later was left at 1, so a server's new pool threads ran torch on one core, unsaid."""
    import threading

    import torch
    from uadc.core.scoped import torch_threads
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a():
        with torch_threads(1):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b():
        a_in.wait(10)
        with torch_threads(2):
            b_in.set()
            a_out.wait(10)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        threads = [threading.Thread(target=f) for f in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        new = []
        (t := threading.Thread(target=lambda: new.append(torch.get_num_threads()))).start()
        t.join()
        seen = (torch.get_num_threads(), new[0])
    finally:
        torch.set_num_threads(before)
    assert seen == (3, 3)


def test_uadc_verify_docstring_without_torch_is_the_packages():
    """help(uadc.verify) on the torch-free install raised ModuleNotFoundError (its docstring imported the API)."""
    import subprocess
    code = ("import sys, pydoc; sys.modules['torch'] = None\nimport uadc.verify\n"
            "assert 'Polygraphy comparisons' in uadc.verify.__doc__\npydoc.render_doc(uadc.verify)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-800:]


def test_a_print_in_another_thread_survives_quiet_blocks_ending(tmp_path, monkeypatch):
    """CPython's print() holds sys.stdout as a borrowed reference across its writes: the router a quiet block
    put there was freed as the last block ended, and an app thread printing meanwhile crashed the process
    (SIGSEGV, or "'str' object has no attribute 'write'" from the freed memory's next owner); so did the
    command line's own stream guards (uadc.cli.main run in an app); one router per stream seen kept every
    captured StringIO alive."""
    import subprocess
    script = tmp_path / "prints.py"
    script.write_text(
        "import io, sys, threading, time\n"
        "from uadc.core.process import stdout_failures_as_errors\n"
        "from uadc.core.scoped import quiet_third_party\n"
        "stop = threading.Event()\n"
        "class Slow:\n"
        "    def __init__(self, s): self.s = s\n"
        "    def write(self, t):\n"
        "        for _ in range(50): pass\n"
        "        return self.s.write(t)\n"
        "    def flush(self): pass\n"
        "sys.stdout = Slow(io.StringIO())\n"
        "def printer():\n"
        "    while not stop.is_set(): print('tick', 1, 2, 3, 4, 5, 6, 7, 8, 9)\n"
        "def swap(block):\n"
        "    while not stop.is_set():\n"
        "        with block(): pass\n"
        "block = quiet_third_party if sys.argv[1] == 'quiet' else stdout_failures_as_errors\n"
        "ts = [threading.Thread(target=printer) for _ in range(2)] + [threading.Thread(target=swap, args=(block,))]\n"
        "sys.setswitchinterval(1e-6)\n"
        "[t.start() for t in ts]\n"
        "time.sleep(3)\n"
        "stop.set(); [t.join() for t in ts]\n"
        "sys.__stdout__.write('survived')\n")
    for block in ("quiet", "guard"):   # each swaps sys.stdout in its own way (not nested in one another here)
        p = subprocess.run([sys.executable, str(script), block], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout == "survived", (block, p.returncode, p.stderr[-2000:])
    import contextlib
    import io

    import logging

    from uadc.core import scoped
    with scoped.quiet_third_party():
        handler = logging.StreamHandler()   # a library's, made in a block: it keeps the stream of then
    for _ in range(3):   # each capture's stream was kept for good
        with contextlib.redirect_stderr(buf := io.StringIO()):
            with scoped.quiet_third_party():
                pass
        assert handler.stream.stream is not buf   # one router re-pointed sent it into the app's capture
    import types
    later = scoped.time.monotonic() + 61
    monkeypatch.setattr(scoped, "time", types.SimpleNamespace(monotonic=lambda: later))   # uadc's clock only
    with scoped.quiet_third_party():
        pass
    assert buf not in [entry[0].stream for entry in scoped._routers.values()]   # put back a minute ago: gone
    assert handler.stream in [entry[0] for entry in scoped._routers.values()]   # held by the handler: kept
