"""Predict over files and folders (``uadc predict``): predictions.jsonl / .csv and optional PNG
heat-map overlays with the mask contour. An unreadable image is recorded with its path and
skipped; the run goes on."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from uadc.core.constants import OVERLAYS_DIR, PREDICTIONS_CSV, PREDICTIONS_JSONL
from uadc.core.errors import NonFiniteOutputs, UadcError, csv_cell
from uadc.core.images import FoundImages, find_images, printable, shown
from uadc.core.io import (atomic_write_bytes, atomic_write_text, check_dir_creatable, check_own_file, check_writable,
                          file_lock, parse_json, staged_files)
from uadc.core.process import signals_deferred
from uadc.core.scoped import logged_warnings
from uadc.core.manifest import GLOBAL, check_outside_artifacts, infer_category, named_in
from uadc.core.progress import progress
from uadc.runtime.detector import Detector, Prediction
from uadc.runtime.preprocess import load_rgb, model_input

log = logging.getLogger(__name__)
OVERLAY_MARK = ("Software", "uadc predict")   # a text chunk in each overlay PNG
MAX_LISTED = 100   # failures named in the summary (--json); the tables name every one
CSV_FIELDS = ("path", "category", "score", "normalized_score", "label", "verdict", "threshold", "mask_fraction",
              "latency_ms", "overlay", "error")   # an image that could not be read: verdict "error", the reason


@dataclass
class PredictRun:
    records: list[dict]                       # one per predicted image (Prediction.to_dict())
    failed: list[tuple[str, str, str | None]]   # (path, reason, category judged as) of skipped images
    out: Path | None = None
    written: list[Path] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)   # files a folder walk passed over, by reason
    warnings: list[str] = field(default_factory=list)   # every warning of the run (also logged), the Detector's too
    backend: str | None = None                                # the runtime that made the verdicts

    def summary(self) -> dict:
        verdicts = {"defective": 0, "good": 0}   # both, in one order: a pipeline reads the same keys every run
        for r in self.records:
            verdicts[r["verdict"]] = verdicts.get(r["verdict"], 0) + 1
        lat = [r["latency_ms"] for r in self.records]
        return {"images": len(self.records), "failed": len(self.failed),
                "failures": [{"path": printable(f), "category": c and printable(c), "error": printable(e)}
                             for f, e, c in self.failed[:MAX_LISTED]],
                "verdicts": verdicts,
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
                "left_out": dict(self.left_out), "warnings": list(self.warnings), "backend": self.backend,
                "out": str(self.out) if self.out else None}

    def to_dict(self) -> dict:   # `uadc predict --json`
        return self.summary()

    @property
    def exit_code(self) -> int:
        """1 when an image could not be read or got no verdict (the rest ran), else 0."""
        return 1 if self.failed else 0

    def summary_line(self) -> str:
        """``N images (verdicts); K skipped[; left out: ...]; p50 latency X ms per image``."""
        s = self.summary()
        verdicts = ", ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items()) if v)
        left = f"; left out: {_describe(self.left_out)}" if self.left_out else ""
        latency = f"; p50 latency {s['latency_ms_p50']} ms per image" if self.records else ""
        counts = f"{s['images']} image{'' if s['images'] == 1 else 's'}" + (f" ({verdicts})" if verdicts else "")
        return f"{counts}; {s['failed']} skipped{left}{latency}"


def _progress(it, **kw):
    try:
        import tqdm  # noqa: F401  (optional on an edge box)
    except ImportError:
        return it
    return progress(it, **kw)


def _colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 (blue - green - red), numpy only."""
    x = np.clip(x, 0, 1)[..., None]
    rgb = np.concatenate([np.clip(2 * x - 0.5, 0, 1) * 1.0, 1 - np.abs(2 * x - 1), np.clip(1.5 - 2 * x, 0, 1)], -1)
    return (255 * rgb).astype(np.uint8)


def _contour(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def overlay(rgb: np.ndarray, pred: Prediction, detector: Detector) -> np.ndarray:
    """The image the model saw, blended with the normalised anomaly map (pixel threshold at
    mid-scale), the mask's contour in white."""
    heat = _colormap(detector.thresholds(pred.category).pixel.normalize(pred.anomaly_map))
    out = (0.55 * (rgb * 255) + 0.45 * heat).astype(np.uint8)
    out[_contour(pred.mask)] = 255
    return out


def _unique(name: Path, taken: set[Path]) -> Path:
    """``name``, or ``stem-2``, ``stem-3``, ... when an earlier file of the run took it."""
    out, k = name, 2
    while out in taken:
        out, k = name.with_name(f"{name.stem}-{k}{name.suffix}"), k + 1
    taken.add(out)
    return out


def overlay_names(files: list[Path], roots: list[Path]) -> dict[Path, Path]:
    """One distinct overlay path per file: ``<input folder>/<relative path>.png`` (two input folders
    of one name, e.g. two ``test/good``, become ``good`` and ``good-2``), else ``<stem>.png``; bytes of a
    name that is not UTF-8 written as ``\\xNN``, as the tables give it."""
    labels: dict[Path, Path] = {}
    used: set[Path] = set()
    for root in roots:
        if root.is_dir() and root not in labels:
            # named as the folder it is: '..' or 'a/..' is a name pathlib keeps, and overlays/../x
            # wrote over the input images themselves
            labels[root] = _unique(Path(Path(os.path.abspath(root)).name or "root"), used)
    wanted = {f: Path(printable(str(next((labels[r] / f.relative_to(r) for r in labels if _below(f, r)),
                                         Path(f.name)).with_suffix(".png")))) for f in files}   # as the tables say
    # a folder's name is taken too: `x.jpg` beside a folder `x.png/` wrote overlays/x.png as a file, and
    # the folder's overlays then failed, after every image had run
    taken = {d for name in wanted.values() for d in name.parents}
    return {f: _unique(name, taken) for f, name in wanted.items()}


def _below(f: Path, root: Path) -> bool:
    """``f`` was found under ``root`` (spelt ``root/<relative path>``): `.` is a parent of `../good/x.png`
    and `a` of `a/../b/x.png` only as text, which named overlays `../good/...` outside --out."""
    return root in f.parents and ".." not in f.relative_to(root).parts


def predict_paths(detector: Detector, inputs: Sequence[Path], category: str | None = None, out: Path | None = None,
                  overlays: bool = False, batch_size: int = 8, infer: bool = True) -> PredictRun:
    """Predict every image under ``inputs``; with ``out``, write predictions.jsonl, predictions.csv
    and (``overlays``) overlays/<input folder>/<relative path>.png. ``category=None`` with
    ``infer``: each image's category comes from its folder names, else the global thresholds.
    Runs that share an ``out`` take turns (a lock beside it): two at once could leave one run's
    jsonl beside the other's csv."""
    roots = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if category is not None:
        detector.thresholds(category)
    # the user's mistakes are refused before the lock (and the folders it needs) is made
    found = find_images(roots, exclude=[Path(out)] if out else ())
    if not found.files:
        raise UadcError(f"no images found in {', '.join(map(str, roots))}"
                        + (f" (left out: {_describe(found.skipped)})" if found.skipped else ""))
    if out:
        check_outside_artifacts(Path(out))   # its files are hashed in artifact.json: a bundle listed ours as unlisted
        _check_out(Path(out))
        _check_inputs_outside_overlays(Path(out), found.files)
    with file_lock(Path(out), inside=True) if out else contextlib.nullcontext(), logged_warnings() as said:
        run = _predict(detector, found, category, out, overlays, batch_size, infer, roots)
    run.warnings += said   # every warning the run logged (an image noted once per folder, the category one)
    return run


def _predict(detector: Detector, found: FoundImages, category: str | None, out: Path | None, overlays: bool,
             batch_size: int, infer: bool, roots: list[Path]) -> PredictRun:
    files = found.files
    run = PredictRun([], [], Path(out) if out else None, left_out=found.skipped, backend=detector.backend_name,
                     warnings=list(detector.warnings))
    names = overlay_names(files, roots) if out and overlays else {}
    if out:
        _check_overlays_removable(Path(out))
    if names:
        _check_overlays_free(Path(out), names)
    tables = (lambda: _write_tables(run, Path(out))) if out else None
    # overlays move into out/overlays/ once every image ran, the tables naming them right after, as
    # one step: a run stopped half-way leaves none of them, one stopped while they move in all of them
    if category is None and infer:
        _warn_categories_from_above(files, detector.categories)
    with staged_files(Path(out) / OVERLAYS_DIR, then=tables) if names else contextlib.nullcontext() as stage:
        _run_images(detector, files, category, infer, batch_size, run, stage, names)
        n_global = sum(r["category"] is None for r in run.records)
        if n_global and len(detector.categories) > 1 and category != GLOBAL:   # not when asked for
            log.warning("%d of %d images are in no folder named after a category (%s): they were judged at the global "
                        "thresholds, set on every category's normals together, which can sit far above one category's "
                        "defect scores; pass --category (or category=) to judge them as that product", n_global,
                        len(run.records), ", ".join(detector.categories))
    if tables is not None and not names:
        with signals_deferred():   # predictions.jsonl and .csv: both or neither
            tables()
    return run


def _warn_categories_from_above(files: list[Path], categories: list[str]) -> None:
    """A category named only by the folder uadc runs in (``cd gray; uadc predict ART cam1``): judged so, and said."""
    above: dict[str, int] = {}
    for f in files:
        cat = infer_category(f, categories)
        if cat is not None and not named_in(f, cat):
            above[cat] = above.get(cat, 0) + 1
    if above:
        log.warning("%s: taken from a folder above the inputs given (the folder uadc runs in, %s, or a `..`), not from "
                    "their paths; "
                    "pass --category (or category=) if that folder is not the product", ", ".join(
                        f"{n} image{'s' * (n > 1)} judged as {c}" for c, n in sorted(above.items())), shown(Path.cwd()))


def _run_images(detector: Detector, files: list[Path], category: str | None, infer: bool, batch_size: int,
                run: PredictRun, stage: Path | None, names: dict[Path, Path]) -> None:
    """Predict ``files`` a batch at a time into ``run``; with ``stage``, each overlay is written there."""
    def category_of(f: Path) -> str | None:   # a failure's row named none: a table filtered by product lost it
        return category if category is not None else (infer_category(f, detector.categories) if infer else None)
    for i in _progress(range(0, len(files), batch_size), desc="predict", unit="batch"):
        chunk, arrays, rgbs = [], [], []
        pre = detector.manifest.preprocessing
        for f in files[i:i + batch_size]:
            try:   # an overlay shows the pixels scored: read again, a file gone meanwhile failed the run (exit 2,
                rgb = load_rgb(f, pre) if stage is not None else None   # no tables), a replaced one showed another
                arrays.append(model_input(rgb, pre) if rgb is not None else detector.preprocess(f))
            except UadcError as exc:
                run.failed.append((str(f), str(exc), category_of(f)))
                continue
            chunk.append(f)
            rgbs.append(rgb)
        if not chunk:
            continue
        maps, scores, ms = detector.run(np.stack(arrays))
        for j, f in enumerate(chunk):
            cat = category_of(f)
            try:
                pred = detector.decide(maps[j:j + 1], scores[j:j + 1], cat, ms, [str(f)])[0]
            except NonFiniteOutputs as exc:   # no verdict for this image; the others stand
                run.failed.append((str(f), str(exc), cat))
                continue
            run.records.append(pred.to_dict())
            if stage is not None:
                img = overlay(rgbs[j], pred, detector)
                buf = io.BytesIO()
                mark = PngInfo()
                mark.add_text(*OVERLAY_MARK)   # what a later run may remove as its own
                Image.fromarray(img).save(buf, format="PNG", pnginfo=mark)
                atomic_write_bytes(stage / names[f], buf.getvalue())
                run.written.append(run.out / OVERLAYS_DIR / names[f])
                run.records[-1]["overlay"] = (OVERLAYS_DIR / names[f]).as_posix()


def _check_out(out: Path) -> None:
    """Refuse, before any work, to overwrite prediction tables that uadc predict did not write (or to
    write into a broken link, found after every image had run)."""
    check_dir_creatable(out)
    def is_record(head: str) -> bool:   # a user's JSONL of paths is no prediction: an image's row or a failure's
        try:
            first = parse_json(head.split("\n", 1)[0])
        except ValueError:
            return False
        return isinstance(first, dict) and ({"path", "score", "verdict"} <= first.keys() or   # a failure's row
                                            {"path", "error"} <= first.keys() <= {"path", "category", "error"})

    header = ",".join(CSV_FIELDS)   # the whole header: a user's table may start with path,category,score too
    check_own_file(out / PREDICTIONS_CSV, lambda head: head.split("\n", 1)[0].rstrip("\r") == header, "uadc predict")
    check_own_file(out / PREDICTIONS_JSONL, is_record, "uadc predict")


def _check_inputs_outside_overlays(out: Path, files: list[Path]) -> None:
    """An input image under ``out/overlays/`` (an earlier run's overlays predicted into the same --out) is a
    file this run replaces or removes as stale: its inputs were deleted while the tables named them."""
    own = os.path.realpath(out / OVERLAYS_DIR) + os.sep
    inside = next((f for f in files if os.path.realpath(f).startswith(own)), None)
    if inside is not None:
        raise UadcError(f"input {shown(inside)} is in {shown(out / OVERLAYS_DIR)}, which this run rewrites; "
                        f"give another --out (nothing was changed)")


def _check_overlays_free(out: Path, names: dict[Path, Path]) -> None:
    """An overlay this run would write where a file lies that the replaced tables do not name and that
    carries no uadc mark (inside ``overlays/``) is a user's file (or another tool's), and one whose folder this user cannot change would fail once
    the others moved in: both refused before any image runs."""
    ours, root = _named_overlays(out), (out / OVERLAYS_DIR).resolve()
    for name in names.values():
        rel = Path(OVERLAYS_DIR) / name
        p = out / rel
        # one marked as uadc's that the tables do not name: a run killed while its overlays moved in (its
        # tables not yet written), whose rerun was refused until the folder was cleaned by hand
        if (p.exists() or p.is_symlink()) and rel.as_posix() not in ours and not (
                p.is_file() and not p.is_symlink() and root in p.resolve().parents and _ours(p)):
            raise UadcError(f"{p} exists and was not written by uadc predict; choose another --out "
                            f"(nothing was changed)")
    _check_folders_writable({(out / OVERLAYS_DIR / name).parent for name in names.values()}, "write overlays into")


def _check_folders_writable(folders: set[Path], what: str) -> None:
    for d in sorted(folders):
        try:
            check_writable(d)   # probes: os.access says yes to root where a write fails (immutable, read-only)
        except UadcError as exc:
            raise UadcError(f"cannot {what} {shown(d)} ({exc}); choose another --out (nothing was changed)") from None


def _check_overlays_removable(out: Path) -> None:
    """The earlier run's overlays are each replaced or removed once the images ran: one in a folder
    this user cannot change is refused now (then, the tables were replaced and the run failed)."""
    _check_folders_writable({p.parent for p in _overlay_files(out, _named_overlays(out))},
                            "remove the earlier run's overlays in")


def _describe(skipped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))


def _write_tables(run: PredictRun, out: Path) -> None:
    stale = _stale_overlays(out, run)
    # a file name that is not UTF-8 is written as \\xNN in both tables (same text in each)
    records = [{k: printable(v) if isinstance(v, str) else v for k, v in r.items()} for r in run.records]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    failed = [{"path": printable(p), "category": c and printable(c), "error": printable(e)}
              for p, e, c in run.failed]
    lines += "".join(json.dumps(r) + "\n" for r in failed)
    run.written.insert(0, atomic_write_text(out / PREDICTIONS_JSONL, lines))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows({k: csv_cell(v) for k, v in r.items()} for r in records + [{**r, "verdict": "error"} for r in failed])   # a CSV reader sees them too
    run.written.insert(1, atomic_write_text(out / PREDICTIONS_CSV, buf.getvalue()))
    for p in stale:
        p.unlink(missing_ok=True)
    for d in sorted({p.parent for p in stale}, key=lambda d: -len(d.parts)):   # their folders, emptied
        while d != out and d.is_dir() and not d.is_symlink() and not any(d.iterdir()):   # overlays/ may link elsewhere
            d.rmdir()
            d = d.parent


def _stale_overlays(out: Path, run: PredictRun) -> list[Path]:
    """Overlays that the earlier run's predictions.jsonl in ``out`` names and this run did not write
    again: they belong to the tables being replaced, and left there they would mix two runs. Only
    PNG files under ``out/overlays/``; anything else there is not uadc's."""
    return _overlay_files(out, _named_overlays(out) - {r.get("overlay") for r in run.records})


def _overlay_files(out: Path, named: set[str]) -> list[Path]:
    """The named overlays under ``out/overlays/`` (a link to another disk too) that uadc wrote: a line of the
    editable predictions.jsonl named any PNG there, e.g. a photo in a folder `overlays` was linked to."""
    root = (out / OVERLAYS_DIR).resolve()
    paths = [out / o for o in sorted(named)]
    return [p for p in paths if p.suffix == ".png" and root in p.resolve().parents and p.is_file() and _ours(p)]


def _ours(png: Path) -> bool:
    try:
        with Image.open(png) as im:
            return im.format == "PNG" and im.info.get(OVERLAY_MARK[0]) == OVERLAY_MARK[1]
    except Exception:  # noqa: BLE001 - unreadable: not an overlay uadc wrote
        return False


def _named_overlays(out: Path) -> set[str]:
    """The overlays (paths relative to ``out``) that the predictions.jsonl in ``out`` names."""
    old, named = out / PREDICTIONS_JSONL, set()
    if not old.is_file():
        return named
    for line in old.read_text(errors="replace").splitlines():
        try:
            named.add(parse_json(line).get("overlay"))
        except (ValueError, AttributeError):
            continue
    return {n for n in named if isinstance(n, str)}
