"""Training a recipe: unified multi-class (all categories shuffled together) or one model per
category. Returns a typed ``TrainResult``; the checkpoint is written atomically."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import ConcatDataset

from uadc.config.recipe import Recipe
from uadc.core.errors import UadcError
from uadc.core.io import JsonResult, check_writable, file_lock
from uadc.core.manifest import check_outside_artifacts
from uadc.core.progress import progress
from uadc.core.scoped import seeded, torch_threads
from uadc.data.mvtec import load_image
from uadc.data.sources import check_outside_data
from uadc.data.prepare import RecipeData, prepare_data
from uadc.models import KDModel
from uadc.models.profile import model_stats, peak_rss_mb
from uadc.training.checkpoint import (check_recipe_copy, checkpoint_path, held_out, make_model, note_replaced_checkpoint,
                                     save_checkpoint)
from uadc.training.fit import EpochCallback, fit, fit_image_knn, fit_patch_knn

log = logging.getLogger(__name__)


@dataclass
class TrainedModel:
    checkpoint: Path
    category: str | None            # None: the unified model
    train_seconds: float
    epochs: int
    final_loss: float
    stats: dict = field(default_factory=dict)
    images: dict[str, dict[str, int]] = field(default_factory=dict)   # per category: train / validation images


@dataclass
class TrainResult(JsonResult):
    recipe: str
    recipe_hash: str
    one_class: bool
    models: list[TrainedModel]

    @property
    def checkpoints(self) -> list[Path]:
        return [m.checkpoint for m in self.models]

    def to_dict(self) -> dict:
        d = asdict(self)
        for m in d["models"]:
            m["checkpoint"] = str(m["checkpoint"])
        return d


def load_images(ds, desc: str) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in progress(range(len(ds)), desc=desc, unit="img")])


def train_recipe(recipe: Recipe, artifacts: Path | None = None, one_class: bool = False,
                 on_epoch: Callable[[str | None, RecipeData], EpochCallback | None] | None = None) -> TrainResult:
    """Train unified (one model) or one-class (one per category).

    ``on_epoch(category, data)`` may return a per-epoch callback (learning curves); time it
    spends (``eval_seconds`` in the history) is not counted in ``train_seconds``."""
    check_writable(recipe.artifact_dir(artifacts))  # a read-only root fails before any work
    # checkpoints in the recipe's data or in an artifact folder: trained, then every compile refused that --artifacts
    check_outside_artifacts(recipe.artifact_dir(artifacts), what="--artifacts")
    check_outside_data(recipe.artifact_dir(artifacts), recipe, what="--artifacts")
    data = prepare_data(recipe)
    for ds in data.val.values():   # an unreadable validation normal stopped `uadc compile`, after the training
        for s in ds.samples:
            load_image(s.path, ds.size)
    cats = data.categories
    groups = [(c, [i for i, s in enumerate(data.train.samples) if s.category == c]) for c in cats] if one_class \
        else [(None, list(range(len(data.train))))]
    paths = [checkpoint_path(recipe, artifacts, cat) for cat, _ in groups]
    for (cat, _), path in zip(groups, paths):   # a checkpoint path that cannot be written fails before the training
        check_recipe_copy(path, recipe, cat)
        check_writable(path.parent)
        if path.exists() and not path.is_file():
            raise UadcError(f"cannot write {path}: something other than a file is there")
    knn = [n for n in ("patch_knn", "image_knn") if recipe.cfg["model"][n]["weight"] > 0]
    for cat, _ in groups if knn else []:   # every model's, before the first trains (one-class: found after some)
        _knn_sets(data, [cat] if cat else cats, knn[0])
    _check_single_image_batches(recipe, groups)
    models: list[TrainedModel] = []
    with torch_threads(recipe.train.threads), _stopped_after(models):
        # every model's images first: an unreadable one fails before any folder or lock exists (one-class: it
        # was found after earlier categories' models were replaced); all of them, as a unified model reads
        loaded = [load_images(torch.utils.data.Subset(data.train, idx), "loading images") for _, idx in groups]
        for (cat, _), path, images in zip(groups, paths, loaded):
            # the caller's random streams come back afterwards
            with seeded(recipe.seed, cuda=train_device(recipe.train.device).type == "cuda"):
                model = make_model(recipe)  # a setting the model refuses (an unknown tap) fails here too
                # after it: "replacing a checkpoint" was said of settings the model then refused, nothing replaced
                note_replaced_checkpoint(path, recipe)   # a one-class one too: it stores the whole recipe
                with file_lock(path):
                    models.append(_train_one(recipe, data, cat, images, cats, path, on_epoch, model))
    return TrainResult(recipe.name, recipe.hash, one_class, models)


def _check_single_image_batches(recipe: Recipe, groups: list[tuple[str | None, list[int]]]) -> None:
    """Batches of one image (one training image, or train.batch_size 1) fail in batch normalisation
    where a feature map is 1x1; found for every model before the first trains (a one-class run
    replaced some categories' models before failing on another's)."""
    single = [(cat, len(idx)) for cat, idx in groups if min(recipe.train.batch_size, len(idx)) == 1]
    if not single:
        return
    size = recipe.data.image_size
    with seeded(recipe.seed), torch.no_grad():
        model = make_model(recipe).train()
        try:
            x = torch.zeros(1, 3, size, size)
            model.student_features(x, model.teacher_features(x))
        except ValueError as exc:
            if "more than 1 value per channel" not in str(exc):
                raise
            cat, n = single[0]
            raise UadcError(f"{'category ' + cat if cat else 'the model'}: training batches of 1 image ({n} training "
                            f"image{'s' * (n != 1)}, train.batch_size {recipe.train.batch_size}) reach a 1x1 feature "
                            f"map, which batch normalisation cannot train on: "
                            + ("give it more training images" if n == 1 else "raise train.batch_size")
                            + f" (or raise data.image_size {size}); nothing was trained") from None


@contextlib.contextmanager
def _stopped_after(models: list[TrainedModel]) -> Iterator[None]:
    """A one-class run stopped half-way has replaced some categories' models: name them."""
    try:
        yield
    except BaseException:
        if models:
            log.warning("stopped after writing the models of %s; the other categories keep their earlier ones",
                        ", ".join(m.category or "unified" for m in models))
        raise


def _train_one(recipe: Recipe, data: RecipeData, cat: str | None, images: torch.Tensor, cats: list[str],
               path: Path, on_epoch, model: KDModel) -> TrainedModel:
    device = train_device(recipe.train.device)
    model = model.to(device)
    banks = [n for n in ("patch_knn", "image_knn") if getattr(model.head, n, None) is not None]
    knn_val = _knn_validation(data, [cat] if cat else cats, banks[0]) if banks else None
    images = images.to(device).contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
    t0 = time.time()
    stages = {}
    t = recipe.train
    if hasattr(model, "pretrain_teacher"):  # US: the descriptor teacher is distilled first
        stages["teacher_history"] = model.pretrain_teacher(images, epochs=t.epochs, lr=t.lr,
                                                           batch_size=t.batch_size, seed=recipe.seed)
        stages["pretrain_seconds"] = round(time.time() - t0, 2)   # before epoch 1: on the learning curve's clock
    callback = _on_cpu(on_epoch(cat, data), device) if on_epoch else None
    history = fit(model, images, t, recipe.seed, desc=f"train {cat or 'unified'}", on_epoch=callback)
    if hasattr(model, "fit_head_stats"):  # US: standardise error/variance on normal data
        stages["head_stats"] = model.fit_head_stats(images)
    if "patch_knn" in banks:  # first: the image kNN standardises the score with the patch term in
        stages["patch_knn"] = fit_patch_knn(model, images, knn_val.to(device),
                                            recipe.cfg["model"]["patch_knn"]["bank"], recipe.seed)
    if "image_knn" in banks:
        stages["image_knn"] = fit_image_knn(model, images, knn_val.to(device),
                                            recipe.cfg["model"]["image_knn"]["max_bank"], recipe.seed)
    seconds = round(max(time.time() - t0 - sum(h.get("eval_seconds", 0) for h in history), 0.0), 1)
    model.cpu()
    stats = {**model_stats(model, recipe.data.image_size), "train_peak_rss_mb": peak_rss_mb()}
    save_checkpoint(path, model, recipe, history, [cat] if cat else cats,
                    {"train_seconds": seconds, "train_device": str(device), "one_class": bool(cat), "stats": stats,
                     "held_out": held_out(recipe, data, [cat] if cat else cats), **stages})
    counts = {c: {"train": sum(s.category == c for s in data.train.samples),
                  "validation": len(data.val[c]) if c in data.val else 0} for c in ([cat] if cat else cats)}
    return TrainedModel(path, cat, seconds, len(history), history[-1]["loss"] if history else float("nan"), stats,
                        counts)


def _knn_sets(data: RecipeData, cats: list[str], name: str) -> list:
    """The validation sets the kNNs standardise on (at least 2 images)."""
    sets = [data.val[c] for c in cats if c in data.val and len(data.val[c])]
    if (n := sum(len(s) for s in sets)) < 2:   # one-class: one category's share of a small train/good
        raise UadcError(f"model.{name} needs at least 2 validation normals to standardise its score, "
                        f"{'/'.join(cats)} has {n}: raise data.val_fraction or give data.val")
    return sets


def _knn_validation(data: RecipeData, cats: list[str], name: str) -> torch.Tensor:
    return load_images(ConcatDataset(_knn_sets(data, cats, name)), "validation normals")


def train_device(name: str) -> torch.device:
    """``train.device`` resolved; asking for a GPU torch cannot see is a one-line error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UadcError("train.device: cuda, but this torch sees no CUDA GPU (use cpu or auto)")
    return torch.device(name)


def _on_cpu(callback: EpochCallback | None, device: torch.device) -> EpochCallback | None:
    """Per-epoch evaluation runs on CPU like every evaluation; the model goes back afterwards."""
    if callback is None or device.type == "cpu":
        return callback

    def run(epoch: int, model: KDModel) -> dict | None:
        try:
            return callback(epoch, model.cpu())
        finally:
            model.to(device)
    return run
