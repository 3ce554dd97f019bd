"""Where a recipe's data is: its (root, category) folders, listed without reading an image (no torch:
a grid's checks run before any of its work)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from uadc.config.recipe import Recipe
from uadc.core.errors import UadcError
from uadc.core.images import check_utf8_name, is_hidden
from uadc.core.names import same_name
from uadc.core.manifest import GLOBAL

log = logging.getLogger(__name__)


def _nested_category(folder: Path) -> Path | None:
    return next((q for q in sorted(folder.iterdir()) if not is_hidden(q.name) and (q / "train" / "good").is_dir()),
                None)


def list_categories(root: Path, warn: bool = False) -> list[str]:
    """The MVTec-layout categories under ``root``; ``warn``: name the folders laid out a little differently."""
    if not root.is_dir():
        raise UadcError(f"data folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if not is_hidden(p.name) and p.is_dir())
    cats = [p.name for p in folders if (p / "train" / "good").is_dir()]
    for p in folders:   # a category laid out a little differently was left out without a word
        near = [x.name for x in p.iterdir() if x.is_dir() and x.name.lower() in ("train", "test")] \
            if p.name not in cats else []
        if near and warn:
            log.warning("%s has %s/ but no train/good/: left out (uadc reads <category>/train/good/*.png: rename the "
                        "folders so)", p, " and ".join(sorted(near)))
        elif warn and p.name not in cats and (deeper := _nested_category(p)):   # an archive unpacked twice: gray/gray/
            log.warning("%s holds a category one folder deeper (%s/train/good/): left out; give %s as a data.sources "
                        "root, or move it up", p, deeper.name, p)
    if not cats:
        raise UadcError(f"no MVTec-layout category (<cat>/train/good) in {root}")
    return cats



def resolve_sources(sources: Sequence[dict], warn: bool = False) -> list[tuple[Path, str]]:
    """(root, category) pairs from recipe ``data.sources``; duplicate category names are errors. ``warn``:
    name the folders a listed root leaves out (data preparation does, once a command: the checkpoint's and
    the outside-data check's listings said it again, three times a train)."""
    pairs, seen, folders = [], {}, {}
    for i, src in enumerate(sources):
        root = Path(src["root"])
        if not root.is_dir():
            # name the recipe key: a packaged recipe's relative root points beside the package
            raise UadcError(f"data.sources[{i}].root: data folder not found: {root} (set this key in the recipe "
                            f"to your data; relative paths resolve against the file that sets them, the recipe or a "
                            f"sweep file's overrides, or the current folder for a recipe given as a dict)")
        cats = src.get("categories") or list_categories(root, warn)
        for c in cats:
            if not (root / c).exists():   # the folder's name in another Unicode form (copied from macOS: NFD)
                c = next((p.name for p in root.iterdir() if same_name(p.name, c)), c)
            check_utf8_name(root / c, "category")
            if c == GLOBAL:   # the key of the thresholds over all categories (artifact.json, --category)
                raise UadcError(f"category name {GLOBAL!r} is reserved for the thresholds over all categories: "
                                f"rename {root / c}")
            if c in seen:
                raise UadcError(f"data.sources: category {c!r} appears twice (in {seen[c]} and {root})")
            seen[c] = root
            real = (root / c).resolve()   # a link (or another root) reaching a category already listed
            if real in folders:
                raise UadcError(f"categories {folders[real]!r} and {c!r} are the same folder ({real}): its images "
                                f"would be trained on and judged twice")
            folders[real] = c
            pairs.append((root, c))
    return pairs


def check_outside_data(out: Path, recipe: Recipe, what: str = "--out") -> None:
    """An output written into a category's folder or a validation folder is read as data by the
    recipe's next run (an artifact named ``x.png`` in train/good stopped it), and puts files in the user's
    dataset."""
    folders = [root / cat for root, cat in resolve_sources([s.model_dump() for s in recipe.data.sources])]
    where = Path(os.path.realpath(out))
    for folder in [*folders, *(Path(v.folder) for v in recipe.data.val or [])]:
        real = Path(os.path.realpath(folder))
        if where == real or real in where.parents:
            raise UadcError(f"{what} {out}: inside the recipe's data folder {folder}; choose a folder outside its data")


def data_fingerprint(recipe: Recipe) -> str:
    """The names and sizes of every file under the recipe's category folders (train, test, masks) and
    validation folders, hashed: a grid's finished cells were reused after test images were removed."""
    import hashlib
    import json
    try:
        folders = [root / cat for root, cat in resolve_sources([s.model_dump() for s in recipe.data.sources])]
    except UadcError as exc:   # not there (yet): a plan is made without it, and the cells say why they fail
        return f"unavailable: {exc}"[:200]
    items = []
    for folder in [*folders, *(Path(v.folder) for v in recipe.data.val or [])]:
        real = {os.path.realpath(folder)}   # linked folders followed, as the loader reads them (each real one once)
        for here, dirs, files in os.walk(folder, followlinks=True):
            # hidden names are not read (.DS_Store, ._x.png, .ipynb_checkpoints/): opening the folder in Finder
            # changed the fingerprint, and the one-class comparison was dropped
            dirs[:] = sorted(d for d in dirs if not is_hidden(d) and os.path.realpath(os.path.join(here, d)) not in real)
            real.update(os.path.realpath(os.path.join(here, d)) for d in dirs)
            items += [(os.path.relpath(os.path.join(here, f), folder), os.path.getsize(os.path.join(here, f)))
                      for f in sorted(files) if not is_hidden(f) and os.path.isfile(os.path.join(here, f))]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
