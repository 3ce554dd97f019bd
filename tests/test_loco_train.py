"""bench/loco_train.py (training settings chosen leave-one-category-out) and ``train.device``."""

from __future__ import annotations

import json

import pytest
import torch

from bench import loco_train
from uadc.core.errors import UadcError


def _grid(tmp_path, text: str):
    p = tmp_path / "grid.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("configs: []\n", "non-empty list"),
    ("configs:\n  - name: x\n    overrides: {model: {combine: sum}}\n", "first config must be the recipe"),
    ("configs:\n  - name: a\n  - name: a\n", "appears twice"),
    ("configs:\n  - name: a\n  - name: b\n    overrides: {model: 3}\n", "must map recipe sections"),
    ("configs:\n  - name: 'a b'\n", "needs a 'name'"),
])
def test_bad_grid_is_one_line_error(tmp_path, text, match):
    with pytest.raises(UadcError, match=match):
        loco_train.read_grid(_grid(tmp_path, text))


@pytest.mark.parametrize("name", ["loco_grid.yaml", "loco_grid_budget.yaml"])
def test_shipped_grids_read(name):
    configs = loco_train.read_grid(loco_train.GRID.parent / name)
    assert configs[0]["name"] == "default" and len(configs) >= 3
    assert all(c["why"] for c in configs if not c["selectable"])


def test_run_grid_end_to_end_never_chooses_an_unselectable_config(tmp_path, tiny_data):
    """Two configs with untrained checkpoints reused from --artifacts; the unselectable one is reported only."""
    from conftest import write_recipe
    from uadc.models import build_model
    from uadc.training.checkpoint import checkpoint_path, save_checkpoint

    data = tmp_path / "data"
    data.mkdir()
    (data / "tiny").symlink_to(tiny_data)
    # a top-k recipe whose own top-k is not in --topk: it was left out of the grid, and the result had no folds
    base = write_recipe(tmp_path / "base.yaml", tiny_data, model={"score_reduction": "topk_mean", "score_topk": 0.02})
    grid = _grid(tmp_path, "configs:\n  - name: default\n  - name: summed\n    overrides: {model: {combine: sum}}\n"
                           "    selectable: false\n    why: test\n")
    base_recipe = loco_train.loco_recipe(base, data, None, 1)
    for name, over in (("default", {}), ("summed", {"combine": "sum"})):
        r = base_recipe.with_overrides(name=f"{base_recipe.name}_{name}", model=over)
        torch.manual_seed(0)
        save_checkpoint(checkpoint_path(r, tmp_path / "art"), build_model(r.cfg["model"], r.data.image_size), r,
                        [{"epoch": 1}], ["gray", "stripes"])
    out = tmp_path / "out"
    res = loco_train.run_grid(base, data, grid, tmp_path / "art", out, "cpu", 1, sigmas=(1.0,), topk=(0.01,),
                              log=lambda m: None)
    assert [c["name"] for c in res["configs"]] == ["default", "summed"]
    assert all(c["model"]["reused"] for c in res["configs"])
    assert any(k.startswith("summed|") for k in res["all_settings"])
    assert all(f["chosen_key"].startswith("default|") for f in res["folds"])
    assert any("top2%" in k for k in res["all_settings"]) and res["mean"]
    assert json.loads((out / loco_train.RESULT_JSON).read_text())["folds"] == json.loads(json.dumps(res["folds"]))
    assert "| summed |" in (out / loco_train.RESULT_MD).read_text()


def test_train_device_resolution():
    from uadc.training.run import train_device
    assert train_device("cpu").type == "cpu"
    if torch.cuda.is_available():
        assert train_device("auto").type == "cuda"
    else:
        assert train_device("auto").type == "cpu"
        with pytest.raises(UadcError, match="sees no CUDA GPU"):
            train_device("cuda")
