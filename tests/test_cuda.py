"""``train.device: cuda``: every method trains on the GPU, and its checkpoint evaluates and compiles
on the CPU. Needs a CUDA GPU, which CI does not have; the first run on one found the image kNN's bank
and the US decoder left on the CPU while the images were on the GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from synthetic import make_category

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: trains each method with train.device cuda")

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # each shipped recipe's model, plus the patch kNN the shipped recipes leave off
    "stfpm": ("stfpm_effnet_lite0", {}),
    "stfpm-patch-knn": ("stfpm_effnet_lite0", {"patch_knn": {"weight": 1.0, "taps": ["blocks.4"], "bank": 64}}),
    "rd": ("rd_effnet_lite0", {}),
    "us": ("us_effnet_lite0", {}),
    "paste": ("paste_effnet_lite0", {}),
    "dcam": ("dcam_effnet_lite0", {}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cuda_data")
    make_category(root, "stripes", size=64, n_train=16, n_good=3, n_defect=3, seed=1)
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_each_method_trains_on_the_gpu_and_its_checkpoint_runs_on_the_cpu(case, data, tmp_path):
    import uadc

    shipped, extra = CASES[case]
    cfg = yaml.safe_load((ROOT / "recipes" / f"{shipped}.yaml").read_text())
    cfg["model"].update(extra)
    cfg.update(name=f"cuda_{case}",
               data={"sources": [{"root": str(data), "categories": ["stripes"]}], "image_size": 64,
                     "val_fraction": 0.25, "normalization": cfg["data"].get("normalization", "imagenet")},
               train={**cfg["train"], "epochs": 2, "batch_size": 4, "device": "cuda", "threads": 2})  # workers share the cores
    cfg["compile"]["calib_samples"] = 4
    recipe = tmp_path / f"cuda_{case}.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    # per-epoch evaluation moves the model to the CPU and back between epochs
    trained = uadc.train(recipe, artifacts=tmp_path / "art", eval_every=1 if case == "stfpm" else None)
    ckpt = torch.load(trained.models[0].checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["train_device"].startswith("cuda")
    res = uadc.evaluate(recipe, artifacts=tmp_path / "art")
    assert math.isfinite(res.mean["image_auroc"]) and math.isfinite(res.mean["pixel_auroc"])
    out = uadc.compile(recipe, target="ort-cpu-int8", artifacts=tmp_path / "art", latency_runs=1, threads=2)
    assert out.precision == "int8"
