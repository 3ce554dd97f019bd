"""MVTec-layout datasets: one unified training set over several roots/categories, and
per-category test sets with ground-truth masks.

Layout per category: ``<root>/<cat>/train/good/*``, ``<root>/<cat>/test/<defect>/*`` and
``<root>/<cat>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``, as BTAD names them).
Every problem a user can cause (missing folder, empty category, unreadable image, defect without
mask, mask size mismatch) is a ``UadcError`` naming the file.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from uadc.core.constants import MASKS_FOLDER
from uadc.core.errors import UadcError
from uadc.core.folders import DESKTOP_LITTER
from uadc.core.images import (IMAGE_EXTS, OTHER_IMAGE_EXTS, READ_FORMATS, check_utf8_name, eight_bit, is_hidden,
                              not_a_file, open_image, shown)
from uadc.core.io import file_key
from uadc.core.scoped import warnings_ignored

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    path: Path
    category: str
    defect: str  # "good" or the defect type
    mask_path: Path | None = None

    @property
    def label(self) -> int:
        return 0 if self.defect == "good" else 1


def _images(folder: Path) -> list[Path]:
    """The images directly in ``folder`` (the MVTec layout); images in its subfolders (one per camera,
    a copy nested one level too deep) are not read, and a warning counts them."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not is_hidden(p.name)
                   and not p.is_dir())   # a folder named ``x.png`` is a subfolder, counted below
    for p in files:   # a link loop made every later path lookup a traceback; a dangling link "had no mask"
        if why := not_a_file(p):
            raise UadcError(f"unreadable image {p}: {why}")
    other = sorted({p.suffix.lower() for p in folder.iterdir() if p.suffix.lower() in OTHER_IMAGE_EXTS})
    if other:   # .webp / .gif images were left out of training and test without a word
        log.warning("%s: its %s images are not read (uadc reads %s)", folder, " / ".join(other), " ".join(IMAGE_EXTS))
    nested = sum(1 for p in folder.rglob("*") if p.parent != folder and p.suffix.lower() in IMAGE_EXTS
                 and not any(is_hidden(x) for x in p.relative_to(folder).parts))
    if nested:
        log.warning("%s: %d image%s in its subfolders %s not read (the MVTec layout keeps them directly in "
                    "the folder)", folder, nested, "s" * (nested != 1), "are" if nested != 1 else "is")
    return files


def _category_dir(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise UadcError(f"data folder not found: {root}")
    cat = root / category
    if not cat.is_dir():
        found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
        raise UadcError(f"category {category!r} not found in {root} (found: {', '.join(found) or 'none'})")
    return cat


def list_train_samples(root: Path, category: str) -> list[Sample]:
    good = _category_dir(root, category) / "train" / "good"
    _warn_loose(good.parent, "training images go in train/good/")
    return _good_samples(good, category, f"missing folder {good}",
                         f"category {category!r} has no training images in {good}")


def _good_samples(folder: Path, category: str, missing: str, empty: str) -> list[Sample]:
    if not folder.is_dir():
        raise UadcError(missing)
    files = _images(folder)
    if not files:
        raise UadcError(empty)
    return [Sample(p, category, "good") for p in files]


def _mask_files(folder: Path) -> dict[str, Path]:
    """Mask files of one defect folder by exact name and by lower-cased name (``000_MASK.PNG`` is
    ``000_mask.png``, unless a name differs only in case: ``A_mask.png`` is A's, ``a_mask.png`` a's)."""
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    return {p.name.lower(): p for p in files} | {p.name: p for p in files}


def _mask_names(img: Path) -> list[str]:
    """Names a defect image's mask goes by, in order: MVTec AD's ``<stem>_mask.png``, then the
    ``<stem>.png`` of datasets laid out like it (BTAD, VisA's MVTec-style split), then either with
    the image's own extension (``<stem>_mask.bmp``)."""
    names = [f"{img.stem}_mask.png", f"{img.stem}.png", f"{img.stem}_mask{img.suffix}", f"{img.stem}{img.suffix}"]
    return list(dict.fromkeys(names + [n.lower() for n in names]))   # exact spelling first


_MASK_LOOKALIKES = ("groundtruth", "ground-truth", "gt", "masks", "mask")


def _child_dir(parent: Path | None, name: str) -> Path | None:
    """``parent/name``, or the one folder there whose name differs in letter case only (``Ground_Truth``: pixel
    metrics were off without a word); None where there is neither."""
    if parent is None:
        return None
    if (parent / name).is_dir():
        return parent / name
    return next((p for p in sorted(parent.iterdir()) if p.is_dir() and p.name.lower() == name.lower()), None)


def _warn_loose(folder: Path, where: str) -> None:
    """Images directly in ``train/`` or ``test/`` are not read: left out without a word, they were."""
    loose = sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                and not is_hidden(p.name)) if folder.is_dir() else 0
    if loose:
        log.warning("%s: %d image%s directly in it %s not read (%s)", folder, loose, "s" * (loose != 1),
                    "are" if loose != 1 else "is", where)


def list_test_samples(root: Path, category: str) -> list[Sample]:
    cat = _category_dir(root, category)
    test = _test_dir(cat)
    if not test.is_dir():
        raise UadcError(f"missing folder {test}")
    samples = []
    _warn_loose(test, "test images go in test/good/ or test/<defect type>/")   # no defect type to label them
    gt = _child_dir(cat, MASKS_FOLDER)   # without ground_truth/: image-level labels, no pixel metrics
    masked = gt is not None
    if not masked and (near := [p.name for p in cat.iterdir() if p.is_dir() and p.name.lower() in _MASK_LOOKALIKES]):
        log.warning("%s: no %s/ folder, so no pixel metrics; its masks are not read from %s/", cat, MASKS_FOLDER,
                    near[0])
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir() and not is_hidden(p.name)):
        check_utf8_name(defect_dir, "defect type")
        defect = "good" if defect_dir.name.lower() == "good" else defect_dir.name   # test/Good was a defect type
        masks = _mask_files(_child_dir(gt, defect) or gt / defect) if defect != "good" and masked else {}
        for img in _images(defect_dir):
            mask = None
            if defect != "good" and masked:
                mask = next((masks[n] for n in _mask_names(img) if n in masks), None)
                if mask is None:
                    raise UadcError(f"defect image without mask: {img} (expected "
                                    f"{gt / defect / (img.stem + '_mask.png')}; with no "
                                    f"{MASKS_FOLDER}/ folder at all the category is judged on image labels only)")
            samples.append(Sample(img, category, defect, mask))
    if not samples:
        raise UadcError(f"category {category!r} has no test images in {test}")
    return samples


def load_image(path: Path, size: int) -> np.ndarray:
    """RGB float32 HWC in [0, 1]; grayscale sources are replicated to three channels."""
    with open_image(path) as im:
        im = eight_bit(im, path).convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32) / 255.0


def _turned(path: Path) -> str:
    """Why an image's size reads transposed: uadc turns it upright by its EXIF orientation, as viewers do."""
    try:
        with warnings_ignored(Image.DecompressionBombWarning), Image.open(path, formats=READ_FORMATS) as raw:
            turned = raw.getexif().get(0x0112, 1) in (5, 6, 7, 8)   # the orientations that swap width and height
    except Exception:  # noqa: BLE001 - it opened a moment ago: no reason to add
        return ""
    return " (after its EXIF orientation, which turns it upright)" if turned else ""


def _mask_pixels(sample: Sample) -> np.ndarray:
    """A defect image's mask as booleans at the mask's own size. Label or instance masks (values all
    below 128: 0/1, 0/2, 1..N per defect, in 8 or 16 bits) mark their defect with any non-zero value;
    others are cut at half their peak, plus every darker level that fills an area (a defect class:
    0/100/255, palette colours), not anti-aliased edges. A JPEG-saved mask is always cut at half its
    peak: its ringing near 0 is noise, not defect."""
    with open_image(sample.mask_path, "mask") as m:
        with open_image(sample.path) as im:
            if m.size != im.size:
                raise UadcError(f"mask size {m.size} differs from image size {im.size}{_turned(sample.path)}: "
                                f"{sample.mask_path}")
        lossy = m.format == "JPEG" or sample.mask_path.suffix.lower() in (".jpg", ".jpeg")
        deep = m.mode.startswith("I;16") or m.mode == "I"   # raw values: 8 bits would round 0/1 to 0/0
        a = np.asarray(m, dtype=np.float64) if deep else _mask_levels(eight_bit(m, sample.mask_path))
    peak = float(a.max(initial=0))
    if not lossy and peak < 128:   # a label mask
        return a > 0
    marked = a > peak / 2
    return marked if lossy else marked | _class_levels(a, peak / 2)


def _class_levels(a: np.ndarray, cut: float) -> np.ndarray:
    """Pixels at a level below ``cut`` that is a defect class of its own (0/100/255, palette colours: the cut
    dropped the darker class): one that fills an area, some pixel with its 4 neighbours at the same level.
    Anti-aliased or resized edges (a 0/255 mask BOX-resized: levels 16 and 64) are one pixel wide: cut."""
    inner = np.zeros(a.shape, bool)
    c = a[1:-1, 1:-1]
    inner[1:-1, 1:-1] = (c > 0) & (c <= cut) & (c == a[:-2, 1:-1]) & (c == a[2:, 1:-1]) & (c == a[1:-1, :-2]) & \
        (c == a[1:-1, 2:])
    return np.isin(a, np.unique(a[inner])) if inner.any() else inner


def _mask_levels(m: Image.Image) -> np.ndarray:
    """A mask's level per pixel. A colour mask (one colour per defect class, as annotation tools export
    them) counts its brightest channel, over black where it is transparent: luminance made a red defect
    76 of 255, below the cut a white one set, and dropped it."""
    if m.mode in ("1", "L"):
        return np.asarray(m.convert("L"))
    rgba = np.asarray(m.convert("RGBA"), dtype=np.float64)
    return rgba[..., :3].max(axis=2) * (rgba[..., 3] / 255.0)


def load_mask(sample: Sample, size: int) -> np.ndarray:
    """Binary HxW float32 mask; zeros for good images."""
    if sample.mask_path is None:
        return np.zeros((size, size), np.float32)
    a = _mask_pixels(sample)
    if a.shape != (size, size):
        a = np.asarray(Image.fromarray(a).resize((size, size), Image.NEAREST))
    return a.astype(np.float32)


class ImageDataset(Dataset):
    """Images normalised with (mean, std); items are dicts of image, mask, label, category."""

    def __init__(self, samples: Sequence[Sample], image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.samples = list(samples)
        self.size = image_size
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        img = (load_image(s.path, self.size) - self.mean) / self.std
        return {
            "image": torch.from_numpy(img.transpose(2, 0, 1).copy()),
            "mask": torch.from_numpy(load_mask(s, self.size))[None],
            "label": s.label,
            "category": s.category,
        }


def build_train_set(pairs: Sequence[tuple[Path, str]], image_size: int, norm: tuple, limit: int | None = None,
                    exclude: frozenset[Path] = frozenset(),
                    listed: dict[str, list[Sample]] | None = None) -> ImageDataset:
    """Unified training set: the good images of every (root, category) together (``listed`` where
    the caller has listed them already), minus ``exclude`` (the held-out validation normals)."""
    samples = []
    held_out = {file_key(p) for p in exclude}      # one file however its path is spelt, or hard-linked
    for root, cat in pairs:
        found = listed[cat] if listed is not None else list_train_samples(root, cat)
        kept = [s for s in found if file_key(s.path) not in held_out][:limit]
        if not kept:
            raise UadcError(f"category {cat!r} has no training images left: all {len(found)} of its train/good images "
                            f"are listed as validation normals (data.val); give data.val a folder of other images")
        samples += kept
    return ImageDataset(samples, image_size, *norm)


def split_validation(samples: Sequence[Sample], fraction: float, seed: int) -> list[Sample]:
    """The validation share of one category's train/good images: a seeded draw that depends only
    on (seed, category, file list), so it is the same in every process and for every target."""
    if fraction <= 0 or len(samples) < 2:
        return []
    n = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    cat = samples[0].category
    rng = np.random.default_rng([seed, zlib.crc32(cat.encode())])
    picked = sorted(rng.choice(len(samples), n, replace=False))
    return [samples[i] for i in picked]


def list_folder_samples(folder: Path, category: str) -> list[Sample]:
    """Defect-free images of ``category`` from a plain folder (recipe ``data.val``). Masks are no
    normals: a folder under ``ground_truth/``, or holding ``*_mask`` files, set a threshold 13x too high."""
    if MASKS_FOLDER in (p.lower() for p in Path(folder).resolve().parts):
        raise UadcError(f"validation folder {folder} is in a {MASKS_FOLDER}/ folder of masks; give a folder of "
                        f"defect-free images")
    samples = _good_samples(folder, category, f"data.val: validation folder not found: {folder}",
                            f"data.val: validation folder {folder} holds no images")
    masks = [s.path.name for s in samples if s.path.stem.lower().endswith("_mask")]
    if masks:
        raise UadcError(f"validation folder {folder} holds masks ({masks[0]}{' and others' if len(masks) > 1 else ''}: "
                        f"named *_mask); give a folder of defect-free images only")
    return samples


def build_test_sets(pairs: Sequence[tuple[Path, str]], image_size: int, norm: tuple) -> dict[str, ImageDataset]:
    """The labelled test set of every category whose ``test`` folder holds images: a new product often
    has defect-free images only, and is trained and given thresholds without them (not evaluated)."""
    return {cat: ImageDataset(list_test_samples(root, cat), image_size, *norm) for root, cat in pairs
            if untested(root, cat) is None}


def untested(root: Path, category: str) -> str | None:
    """Why a category has no test set ("no test folder", or an empty one's "no test images"), else None.
    An empty ``test/`` (or one with ``test/good/`` made and nothing in it yet) stopped training."""
    test = _test_dir(_category_dir(root, category))
    if not test.is_dir():
        return "no test folder"
    if any(p.suffix.lower() in (*IMAGE_EXTS, *OTHER_IMAGE_EXTS) for p in _files_below(test, set())):
        return None
    # a test folder of .dng or .exr images said "no test images" alone: what it holds (a file manager's litter aside)
    kinds = sorted({shown(p.suffix.lower()) or "suffixless" for p in _files_below(test, set()) if p.name not in
                    DESKTOP_LITTER})
    return f"no test images: it holds {', '.join(kinds[:5])}{', ...' * (len(kinds) > 5)} files only" if kinds \
        else "no test images"


def _files_below(folder: Path, seen: set[str]) -> Iterator[Path]:
    """Every file below ``folder``, linked folders followed as the loader follows them: a test set, read,
    which names what it cannot read (a .webp, images a folder too deep); notes or Thumbs.db alone are none."""
    real = os.path.realpath(folder)
    if real in seen:   # a link loop
        return
    seen.add(real)
    try:
        found = [p for p in folder.iterdir() if not is_hidden(p.name)]
    except OSError as exc:
        raise UadcError(f"unreadable test folder {folder}: {exc.strerror}") from None
    for p in found:   # a broken link or a FIFO named like an image: the loader names it ("unreadable image")
        yield from _files_below(p, seen) if p.is_dir() else (p,)


def _test_dir(cat: Path) -> Path:
    """``test/``, or ``Test/`` (it was "no test folder": the category left out of the mean, unevaluated)."""
    return (_child_dir(cat, "test") if cat.is_dir() else None) or cat / "test"   # a file `test` beside `Test/`: Test/


def validate_test_masks(ds: ImageDataset) -> None:
    """Fail early (before training) on defect images whose mask is missing, mis-sized or empty.

    Empty means empty at the mask's own resolution: a tiny defect that vanishes when resized to
    the working size is legitimate (its image still counts for image AUROC)."""
    most: dict[tuple[str, str], list[int]] = {}
    seen: dict[str, bool] = {}   # category -> a mask marks a pixel at the working size
    shape: dict[str, tuple[int, int]] = {}   # category -> its most stretched image's size
    for s in ds.samples:
        load_image(s.path, ds.size)  # an unreadable test image fails here, not after training
        # its header (the ratio is the same turned upright), read as the loader reads it: no Pillow warning
        with warnings_ignored(Image.DecompressionBombWarning), Image.open(s.path, formats=READ_FORMATS) as im:
            w, h = im.size
        if max(w, h) * min(*shape.get(s.category, (1, 1))) > max(*shape.get(s.category, (1, 1))) * min(w, h):
            shape[s.category] = (w, h)
        if s.mask_path is None:
            continue
        marked = _mask_pixels(s)
        if not marked.any():
            raise UadcError(f"mask of defect image {s.path} marks no pixel: {s.mask_path}")
        counts = most.setdefault((s.category, s.defect), [0, 0])
        counts[0] += marked.mean() > 0.5
        counts[1] += 1
        small = marked if marked.shape == (ds.size, ds.size) else \
            np.asarray(Image.fromarray(marked).resize((ds.size, ds.size), Image.NEAREST))   # as load_mask does
        seen[s.category] = seen.get(s.category, False) or bool(small.any())
    for cat in (c for c, any_pixel in seen.items() if not any_pixel):   # its pixel figures vanished unsaid
        log.warning("category %r: no defect mask marks a pixel at data.image_size %d (each defect is smaller than a "
                    "pixel there): it gets image AUROC only; raise data.image_size for pixel metrics", cat, ds.size)
    for cat, (w, h) in shape.items():   # a 300x20 strip's 9-px defects became 1 px wide, its pixel AUROC 0.008, unsaid
        if max(w, h) > 2 * min(w, h):
            log.warning("category %r: its images are %dx%d, resized to %dx%d (stretched, the aspect ratio not kept): "
                        "a defect is squeezed %.1f times more along the long side than across; crop or tile them near square first",
                        cat, w, h, ds.size, ds.size, max(w, h) / min(w, h))
    for (cat, defect), (n, total) in most.items():
        if n:   # inverted masks gave pixel AUROC ~0.4 without a word (a colour cast marked whole is real)
            log.warning("%s/%s: %d of %d masks mark more than half their image; masks mark defects non-zero on "
                        "black: if yours are black on white, invert them", cat, defect, n, total)


def stack(ds: ImageDataset, indices: Sequence[int] | None = None) -> torch.Tensor:
    idx = range(len(ds)) if indices is None else indices
    return torch.stack([ds[i]["image"] for i in idx])
