"""Images a user gives ``uadc verify`` / ``uadc diff`` (``--images``), read as the model reads them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from uadc.core.constants import MASKS_FOLDER
from uadc.core.errors import UadcError
from uadc.core.images import IMAGE_EXTS, find_images
from uadc.core.io import file_key
from uadc.core.manifest import MAX_IMAGE_SIZE, infer_category, named_in
from uadc.data.mvtec import load_image
from uadc.export.onnx_export import get_metadata


def _folder_name(d: Path) -> str:
    """The folder's own name (``.`` and ``..`` named as the folders they are, not ``''`` and ``..``)."""
    return Path(os.path.abspath(d)).name or str(d)


def metadata_image_size(meta: dict, model: Path) -> int:
    """The input size a model's uadc metadata names (KeyError without it); one bounded by the manifest's
    limit: an edited 200000 made GBs of images (`diff --images` took 23 GB), 0 blamed each image, Infinity
    was an OverflowError and `true` read as 1."""
    size = meta["image_size"]
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise UadcError(f"{model}: its metadata's image_size {str(size)[:40]} is not a whole number")
    try:
        whole = int(size)
    except (ValueError, OverflowError):
        raise UadcError(f"{model}: its metadata's image_size {str(size)[:40]} is not a whole number") from None
    if not 1 <= whole <= MAX_IMAGE_SIZE or whole != float(size):
        raise UadcError(f"{model}: its metadata's image_size {str(size)[:40]} is not 1 to {MAX_IMAGE_SIZE}")
    return whole


def load_image_dirs(dirs: Sequence[Path], model_path: Path, limit: int = 512,
                    categories: Sequence[str] = ()) -> tuple[np.ndarray, list[dict], list[str]]:
    """Images under ``dirs`` (recursively, sorted, at most ``limit`` a folder), preprocessed as the
    model's metadata says; category = the nearest folder named after one of ``categories`` (as
    ``uadc predict``), else the folder given. Taken as normal images (no labels). Also returns a
    note for each folder cut to ``limit``."""
    meta = get_metadata(onnx.load(str(model_path), load_external_data=False))
    try:
        size = metadata_image_size(meta, model_path)
        mean = np.asarray(meta["normalization"]["mean"], np.float32)
        std = np.asarray(meta["normalization"]["std"], np.float32)
    except (KeyError, TypeError, ValueError):
        raise UadcError(f"{model_path}: no uadc preprocessing metadata (image_size, normalization)") from None
    images, records, notes = [], [], []
    seen: set[Path] = set()
    judged: set[tuple] = set()   # `--images data/gray --images data/gray/test` judged the test images twice
    for d in map(Path, dirs):
        if d.resolve() in seen:   # one folder given twice was judged twice
            continue
        seen.add(d.resolve())
        if not d.is_dir():
            raise UadcError(f"images (--images): not a folder: {d}")
        if MASKS_FOLDER in (p.lower() for p in d.resolve().parts):   # its masks were judged as normal images, PASS
            raise UadcError(f"images (--images): {d} is in a {MASKS_FOLDER}/ folder of masks; give a folder of images")
        files = find_images([d]).files   # as `uadc predict` walks: no MVTec masks, no predict outputs
        if not files:
            raise UadcError(f"images (--images): no images ({', '.join(sorted(IMAGE_EXTS))}) under {d}")
        again = [p for p in files if file_key(p) in judged]   # a hard link too
        if again:
            notes.append(f"--images {d}: {len(again)} of its images are under another --images folder too: "
                         f"judged once")
            files = [p for p in files if file_key(p) not in judged]
        judged.update(file_key(p) for p in files[:limit])
        if len(files) > limit:
            notes.append(f"--images {d}: judged the first {limit} of its {len(files)} images (sorted by path)")
        above = 0
        for p in files[:limit]:
            images.append(((load_image(p, size) - mean) / std).transpose(2, 0, 1))
            cat = infer_category(p, categories)
            above += cat is not None and not named_in(p, cat)
            records.append({"kind": "user", "category": cat or _folder_name(d), "label": None, "source": str(p)})
        if above:   # as predict says it: the folder it runs in named the product, not the path given
            notes.append(f"--images {d}: {above} images take their category from a folder above the path given (the "
                         f"folder uadc runs in or a `..`), not from the path itself")
    return np.ascontiguousarray(np.stack(images), dtype=np.float32), records, notes
