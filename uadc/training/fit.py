"""The training loop: the teacher is frozen, so its features are computed once and cached
(``train.cache_teacher``); each epoch then only runs the student. The mean teacher/student
discrepancy per tap on the normal training images is logged every epoch: it shows convergence
better than the loss."""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from uadc.config.recipe import TrainConfig
from uadc.core.errors import UadcError
from uadc.core.manifest import NO_VALIDATION_ADVICE
from uadc.core.progress import progress
from uadc.core.scoped import environment_kept
from uadc.models import KDModel
from uadc.models.dcam import build_dcam

log = logging.getLogger(__name__)
EpochCallback = Callable[[int, KDModel], "dict | None"]


@torch.no_grad()
def cache_teacher(model: KDModel, images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = [model.teacher_features(images[i:i + batch_size])
              for i in progress(range(0, len(images), batch_size), desc="teacher features")]
    return [torch.cat(parts) for parts in zip(*chunks)]


def _warn_misaligned(model: KDModel, images: torch.Tensor, t_cache: list[torch.Tensor] | None) -> None:
    """An image size its deepest features do not divide (33, 129 px with a stride-16 tap): their cells
    no longer line up with the pixels, the border cells see extra padding, and a review's maps peaked
    at the image borders, with far lower AUROC than one pixel less or more."""
    size = int(images.shape[-1])
    if t_cache is None:
        with torch.no_grad():
            t_cache = model.eval().teacher_features(images[:1])
    side = min(int(f.shape[-1]) for f in t_cache) if t_cache else size
    stride = 2 ** math.ceil(math.log2(size / max(side, 1)) - 1e-9)   # side = ceil(size / stride): 40 px, stride 32
    stride *= int(getattr(model, "below_taps", 1))   # RD's embedding halves the deepest tap again
    if stride > 1 and size % stride:
        low = size - size % stride   # 0 or below the 32 px minimum is no size to suggest
        sizes = f"{low} or {low + stride} line up" if low >= 32 else f"{low + stride} lines up"
        log.warning("data.image_size %d is not a multiple of %d, the stride of the model's deepest features: their "
                    "cells do not line up with the pixels, and anomaly maps can peak at the image borders (a review "
                    "measured far lower AUROC at 33 and 129 px than at 32 and 128); %s", size, stride, sizes)


def _optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    with environment_kept():   # the first optimizer imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fit(model: KDModel, images: torch.Tensor, t: TrainConfig, seed: int, desc: str = "train",
        on_epoch: EpochCallback | None = None) -> list[dict]:
    """Train the student on preloaded normalised images; returns per-epoch history.

    ``on_epoch(epoch, model)`` may return extra figures (e.g. test AUROC) for the history."""
    bs = min(t.batch_size, len(images))
    steps_per_epoch = max(1, len(images) // bs)  # drop the ragged last batch (BN statistics)
    total = steps_per_epoch * t.epochs
    if t.warmup_epochs >= t.epochs:   # the warm-up's last step is at train.lr: equal epochs reach it once
        log.warning("train.warmup_epochs (%d) %s train.epochs (%d): the learning rate %s", t.warmup_epochs,
                    *((">", t.epochs, "never reaches train.lr") if t.warmup_epochs > t.epochs else
                      ("=", t.epochs, "reaches train.lr on the last step only")))
    t_setup = time.time()   # teacher caching and DCAM set-up count as training time too
    t_cache = cache_teacher(model.eval(), images, 32) if t.cache_teacher else None
    # DCAM: training-only attention blocks and loss, dropped after training (never exported).
    dcam = build_dcam(model, t.dcam, images[:2]).to(images.device) if t.dcam.enabled else None
    _warn_misaligned(model, images, t_cache)
    model.train()
    opt = _optimizer(model.trainable_parameters() + (list(dcam.parameters()) if dcam is not None else []), t)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, t.warmup_epochs * steps_per_epoch, t.schedule))
    gen = torch.Generator().manual_seed(seed)
    history = []
    setup_seconds = round(time.time() - t_setup, 2)
    bar = progress(total=total, desc=desc, unit="step")
    for epoch in range(t.epochs):
        perm = torch.randperm(len(images), generator=gen)
        losses, disc, t0 = [], [], time.time()
        for b in range(steps_per_epoch):
            idx = perm[b * bs:(b + 1) * bs]
            x = images[idx]
            tf = [f[idx] for f in t_cache] if t_cache is not None else model.teacher_features(x)
            try:
                sf = model.student_features(x, tf)
                loss = dcam(model, tf, sf) if dcam is not None else model.loss(tf, sf)
            except ValueError as exc:   # batch normalisation of one value per channel (torch's own traceback)
                bar.close()
                if "more than 1 value per channel" not in str(exc):
                    raise
                raise UadcError(f"training batches of {len(idx)} image reach a 1x1 feature map, which batch "
                                f"normalisation cannot train on: raise train.batch_size (or data.image_size, or "
                                f"give more training images)") from None
            if not torch.isfinite(loss):
                bar.close()
                raise UadcError(f"training diverged: the loss is {loss.item()} at epoch {epoch + 1}, step {b + 1} "
                                f"(non-finite input, weights or a too large train.lr={t.lr:g}); no checkpoint written")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]   # the rate this step used (the history said the next epoch's)
            opt.step()
            sched.step()
            losses.append(loss.item())
            with torch.no_grad():
                disc.append(model.discrepancy(tf, [s.detach() for s in sf]))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses):.4f}")
        d = np.mean(disc, axis=0).round(4).tolist()
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "discrepancy": d,
                        "seconds": round(time.time() - t0, 2), "lr": lr,
                        **({"setup_seconds": setup_seconds} if epoch == 0 else {})})
        if on_epoch is not None:
            model.eval()
            history[-1].update(on_epoch(epoch + 1, model) or {})
            model.train()
        log.info("%s: epoch %d/%d  loss %.4f  normal discrepancy per %s %s  (%.1f s)%s", desc, epoch + 1, t.epochs,
                 np.mean(losses), model.discrepancy_per, d, history[-1]["seconds"],
                 _curve_point(history[-1].get("test")))
    bar.close()
    model.eval()
    return history


def _curve_point(test: dict | None) -> str:
    """The learning curve's point on the epoch line (``--eval-every``): it was only in the checkpoint."""
    mean = (test or {}).get("mean") or {}
    figures = [f"{k.split('_')[0]} {mean[k]:.4f}" for k in ("image_auroc", "pixel_auroc") if k in mean]
    return f"  test AUROC {', '.join(figures)}" if figures else ""


def _need_validation(val_images: torch.Tensor, name: str) -> None:
    if len(val_images) < 2:
        raise UadcError(f"model.{name} needs validation normals to standardise its score: {NO_VALIDATION_ADVICE}")


@torch.no_grad()
def fit_image_knn(model: KDModel, images: torch.Tensor, val_images: torch.Tensor, max_bank: int, seed: int,
                  batch_size: int = 32) -> dict:
    """Fill the head's image kNN (``model.image_knn``): the bank from the training images (a seeded
    subset of ``max_bank`` beyond that), then the standardisation from the validation normals, whose
    images are never in the bank. Needs at least two validation normals."""
    knn = model.head.image_knn
    _need_validation(val_images, "image_knn")
    was_training = model.training
    model.eval()
    bank = torch.cat([knn.describe(model.teacher(images[i:i + batch_size]))
                      for i in progress(range(0, len(images), batch_size), desc="image kNN bank")])
    knn.set_bank(bank[knn.bank_indices(len(bank), max_bank, seed).to(bank.device)])  # on the model's device
    if knn.k > knn.bank_size:   # the term averaged over every bank image, silently
        log.warning("model.image_knn.k %d is more than its bank of %d training images: each score averages "
                    "over all of them (lower k%s)", knn.k, knn.bank_size,   # max_bank only where it capped the bank
                    ", or raise image_knn.max_bank" if knn.k <= len(bank) else ", or give more training images")
    scores, dists = [], []
    for i in range(0, len(val_images), batch_size):
        x = val_images[i:i + batch_size]
        t = model.teacher(x)
        scores.append(model.head(t, model.student(x, t))[1])   # raw: the stats are not set yet
        dists.append(knn.distance(t))
    stats = knn.set_stats(torch.cat(scores).cpu(), torch.cat(dists).cpu())
    model.train(was_training)
    return {"bank_images": knn.bank_size, "val_images": len(val_images), **stats}


def greedy_coreset(x: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    """Indices of ``m`` rows of ``x`` chosen by greedy k-center (each pick the row farthest from those
    picked), starting from a seeded row: the coreset covers the training patches' spread, rare ones
    included, where a random subset of the same size leaves holes (PatchCore)."""
    n = len(x)
    if n <= m:
        return torch.arange(n)
    first = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    picked = torch.empty(m, dtype=torch.long)
    picked[0] = first
    nearest = ((x - x[first]) ** 2).sum(1)
    for j in progress(range(1, m), desc="patch kNN coreset"):
        i = int(nearest.argmax())
        picked[j] = i
        nearest = torch.minimum(nearest, ((x - x[i]) ** 2).sum(1))
    return picked.sort().values


@torch.no_grad()
def fit_patch_knn(model: KDModel, images: torch.Tensor, val_images: torch.Tensor, bank: int, seed: int,
                  batch_size: int = 32) -> dict:
    """Fill the head's patch kNN (``model.patch_knn``): a greedy coreset of the training images' patch
    descriptors, then the scale from the validation normals' combined maps (never in the bank). Runs
    before ``fit_image_knn``, whose standardisation sees the map with the patch term in."""
    knn = model.head.patch_knn
    _need_validation(val_images, "patch_knn")
    was_training = model.training
    model.eval()
    patches = torch.cat([knn.patches(knn.describe(model.teacher(images[i:i + batch_size]))).cpu()
                         for i in progress(range(0, len(images), batch_size), desc="patch kNN bank")])
    knn.set_bank(patches[greedy_coreset(patches, bank, seed)])
    knn.to(images.device)
    maps, dists = [], []
    for i in range(0, len(val_images), batch_size):
        x = val_images[i:i + batch_size]
        t = model.teacher(x)
        amap = model.head.combined(t, model.student(x, t))
        maps.append(amap.cpu())
        dists.append(knn.resized(t, amap.shape[-2:]).cpu())
    stats = knn.set_stats(torch.cat(maps), torch.cat(dists))
    knn.to(images.device)
    model.train(was_training)
    return {"bank_patches": knn.bank_size, "training_patches": len(patches), "val_images": len(val_images), **stats}
