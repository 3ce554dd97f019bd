"""Tiny MVTec-layout datasets made on the fly: striped textures, with planted bright blobs as
defects and their masks. Deterministic for a given seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _texture(rng: np.random.Generator, size: int, period: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (x + 0.3 * y) / period + phase)
    img += rng.normal(0, 0.03, (size, size))
    return np.clip(img, 0, 1)


def _plant(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    r = int(rng.integers(size // 10, size // 6))
    cy, cx = rng.integers(r + 2, size - r - 2, 2)
    y, x = np.mgrid[0:size, 0:size]
    mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    out = img.copy()
    out[mask] = 0.95 - 0.1 * rng.random(mask.sum())  # bright, texture-free blob
    return out, mask


def _save(arr: np.ndarray, path: Path, rgb: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    a = (arr * 255).astype(np.uint8)
    Image.fromarray(np.stack([a, a * 0.9, a * 0.8], -1).astype(np.uint8) if rgb else a).save(path)


def make_category(root: Path, name: str, size: int = 64, n_train: int = 16, n_good: int = 4,
                  n_defect: int = 6, seed: int = 0, rgb: bool = True, period: float = 9.0) -> Path:
    rng = np.random.default_rng(seed)
    cat = root / name
    for i in range(n_train):
        _save(_texture(rng, size, period), cat / "train" / "good" / f"{i:03d}.png", rgb)
    for i in range(n_good):
        _save(_texture(rng, size, period), cat / "test" / "good" / f"{i:03d}.png", rgb)
    for i in range(n_defect):
        img, mask = _plant(rng, _texture(rng, size, period))
        _save(img, cat / "test" / "blob" / f"{i:03d}.png", rgb)
        m = Image.fromarray((mask * 255).astype(np.uint8))
        (cat / "ground_truth" / "blob").mkdir(parents=True, exist_ok=True)
        m.save(cat / "ground_truth" / "blob" / f"{i:03d}_mask.png")
    return cat


def make_tiny_recipe(root: Path, name: str = "tiny", epochs: int = 1) -> Path:
    """Two tiny categories (32 px) and a fast STFPM recipe for them under ``root``; returns its path."""
    import yaml

    data = root / "data"
    make_category(data, "stripes", size=32, n_train=8, n_good=3, n_defect=3, seed=1, rgb=True)
    make_category(data, "gray", size=32, n_train=8, n_good=3, n_defect=3, seed=2, rgb=False, period=13.0)
    cfg = {"data": {"sources": [{"root": str(data), "categories": ["stripes", "gray"]}], "image_size": 32},
           "model": {"method": "stfpm", "backbone": "efficientnet_lite0", "taps": ["blocks.1", "blocks.3"],
                     "smoothing_sigma": 1.0},
           "train": {"epochs": epochs, "batch_size": 8, "lr": 0.003, "threads": 1},
           "eval": {"batch_size": 8}, "compile": {"calib_samples": 4}}
    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    return recipe
