"""Per-cell result records in the sweep's output folder (``records/<cell key>.json``).

A record is written atomically once its cell's artifact folder is in place, so a record on
disk always names a complete artifact; a rerun reads records instead of redoing the work.
Failed cells are recorded too (with their one-line error) but are tried again by a rerun."""

from __future__ import annotations

from pathlib import Path

from uadc.core.constants import REPORT_FILE
from uadc.core.errors import UadcError
from uadc.core.io import atomic_write_json, parse_json
from uadc.core.manifest import read_manifest

RECORDS = "records"
CELLS = "cells"


def record_path(out: Path, key: str) -> Path:
    return Path(out) / RECORDS / f"{key}.json"


def load_record(out: Path, key: str) -> dict | None:
    """The finished (status ok) record of ``key``, or None (absent, failed or unreadable)."""
    try:
        rec = parse_json(record_path(out, key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("status") != "ok" or rec.get("key") != key:
        return None
    # the artifact it names must still be there, whole (a deleted cell folder, or model.onnx, is computed
    # again), in this run's folder (a record naming any folder was reused) and of the record's target
    folder = (Path(out) / str(rec.get("artifact"))).resolve()
    if Path(out).resolve() not in folder.parents:
        return None
    try:
        manifest = read_manifest(folder)
        manifest.check_model_file()
    except UadcError:
        return None
    if (manifest.target, manifest.precision) != (rec.get("target"), rec.get("precision")):
        return None
    return rec if (folder / REPORT_FILE).is_file() else None


def write_record(out: Path, record: dict) -> Path:
    return atomic_write_json(record_path(out, record["key"]), record)


def cell_dir(out: Path, folder: str) -> Path:
    return Path(out) / CELLS / folder
