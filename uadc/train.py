"""Training: unified multi-class (all categories shuffled together) or one model per category.

The teacher is frozen, so its features are computed once and cached (``train.cache_teacher``);
each epoch then only runs the student. The mean teacher/student discrepancy per tap on the
normal training images is logged every epoch: it shows convergence better than the loss.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from uadc import __version__
from uadc.data import build_test_sets, build_train_set, resolve_sources, validate_test_masks
from uadc.errors import UadcError
from uadc.models import KDModel, build_model, model_config
from uadc.models.backbones import normalization
from uadc.profile import model_stats, peak_rss_mb
from uadc.recipe import Recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def input_normalization(recipe: Recipe) -> tuple:
    kind = recipe["data"]["normalization"]
    if kind == "imagenet":
        from uadc.models.backbones import IMAGENET_NORM
        return IMAGENET_NORM
    if kind == "unit":
        return ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return normalization(recipe["model"]["backbone"])


def set_threads(recipe: Recipe) -> None:
    if recipe["train"]["threads"]:
        torch.set_num_threads(recipe["train"]["threads"])


def make_model(recipe: Recipe) -> KDModel:
    return build_model(recipe["model"], recipe["data"]["image_size"])


def load_images(ds, desc: str) -> torch.Tensor:
    return torch.stack([ds[i]["image"] for i in tqdm(range(len(ds)), desc=desc, leave=False, unit="img")])


@torch.no_grad()
def cache_teacher(model: KDModel, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = [model.teacher_features(images[i:i + batch_size])
              for i in tqdm(range(0, len(images), batch_size), desc="teacher features", leave=False)]
    return [torch.cat(parts) for parts in zip(*chunks)]


def _optimizer(params, t: dict) -> torch.optim.Optimizer:
    if t["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"])
    return torch.optim.Adam(params, lr=t["lr"], weight_decay=t["weight_decay"])


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model: KDModel, images: torch.Tensor, t: dict, seed: int, desc: str = "train",
        on_epoch: Callable[[int, KDModel], dict | None] | None = None) -> list[dict]:
    """Train the student on preloaded normalised images; returns per-epoch history.

    ``on_epoch(epoch, model)`` may return extra figures (e.g. test AUROC) for the history."""
    bs = min(t["batch_size"], len(images))
    steps_per_epoch = max(1, len(images) // bs)  # drop the ragged last batch (BN statistics)
    total = steps_per_epoch * t["epochs"]
    model.train()
    t_cache = cache_teacher(model.eval(), images, 32) if t["cache_teacher"] else None
    model.train()
    opt = _optimizer(model.trainable_parameters(), t)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, t["warmup_epochs"] * steps_per_epoch, t["schedule"]))
    gen = torch.Generator().manual_seed(seed)
    history = []
    bar = tqdm(total=total, desc=desc, unit="step")
    for epoch in range(t["epochs"]):
        perm = torch.randperm(len(images), generator=gen)
        losses, disc, t0 = [], [], time.time()
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            x = images[idx]
            tf = [f[idx] for f in t_cache] if t_cache is not None else model.teacher_features(x)
            sf = model.student_features(x, tf)
            loss = model.loss(tf, sf)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            with torch.no_grad():
                disc.append(model.discrepancy(tf, [s.detach() for s in sf]))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses):.4f}")
        d = np.mean(disc, axis=0).round(4).tolist()
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "discrepancy": d,
                        "seconds": round(time.time() - t0, 2), "lr": opt.param_groups[0]["lr"]})
        bar.write(f"epoch {epoch + 1}/{t['epochs']}  loss {np.mean(losses):.4f}  "
                  f"normal discrepancy per tap {d}  ({time.time() - t0:.0f} s)")
        if on_epoch is not None:
            model.eval()
            history[-1].update(on_epoch(epoch + 1, model) or {})
            model.train()
    bar.close()
    model.eval()
    return history


def save_checkpoint(path: Path, model: KDModel, recipe: Recipe, history: list[dict], categories: list[str],
                    extra: dict | None = None) -> None:
    """Atomic: a crash mid-write never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"state_dict": model.state_dict(), "recipe": recipe.cfg, "recipe_hash": recipe.hash,
            "model_hash": model_hash(recipe), "history": history, "categories": categories,
            "uadc_version": __version__, **(extra or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)
    (path.parent / "recipe.yaml").write_text(_recipe_yaml(recipe))


def _recipe_yaml(recipe: Recipe) -> str:
    import yaml
    return yaml.safe_dump(recipe.cfg, sort_keys=False)


def model_hash(recipe: Recipe) -> str:
    """Hash of what a checkpoint must agree with to be used (data and architecture)."""
    return recipe.section_hash(("data", "model"))


def checkpoint_path(recipe: Recipe, artifacts: Path | None = None, category: str | None = None) -> Path:
    d = recipe.artifact_dir(artifacts)
    return (d / "one_class" / category if category else d) / "checkpoint.pt"


def load_checkpoint(path: Path, recipe: Recipe | None = None) -> tuple[KDModel, dict]:
    if not path.is_file():
        raise UadcError(f"checkpoint not found: {path} (run `uadc train` first)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UadcError(f"cannot read checkpoint {path}: {exc}") from None
    trained = Recipe(blob["recipe"], None)
    # Recompute from the stored recipe rather than trusting a stored hash of an older definition.
    if recipe is not None and model_hash(trained) != model_hash(recipe):
        raise UadcError(f"checkpoint {path} was trained with different data/model settings than "
                        f"recipe {recipe.path}; retrain with `uadc train`")
    model = make_model(trained)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob


def prepare_data(recipe: Recipe, categories: list[str] | None = None):
    """Validates all data (train and test, masks included) before any training starts."""
    pairs = resolve_sources(recipe["data"]["sources"])
    if categories:
        pairs = [p for p in pairs if p[1] in categories]
    norm = input_normalization(recipe)
    size = recipe["data"]["image_size"]
    train = build_train_set(pairs, size, norm, recipe["data"]["train_limit"])
    tests = build_test_sets(pairs, size, norm)
    for ds in tests.values():
        validate_test_masks(ds)
    return pairs, train, tests


def _learning_curve(recipe: Recipe, tests: dict, every: int, categories: list[str] | None):
    """on_epoch callback: test metrics every ``every`` epochs (AUROC against training time)."""
    from uadc.evaluate import evaluate, load_test_arrays, torch_predictor
    arrays = {c: load_test_arrays(ds) for c, ds in tests.items() if not categories or c in categories}

    def on_epoch(epoch: int, model: KDModel) -> dict | None:
        if epoch % every and epoch != recipe["train"]["epochs"]:
            return None
        t0 = time.time()
        res = evaluate(torch_predictor(model), arrays, recipe["eval"]["batch_size"], "learning curve")
        tqdm.write(f"epoch {epoch}: test {({k: round(v, 4) for k, v in res['mean'].items()})}")
        return {"test": res, "eval_seconds": round(time.time() - t0, 1)}

    return on_epoch


def train_recipe(recipe: Recipe, artifacts: Path | None = None, one_class: bool = False,
                 eval_every: int | None = None) -> list[Path]:
    """Train unified (one model) or one-class (one per category); returns checkpoint paths.

    ``eval_every``: also evaluate on the test sets every N epochs (time spent there is not
    counted in ``train_seconds``)."""
    set_threads(recipe)
    pairs, train_set, tests = prepare_data(recipe)
    cats = [c for _, c in pairs]
    groups = [(c, [i for i, s in enumerate(train_set.samples) if s.category == c]) for c in cats] if one_class \
        else [(None, list(range(len(train_set))))]
    paths = []
    for cat, idx in groups:
        seed_everything(recipe["seed"])
        model = make_model(recipe)
        images = load_images(torch.utils.data.Subset(train_set, idx), "loading images")
        images = images.contiguous(memory_format=torch.channels_last)  # faster CPU convolutions
        t0 = time.time()
        stages = {}
        if hasattr(model, "pretrain_teacher"):  # US: the descriptor teacher is distilled first
            t = recipe["train"]
            stages["teacher_history"] = model.pretrain_teacher(images, epochs=t["epochs"], lr=t["lr"],
                                                               batch_size=t["batch_size"], seed=recipe["seed"])
        curve = _learning_curve(recipe, tests, eval_every, [cat] if cat else None) if eval_every else None
        history = fit(model, images, recipe["train"], recipe["seed"], desc=f"train {cat or 'unified'}",
                      on_epoch=curve)
        if hasattr(model, "fit_head_stats"):  # US: standardise error/variance on normal data
            stages["head_stats"] = model.fit_head_stats(images)
        path = checkpoint_path(recipe, artifacts, cat)
        seconds = time.time() - t0 - sum(h.get("eval_seconds", 0) for h in history)
        stats = {**model_stats(model, recipe["data"]["image_size"]), "train_peak_rss_mb": peak_rss_mb()}
        save_checkpoint(path, model, recipe, history, [cat] if cat else cats,
                        {"train_seconds": round(seconds, 1), "one_class": bool(cat), "stats": stats, **stages})
        paths.append(path)
    return paths


__all__ = ["train_recipe", "load_checkpoint", "checkpoint_path", "prepare_data", "fit", "make_model",
           "input_normalization", "model_config"]
