"""The FP32 baseline of one trained model: everything every target of a compile shares.

A ``Baseline`` is built from a recipe's checkpoint, a checkpoint path or a ``KDModel``; each
stage (export, simplify, test arrays, FP32 metrics, torch-vs-ORT check) runs once, on first
use. FP32 latency is measured per (runs, threads) setting, so two compiles with different
latency settings each get their own figures.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import onnx
import torch

from uadc.backends.ort import latency_ms, make_session, ort_predictor
from uadc.config.recipe import Recipe
from uadc.config.settings import MAX_CALIB_SAMPLES
from uadc.config.targets import get_target
from uadc.core.constants import INPUT_NAME
from uadc.core.errors import UadcError
from uadc.core.scoped import default_threads, torch_threads
from uadc.data.prepare import RecipeData, prepare_data
from uadc.evaluation.run import EvalResult, evaluate, test_arrays
from uadc.export.onnx_export import export_model
from uadc.models import KDModel
from uadc.models.heads import ImageKNN
from uadc.passes.pipeline import PassContext, check_finite, run_passes
from uadc.quant.calibrate import calibration_images
from uadc.training.checkpoint import (as_recipe_model, check_held_out, checkpoint_path, judged_categories,
                                      load_checkpoint)
from uadc.verify.polygraphy_compare import TorchCpuRunner, compare, ort_runner

log = logging.getLogger(__name__)
EXPORT_ATOL = 1e-4  # torch vs ORT FP32: same math, only float reassociation may differ


@dataclass
class ModelSource:
    model: KDModel
    checkpoint: Path | None
    blob: dict


def resolve_source(source: Any, recipe: Recipe, artifacts: Path | None = None) -> ModelSource:
    """A recipe's own checkpoint, a checkpoint path, or a ``KDModel``; never trains."""
    if isinstance(source, KDModel):   # a new model: the caller's (mid-fine-tune, in train mode) is left as it was
        return ModelSource(as_recipe_model(on_cpu(source), recipe), None, {"categories": None})
    if isinstance(source, (str, os.PathLike)) and names_checkpoint(source, recipe):
        model, blob = load_checkpoint(Path(source), recipe)
        return ModelSource(model, Path(source), blob)
    ckpt = checkpoint_path(recipe, artifacts)
    if not ckpt.is_file():
        raise UadcError(f"no checkpoint for recipe {recipe.name!r} at {ckpt}: run `uadc train` first")
    model, blob = load_checkpoint(ckpt, recipe)
    return ModelSource(model, ckpt, blob)


def on_cpu(model: KDModel) -> KDModel:
    """uadc evaluates and exports on the CPU: a model left on a GPU failed deep inside torch."""
    where = {str(t.device) for t in (*model.parameters(), *model.buffers()) if t.device.type != "cpu"}
    if where:
        raise UadcError(f"the KDModel's weights are on {', '.join(sorted(where))}; uadc evaluates and compiles "
                        f"on the CPU: pass model.cpu()")
    kinds = {str(t.dtype).removeprefix("torch.") for t in (*model.parameters(), *model.buffers())
             if t.is_floating_point() and t.dtype != torch.float32}
    if kinds:   # a raw "Input type ... and weight type" error, or one that blamed ONNX Runtime
        raise UadcError(f"the KDModel's weights are {', '.join(sorted(kinds))}; uadc evaluates and compiles float32 "
                        f"models: pass model.float()")
    return model


def names_checkpoint(source: str | Path, recipe: Recipe) -> bool:
    """A path is a checkpoint unless it names the recipe itself (``--checkpoint x.bin``, or another
    recipe's YAML, must not silently fall back to the recipe's own checkpoint)."""
    p = Path(source)
    if p.suffix in (".pt", ".pth"):
        return True
    if str(source) == recipe.name:
        return False
    if recipe.path is None:
        return p.suffix not in (".yaml", ".yml")
    from uadc.config.packaged import resolve_recipe_path
    try:  # the recipe's own file, or a built-in recipe's name
        return resolve_recipe_path(source).resolve() != Path(recipe.path).resolve()
    except UadcError:
        return True


class Baseline:
    """One trained model with its FP32 export and the stages all targets share."""

    def __repr__(self) -> str:
        return f"Baseline(recipe={self.recipe.name}, checkpoint={self.checkpoint}, {self.size} px)"

    def __init__(self, recipe: Recipe, source: ModelSource, threads: int | None = None,
                 artifacts: Path | None = None):
        self.recipe = recipe
        self.artifacts = artifacts   # the root it was read from: its compiles' default (./artifacts was)
        self.model = source.model
        self.checkpoint = source.checkpoint
        self.blob = source.blob
        # of the bytes the model was read from: the file may be trained again while the Baseline lives
        self.checkpoint_sha256: str | None = getattr(source.blob, "sha256", None) or None
        self.size = recipe.data.image_size
        # torch's own default honours OMP_NUM_THREADS, as before
        self.threads = threads or recipe.train.threads or torch.get_num_threads() or default_threads()
        self._latency: dict[tuple[int, int], dict] = {}
        self._bank_images: np.ndarray | None = None

    def with_recipe(self, recipe: Recipe) -> "Baseline":
        """This model and data (exports and figures shared) under ``recipe``'s name, compile and deploy
        settings; the caller checks that its data and model settings are this one's."""
        other = copy.copy(self)
        other.recipe = recipe
        return other

    # -- data --------------------------------------------------------------------------------
    @cached_property
    def data(self) -> RecipeData:
        data = prepare_data(self.recipe)
        judged_categories(self.blob, data.categories, self.checkpoint, subset=False)
        check_held_out(self.blob, self.recipe, data, self.checkpoint)
        return data

    @cached_property
    def test_arrays(self) -> dict[str, tuple]:
        return test_arrays(self.data)

    @cached_property
    def categories(self) -> list[str]:
        return self.blob.get("categories") or self.data.categories

    def sample_feeds(self, batches: int = 2, batch: int = 2) -> list[dict[str, np.ndarray]]:
        """Real test images (defective ones included) for numeric checks; training images where no
        category has a test folder."""
        sets = [a[0] for a in self.test_arrays.values()] or \
            [self.train_images(list(range(min(len(self.data.train), batches * batch))))]
        images = np.concatenate([a[::max(1, len(a) // (batches * batch))] for a in sets])
        return [{INPUT_NAME: images[i * batch:(i + 1) * batch]} for i in range(batches)]

    def train_images(self, indices: list[int]) -> np.ndarray:
        ds = self.data.train
        return np.stack([ds[i]["image"].numpy() for i in indices])

    def bank_images(self) -> np.ndarray:
        """The training images of the model's image kNN bank, in bank order (``passes.knn``)."""
        if self._bank_images is None:
            cats = set(self.categories)
            idx = [i for i, smp in enumerate(self.data.train.samples) if smp.category in cats]
            knn = self.recipe.cfg["model"]["image_knn"]
            keep = ImageKNN.bank_indices(len(idx), knn["max_bank"], self.recipe.seed).tolist()
            self._bank_images = self.train_images([idx[i] for i in keep])
        return self._bank_images

    def calibration_images(self, kind: str, n: int, images: Iterable[np.ndarray] | None = None) -> np.ndarray:
        """``n`` images of a named kind, or the caller's own images (bring your own data)."""
        if images is not None:
            return own_calibration_images(images, self.size, self.recipe.normalization())
        return calibration_images(kind, n, self.recipe.seed, self.train_images, len(self.data.train), self.size)

    # -- FP32 model ------------------------------------------------------------------------------
    @cached_property
    def exported(self) -> tuple[onnx.ModelProto, float]:
        t0 = time.time()
        r = self.recipe
        mean, std = r.normalization()
        meta = {"method": r.model.method, "backbone": r.model.backbone, "image_size": self.size,
                "normalization": {"mean": list(mean), "std": list(std)}, "categories": self.categories,
                "recipe_hash": r.hash, "recipe_name": r.name}
        model = export_model(self.model, self.size, meta)
        return model, time.time() - t0

    @cached_property
    def fp32_simplified(self) -> tuple[onnx.ModelProto, list[dict]]:
        model, seconds = self.exported
        feeds = self.sample_feeds(1)[0]
        check_finite(model, feeds, "export")
        ctx = PassContext(target=get_target("ort-cpu-fp32"), sample_feeds=feeds)
        simplified, records = run_passes(model, ["shape_inference", "simplify", "partition_check"], ctx)
        return simplified, [{"name": "export", "seconds": round(seconds, 3),
                             "nodes_before": 0, "nodes_after": len(model.graph.node)}] + records

    @property
    def fp32(self) -> onnx.ModelProto:
        return self.fp32_simplified[0]

    def metrics(self, model: onnx.ModelProto, desc: str) -> EvalResult:
        sess = make_session(model, self.threads)
        return evaluate(ort_predictor(sess), self.test_arrays, self.recipe.eval.batch_size, desc)

    @cached_property
    def fp32_metrics(self) -> EvalResult:
        return self.metrics(self.fp32, "fp32")

    def fp32_latency(self, runs: int = 30, threads: int | None = None) -> dict:
        """torch eager and ORT FP32 latency at batch 1, measured once per (runs, threads)."""
        threads = threads or self.threads
        key = (runs, threads)
        if key not in self._latency:
            x = self.sample_feeds(1, 1)[0][INPUT_NAME]
            with torch_threads(threads), torch.no_grad():
                t_lat = latency_ms(lambda: self.model(torch.from_numpy(x)), runs)
            sess = make_session(self.fp32, threads)
            o_lat = latency_ms(lambda: sess.run(None, {INPUT_NAME: x}), runs)
            self._latency[key] = {"torch_fp32": t_lat, "ort_fp32": o_lat}
        return dict(self._latency[key])

    @cached_property
    def torch_vs_ort(self) -> dict:
        feeds = self.sample_feeds()
        shape = feeds[0][INPUT_NAME].shape
        with torch_threads(self.threads):
            return compare([TorchCpuRunner(self.model, shape), ort_runner(self.fp32, "ort-fp32", self.threads)],
                           feeds, EXPORT_ATOL, 1e-3)


def own_calibration_images(images: Iterable[np.ndarray], size: int,
                           norm: tuple[Sequence[float], Sequence[float]] | None = None) -> np.ndarray:
    """Stack user-given calibration images: each (3,H,W) or (N,3,H,W), already normalised (one array alone is
    one image or one batch). Integer pixels, or values ten times beyond the range ``norm`` (mean, std) maps
    [0, 1] to, are refused:
    ranges calibrated on 0..255 images would quantize every real input to a few levels."""
    parts, n = [], 0
    if isinstance(images, np.ndarray) and images.ndim in (3, 4):   # one (3,H,W) image was 3 images of (H,W)
        images = [images]
    for i, im in enumerate(images):
        raw = np.asarray(im)
        if raw.dtype.kind not in "iubf":   # a path, a name, a dict: numpy's "could not convert string to float"
            raise UadcError(f"calibration image {i}: expected an image array, got {type(im).__name__} {im!r:.60} "
                            f"(image files are not read here; give normalised arrays, or train / random-normal / mixed)")
        if raw.dtype.kind in "iub":
            raise UadcError(f"calibration image {i}: {raw.dtype} pixels; give float images normalised like the "
                            f"model input ((x / 255 - mean) / std)")
        a = raw.astype(np.float32)
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[1:] != (3, size, size):
            raise UadcError(f"calibration image {i}: expected shape (3, {size}, {size}) or (N, 3, {size}, {size}) "
                            f"in the model's normalised input space, got {a.shape}")
        parts.append(a)
        n += len(a)
        if n > MAX_CALIB_SAMPLES:   # an endless generator was read until the memory ran out
            raise UadcError(f"calibration: more than {MAX_CALIB_SAMPLES} images given (calib_samples' limit)")
    if not parts:
        raise UadcError("calibration: no images given")
    out = np.ascontiguousarray(np.concatenate(parts))
    if not np.isfinite(out).all():
        raise UadcError("calibration images contain NaN or Inf")
    if out.min() == out.max():   # the input's range was zero-wide: ORT quantized it at scale 1 (a few levels)
        raise UadcError(f"calibration images are all one value ({float(out.min()):g}): the input's range would be "
                        f"zero-wide; give real images, or train / random-normal / mixed")
    if norm is not None:
        mean, std = (np.asarray(v, np.float64) for v in norm)
        span = float(np.max(np.abs(np.r_[(0 - mean) / std, (1 - mean) / std])))
        if np.abs(out).max() > 10 * span:
            raise UadcError(f"calibration images reach {np.abs(out).max():g}, far outside the model's normalised "
                            f"input range (|x| <= {span:.3g}); give them as (x / 255 - mean) / std")
    return out
