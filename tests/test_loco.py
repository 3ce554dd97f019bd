"""bench/loco.py: the leave-one-category-out choice never reads the held-out category's metrics, the
post-hoc smoothing reproduces the head's own maps, and the whole run writes its table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import loco


def _res(values: dict[str, dict[str, float]]) -> tuple[list[dict], dict]:
    settings = [{"smoothing_sigma": 2.0, "score_reduction": "max", "score_topk": None},
                {"smoothing_sigma": 2.0, "score_reduction": "topk_mean", "score_topk": 0.01}]
    res = {loco.key(s): {c: {"image_auroc": v, "pixel_auroc": 0.9} for c, v in values[loco.key(s)].items()}
           for s in settings}
    return settings, res


def test_choice_ignores_the_held_out_category():
    settings, res = _res({"sigma=2,max": {"a": 0.9, "b": 0.9, "c": 0.5},
                          "sigma=2,top1%": {"a": 0.95, "b": 0.95, "c": 0.4}})
    default = settings[0]
    folds = {f["held_out"]: f for f in loco.leave_one_out(settings, res, default)}
    assert folds["c"]["chosen_key"] == "sigma=2,top1%"   # chosen on a, b; worse on c, and reported so
    assert folds["c"]["chosen_metrics"]["image_auroc"] == 0.4
    assert folds["c"]["default_metrics"]["image_auroc"] == 0.5
    # a held-out category's own numbers cannot move its choice
    res["sigma=2,top1%"]["c"]["image_auroc"] = 0.0
    assert {f["held_out"]: f["chosen_key"] for f in loco.leave_one_out(settings, res, default)}["c"] == \
        "sigma=2,top1%"
    # folds a and b: inner means over {b, c} / {a, c}: max 0.7 vs top1% 0.675 (after the edit 0.475)
    assert folds["a"]["chosen_key"] == "sigma=2,max"


def test_ties_go_to_the_recipe_setting():
    settings, res = _res({"sigma=2,max": {"a": 0.9, "b": 0.8}, "sigma=2,top1%": {"a": 0.9, "b": 0.8}})
    for default in settings:
        assert {f["chosen_key"] for f in loco.leave_one_out(settings, res, default)} == {loco.key(default)}


def test_grid_metrics_topk_helps_area_defects():
    """Synthetic maps: anomalies are areas, a few normals have one hot pixel -> top-k mean ranks better."""
    rng = np.random.default_rng(0)
    maps = {}
    for cat in ("a", "b"):
        raw = rng.random((12, 32, 32)).astype(np.float32) * 0.1
        masks = np.zeros((12, 32, 32), bool)
        labels = np.array([0] * 6 + [1] * 6)
        raw[:3, 4, 4] = 5.0                   # hot pixel on three normals
        raw[6:, 10:20, 10:20] += 0.5          # defect areas
        masks[6:, 10:20, 10:20] = True
        maps[cat] = (raw, masks, labels)
    settings, res = loco.grid_metrics(maps, (0.0,), (0.05,), lambda m: None)
    assert [loco.key(s) for s in settings] == ["sigma=0,max", "sigma=0,top5%"]
    assert res["sigma=0,top5%"]["a"]["image_auroc"] == 1.0
    assert res["sigma=0,max"]["a"]["image_auroc"] < 1.0
    assert res["sigma=0,max"]["a"]["pixel_auroc"] == res["sigma=0,top5%"]["a"]["pixel_auroc"]


def test_run_loco_end_to_end(tmp_path, tiny_data):
    """Tiny data in a --data layout, an untrained checkpoint reused from --artifacts: maps, grid, folds, files."""
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    from uadc.training.checkpoint import checkpoint_path, save_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny").symlink_to(tiny_data)
    base = write_recipe(tmp_path / "base.yaml", tiny_data)
    recipe = loco.loco_recipe(base, data, epochs=1)
    assert recipe.name == "base_loco_e1" and recipe.train.epochs == 1
    assert recipe.cfg["data"]["sources"] == [{"root": str((data / "tiny").resolve()), "categories": ["gray", "stripes"]}]
    torch.manual_seed(0)
    model = build_model(recipe.cfg["model"], recipe.data.image_size)
    save_checkpoint(checkpoint_path(recipe, tmp_path / "art"), model, recipe, [{"epoch": 1}], ["gray", "stripes"])
    out = tmp_path / "out"
    r = loco.run_loco(base, data, tmp_path / "art", out, epochs=1, threads=1, sigmas=(1.0,), topk=(0.01,),
                      log=lambda m: None)
    assert r["model"]["reused"] and r["default_key"] == "sigma=1,max"
    assert [f["held_out"] for f in r["folds"]] == ["gray", "stripes"]
    assert json.loads((out / loco.RESULT_JSON).read_text())["folds"] == json.loads(json.dumps(r["folds"]))
    assert "| **mean** |" in (out / loco.RESULT_MD).read_text()
    assert load_recipe(base).model.score_reduction == "max"


def test_bad_data_folder_is_one_line_error(tmp_path):
    from uadc.core.errors import UadcError
    with pytest.raises(UadcError, match="no dataset folder"):
        loco.loco_recipe(loco.RECIPE, tmp_path)


def test_loco_head_end_to_end(tmp_path, tiny_data):
    """Head-only LOCO: every tap subset x combine x sigma x reduction scored from maps computed
    once; the recipe's own setting is in the grid, and its figures equal the head's own AUROC."""
    from bench import loco_head
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.models import build_model
    from uadc.training.checkpoint import checkpoint_path, save_checkpoint

    path = write_recipe(tmp_path / "r.yaml", tiny_data, model={"taps": ["blocks.1", "blocks.2", "blocks.3"],
                                                              "smoothing_sigma": 2.0})
    recipe = load_recipe(path)
    torch.manual_seed(0)
    model = build_model(recipe.cfg["model"], recipe.data.image_size)
    save_checkpoint(checkpoint_path(recipe, tmp_path / "art"), model, recipe, [{"epoch": 1}], ["stripes", "gray"])
    out = tmp_path / "out"
    assert loco_head.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"), "--out", str(out),
                           "--sigmas", "2", "--topk", "0.05", "--threads", "1"]) == 0
    r = json.loads((out / "loco_head.json").read_text())
    assert len(r["grid"]) == 4 * 2 * 2      # subsets {01, 02, 12, 012} x combine x {max, top5%}
    assert r["default_key"] == "taps=0+1+2,product,sigma=2,max"
    assert [f["held_out"] for f in r["folds"]] == ["stripes", "gray"]
    from uadc.data.prepare import prepare_data
    from uadc.evaluation import metrics
    from uadc.evaluation.run import predict, test_arrays, torch_predictor
    images, masks, labels = test_arrays(prepare_data(recipe))["gray"]
    maps, scores = predict(torch_predictor(model.eval()), images, 16)
    own = r["all_settings"][r["default_key"]]["gray"]
    assert abs(own["image_auroc"] - metrics.image_auroc(labels, scores)) < 1e-9
    assert abs(own["pixel_auroc"] - metrics.pixel_auroc(masks, maps[:, 0] if maps.ndim == 4 else maps)) < 1e-6
    assert loco_head.main(["--recipe", str(path), "--artifacts", str(tmp_path / "none")]) == 2


def test_loco_image_knn_end_to_end(tmp_path, tiny_data):
    """Image kNN LOCO: off plus every tap subset x k x weight; the setting a trained model holds
    scores exactly as that model's own head does (the bench uses the head's code)."""
    import uadc
    from bench import loco_image_knn
    from conftest import write_recipe
    from uadc.config.recipe import load_recipe
    from uadc.data.prepare import prepare_data
    from uadc.evaluation import metrics
    from uadc.evaluation.run import predict, test_arrays, torch_predictor
    from uadc.training.checkpoint import load_checkpoint

    path = write_recipe(tmp_path / "r.yaml", tiny_data, model={"image_knn": {"weight": 1.0}},
                        data={"val_fraction": 0.25}, train={"epochs": 1, "threads": 1})
    ckpt = uadc.train(path, artifacts=tmp_path / "art").checkpoints[0]
    out = tmp_path / "out"
    assert loco_image_knn.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"), "--out", str(out),
                                "--k", "1", "--weights", "1,2", "--threads", "1"]) == 0
    r = json.loads((out / "loco_image_knn.json").read_text())
    assert r["grid"][0] == "off" and len(r["grid"]) == 1 + 3 * 1 * 2   # subsets {0, 1, 01} x k x weights
    assert [f["held_out"] for f in r["folds"]] == ["stripes", "gray"]
    recipe = load_recipe(path)
    model, _ = load_checkpoint(ckpt, recipe)
    for cat, (images, _, labels) in test_arrays(prepare_data(recipe)).items():
        _, scores = predict(torch_predictor(model), images, 16)
        own = r["all_settings"]["taps=0+1,k=1,w=1"][cat]["image_auroc"]
        assert abs(own - metrics.image_auroc(labels, scores)) < 1e-9, cat
    assert loco_image_knn.main(["--recipe", str(path), "--artifacts", str(tmp_path / "none")]) == 2


def test_loco_patch_knn_end_to_end(tmp_path, tiny_data):
    """Patch kNN LOCO: off plus tap sets x bank sizes x weights, each fitted as training fits it; the
    setting a trained model holds scores exactly as that model does (image and pixel AUROC)."""
    import uadc
    from bench import loco_patch_knn
    from conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_data, data={"val_fraction": 0.25},
                        model={"patch_knn": {"weight": 1.0, "bank": 40}, "image_knn": {"weight": 1.0}},
                        train={"epochs": 1, "threads": 1})
    ckpt = uadc.train(path, artifacts=tmp_path / "art").checkpoints[0]
    out = tmp_path / "out"
    assert loco_patch_knn.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"), "--out", str(out),
                                "--taps", "blocks.3,blocks.1+blocks.3", "--banks", "20,40", "--weights", "1",
                                "--threads", "1"]) == 0
    r = json.loads((out / "loco_patch_knn.json").read_text())
    assert r["grid"][0] == "off" and len(r["grid"]) == 1 + 2 * 2 * 1
    assert [f["held_out"] for f in r["folds"]] == ["stripes", "gray"]
    assert list(r["map_only"]["folds"]) == ["stripes", "gray"] and set(r["map_only"]["mean_pixel_auroc"]) == {"chosen", "default"}
    _scores_as_the_model_does(r["all_settings"]["taps=blocks.1+blocks.3,bank=40,w=1"], path, ckpt)
    assert loco_patch_knn.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"),
                                "--taps", "blocks.9"]) == 2


def test_loco_channel_weight_end_to_end(tmp_path, tiny_data):
    """Channel-weight LOCO: off plus each alpha; off scores exactly as the trained model does, and a
    weighting that is not uniform moves the maps."""
    import uadc
    from bench import loco_channel_weight
    from conftest import write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_data, data={"val_fraction": 0.25}, model={"image_knn": {"weight": 1.0}},
                        train={"epochs": 1, "threads": 1})
    ckpt = uadc.train(path, artifacts=tmp_path / "art").checkpoints[0]
    out = tmp_path / "out"
    assert loco_channel_weight.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"), "--out", str(out),
                                     "--alphas", "1,4", "--threads", "1"]) == 0
    r = json.loads((out / "loco_channel_weight.json").read_text())
    assert r["grid"] == ["off", "alpha=1", "alpha=4"] and [f["held_out"] for f in r["folds"]] == ["stripes", "gray"]
    assert r["all_settings"]["alpha=4"] != r["all_settings"]["off"]
    _scores_as_the_model_does(r["all_settings"]["off"], path, ckpt)
    assert loco_channel_weight.main(["--recipe", str(path), "--artifacts", str(tmp_path / "art"),
                                     "--alphas", "x"]) == 2


def _scores_as_the_model_does(setting: dict, recipe_path, ckpt) -> None:
    """``setting`` (category -> image / pixel AUROC) is what the trained checkpoint itself scores."""
    from uadc.config.recipe import load_recipe
    from uadc.data.prepare import prepare_data
    from uadc.evaluation import metrics
    from uadc.evaluation.run import predict, test_arrays, torch_predictor
    from uadc.training.checkpoint import load_checkpoint
    recipe = load_recipe(recipe_path)
    model, _ = load_checkpoint(ckpt, recipe)
    for cat, (images, masks, labels) in test_arrays(prepare_data(recipe)).items():
        maps, scores = predict(torch_predictor(model), images, 16)
        assert abs(setting[cat]["image_auroc"] - metrics.image_auroc(labels, scores)) < 1e-6, cat
        assert abs(setting[cat]["pixel_auroc"] - metrics.pixel_auroc(masks, maps[:, 0] if maps.ndim == 4 else maps)) < 1e-6, cat
