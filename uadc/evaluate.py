"""Evaluation: run any predictor (torch model, ONNX Runtime session, TensorRT engine) over the
per-category test sets and compute image AUROC, pixel AUROC, AUPRO and pixel F1-max."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from uadc import metrics
from uadc.data import ImageDataset

# images (N,3,H,W) float32 normalised -> (anomaly maps (N,H,W), scores (N,))
Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1")


def torch_predictor(model: torch.nn.Module) -> Predictor:
    model.eval()

    @torch.no_grad()
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amap, score = model(torch.from_numpy(images))
        return amap[:, 0].numpy(), score.numpy()

    return run


def load_test_arrays(ds: ImageDataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, masks (N,H,W) bool, labels) for a test set, loaded once."""
    items = [ds[i] for i in range(len(ds))]
    images = np.stack([it["image"].numpy() for it in items])
    masks = np.stack([it["mask"][0].numpy() > 0.5 for it in items])
    labels = np.array([it["label"] for it in items])
    return images, masks, labels


def predict(predictor: Predictor, images: np.ndarray, batch_size: int, desc: str = "predict"
            ) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, leave=False):
        m, s = predictor(np.ascontiguousarray(images[i:i + batch_size]))
        maps.append(np.asarray(m, np.float32))
        scores.append(np.asarray(s, np.float32).reshape(-1))
    return np.concatenate(maps), np.concatenate(scores)


def evaluate(predictor: Predictor, test_arrays: dict[str, tuple], batch_size: int = 16, desc: str = "eval",
             defects: dict[str, list[str]] | None = None) -> dict:
    """{"mean": {...}, "categories": {cat: {...}}} with METRIC_KEYS per category; with
    ``defects`` (defect type per test image) also ``"defects": {cat: {type: {...}}}``."""
    per_cat, per_defect = {}, {}
    for cat, (images, masks, labels) in test_arrays.items():
        maps, scores = predict(predictor, images, batch_size, f"{desc} {cat}")
        per_cat[cat] = metrics.compute_all(labels, scores, masks, maps)
        if defects and cat in defects:
            per_defect[cat] = defect_breakdown(np.asarray(defects[cat]), labels, scores, masks, maps)
    result = metrics.summarize(per_cat)
    if per_defect:
        result["defects"] = per_defect
    return result


def defect_breakdown(kinds: np.ndarray, labels, scores, masks, maps) -> dict[str, dict[str, float]]:
    """Per defect type: image AUROC against the good images, pixel AUROC on that type's images."""
    out = {}
    for kind in sorted(set(kinds) - {"good"}):
        sel, only = (kinds == kind) | (kinds == "good"), kinds == kind
        out[kind] = {"count": int(only.sum()), "image_auroc": metrics.image_auroc(labels[sel], scores[sel]),
                     "pixel_auroc": metrics.pixel_auroc(masks[only], maps[only])}
    return out


def format_table(result: dict, title: str = "") -> str:
    head = f"{'category':<16}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    rows = [title, head] if title else [head]
    for cat, vals in list(result["categories"].items()) + [("mean", result["mean"])]:
        rows.append(f"{cat:<16}" + "".join(f"{vals[k]:>13.4f}" for k in METRIC_KEYS))
    return "\n".join(rows)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def test_arrays_for(recipe, categories: list[str] | None = None) -> dict[str, tuple]:
    from uadc.train import prepare_data
    _, _, tests = prepare_data(recipe, categories)
    return {c: load_test_arrays(ds) for c, ds in tests.items()}


def run_eval(recipe, checkpoint: Path | None = None, artifacts: Path | None = None) -> dict:
    """Evaluate the unified checkpoint; writes ``eval.json`` next to it and prints the table."""
    from uadc.train import checkpoint_path, load_checkpoint, set_threads
    set_threads(recipe)
    ckpt = checkpoint or checkpoint_path(recipe, artifacts)
    model, blob = load_checkpoint(ckpt, recipe)
    from uadc.train import prepare_data
    _, _, tests = prepare_data(recipe)
    arrays = {c: load_test_arrays(ds) for c, ds in tests.items()}
    kinds = {c: [s.defect for s in ds.samples] for c, ds in tests.items()}
    result = evaluate(torch_predictor(model), arrays, recipe["eval"]["batch_size"], defects=kinds)
    result.update(checkpoint=str(ckpt), recipe_hash=recipe.hash, train_seconds=blob.get("train_seconds"),
                  epochs=len(blob.get("history", [])), model_stats=blob.get("stats"),
                  learning_curve=[{"epoch": h["epoch"], "train_seconds": _seconds_until(blob["history"], h["epoch"]),
                                   "mean": h["test"]["mean"], "categories": h["test"]["categories"]}
                                  for h in blob.get("history", []) if "test" in h])
    out = recipe.artifact_dir(artifacts) / "eval.json"
    write_json_atomic(out, result)
    print(format_table(result, f"{recipe.name} (unified, {result['epochs']} epochs)"))
    for cat, kinds in result.get("defects", {}).items():
        print(f"{cat}: " + ", ".join(f"{k} {v['image_auroc']:.3f}/{v['pixel_auroc']:.3f}" for k, v in kinds.items())
              + "  (image/pixel AUROC per defect type)")
    print(f"written: {out}")
    return result


def _seconds_until(history: list[dict], epoch: int) -> float:
    """Training time (test evaluations excluded) up to the end of ``epoch``."""
    return round(sum(h["seconds"] for h in history if h["epoch"] <= epoch), 1)


def run_eval_one_class(recipe, artifacts: Path | None = None) -> dict:
    """Evaluate each per-category model on its category; compare with the unified model."""
    from uadc.train import checkpoint_path, load_checkpoint, set_threads
    set_threads(recipe)
    arrays = test_arrays_for(recipe)
    per_cat = {}
    for cat, arr in arrays.items():
        model, _ = load_checkpoint(checkpoint_path(recipe, artifacts, cat), recipe)
        per_cat[cat] = evaluate(torch_predictor(model), {cat: arr}, recipe["eval"]["batch_size"])["categories"][cat]
    one_class = metrics.summarize(per_cat)
    unified_path = recipe.artifact_dir(artifacts) / "eval.json"
    unified = json.loads(unified_path.read_text()) if unified_path.is_file() else None
    result = {"one_class": one_class, "unified": unified}
    write_json_atomic(recipe.artifact_dir(artifacts) / "one_class_eval.json", result)
    print(format_table(one_class, f"{recipe.name} (one model per category)"))
    if unified:
        print(format_comparison(unified, one_class))
    else:
        print("no unified eval.json yet: run `uadc eval` for the unified-vs-one-class table")
    return result


def format_comparison(unified: dict, one_class: dict) -> str:
    rows = [f"{'category':<16}{'metric':<13}{'unified':>10}{'one-class':>11}{'delta':>9}"]
    for cat in one_class["categories"]:
        for k in ("image_auroc", "pixel_auroc"):
            u, o = unified["categories"][cat][k], one_class["categories"][cat][k]
            rows.append(f"{cat:<16}{k:<13}{u:>10.4f}{o:>11.4f}{u - o:>+9.4f}")
    return "\n".join(rows)
