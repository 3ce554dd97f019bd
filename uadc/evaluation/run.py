"""Evaluation: run any predictor (torch model, ONNX Runtime session, TensorRT engine) over the
per-category test sets and compute image AUROC, pixel AUROC, AUPRO and pixel F1-max."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from uadc.config.recipe import Recipe
from uadc.core.constants import EVAL_FILE, METRIC_KEYS
from uadc.core.errors import NonFiniteOutputs, UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import JsonResult, atomic_write_json, check_writable, read_json
from uadc.core.numbers import fixed_difference
from uadc.core.progress import progress
from uadc.core.scoped import eval_mode, torch_threads
from uadc.data.mvtec import ImageDataset
from uadc.data.prepare import RecipeData, prepare_data
from uadc.data.sources import data_fingerprint
from uadc.evaluation import metrics
from uadc.models import KDModel
from uadc.training.checkpoint import ONE_CLASS_DIR, checkpoint_path, judged_categories, load_checkpoint

# images (N,3,H,W) float32 normalised -> (anomaly maps (N,H,W), scores (N,))
Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
TestArrays = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class EvalResult:
    """Metrics per category and their mean (``eval.json``'s shape)."""

    mean: dict[str, float]
    categories: dict[str, dict[str, float]]
    defects: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)   # checkpoint, epochs, learning curve, ...
    path: Path | None = None                             # where eval.json was written
    images: dict[str, dict[str, int]] = field(default_factory=dict)   # per category: good / defective test images

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"mean": self.mean, "categories": self.categories}
        if self.defects:
            d["defects"] = self.defects
        if self.images:
            d["test_images"] = self.images
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        from uadc.core.io import to_json
        return to_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        extra = {k: v for k, v in d.items() if k not in ("mean", "categories", "defects", "test_images")}
        return cls(d["mean"], d["categories"], d.get("defects") or {}, extra, images=d.get("test_images") or {})


def torch_predictor(model: torch.nn.Module) -> Predictor:
    """The model in eval mode for each call (:func:`eval_mode`), the caller's modes back after it."""
    @torch.no_grad()
    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with eval_mode(model):
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


def test_arrays(data: RecipeData, categories: list[str] | None = None) -> TestArrays:
    return {c: load_test_arrays(ds) for c, ds in data.tests.items() if not categories or c in categories}


def defect_types(data: RecipeData, categories: list[str] | None = None) -> dict[str, list[str]]:
    """Each test image's defect type, per category, in test_arrays' order: the per-defect figures."""
    return {c: [x.defect for x in ds.samples] for c, ds in data.tests.items() if not categories or c in categories}


def predict(predictor: Predictor, images: np.ndarray, batch_size: int, desc: str = "predict"
            ) -> tuple[np.ndarray, np.ndarray]:
    maps, scores = [], []
    for i in progress(range(0, len(images), batch_size), desc=desc):
        m, s = predictor(np.ascontiguousarray(images[i:i + batch_size]))
        maps.append(np.asarray(m, np.float32))
        scores.append(np.asarray(s, np.float32).reshape(-1))
    maps_, scores_ = np.concatenate(maps), np.concatenate(scores)
    if not (np.isfinite(scores_).all() and np.isfinite(maps_).all()):
        raise NonFiniteOutputs(f"{desc}: the model produced non-finite outputs (NaN/Inf) on the test images; "
                        f"check the weights for NaN/Inf")
    return maps_, scores_


def _need_tests(arrays: TestArrays) -> None:
    if not arrays:
        raise UadcError("no labelled test images to evaluate on: no category has a test folder with good and "
                        "defective images (<root>/<category>/test/good, test/<defect> with ground_truth masks)")


def evaluate(predictor: Predictor, arrays: TestArrays, batch_size: int = 16, desc: str = "eval",
             defects: dict[str, list[str]] | None = None) -> EvalResult:
    """Metrics per category (and per defect type with ``defects``: type per test image)."""
    _need_tests(arrays)
    per_cat, per_defect, counts = {}, {}, {}
    for cat, (images, masks, labels) in arrays.items():
        counts[cat] = {"good": int((labels == 0).sum()), "defective": int((labels != 0).sum())}
        maps, scores = predict(predictor, images, batch_size, f"{desc} {cat}")
        per_cat[cat] = metrics.compute_all(labels, scores, masks, maps)
        if defects and cat in defects:
            per_defect[cat] = defect_breakdown(np.asarray(defects[cat]), labels, scores, masks, maps)
    s = metrics.summarize(per_cat)
    return EvalResult(s["mean"], s["categories"], per_defect, images=counts)


def defect_breakdown(kinds: np.ndarray, labels, scores, masks, maps) -> dict[str, dict[str, float]]:
    """Per defect type: image AUROC against the good images, pixel AUROC on that type's images."""
    out = {}
    for kind in sorted(str(k) for k in set(kinds) - {"good"}):   # str: numpy's str_ kept YAML from dumping it
        sel, only = (kinds == kind) | (kinds == "good"), kinds == kind
        out[kind] = {"count": int(only.sum()), "image_auroc": metrics.image_auroc(labels[sel], scores[sel])}
        if metrics.has_pixels(masks[only]):
            out[kind]["pixel_auroc"] = metrics.pixel_auroc(masks[only], maps[only])
    return out


def format_table(result: EvalResult | dict, title: str = "") -> str:
    d = result.to_dict() if isinstance(result, EvalResult) else result
    head = f"{'category':<16}" + "".join(f"{k:>13}" for k in METRIC_KEYS)
    rows = [title, head] if title else [head]
    for cat, vals in list(d["categories"].items()) + [("mean", d["mean"])]:
        rows.append(f"{cat:<16}" + "".join(f"{vals[k]:>13.4f}" if k in vals else f"{'-':>13}" for k in METRIC_KEYS))
    return "\n".join(rows)


def learning_curve(recipe: Recipe, every: int):
    """For ``train_recipe(on_epoch=...)``: test metrics every ``every`` epochs (AUROC against
    training time)."""
    def factory(category: str | None, data: RecipeData):
        arrays = test_arrays(data, [category] if category else None)

        def on_epoch(epoch: int, model: KDModel) -> dict | None:
            if not arrays or (epoch % every and epoch != recipe.train.epochs):   # no test folder: no curve
                return None
            t0 = time.time()
            res = evaluate(torch_predictor(model), arrays, recipe.eval.batch_size, "learning curve")
            return {"test": res.to_dict(), "eval_seconds": round(time.time() - t0, 3)}   # 0.1 s: a -0.0 s training

        return on_epoch

    return factory


def evaluate_checkpoint(recipe: Recipe, checkpoint: Path | None = None, artifacts: Path | None = None,
                        write: bool = True) -> EvalResult:
    """Evaluate the unified checkpoint (per defect type too); writes ``eval.json`` beside it."""
    ckpt = Path(checkpoint) if checkpoint else checkpoint_path(recipe, artifacts)
    own = ckpt.resolve() == checkpoint_path(recipe, artifacts).resolve()
    if write and own:   # before the work: a read-only folder stopped it at the end
        check_writable(recipe.artifact_dir(artifacts))
    if own and not ckpt.exists():   # only one-class models trained: name them and what judges them
        found = sorted(p.parent.name for p in (ckpt.parent / ONE_CLASS_DIR).glob(f"*/{ckpt.name}"))
        if found:
            raise UadcError(f"checkpoint not found: {ckpt} (run `uadc train` first); {ckpt.parent / ONE_CLASS_DIR} "
                            f"holds one-class models of {', '.join(found)}: `uadc eval --one-class` judges them")
    with torch_threads(recipe.train.threads):
        model, blob = load_checkpoint(ckpt, recipe)
        data = prepare_data(recipe)
        cats = judged_categories(blob, data.categories, ckpt)     # a one-class model: its own category
        result = evaluate(torch_predictor(model), test_arrays(data, cats), recipe.eval.batch_size,
                          defects=defect_types(data, cats))
    history = blob.get("history", [])
    one_class = bool(blob.get("one_class"))
    result.extra = {"checkpoint": os.path.realpath(ckpt),   # eval.json's bytes: not the working folder's
                    "checkpoint_sha256": blob.sha256, "recipe_hash": recipe.hash,
                    "data_fingerprint": data_fingerprint(recipe),   # the test images judged (names and sizes)
                    # a category left out of `mean` (one kind of test image, or none): said in the document too
                    **({"not_evaluated": skipped} if (skipped := {c: why for c, why in data.not_evaluated.items()
                                                                   if c in cats}) else {}),
                    # the training's own (train --json's): another when `train --epochs N` overrode the recipe
                    "trained_recipe_hash": blob.get("recipe_hash"), "train_seconds": blob.get("train_seconds"),
                    **({"one_class": True, "trained_on": list(blob.get("categories") or [])} if one_class else {}),
                    "epochs": len(history), "model_stats": blob.get("stats"),
                    "learning_curve": [{"epoch": h["epoch"], "train_seconds": _seconds_until(history, h["epoch"],
                                                                                             _pretrain_seconds(blob)),
                                        "mean": h["test"]["mean"], "categories": h["test"]["categories"]}
                                       for h in history if "test" in h]}
    if write and own and not one_class:   # eval.json is the recipe's own model's: the one-class comparison reads it
        result.path = atomic_write_json(recipe.artifact_dir(artifacts) / EVAL_FILE, result.to_dict())
    return result


def _seconds_until(history: list[dict], epoch: int, before: float = 0.0) -> float:
    """Training time (test evaluations excluded, teacher caching and ``before`` the first epoch included:
    Uninformed Students' descriptor teacher) up to the end of ``epoch``."""
    return round(before + sum(h["seconds"] + h.get("setup_seconds", 0) for h in history if h["epoch"] <= epoch), 1)


def _pretrain_seconds(blob: dict) -> float:
    """The descriptor teacher's training (US), as recorded; an older checkpoint's from its epochs."""
    if isinstance(blob.get("pretrain_seconds"), (int, float)):
        return float(blob["pretrain_seconds"])
    epochs = blob.get("teacher_history")
    return float(sum(h.get("seconds", 0) for h in epochs if isinstance(h, dict) and isinstance(h.get("seconds", 0),
                                                                                                (int, float)))) \
        if isinstance(epochs, list) else 0.0


@dataclass
class OneClassResult(JsonResult):
    """``uadc.evaluate(..., one_class=True)``: every category's one-class model on its category, and
    the unified model's figures (None where it was not evaluated) beside them."""

    one_class: EvalResult
    unified: EvalResult | None
    path: Path | None = None

    def to_dict(self) -> dict:
        return {"one_class": self.one_class.to_dict(), "unified": self.unified.to_dict() if self.unified else None}


def evaluate_one_class(recipe: Recipe, artifacts: Path | None = None, write: bool = True) -> OneClassResult:
    """Evaluate each per-category model on its category; compare with the unified model. Each
    checkpoint must be its category's one-class model (a copied or unified one was scored as it)."""
    if write:
        check_writable(recipe.artifact_dir(artifacts))
    with torch_threads(recipe.train.threads):
        data = prepare_data(recipe)
        arrays = test_arrays(data)
        _need_tests(arrays)
        per_cat, models, counts, defects = {}, {}, {}, {}
        for cat, arr in arrays.items():
            path = checkpoint_path(recipe, artifacts, cat)
            model, blob = load_checkpoint(path, recipe, retrain="uadc train --one-class")
            if not blob.get("one_class") or list(blob.get("categories") or []) != [cat]:
                raise UadcError(f"{path}: not the one-class model of {cat!r} (a {'one-class' if blob.get('one_class') else 'unified'} "
                                f"model of {', '.join(blob.get('categories') or ['?'])}); retrain with `uadc train "
                                f"--one-class`")
            models[cat] = {"checkpoint": os.path.realpath(path), "checkpoint_sha256": blob.sha256,
                           "epochs": len(blob.get("history", []))}   # a partial retrain mixes models: visible here
            res = evaluate(torch_predictor(model), {cat: arr}, recipe.eval.batch_size,   # per defect, as eval.json's
                           defects=defect_types(data, [cat]))
            per_cat[cat], counts[cat], defects[cat] = res.categories[cat], res.images[cat], res.defects[cat]
    s = metrics.summarize(per_cat)
    skipped = {"not_evaluated": data.not_evaluated} if data.not_evaluated else {}
    one_class = EvalResult(s["mean"], s["categories"], defects,
                           extra={"recipe_hash": recipe.hash, "models": models, **skipped}, images=counts)
    result = OneClassResult(one_class, _unified_eval(recipe.artifact_dir(artifacts) / EVAL_FILE, recipe, per_cat,
                                                     checkpoint_path(recipe, artifacts)))
    if write:
        result.path = atomic_write_json(recipe.artifact_dir(artifacts) / "one_class_eval.json", result.to_dict())
    return result


def _unified_eval(path: Path, recipe: Recipe, categories: dict, checkpoint: Path) -> EvalResult | None:
    """The unified model's ``eval.json`` to compare with, if it is this recipe's, of the checkpoint there
    now (a retrained model's was compared before), of the data there now (test images removed since:
    8 images' figures against 4's) and covers every category (an older recipe's, or a damaged file, is
    no basis for a comparison: None)."""
    if not path.is_file() or not checkpoint.is_file():
        return None
    try:
        res = EvalResult.from_dict(read_json(path, "unified evaluation"))
        fits = res.extra.get("recipe_hash") == recipe.hash and not res.extra.get("one_class") and \
            res.extra.get("checkpoint_sha256") == sha256_file(checkpoint) and \
            res.extra.get("data_fingerprint") == data_fingerprint(recipe) and all(
            isinstance(res.categories.get(c), dict) and all(isinstance(res.categories[c].get(k), (int, float))
                                                          for k in m if k in ("image_auroc", "pixel_auroc"))
            for c, m in categories.items())
    except (UadcError, KeyError, TypeError, AttributeError):
        fits = False
    return res if fits else None


def format_defects(res: EvalResult) -> str:
    """One line per category: image / pixel AUROC of each defect type."""
    return "\n".join(f"{cat}: " + ", ".join(f"{k} {v['image_auroc']:.3f}/" + (f"{v['pixel_auroc']:.3f}" if "pixel_auroc"
                                                in v else "-") for k, v in kinds.items())
                     + "  (image/pixel AUROC per defect type)" for cat, kinds in res.defects.items())


def format_comparison(unified: EvalResult | None, one_class: EvalResult) -> str:
    if unified is None:
        return ("no unified eval.json of this recipe's current checkpoint: run `uadc eval` (after `uadc train`, where "
                "there is no unified checkpoint) for the unified-vs-one-class table")
    rows = [f"{'category':<16}{'metric':<13}{'unified':>10}{'one-class':>11}{'delta':>9}"]
    for cat in one_class.categories:
        for k in ("image_auroc", "pixel_auroc"):
            if k not in one_class.categories[cat]:     # no test masks: image AUROC only
                continue
            u, o = unified.categories[cat][k], one_class.categories[cat][k]
            rows.append(f"{cat:<16}{k:<13}{u:>10.4f}{o:>11.4f}{fixed_difference(u, o):>9}")
    return "\n".join(rows + ["delta = unified - one-class: positive where the unified model scores higher"])
