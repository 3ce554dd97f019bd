"""Image preprocessing that reproduces the training loader (uadc.data.mvtec.load_image and the
dataset's normalisation) with numpy and Pillow only: ``convert("RGB")`` (grayscale replicated),
bilinear resize to the square input size when the size differs, ``/ 255``, ``(x - mean) / std``
in float32, HWC -> CHW."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uadc.core.errors import UadcError
from uadc.core.images import eight_bit, find_images, open_image
from uadc.core.manifest import Preprocessing

_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def _from_pil(im: Image.Image, pre: Preprocessing, source: Any = "image") -> np.ndarray:
    im = eight_bit(im, source).convert(pre.color)
    size = pre.image_size
    if im.size != (size, size):
        im = im.resize((size, size), _FILTERS[pre.resize])
    return np.asarray(im, dtype=np.float32) / 255.0


def load_rgb(source: Any, pre: Preprocessing) -> np.ndarray:
    """float32 HWC in [0, 1] at the model's size from a path, PIL image or uint8 array."""
    if isinstance(source, (str, Path)):
        with open_image(source) as im:
            return _from_pil(im, pre, source)
    if isinstance(source, Image.Image):
        return _from_pil(source, pre)
    arr = np.asarray(source)
    if arr.dtype == np.uint8 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        return _from_pil(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr), pre)
    if arr.dtype.kind == "f" and arr.shape == (pre.image_size, pre.image_size, 3):
        return arr.astype(np.float32)          # already RGB in [0, 1] at the model's size
    raise UadcError(f"image array: expected uint8 HxW / HxWx3 / HxWx4, or float HxWx3 in [0, 1] at "
                    f"{pre.image_size}x{pre.image_size}; got {arr.dtype} {arr.shape}")


def preprocess(source: Any, pre: Preprocessing) -> np.ndarray:
    """One image -> the model's (3, H, W) float32 input, exactly as the training loader makes it."""
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    img = (load_rgb(source, pre) - mean) / std
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def list_images(paths: list[Path]) -> list[Path]:
    """Files given directly, and image files found recursively in folders (sorted; ``find_images``)."""
    return find_images(paths).files
