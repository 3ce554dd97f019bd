"""Where a recipe's files live, left out of what identifies it: the data folders (their files are
fingerprinted apart) and the initial weights' folder (the file's name still counts)."""

from __future__ import annotations

import copy
from pathlib import Path


def without_locations(cfg: dict, folder: str | None = None) -> dict:
    """A copy of a recipe dict (or of its data and model sections) with each data folder as ``folder`` and
    ``model.weights`` by file name: a moved project, or its data copied elsewhere, is the same recipe."""
    cfg = copy.deepcopy(cfg)
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    for source in data.get("sources") or []:
        source["root"] = folder
    for val in data.get("val") or []:
        val["folder"] = folder
    if model.get("weights"):   # by name: another file is another teacher
        model["weights"] = Path(model["weights"]).name
    return cfg
