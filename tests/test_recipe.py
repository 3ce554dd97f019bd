import json
import re
from pathlib import Path

import pytest
import yaml

from conftest import write_recipe
from uadc.core.errors import UadcError
from uadc.config.recipe import load_recipe, recipe_from_dict
from uadc.config.schema import describe_schema

SRC = {"data": {"sources": [{"root": "data", "categories": ["a"]}]}}


def _with(**sections):
    cfg = {"data": dict(SRC["data"])}
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


def test_defaults_filled_and_paths_resolved(tmp_path):
    p = tmp_path / "sub" / "r.yaml"
    p.parent.mkdir()
    p.write_text(yaml.safe_dump(SRC))
    r = load_recipe(p)
    assert r.name == "r"
    assert r.model.backbone == "efficientnet_lite0"
    assert r.train.epochs == 10
    assert Path(r.data.sources[0].root) == (tmp_path / "sub" / "data").resolve()


@pytest.mark.parametrize("cfg, message", [
    (_with(model={"backbone": "resnet19"}), "model.backbone: 'resnet19' is not one of efficientnet_lite0, resnet18"),
    (_with(model={"colour": 1}), "model.colour: unknown key"),
    (_with(train={"epochs": "ten"}), "train.epochs: expected int, got 'ten'"),
    (_with(train={"epochs": True}), "train.epochs: expected int, got true"),
    (_with(train={"epochs": 0}), "train.epochs: 0 is below the minimum 1"),
    (_with(train={"lr": 0}), "train.lr: must be above 0.0, got 0"),            # "0 is below the minimum 0.0"
    (_with(deploy={"false_alarm_rate": 0.5}), "deploy.false_alarm_rate: must be below 0.5, got 0.5"),
    # 1 - 1e-17 is 1.0: the tolerance factor was NaN and the thresholds fell to the largest validation value
    (_with(deploy={"false_alarm_rate": 1e-17}), "deploy.false_alarm_rate: 1e-17 is too small to tell from 0"),
    (_with(compile={"quantize": ["students"]}), "compile.quantize[0]: 'students' is not one of"),
    ({"data": {"sources": [{"root": "x", "cats": []}]}}, "data.sources[0].cats: unknown key"),
    ({"data": {}}, "data.sources: at least one"),
    (_with(model={"method": "paste"}), "model.split: required for method paste"),
    # a traceback from the blur's padding after the whole training (inside the schema's range)
    (_with(model={"smoothing_sigma": 8}, data={"image_size": 32}),
     "model.smoothing_sigma: 8 blurs 32 px each way, which needs data.image_size > 32 (it is 32)"),
    (_with(model={"smoothing_sigma": 64}), "model.smoothing_sigma: 64 blurs 256 px each way"),
    (_with(model={"backbone": "resnet18"}), "model.weights: backbone 'resnet18' has no bundled weights"),
    # US's students describe one stage: every tap after the first was ignored, silently
    (_with(model={"method": "us", "taps": ["blocks.1", "blocks.3"]}), "model.taps: method us describes one teacher stage"),
    ([1, 2], "recipe: expected a mapping"),
    ({**SRC, 1: 2}, "recipe: key 1 is not a setting's name"),   # "[1]: Keys should be strings"
    ({"data": {**SRC["data"], None: 2}}, "data: key null is not a setting's name"),
    # a category names a folder under the data root and, one-class, under the artifacts: one plain name
    ({"data": {"sources": [{"root": "x", "categories": ["/tmp/data/bottle"]}]}},
     "data.sources[0].categories: '/tmp/data/bottle' is not a plain folder name"),
    ({"data": {"sources": [{"root": "x", "categories": ["ok", "../../etc"]}]}},
     "data.sources[0].categories: '../../etc' is not a plain folder name"),
    ({"data": {"sources": [{"root": "x", "categories": ["a\nb"]}]}}, "is not a plain folder name"),
    ({**SRC, "name": "a\nb"}, "name: must be a plain folder name"),
    ({**SRC, "name": "é" * 100}, "valid UTF-8, at most 128 bytes)"),   # 100 characters, 200 bytes: an OSError
    ({**SRC, "name": " "}, "name: must be a plain folder name"),   # trained into artifacts/ /
    ({**SRC, "name": "line1 "}, "no '/', '..', leading '.' or space at either end"),
    # the filesystem's 255-byte limit: an OSError traceback before training
    ({"data": {"sources": [{"root": "x", "categories": ["a" * 300]}]}}, "at most 255 bytes"),
    ({"data": {"sources": [{"root": "/tmp/" + "a" * 300}]}}, "data.sources[0].root: a part of the path is 300 bytes"),
    (_with(model={"weights": "w" * 256 + ".pt"}), "model.weights: a part of the path is 259 bytes long"),
    (_with(data={"val_fraction": 0}, deploy={"postprocess": True}), "deploy.postprocess: the in-graph decisions need"),
    (_with(compile={"quantize": ["student", "student"]}), "compile.quantize: a partition is listed twice"),
    (_with(model={"pretrained": False, "weights": "w.pt"}), "model.weights: given with model.pretrained: false"),
    (_with(model={"weights": ""}), "model.weights: an empty path"),
    # a typo named, not suggested
    (_with(train={"epoch": 3}), "train.epoch: unknown key (did you mean 'epochs'?)"),
    ({**SRC, "trian": {}}, "trian: unknown key (did you mean 'train'?)"),
    # refused 20 s into training: the kNN's taps against the backbone's default taps
    (_with(model={"image_knn": {"weight": 1.0, "taps": ["blocks.9"]}}), "image_knn.taps must be among model.taps "
                                                                         "(blocks.2, blocks.4, blocks.10)"),
    # trained in full before `uadc compile` said "unknown target"
    (_with(compile={"target": "ORT-CPU-INT8"}), "compile.target: 'ORT-CPU-INT8' is not a target; expected one of"),
])
def test_validation_errors_name_the_key(cfg, message):
    with pytest.raises(UadcError) as e:
        recipe_from_dict(cfg)
    assert message in str(e.value)


def test_exponent_numbers_are_numbers(tmp_path):
    """`lr: 1e-3` is a string to PyYAML's YAML 1.1 (floats need a dot): it was refused as
    `train.lr: expected number, got '1e-3'`."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(SRC) + "train:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    r = load_recipe(p)
    assert (r.train.lr, r.train.weight_decay) == (0.001, 0.0005)


def test_numbers_and_booleans_read_as_yaml_1_2(tmp_path):
    """PyYAML's YAML 1.1 read `seed: 010` as 8 and `epochs: 1:30` as 90, silently; `enabled: no` as false."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(SRC) + "seed: 010\ntrain:\n  epochs: 0x10\n")
    r = load_recipe(p)
    assert (r.seed, r.train.epochs) == (10, 16)
    for text, message in (("seed: 1:30\n", "seed: expected int, got '1:30'"),
                          ("train:\n  lr: 1:30.0\n", "train.lr: expected number, got '1:30.0'"),
                          ("train:\n  dcam:\n    enabled: no\n", "train.dcam.enabled: expected bool, got 'no'")):
        p.write_text(yaml.safe_dump(SRC) + text)
        with pytest.raises(UadcError, match=message):
            load_recipe(p)
    assert yaml.safe_load("a: no") == {"a": False}     # PyYAML's own loader is left as it was
    p.write_text(yaml.safe_dump({**SRC, "name": "x"}).replace("name: x", "name: 2024-01-05"))
    assert load_recipe(p).name == "2024-01-05"   # no YAML 1.1 timestamp: "expected str, got datetime.date"


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(UadcError, match="recipe not found"):
        load_recipe(tmp_path / "none.yaml")
    with pytest.raises(UadcError, match=f"^recipe {re.escape(str(tmp_path))}: a folder, not a YAML file$"):
        load_recipe(tmp_path)                                    # it said "not found" of a folder that is there
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(UadcError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("data:\n\tsources: []\n")     # a tab: where it is, not only "while scanning for the next token"
    with pytest.raises(UadcError, match=r"not valid YAML: .*\(line 2, column 1: found character '\\t'"):
        load_recipe(bad)


def test_hash_changes_with_content():
    a = recipe_from_dict(_with())
    b = recipe_from_dict(_with(train={"epochs": 11}))
    assert a.hash != b.hash and len(a.hash) == 16
    # where the data lives is no setting (its files are fingerprinted apart): a moved project, or its data
    # copied elsewhere, was another recipe to verify's note and to `eval --one-class`'s comparison
    moved = recipe_from_dict(_with(data={"sources": [{**s, "root": "/elsewhere/data"} for s in SRC["data"]["sources"]],
                                         "val": [{"category": "a", "folder": "/elsewhere/val"}]}))
    here = recipe_from_dict(_with(data={"val": [{"category": "a", "folder": "/here/val"}]}))
    assert moved.hash == here.hash != a.hash
    weights = [recipe_from_dict(_with(model={"backbone": "resnet18", "weights": f"/{d}/w.pt"})) for d in ("a", "b")]
    assert weights[0].hash == weights[1].hash   # the weights file by name, as the checkpoint check takes it


def test_schema_is_described():
    lines = describe_schema()
    assert any(line.startswith("model.backbone (") and "default 'efficientnet_lite0'" in line for line in lines)
    assert any(line.startswith("data.sources[].root") for line in lines)


def test_shipped_recipes_load():
    root = Path(__file__).parent.parent / "recipes"
    files = sorted(root.glob("*.yaml"))
    assert {"stfpm_effnet_lite0.yaml", "paste_effnet_lite0.yaml", "quickstart.yaml"} <= {f.name for f in files}
    for f in files:
        if f.name == "stfpm_resnet18.yaml":
            continue  # needs a user-supplied weights path; tested below
        load_recipe(f)


def test_resnet_recipe_requires_weights_file():
    r = load_recipe(Path(__file__).parent.parent / "recipes" / "stfpm_resnet18.yaml")
    assert r.model.weights.endswith("resnet18.pth")


def test_recipe_schema_gives_every_key_a_meaning():
    """The README promises "every recipe key with its type, default and meaning"; 18 keys (train.epochs,
    model.method, compile.target, ...) had no meaning."""
    from click.testing import CliRunner
    from uadc.cli import main
    res = CliRunner().invoke(main, ["recipe-schema"])
    assert res.exit_code == 0
    bare = [ln for ln in res.output.splitlines() if ln and not ln.startswith(" ") and "): " not in ln]
    assert bare == [], bare
    from uadc.config.schema import json_schema
    from uadc.config.targets import TARGETS
    target = json_schema()["$defs"]["CompileConfig"]["properties"]["target"]   # an editor accepted `target: bogus`
    assert target["enum"] == list(TARGETS) and target["default"] in target["enum"]
    assert f"compile.target (str, default 'ort-cpu-int8', one of {' | '.join(TARGETS)}): " in res.output


@pytest.mark.parametrize("split, taps, message", [
    ("blocks.5", ["blocks.1", "blocks.3"], "model.taps: 'blocks.1' is not after model.split 'blocks.5'"),
    ("blocks.3", ["blocks.3", "blocks.5"], "model.taps: 'blocks.3' is not after model.split 'blocks.3'"),
    ("blocks.99", ["blocks.5"], "model.split: unknown stage 'blocks.99'; stages are: stem, blocks.0"),
    ("stem", ["blocks.3", "blocks.1"], "model.taps: feature taps must be in network order: blocks.1, blocks.3"),
])
def test_paste_split_errors_name_the_wrong_key(split, taps, message):
    """They blamed the taps' order ('must be in network order: blocks.1, blocks.3, blocks.5') for a late split."""
    from uadc.models import build_model
    r = recipe_from_dict(_with(model={"method": "paste", "split": split, "taps": taps, "pretrained": False}))
    with pytest.raises(UadcError) as e:
        build_model(r.cfg["model"], 64)
    assert str(e.value).startswith(message), e.value


def test_a_warm_up_as_long_as_the_training_is_warned_about(recipe_factory, tmp_path, caplog):
    """warmup_epochs 5 with epochs 1 never reached train.lr (image AUROC 0.61 against 1.00), silently."""
    import uadc
    recipe = recipe_factory(train={"epochs": 1, "warmup_epochs": 1, "threads": 1})
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.train(recipe, artifacts=tmp_path / "art")
    # as long as the training: its last step is at train.lr ("never reaches" was said)
    assert "train.warmup_epochs (1) = train.epochs (1): the learning rate reaches train.lr on the last step only" \
        in caplog.text
    from uadc.training.fit import _lr_factor
    assert [_lr_factor(s, 4, 4, "cosine") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert "not a multiple of" not in caplog.text   # 64 px: the stride-8 features line up


def test_the_misalignment_warning_finds_the_deepest_stride(caplog):
    """At 40 px a stride-32 map is 2 wide: the stride was taken for 16, and 32 or 48 recommended (48 then warned)."""
    import torch
    from uadc.training.fit import _warn_misaligned
    for size, sides, said in ((40, (10, 5, 2), "40 is not a multiple of 32,"), (48, (12, 6, 2), "48 is not a multiple "
                                                                                           "of 32,"),
                              (64, (16, 8, 2), None), (33, (17, 9, 5), "33 is not a multiple of 8,")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="uadc"):
            _warn_misaligned(None, torch.zeros(1, 3, size, size), [torch.zeros(1, 1, s, s) for s in sides])
        assert said in caplog.text if said else "not a multiple" not in caplog.text, (size, caplog.text)
    from types import SimpleNamespace   # RD: its embedding is a stride-2 block below the deepest tap (40 px: silent)
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        _warn_misaligned(SimpleNamespace(below_taps=2), torch.zeros(1, 3, 40, 40), [torch.zeros(1, 1, 5, 5)])
    assert "40 is not a multiple of 16" in caplog.text


def test_an_image_size_the_deepest_features_do_not_divide_is_warned_about(recipe_factory, tmp_path, caplog):
    """33 or 129 px (SAME padding, bilinear upsampling): the maps peaked at the image borders, and image AUROC
    fell from 1.0 at 32 px to 0.44 at 33 on the tiny set, without a word (the schema allows any size >= 32)."""
    import uadc
    recipe = recipe_factory(data={"image_size": 66}, train={"epochs": 1, "threads": 1})
    with caplog.at_level("WARNING", logger="uadc"):
        uadc.train(recipe, artifacts=tmp_path / "art")
    assert "data.image_size 66 is not a multiple of 8, the stride of the model's deepest features" in caplog.text
    assert "; 64 or 72 line up" in caplog.text
    import torch
    from uadc.training.fit import _warn_misaligned

    class Deep:   # a 48 px image whose deepest cell is 1 px: stride 64 (it suggested "0 or 64")
        below_taps = 1

        def eval(self):
            return self

        def teacher_features(self, x):
            return [torch.zeros(1, 1, 1, 1)]
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        _warn_misaligned(Deep(), torch.zeros(1, 3, 48, 48), None)
    assert "48 is not a multiple of 64" in caplog.text and caplog.text.rstrip().endswith("; 64 lines up")


def test_a_checkpoint_is_not_judged_on_categories_found_since_it_was_trained(recipe_factory, tiny_data, tmp_path):
    """With no categories list, a category folder added after training was scored (an untrained product in
    the mean, eval.json rewritten) and a removed one dropped, without a word."""
    import shutil
    import uadc
    from synthetic import make_category
    data = tmp_path / "data"
    for c in ("stripes", "gray"):
        shutil.copytree(tiny_data / c, data / c)
    recipe = recipe_factory(data={"sources": [{"root": str(data)}]}, train={"epochs": 1, "threads": 1})
    uadc.train(recipe, artifacts=tmp_path / "art")
    make_category(data, "dots", size=32, n_train=4, n_good=2, n_defect=2, seed=5)
    with pytest.raises(UadcError, match=r"was trained on gray, stripes; the recipe's data now holds dots, gray, "
                                        r"stripes \(new: dots\): train again, or list data.sources\[\].categories"):
        uadc.evaluate(recipe, artifacts=tmp_path / "art")
    shutil.rmtree(data / "dots")
    shutil.rmtree(data / "gray")
    with pytest.raises(UadcError, match=r"now holds stripes \(gone: gray\)"):
        uadc.evaluate(recipe, artifacts=tmp_path / "art")


def test_a_checkpoint_of_other_training_settings_is_named(recipe_factory, tmp_path, caplog):
    """Another recipe file (lr 100) trained into the same folder: `uadc eval` reported it as this recipe's."""
    import uadc
    recipe = recipe_factory(train={"epochs": 1, "threads": 1})
    ckpt = uadc.train(recipe, artifacts=tmp_path / "art", epochs=2).checkpoints[0]
    import torch
    lrs = [h["lr"] for h in torch.load(ckpt, weights_only=True)["history"]]
    assert 0 < lrs[1] < lrs[0] <= 0.003   # each epoch's last step (the last epoch said 0.0: the rate after it)
    with caplog.at_level("WARNING", logger="uadc"):   # a warning: -q hid the INFO line, and compile went on
        uadc.evaluate(recipe, artifacts=tmp_path / "art", write=False)
    assert "was trained with other training settings than recipe" in caplog.text
    assert "(train.epochs: 2 in the checkpoint, 1 in the recipe)" in caplog.text
    res = uadc.compile(recipe, "ort-cpu-fp32", artifacts=tmp_path / "art", out=tmp_path / "fp32", evaluate=False,
                       latency_runs=2, threads=1)   # report.json names the recipe the checkpoint trained with
    assert res.extra["model"]["trained_recipe_hash"] == torch.load(ckpt, weights_only=True)["recipe_hash"] != \
        res.recipe_hash


def test_one_class_knn_validation_is_checked_for_every_category_before_training(tmp_path):
    """Category a was trained and written, then b stopped with "needs at least 2 validation normals"."""
    import uadc
    from conftest import write_recipe
    from synthetic import make_category
    make_category(tmp_path / "d", "a", size=32, n_train=16, seed=1)
    make_category(tmp_path / "d", "b", size=32, n_train=8, seed=2)
    recipe = write_recipe(tmp_path / "k.yaml", tmp_path / "d", data={
        "sources": [{"root": str(tmp_path / "d")}], "image_size": 32, "val_fraction": 0.15},
        model={"image_knn": {"weight": 1.0}}, train={"epochs": 1, "threads": 1})
    with pytest.raises(UadcError, match="model.image_knn needs at least 2 validation normals .* b has 1"):
        uadc.train(recipe, one_class=True, artifacts=tmp_path / "art")
    assert not list((tmp_path / "art").rglob("checkpoint.pt"))


def test_compile_settings_only_compile_used_are_checked_before_training(recipe_factory, tmp_path, caplog):
    """A misspelt compile.passes let a whole training run before `uadc compile` refused it; a calibrator or
    GPU that only some targets use (and --calibrator overrides, or a plug-in installed elsewhere
    provides) is a warning, not a refusal."""
    import uadc
    from uadc.pipeline.compile import check_compile_settings
    with pytest.raises(UadcError, match=re.escape("compile.passes: unknown pass(es) 'nonsense'; available: ")):
        uadc.train(recipe_factory(compile={"passes": ["cleanup", "nonsense"]}), artifacts=tmp_path / "art")
    assert not (tmp_path / "art").exists()
    with pytest.raises(UadcError, match="qdq is listed 2 times"):   # every compile refused it, after the training
        uadc.train(recipe_factory(compile={"passes": ["qdq", "qdq"]}), artifacts=tmp_path / "art")
    assert not (tmp_path / "art").exists()
    # refused by a compile of the recipe's own target only (another --target, --calib-samples may take it): warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="uadc"):
        check_compile_settings(load_recipe(recipe_factory(compile={"passes": [], "target": "ort-cpu-fp32"})))
        assert not caplog.text
        check_compile_settings(load_recipe(recipe_factory(compile={"passes": []})))
        check_compile_settings(load_recipe(recipe_factory(compile={"calib_data": "mixed", "calib_samples": 1})))
    assert "compile.passes []: target ort-cpu-int8 needs qdq (its own list: " in caplog.text
    assert "`uadc compile` without --target (compile.target) will refuse it" in caplog.text
    assert "compile.calib_data mixed takes half training images, half N(0,1) noise: calib_samples must be at least 2, " \
           "got 1; `uadc compile` to an INT8 target refuses it unless --calib-samples gives more" in caplog.text
    with caplog.at_level("WARNING", logger="uadc"):
        check_compile_settings(load_recipe(recipe_factory(compile={"calibrator": "bogus", "auto": {"gpu": "g"}})))
    assert "compile.calibrator: unknown calibrator 'bogus' here" in caplog.text
    assert "compile.auto.gpu: 'g' is not one of " in caplog.text
    caplog.clear()   # a 5000-character value was a 5100-character warning line
    with caplog.at_level("WARNING", logger="uadc"):
        check_compile_settings(load_recipe(recipe_factory(compile={"calibrator": "c" * 5000, "auto": {"gpu": "g" * 5000}})))
    assert len(caplog.records) == 2 and all(len(r.getMessage()) < 400 for r in caplog.records)


def test_a_one_class_run_stopped_half_way_names_the_models_it_replaced(recipe_factory, tmp_path, monkeypatch, caplog):
    """Ctrl-C while the 2nd category trained said "nothing was written for the unfinished step"; the 1st was new."""
    import uadc
    import uadc.training.run as run
    calls = []

    def one(recipe, data, cat, *a):
        calls.append(cat)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run.TrainedModel(tmp_path / "x.pt", cat, 0.0, 1, 0.0)

    monkeypatch.setattr(run, "_train_one", one)
    with caplog.at_level("WARNING", logger="uadc"), pytest.raises(KeyboardInterrupt):
        uadc.train(recipe_factory(train={"epochs": 1, "threads": 1}), one_class=True, artifacts=tmp_path / "art")
    assert f"stopped after writing the models of {calls[0]}; the other categories keep their earlier ones" in caplog.text


def test_a_checkpoint_whose_stored_compile_settings_a_newer_uadc_refuses_still_loads(recipe_factory, tmp_path):
    """Load-time checks added to compile / deploy keys made older checkpoints unusable ("its stored recipe is
    invalid: compile.target ..."), although the model depends on data, model and train only."""
    import torch
    import uadc
    recipe = recipe_factory(train={"epochs": 1, "threads": 1})
    ckpt = uadc.train(recipe, artifacts=tmp_path / "art").checkpoints[0]
    blob = torch.load(ckpt, weights_only=True)
    blob["recipe"]["compile"]["target"] = "ort-cpu-int9"
    blob["recipe"]["compile"]["quantize"] = ["student", "student"]
    torch.save(blob, ckpt)
    assert uadc.evaluate(ckpt, recipe, write=False).mean["image_auroc"] >= 0


def test_calibration_settings_that_mean_nothing_are_refused(tmp_path):
    """`mixed` with one sample calibrated on N(0,1) alone, recorded as "mixed"; `calibrator: ''` read as the default."""
    from uadc.config.settings import resolve_ptq
    from uadc.config.targets import TARGETS
    r = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path))
    with pytest.raises(UadcError, match="calib_data mixed takes half training images.*at least 2, got 1"):
        resolve_ptq(r, TARGETS["ort-cpu-int8"], calib_data="mixed", calib_samples=1)
    assert resolve_ptq(r, TARGETS["ort-cpu-int8"], calib_data="mixed", calib_samples=2).calib_samples == 2
    with pytest.raises(UadcError, match="compile.calibrator"):
        load_recipe(write_recipe(tmp_path / "e.yaml", tmp_path, compile={"calibrator": ""}))


def test_the_model_hash_names_the_weights_file_not_its_folder(tmp_path):
    """A moved project (its weights file with it) is the same model; another file is another teacher."""
    from uadc.training.checkpoint import model_hash
    recipes = {}
    for name, weights in (("a", "x/w.pth"), ("b", "y/w.pth"), ("c", "x/w2.pth")):
        recipes[name] = load_recipe(write_recipe(tmp_path / f"{name}.yaml", tmp_path / name / "data",
                                                 model={"weights": str(tmp_path / weights)}))
    assert model_hash(recipes["a"]) == model_hash(recipes["b"]) != model_hash(recipes["c"])


def test_the_recipe_copy_reads_back_with_the_same_hash_and_odd_file_names_need_a_name(tmp_path):
    """Strings YAML 1.2 reads as numbers (`1e3`, `0o17`) were written bare in the recipe copy beside a
    checkpoint, which then did not load; every recipe whose file name is no folder name (`.a.yaml`)
    trained into the same `recipe/` folder."""
    from uadc.config.yaml_file import dump_yaml
    cfg = {"name": "1e5", "data": {"sources": [{"root": str(tmp_path), "categories": ["1e3", "0o17", "yes", "a: b"]}]}}
    recipe = recipe_from_dict(cfg)
    (tmp_path / "copy.yaml").write_text(dump_yaml(recipe.cfg))
    again = load_recipe(tmp_path / "copy.yaml")
    assert again.hash == recipe.hash and again.name == "1e5"
    (tmp_path / ".a.yaml").write_text(yaml.safe_dump(SRC))
    with pytest.raises(UadcError, match=r"\.a\.yaml: its file name is no plain folder name .* give the recipe a name"):
        load_recipe(tmp_path / ".a.yaml")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({**SRC, "name": "given"}))
    named = load_recipe(tmp_path / "b.yaml")   # its name set back to null: the file's stem, as the schema says
    assert named.with_overrides(name=None).name == load_recipe(named.with_overrides(name=None)).name == "b"
    named.config.name = None   # it was `recipe`: every such recipe trained into one shared artifacts/recipe/
    assert named.name == "b" and recipe_from_dict({**SRC}).name == "recipe"


@pytest.mark.skipif(__import__("sys").getfilesystemencoding() != "utf-8", reason="needs a UTF-8 file system encoding")
def test_a_recipe_file_name_that_is_not_utf8_needs_a_name_key(tmp_path):
    """A recipe stem with a latin-1 byte (`caf\xe9.yaml`) named its artifacts folder with a lone surrogate:
    `--json` paths held "\udce9", which strict JSON readers turn into another path."""
    import os
    path = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.yaml")
    Path(path).write_text(yaml.safe_dump(SRC))
    with pytest.raises(UadcError, match=r"caf\\xe9\.yaml: its file name is no plain folder name .* name: key"):
        load_recipe(Path(path))
    Path(path).write_text(yaml.safe_dump({**SRC, "name": "cafe"}))
    assert load_recipe(Path(path)).name == "cafe"
    with pytest.raises(UadcError, match="name: must be a plain folder name"):   # YAML's "\udce9": the same byte
        recipe_from_dict({**SRC, "name": "caf\udce9"})


def test_every_target_runs_where_its_family_says_and_ships_a_known_precision():
    """artifact.json's runtime is checked against its target's family (core.constants, read without the
    target table): a new target outside the families, or one that ships another precision, would be refused."""
    from uadc.config.targets import TARGETS
    from uadc.core.constants import ARTIFACT_PRECISIONS, TARGET_RUNTIMES
    for name, t in TARGETS.items():
        assert [r for prefix, r in TARGET_RUNTIMES.items() if name.startswith(prefix)] == [t.runtime], name
        assert {t.precision, t.float_precision} <= set(ARTIFACT_PRECISIONS), name


@pytest.mark.parametrize("cfg, message", [
    ({"dta": {}, **{k: v for k, v in SRC.items() if k != "data"}}, "dta: unknown key (did you mean 'data'?)"),  # "data: required"
    ({"data": {"source": SRC["data"]["sources"]}}, "data.source: unknown key (did you mean 'sources'?)"),
    ({"data": {"sources": [{"rot": "data", "categories": ["a"]}]}}, "data.sources[0].rot: unknown key (did you mean 'root'?)"),
    (_with(train={"LR": 0.1}), "train.LR: unknown key (did you mean 'lr'?)"),   # "train: unknown key"
    ({**SRC, "Seed": 1}, "Seed: unknown key (did you mean 'seed'?)"),             # "recipe: unknown key"
    ({**SRC, "compile.calib_samples": 8}, "compile.calib_samples: unknown key; write it nested, {compile: {calib_samples: ...}}"),
    ({**SRC, "name": "\ud800x"}, "name: must be a plain folder name"),          # passed, then file_lock raised
    ({**SRC, "name": "a\u2028b"}, "name: must be a plain folder name"),         # a line break to splitlines
    (_with(compile={"calibrator": ""}), "compile.calibrator: must not be empty"),   # pydantic's own words
])
def test_validation_names_the_key_the_user_wrote(cfg, message):
    with pytest.raises(UadcError) as e:
        recipe_from_dict(cfg)
    assert message in str(e.value)


def test_a_huge_integer_is_one_line_and_aliased_names_are_quick(tmp_path):
    """A 5000-digit hex seed ended in `ValueError: Exceeds the limit (4300 digits)` from the error's own repr."""
    from uadc.config.validation import short
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(SRC) + "seed: 0x" + "f" * 5000 + "\n")
    with pytest.raises(UadcError, match=r"an integer of 5002 characters is too long"):
        load_recipe(p)
    assert short(16 ** 5000) == "an integer of 20001 bits"
    long = "a" * 5000   # aliased 1000 times: each name was checked letter by letter before its length
    with pytest.raises(UadcError, match=r"'a{60}' is not a plain folder name"):
        recipe_from_dict({"data": {"sources": [{"root": "data", "categories": [long] * 1000}]}})


def test_recipes_show_reads_as_loading_does(tmp_path):
    """A BOM (Notepad) ended up after the header, so the copy failed: `\ufeffcompile: unknown key (did you mean
    'compile'?)`; `name: no` was shown as 'False' (YAML 1.1); a newline in the file's path wrote a recipe line."""
    from uadc.config.packaged import shown_recipe
    (d := tmp_path / "x\nseed: 7\n#").mkdir()
    p = d / "b.yaml"
    p.write_text("\ufeff" + yaml.safe_dump({**SRC, "name": "no"}).replace("name: 'no'", "name: no"))
    copy = tmp_path / "c.yaml"
    copy.write_text(text := shown_recipe(str(p)).shown_text())
    assert text.startswith("# uadc recipe 'no' (") and "\ufeff" not in text
    r = load_recipe(copy)
    assert (r.name, r.seed) == ("no", load_recipe(p).seed)


def test_a_category_with_a_c1_character_is_a_plain_name():
    """A Windows-1252 name read as latin-1 holds C1 characters (U+0092 for its apostrophe): refusing them broke
    one-class training of a folder that trained before; only the line breaks among them (U+0085) are refused."""
    from uadc.core.names import is_plain_name
    assert recipe_from_dict({"data": {"sources": [{"root": "d", "categories": ["bob\x92s"]}]}}).data.sources[0] \
        .categories == ["bob\x92s"]
    assert not is_plain_name("a\x85b") and not is_plain_name("a\u2028b") and not is_plain_name("a\x7fb")
    # shown escaped, though: \x9b is a terminal's CSI, and a bidi override showed `tiny\u202egpj.exe` as `tinyexe.jpg`
    from uadc.core.errors import one_line
    assert not is_plain_name("tiny\u202egpj.exe") and one_line("a\x9bb\u202ec") == "a\\x9bb\\u202ec"


def test_section_hash_takes_a_name_or_names_and_refuses_unknown_ones(tmp_path, tiny_data):
    """`recipe.section_hash("data")` hashed the sections 'd', 'a', 't', 'a' (a KeyError 'd')."""
    from conftest import write_recipe
    r = load_recipe(write_recipe(tmp_path / "a.yaml", tiny_data))
    assert r.section_hash("data") == r.section_hash(("data",)) != r.section_hash(("data", "model"))
    with pytest.raises(UadcError, match="section_hash: no recipe section 'dta'"):
        r.section_hash(("dta",))


def test_a_utf8_recipe_reads_the_same_under_any_locale(recipe_factory):
    """Recipes were read in the locale's encoding: under LC_ALL=C a UTF-8 comment made the recipe
    'not a text file' (uadc writes UTF-8, and YAML is UTF-8)."""
    import os
    import subprocess
    import sys
    recipe = recipe_factory()
    recipe.write_text("# réglages d'usine: café\n" + recipe.read_text(), encoding="utf-8")
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    p = subprocess.run([sys.executable, "-m", "uadc", "recipes", "show", str(recipe)], env=env,
                       capture_output=True)
    assert p.returncode == 0, p.stderr


def test_a_recipe_that_cannot_be_read_is_one_line(recipe_factory, monkeypatch):
    """No read permission: `uadc sweep` and `uadc.load_recipe` ended in a PermissionError traceback."""
    recipe = recipe_factory()

    def refused(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "read_text", refused)   # as root, chmod 000 would not stop the read
    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(UadcError, match=rf"^{recipe}: cannot read the recipe: Permission denied$"):
        load_recipe(recipe)


def test_a_built_in_name_beside_a_file_of_that_name_says_which_ran(tmp_path, monkeypatch, caplog):
    """`uadc recipes show demo > demo.yaml`, edited, then `uadc train demo`: the built-in trained for 20 epochs
    into the same artifacts/demo, without a word about the edited copy."""
    from uadc.config.packaged import packaged_recipe, resolve_recipe_path
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe_path("demo") == packaged_recipe("demo").path and not caplog.text
    (tmp_path / "demo.yaml").write_text("name: demo\n")
    with caplog.at_level("WARNING", logger="uadc"):
        assert resolve_recipe_path("demo") == packaged_recipe("demo").path
    assert "recipe demo: the built-in recipe of that name, not demo.yaml here" in caplog.text
    assert resolve_recipe_path("demo.yaml") == Path("demo.yaml")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX-only")
@pytest.mark.parametrize("command", [["train"], ["recipes", "show"]])
def test_a_recipe_given_as_a_pipe_says_so(tmp_path, command, monkeypatch):
    """`uadc train <(cat r.yaml)` said "recipe not found: /dev/fd/63": the path exists, as a pipe."""
    import os
    from click.testing import CliRunner
    from uadc.cli import main
    os.mkfifo(tmp_path / "r.yaml")
    res = CliRunner().invoke(main, [*command, str(tmp_path / "r.yaml")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: recipe {tmp_path / 'r.yaml'}: not a regular file (a pipe or a device); " \
                                 "save it to a file first"
    monkeypatch.chdir(tmp_path)   # a bare name was looked up as a built-in recipe: "recipe not found"
    res = CliRunner().invoke(main, [*command, "r.yaml"])
    assert res.exit_code == 2 and "r.yaml: not a regular file (a pipe or a device)" in res.stderr, res.stderr


def test_keys_of_a_knn_term_that_is_off_are_not_another_model(tmp_path):
    """``image_knn.k: 5`` with weight 0 builds nothing, yet the checkpoint was refused as another model
    ("retrain with `uadc train`"); the hash of a recipe at the defaults stays what uadc 0.2.0 stored."""
    from uadc.training.checkpoint import model_hash
    base = load_recipe(write_recipe(tmp_path / "a.yaml", tmp_path))
    off = load_recipe(write_recipe(tmp_path / "b.yaml", tmp_path, model={"image_knn": {"k": 5},
                                                                      "patch_knn": {"bank": 64}}))
    on = load_recipe(write_recipe(tmp_path / "c.yaml", tmp_path, model={"image_knn": {"k": 5, "weight": 1.0}}))
    assert model_hash(off) == model_hash(base) == model_hash(base, raw=True) != model_hash(off, raw=True)
    assert model_hash(on) != model_hash(base)
    # the refusal names the setting that makes another model, not the off term's key listed first
    from uadc.training.checkpoint import _first_difference, _hashed
    other = load_recipe(write_recipe(tmp_path / "d.yaml", tmp_path, model={"image_knn": {"k": 5}, "smoothing_sigma": 2.0}))
    assert _first_difference(_hashed(base), _hashed(other)).startswith("model.smoothing_sigma: ")


@pytest.mark.parametrize("command", [["train"], ["eval"], ["compile"], ["recipes", "show"]])
def test_a_recipe_files_error_names_the_file(tmp_path, command, monkeypatch):
    """`uadc train a.yaml` said `error: train.epochs: ...` without the file: among a pipeline's recipes, which one?"""
    from click.testing import CliRunner
    from uadc.cli import main
    monkeypatch.chdir(tmp_path)
    write_recipe(tmp_path / "a.yaml", tmp_path, train={"epochs": 0})
    res = CliRunner().invoke(main, [*command, "a.yaml"])
    assert res.exit_code == 2, res.stderr
    assert re.fullmatch(r"error: (\S*/)?a\.yaml: train\.epochs: 0 is below the minimum 1\n", res.stderr), res.stderr
    assert not (tmp_path / "artifacts").exists()
    (tmp_path / " sp.yaml").write_text((tmp_path / "a.yaml").read_text())   # named once (it read `sp.yaml: sp.yaml:`)
    res = CliRunner().invoke(main, [*command, " sp.yaml"])
    assert res.exit_code == 2 and res.stderr.count("sp.yaml") == 1, res.stderr


def test_yaml_files_as_editors_and_yaml_write_them(tmp_path):
    """Merge keys: an anchored mapping overriding a merged key was "appears twice" once an alias met it again,
    and a key repeated inside a merged mapping was silently taken; a latin-1 comment or a UTF-16 file
    (PowerShell 5's `>`) read "not a text file"; a NUL had no line; a BOM inside a key was invisible;
    `categories: [02]` said "expected str, got 2" without the quotes it needs; `recipes show r.json`
    advised `name: r.json`, though loading names it `r`."""
    from uadc.config.packaged import shown_recipe
    from uadc.config.yaml_file import load_yaml_text
    assert load_yaml_text("x:\n  a: &c\n    <<: {seed: 1}\n    seed: 5\ny:\n  <<: *c\n") == \
        {"x": {"a": {"seed": 5}}, "y": {"seed": 5}}
    base = yaml.safe_dump(SRC).replace("- a", "- a\n    - b")
    p = tmp_path / "r.yaml"
    p.write_text(base + "seed: 3\nz: &c\n  <<: {seed: 1, seed: 2}\n")
    with pytest.raises(UadcError, match=r"key 'seed' appears twice in one mapping \(lines 9 and 9\)"):
        load_recipe(p)
    p.write_bytes(base.encode() + b"# caf\xe9\n")
    with pytest.raises(UadcError, match=rf"not UTF-8 text \(byte 0xe9 on line {base.count(chr(10)) + 1}\)"):
        load_recipe(p)
    p.write_bytes(("# café\n" + base).encode("utf-16"))
    assert load_recipe(p).seed == load_recipe(_written(tmp_path / "plain.yaml", base)).seed
    p.write_bytes(b"seed: 1\n\x00\n")
    with pytest.raises(UadcError, match=r"character #x0000 on line 2 is not allowed"):
        load_recipe(p)
    p.write_text("\ufeff\ufeff" + base)
    with pytest.raises(UadcError, match=r": \\ufeff\w+: unknown key"):
        load_recipe(p)
    p.write_text(base.replace("- a", "- 02"))
    with pytest.raises(UadcError, match=r"expected str, got 2 \(a name that looks like a number needs quotes\)"):
        load_recipe(p)
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"seed": 4, **SRC}, indent="\t"))   # tabs: PyYAML refused valid JSON
    assert load_recipe(j).seed == 4
    j.write_text(json.dumps(SRC, indent="\t")[:-1] + ',\n\t"data": {}}')
    with pytest.raises(UadcError, match="not valid JSON: key 'data' appears twice in one object"):
        load_recipe(j)
    j.write_text(json.dumps({**SRC, **{f"k{i}": i for i in range(50000)}}, indent="\t"))   # pairwise: a minute
    with pytest.raises(UadcError, match="k0: unknown key"):
        load_recipe(j)
    j.write_text(json.dumps({"seed": int("9" * 200), **SRC}, indent="\t"))
    with pytest.raises(UadcError, match="an integer of 200 characters is too long"):
        load_recipe(j)
    p.write_bytes(b"\xff\xfe\x00\x81" * 64)   # binary that starts like a UTF-16 byte-order mark
    with pytest.raises(UadcError, match=r"r.yaml: not a text file$"):
        load_recipe(p)
    j.write_text(json.dumps(SRC))
    assert load_recipe(j).name == shown_recipe(str(j)).name == "r"
    p.write_bytes(("# café\n" + base).encode("utf-16"))
    assert "\n# café\ndata:\n" in shown_recipe(str(p)).shown_text()
    p.write_bytes(("# " + "設定" * 140 + "\n" + base).encode("utf-16"))   # mostly not ASCII, still a recipe
    assert load_recipe(p).name == "r"
    p.write_bytes("# 設定だけ".encode("utf-16"))   # comments only: what an empty recipe is told
    with pytest.raises(UadcError, match="data: required"):
        load_recipe(p)


def _written(path, text):
    path.write_text(text)
    return path
