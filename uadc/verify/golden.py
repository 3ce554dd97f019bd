"""Golden outputs: the FP32 reference outputs on a fixed, recorded set of images, stored in
Polygraphy's own formats so the Polygraphy CLI reads them unchanged::

    polygraphy run ARTIFACT/model.onnx --onnxrt \\
        --load-inputs ARTIFACT/golden_inputs.json --load-outputs ARTIFACT/golden_outputs.json

``golden_inputs.json``: a list of feed dicts (``polygraphy.json``), one per batch;
``golden_outputs.json``: a ``RunResults`` with one runner (the FP32 reference), one
``IterationResult`` per batch; ``golden.json``: what uadc needs besides the tensors — per image
its kind (``normal``: validation/train normals, ``random``: N(0,1) inputs, ``test``: labelled
test images), category and label, the masks of labelled defects (``golden_masks.npz``), the
operating thresholds and the reference model's hash.
"""

from __future__ import annotations

import base64
import io
import json
import math
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uadc.core.constants import (GOLDEN_INPUTS, GOLDEN_MASKS, GOLDEN_META, GOLDEN_OUTPUTS, GOLDEN_RUNNER,
                                 INPUT_NAME, MANIFEST_FILE, OUTPUT_NAMES)
from uadc.core.errors import UadcError
from uadc.core.manifest import read_manifest
from uadc.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from uadc.core.names import is_plain_name
from uadc.core.scoped import quiet_third_party

MAX_GOLDEN_BYTES = 2 << 30   # far above a 1024 px golden set (base64 float32 in JSON)

GOLDEN_SCHEMA = 1
IMAGE_KINDS = ("normal", "random", "test", "user")


@dataclass
class GoldenSet:
    """Reference inputs/outputs (batches of feed dicts / output dicts) and per-image records."""

    feeds: list[dict[str, np.ndarray]]
    outputs: list[dict[str, np.ndarray]]
    images: list[dict]                       # {"kind", "category", "label" (int|None), "source"}
    masks: np.ndarray | None = None          # (n_test, H, W) bool, rows follow the "test" images
    meta: dict = field(default_factory=dict)  # thresholds, reference model hash, runner name, ...
    path: Path | None = None

    @property
    def inputs(self) -> np.ndarray:
        return np.concatenate([f[INPUT_NAME] for f in self.feeds])

    def output(self, name: str) -> np.ndarray:
        return np.concatenate([o[name] for o in self.outputs])

    def kinds(self) -> np.ndarray:
        return np.array([im["kind"] for im in self.images])

    def categories(self) -> np.ndarray:
        return np.array([im.get("category") or "" for im in self.images])


def batches(images: np.ndarray, batch: int) -> list[dict[str, np.ndarray]]:
    images = np.ascontiguousarray(images, dtype=np.float32)
    return [OrderedDict([(INPUT_NAME, images[i:i + batch])]) for i in range(0, len(images), batch)]


def write_golden(folder: Path, golden: GoldenSet) -> list[Path]:
    """Write the four golden files into ``folder`` (each atomically); returns their paths."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import to_json as poly_json
    _check(golden)
    folder = Path(folder)
    results = RunResults()
    results.append((GOLDEN_RUNNER, [IterationResult(OrderedDict((n, np.asarray(o[n])) for n in OUTPUT_NAMES),
                                                    runner_name=GOLDEN_RUNNER) for o in golden.outputs]))
    written = [atomic_write_text(folder / GOLDEN_INPUTS, poly_json([OrderedDict(f) for f in golden.feeds])),
               atomic_write_text(folder / GOLDEN_OUTPUTS, results.to_json())]
    meta = {"schema": GOLDEN_SCHEMA, "runner": GOLDEN_RUNNER, "inputs": GOLDEN_INPUTS, "outputs": GOLDEN_OUTPUTS,
            **golden.meta, "images": golden.images}
    if golden.masks is not None and len(golden.masks):
        buf = io.BytesIO()
        np.savez_compressed(buf, masks=np.packbits(golden.masks.astype(bool), axis=-1),
                            shape=np.array(golden.masks.shape))
        written.append(atomic_write_bytes(folder / GOLDEN_MASKS, buf.getvalue()))
        meta["masks"] = GOLDEN_MASKS
    written.append(atomic_write_json(folder / GOLDEN_META, meta))
    return written


def read_golden(path: Path) -> GoldenSet:
    """Read a golden set from an artifact folder or its ``golden.json``."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json
    path = Path(path)
    meta_path = path / GOLDEN_META if path.is_dir() else path
    if not path.exists():
        raise UadcError(f"golden set not found: {path} (give an artifact folder or its {GOLDEN_META})")
    if not meta_path.is_file():
        if not (meta_path.parent / MANIFEST_FILE).is_file():   # a bare model, a recipe's folder: "a bundle" was said
            raise UadcError(f"no golden outputs at {path}: not an artifact folder (no {MANIFEST_FILE}); pass --golden "
                            f"ARTIFACT, the folder `uadc compile` wrote")
        # an artifact whose listed golden.json is gone: that, not "a bundle"
        why = ("a deployment bundle (`uadc bundle`) leaves them out" if read_manifest(meta_path.parent).bundle
               is not None else "an older uadc did not write them")
        raise UadcError(f"no golden outputs at {path}: {why}; pass --golden FULL_ARTIFACT, or compile the artifact "
                        f"again")
    folder = meta_path.parent
    listed = None
    if (folder / MANIFEST_FILE).is_file():   # checked, not trusted: an edited golden.json's budgets passed anything
        listed = set(read_manifest(folder).files)
    meta = _read(meta_path, lambda: json.loads(meta_path.read_text(encoding="utf-8")))
    if not isinstance(meta, dict) or not {"runner", "inputs", "outputs", "images"} <= set(meta):
        raise UadcError(f"{meta_path} is not a golden set's {GOLDEN_META}; pass an artifact folder or its "
                        f"{GOLDEN_META}")
    if meta.get("schema") != GOLDEN_SCHEMA:
        raise UadcError(f"{meta_path}: golden schema {meta.get('schema')!r}, expected {GOLDEN_SCHEMA}")
    for key, kinds in (("runner", str), ("verify", (dict, type(None))), ("reference_model", str)):
        if key in meta and not isinstance(meta[key], kinds):   # a TypeError / ValueError traceback: exit 1, "regression"
            raise UadcError(f"{meta_path}: {key} {meta[key]!r:.80} is not what compile writes there")
    if "reference_model" in meta and not is_plain_name(meta["reference_model"]):   # a model from anywhere judged
        raise UadcError(f"{meta_path}: reference_model {meta['reference_model']!r:.80} is not a file name in its folder")
    inputs, outputs_file = (_member(folder, meta[k], k, meta_path) for k in ("inputs", "outputs"))
    mask_file = _member(folder, meta["masks"], "masks", meta_path) if meta.get("masks") else None
    used = [meta_path.name, inputs.name, outputs_file.name, *([mask_file.name] if mask_file else []),
            *([meta["reference_model"]] if isinstance(meta.get("reference_model"), str) else [])]
    unlisted = [n for n in used if listed is not None and n not in listed]
    if unlisted:   # a reference model swapped in, its name struck from the manifest: judged as if compile wrote it
        raise UadcError(f"{folder / unlisted[0]}: not listed in {folder / MANIFEST_FILE}, so not the file compile wrote; "
                        f"compile the artifact again")
    with quiet_third_party():  # Polygraphy logs every load
        feeds = _read(inputs, lambda: _check_json_arrays(inputs, _FEED_KINDS) or [dict(f) for f in load_json(str(inputs))])
        results = _read(outputs_file, lambda: _check_json_arrays(outputs_file, _RESULT_KINDS)
                        or RunResults.load(str(outputs_file)))
    runs = dict(results.items())
    if meta["runner"] not in runs:
        raise UadcError(f"{outputs_file}: no results of runner {meta['runner']!r}")
    outputs = [{n: np.asarray(it[n]) for n in OUTPUT_NAMES} for it in runs[meta["runner"]]]
    images = meta.pop("images")
    pixels = max((math.prod(a.shape[-2:]) for f in feeds for a in f.values() if np.ndim(a) >= 2), default=0)
    # the packed masks of every image at most (a 249 KB file of deflated zeros asked 4.6 GB before its refusal)
    most = (len(images) if isinstance(images, list) else 0) * (pixels // 8 + math.isqrt(pixels) + 1) + 4096
    masks = _read(mask_file, lambda: _masks(mask_file, most)) if mask_file else None
    g = GoldenSet(feeds, outputs, images, masks, meta, meta_path)
    _check(g)
    return g


def _member(folder: Path, name: Any, key: str, meta_path: Path) -> Path:
    """A file the golden set names: a regular file of bounded size in its own folder. An edited
    golden.json read any file on the machine (its text shown in the error), or /dev/zero until memory ran out."""
    if not isinstance(name, str) or not is_plain_name(name):
        raise UadcError(f"{meta_path}: {key} {name!r:.80} is not a file name in its folder")
    path = folder / name   # a link is followed (an artifact copied with `cp -rs`, DVC): to a regular file only
    if not path.is_file():
        raise UadcError(f"{meta_path}: {key} {name!r} is missing or not a regular file in {folder}")
    if path.stat().st_size > MAX_GOLDEN_BYTES:
        raise UadcError(f"{path}: {path.stat().st_size} bytes is over the golden files' limit of {MAX_GOLDEN_BYTES}")
    return path


def _read(path: Path, load: Any) -> Any:
    """``load()``; a missing or damaged golden file is one error naming that file (a traceback and
    exit 1, a "regression", for a damaged golden_masks.npz before)."""
    from polygraphy.exception import PolygraphyException
    try:
        return load()
    except (OSError, ValueError, KeyError, TypeError, EOFError, RecursionError, MemoryError, zipfile.BadZipFile,
            PolygraphyException) as exc:   # MemoryError: a crafted .npy header asking for TiBs, allocated first
        reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else
                  "nested too deeply" if isinstance(exc, RecursionError) else
                  "not in Polygraphy's format" if isinstance(exc, PolygraphyException) else   # its text quotes the file
                  f"{type(exc).__name__}: {str(exc)[:200]}")
        raise UadcError(f"unreadable golden set file {path}: {reason}") from None


def _masks(path: Path, most: int) -> np.ndarray:
    with np.load(path) as z:
        _check_npy_size(z, "masks", most, "the golden images' masks take")
        _check_npy_size(z, "shape", 1024, "three numbers take")   # 620 KB of deflated zeros there took 1.8 GB
        shape, packed = tuple(int(s) for s in z["shape"]), z["masks"]
        # the stored shape must be the packed array's: a crafted one asked for 35 TiB (a MemoryError traceback)
        if len(shape) != packed.ndim or shape[:-1] != packed.shape[:-1] or not 0 < shape[-1] <= 8 * packed.shape[-1]:
            raise ValueError(f"shape {list(shape)} is not that of its packed masks {list(packed.shape)}")
        return np.unpackbits(packed, axis=-1, count=shape[-1]).astype(bool).reshape(shape)


def _check_npy_size(z: Any, name: str, most: int, what: str) -> None:
    """An array's .npy header must fit the bytes behind it: numpy allocates what the header says before it
    reads (a 100-byte member claiming (10**7, 10**7) was a MemoryError, a smaller lie GBs of memory); and
    those bytes, inflated, at most ``most``."""
    info = z.zip.getinfo(f"{name}.npy")
    if info.file_size > most:
        raise ValueError(f"{name}: {info.file_size} bytes inflated, more than {what} ({most})")
    with z.zip.open(info) as f:
        shape, dtype = _npy_header(f)
    if math.prod(shape) * dtype.itemsize > info.file_size:
        raise ValueError(f"{name}: its header claims shape {list(shape)[:4]} of {dtype}, more than its {info.file_size} bytes")


def _npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(f)
    return shape, dtype


_FEED_KINDS = frozenset({"ndarray"})   # what compile writes into golden_inputs.json, and golden_outputs.json
_RESULT_KINDS = frozenset({"ndarray", "LazyArray", "IterationResult", "RunResults"})


def _check_json_arrays(path: Path, allowed: frozenset) -> None:
    """Every array in a golden JSON file is a plain .npy whose header fits its bytes, as compile writes them:
    Polygraphy's decoder also inflates a compressed .npz (1.8 MB of deflated zeros took 2.15 GB before the
    refusal) and reads torch tensors, neither of which compile writes."""
    def check(d: dict) -> dict:   # Polygraphy's tag, and its older ones ({"__polygraphy_encoded_X": "polygraphy_...")
        kinds = {str(d["polygraphy_class"])[:40]} if "polygraphy_class" in d else set()
        kinds |= {k.removeprefix("__polygraphy_encoded_")[:40] for k, v in d.items() if v == "polygraphy_serialized_json_type"}
        if "tensor" in d or kinds - allowed or len(kinds) > 1 or kinds - {"ndarray"} and "array" in d or \
                "LazyArray" in kinds and not isinstance(d.get("values"), dict):   # a null one: a TypeError traceback
            raise ValueError(f"a {' / '.join(sorted(kinds)) or 'tensor'} payload, which compile does not write there")
        if kinds == {"ndarray"}:
            if not isinstance(d.get("array"), str):
                raise ValueError("an array without its base64 .npy payload")
            data = base64.b64decode(d["array"].encode(), validate=True)
            if not data.startswith(b"\x93NUMPY"):
                raise ValueError("an array that is not a plain .npy (compile writes no other)")
            f = io.BytesIO(data)
            shape, dtype = _npy_header(f)
            if math.prod(shape) * dtype.itemsize > len(data) - f.tell():
                raise ValueError(f"an array whose header claims shape {list(shape)[:4]} of {dtype}, more than its bytes")
        return d
    with open(path, "rb") as f:
        json.load(f, object_hook=check)


_KINDS = {"normal": None, "test": (0, 1), "random": None, "user": None}   # a record's kind -> its labels


def _finite(v: "int | float") -> bool:
    """numpy's isfinite raised TypeError on an int past 64 bits (`10**400`): a traceback, exit 1."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _check_records(g: GoldenSet) -> None:
    """Each image record and threshold as build_golden writes them: an edited golden.json beside no
    manifest (`--golden G`) ended in KeyError / ValueError / TypeError tracebacks."""
    where = f"golden set {g.path or ''}"
    for i, im in enumerate(g.images):
        ok = isinstance(im, dict) and im.get("kind") in _KINDS and \
            (im.get("label") is None if _KINDS[im["kind"]] is None else im.get("label") in _KINDS[im["kind"]]) and \
            (im.get("category") is None or isinstance(im.get("category"), str))
        if not ok or isinstance(im.get("label"), bool):
            raise UadcError(f"{where}: image record {i} is not one golden.json holds ({str(im)[:120]})")
    thr = g.meta.get("thresholds")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v)  # noqa: E731
    if not isinstance(thr, dict) or "global" not in thr:
        raise UadcError(f"{where}: no global thresholds")
    for cat, t in thr.items():
        if not isinstance(t, dict) or not all(number(t.get(k)) for k in ("image", "pixel", "score_std")):
            raise UadcError(f"{where}: thresholds of {cat!r} are not numbers image, pixel and score_std")
        if "n" in t and not (isinstance(t["n"], int) and not isinstance(t["n"], bool) and t["n"] >= 0):
            raise UadcError(f"{where}: thresholds of {cat!r}: n {t['n']!r:.40} is not a count of normals")


def _check(g: GoldenSet) -> None:
    _check_records(g)
    n = sum(len(f[INPUT_NAME]) for f in g.feeds)
    if len(g.feeds) != len(g.outputs) or n != len(g.images) or \
            n != sum(len(o[OUTPUT_NAMES[1]]) for o in g.outputs):
        raise UadcError(f"golden set {g.path or ''}: inputs, outputs and image records disagree "
                        f"({len(g.feeds)} batches, {n} inputs, {len(g.images)} records)")
    n_test = sum(1 for im in g.images if im["kind"] == "test")
    if g.masks is not None and len(g.masks) != n_test:
        raise UadcError(f"golden set {g.path or ''}: {len(g.masks)} masks for {n_test} test images")
