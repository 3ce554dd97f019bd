"""What in an output folder uadc wrote and what someone added: the rule every replacement (``--force``) keeps.

A folder is replaced whole only where all it holds is uadc's: an artifact's listed files (and the device's
engine files), a QAT run's two files, a grid's tables, records and cell artifacts; writers' temps and a file
manager's litter aside. Anything else is named, and the replacement refused (``uadc.core.io``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from uadc.core.constants import (DEVICE_FILES, ENGINE_FILE, ENGINE_SOURCE_SUFFIX, GRID_FILES, GRID_FOLDERS, MANIFEST_FILE,
                                 TMP_TAG)

TMP_RE = re.compile(r"^\.(?P<name>.+)" + re.escape(TMP_TAG)
                    + r"(?P<pid>\d+)(?:@(?P<host>[0-9a-f]{8})(?:\.(?P<boot>[0-9a-f]{4}))?)?-[0-9a-f]+(?:\.tmp)?$")
DESKTOP_LITTER = frozenset((".DS_Store", "Thumbs.db", "desktop.ini"))
MAX_MARKER_BYTES = 256 << 20   # a manifest or record larger is no uadc one (uadc.core.io reads markers as far)


def _litter(name: str) -> bool:   # a file manager's, not a user's
    return name in DESKTOP_LITTER or name.startswith("._")


def files_added_to_artifact(folder: Path) -> list[str] | None:
    """Files and links in an artifact folder that its ``artifact.json`` does not list and no uadc step
    makes there (the device's engine files, writers' temps): added by someone, and theirs to keep. None
    where ``artifact.json`` is not uadc's (another tool's file of that name: the folder is not an artifact)."""
    try:
        if (folder / MANIFEST_FILE).stat().st_size > MAX_MARKER_BYTES:
            return None
        doc = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict) or not {"schema", "uadc_version"} <= doc.keys():
        return None
    return files_added(folder, {*doc["files"], MANIFEST_FILE, *DEVICE_FILES})


def files_added(folder: Path, known: set[str]) -> list[str]:
    """What in ``folder`` is none of the ``known`` files, their folders, writers' temps or a file manager's
    litter; a folder that holds none of the known files is named itself (an empty one went without a word)."""
    parents = {p.as_posix() for k in known for p in Path(k).parents}
    added = []
    for root, dirs, files in os.walk(folder):   # links to folders are not walked: named themselves
        dirs[:] = [d for d in dirs if not TMP_RE.match(d)]   # a writer's temp folder: removed with the rest
        for name in sorted(files) + sorted(dirs):
            rel, is_dir = Path(root, name).relative_to(folder).as_posix(), name in dirs and not os.path.islink(
                os.path.join(root, name))
            if is_dir and (rel in parents or os.listdir(os.path.join(root, name))):
                continue   # a folder of files: each judged by itself
            if rel not in known and not TMP_RE.match(name) and not _litter(name) \
                    and not rel.startswith(f"{ENGINE_FILE}{ENGINE_SOURCE_SUFFIX}"):
                added.append(rel + "/" * is_dir)
    return sorted(added)


def grid_added(folder: Path, sweep: bool) -> list[str]:
    """What a sweep's (``sweep``) or a calibrator comparison's folder holds beyond its tables, its records, its
    cells' locks and its cell artifacts (each judged as an artifact; a sweep keeps them under ``cells/``, a
    comparison beside its tables): a copied sweep.json made a user's folder replaceable."""
    added = []
    for p, rel in _entries(folder, ""):
        if p.name == GRID_FOLDERS[0] and _plain_dir(p):   # records/: uadc's records only
            added += [f"{rel}/{q.name}" for q in sorted(p.iterdir()) if not (_record(q) or TMP_RE.match(q.name))]
        elif sweep and p.name == GRID_FOLDERS[1] and _plain_dir(p):   # cells/
            added += [x for q, r in _entries(p, rel + "/") for x in _cell_added(q, r)]
        elif not (p.name in GRID_FILES and p.is_file()):
            added += [rel + "/" * _plain_dir(p)] if sweep and not _passed_over(p) else _cell_added(p, rel)
    return added


def _entries(folder: Path, prefix: str) -> list[tuple[Path, str]]:
    return [(p, f"{prefix}{p.name}") for p in sorted(folder.iterdir())]


def _plain_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink()


def _passed_over(p: Path) -> bool:
    """A writer's temp, a file manager's litter, or a lock file (empty, as the lock library leaves it)."""
    return bool(TMP_RE.match(p.name)) or _litter(p.name) or (
        p.name.startswith(".") and p.name.endswith(".lock") and p.is_file() and not p.is_symlink()
        and p.stat().st_size == 0)


def _record(p: Path) -> bool:
    """A grid's cell record (JSON naming its key), not a user's JSON file among them."""
    try:
        if p.suffix != ".json" or not p.is_file() or p.stat().st_size > MAX_MARKER_BYTES:
            return False
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and "key" in doc


def _cell_added(p: Path, rel: str) -> list[str]:
    """A cell artifact judged as one; a lock, a temp or litter passed over; anything else named."""
    if _passed_over(p):
        return []
    added = files_added_to_artifact(p) if _plain_dir(p) and (p / MANIFEST_FILE).is_file() else None
    return [f"{rel}/{a}" for a in added] if added is not None else [rel + "/" * _plain_dir(p)]
