"""Image preprocessing that reproduces the training loader (uadc.data.mvtec.load_image and the
dataset's normalisation) with numpy and Pillow only: ``convert("RGB")`` (grayscale replicated),
bilinear resize to the square input size when the size differs, ``/ 255``, ``(x - mean) / std``
in float32, HWC -> CHW."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from uadc.core.constants import MASKS_FOLDER, PREDICTIONS_JSONL
from uadc.core.errors import UadcError
from uadc.core.manifest import Preprocessing

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")   # as uadc.data.mvtec
_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def _from_pil(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    im = im.convert(pre.color)
    size = pre.image_size
    if im.size != (size, size):
        im = im.resize((size, size), _FILTERS[pre.resize])
    return np.asarray(im, dtype=np.float32) / 255.0


def load_rgb(source: Any, pre: Preprocessing) -> np.ndarray:
    """float32 HWC in [0, 1] at the model's size from a path, PIL image or uint8 array."""
    if isinstance(source, (str, Path)):
        try:
            with Image.open(source) as im:
                return _from_pil(im, pre)
        except (UnidentifiedImageError, OSError) as exc:
            raise UadcError(f"unreadable image {source}: {exc}") from None
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


@dataclass
class FoundImages:
    files: list[Path]
    skipped: dict[str, int] = field(default_factory=dict)   # why -> how many image files a folder walk left out


def _skip_reason(f: Path, root: Path, blocked: dict[Path, str]) -> str | None:
    """Why a folder walk below ``root`` leaves ``f`` out: it lies in a ``blocked`` folder, or among
    MVTec masks (``ground_truth/``)."""
    for d, why in blocked.items():
        if d == f.parent or d in f.parents:
            return why
    return f"masks under {MASKS_FOLDER}/" if MASKS_FOLDER in f.relative_to(root).parts[:-1] else None


def find_images(paths: list[Path], exclude: list[Path] | tuple = ()) -> FoundImages:
    """Files given directly, and image files found recursively in folders (sorted), except, in a
    folder walk, files in folders below it that are ``exclude`` (the run's own output) or ``uadc
    predict`` outputs, and under MVTec ``ground_truth/`` (masks, not parts); ``skipped`` counts them."""
    found = FoundImages([])
    for p in map(Path, paths):
        if p.is_dir():
            root = p.absolute()
            blocked = {Path(x).absolute(): "in the output folder" for x in exclude}
            blocked.update({j.parent: "in a uadc predict output folder" for j in root.rglob(PREDICTIONS_JSONL)})
            blocked = {d: why for d, why in blocked.items() if root in d.parents}   # the folder given is walked
            for f in sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS):
                why = _skip_reason(f, root, blocked)
                if why is None:
                    found.files.append(p / f.relative_to(root))
                else:
                    found.skipped[why] = found.skipped.get(why, 0) + 1
        elif p.exists():
            found.files.append(p)
        else:
            raise UadcError(f"input not found: {p}")
    return found


def list_images(paths: list[Path]) -> list[Path]:
    """Files given directly, and image files found recursively in folders (sorted; ``find_images``)."""
    return find_images(paths).files
