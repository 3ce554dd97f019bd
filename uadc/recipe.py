"""Recipe files: a YAML document describing data, model, training, evaluation and compilation.

The schema below is the single source of truth: every key, its type, default and allowed
values. Loading validates the whole document and reports the first problem with its key path
(``model.backbone: 'resnet19' is not one of ...``). Relative paths resolve against the recipe.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from uadc.errors import UadcError

METHODS = ("stfpm", "paste", "rd", "us")
BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2", "mobilenet_v2")
CALIBRATOR_NAMES = ("entropy", "mse", "minmax", "percentile")  # plug-ins are checked at compile
CALIB_DATA = ("train", "random-normal", "mixed")
PARTITIONS = ("teacher", "student", "head")


@dataclass(frozen=True)
class Field:
    """One recipe key: accepted types, default, allowed values, numeric bounds, meaning."""

    types: tuple
    default: Any = None
    choices: tuple | None = None
    low: float | None = None
    help: str = ""
    items: Any = None  # element spec for lists: a Field or a nested dict schema
    path: bool = False  # resolve relative to the recipe file


def _f(types, default=None, **kw) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, **kw)


SOURCE = {
    "root": _f(str, None, path=True, help="dataset root in MVTec layout (<root>/<category>/...)"),
    "categories": _f(list, None, items=_f(str), help="categories under root; all if omitted"),
}

SCHEMA: dict[str, Any] = {
    "name": _f((str, type(None)), None, help="artifact folder name; defaults to the file stem"),
    "seed": _f(int, 0, low=0, help="seed for weights init, shuffling, calibration data"),
    "data": {
        "sources": _f(list, None, items=SOURCE, help="list of {root, categories}"),
        "image_size": _f(int, 256, low=32, help="square input size in pixels"),
        "normalization": _f(str, "backbone", choices=("backbone", "imagenet", "unit"),
                            help="input normalisation: the backbone's own, ImageNet mean/std, or [-1, 1]"),
        "train_limit": _f((int, type(None)), None, low=1, help="use at most N train images per category"),
    },
    "model": {
        "method": _f(str, "stfpm", choices=METHODS),
        "backbone": _f(str, "efficientnet_lite0", choices=BACKBONES),
        "pretrained": _f(bool, True, help="teacher weights: the packaged ones or model.weights"),
        "weights": _f((str, type(None)), None, path=True, help="torchvision/lukemelas-format state dict"),
        "taps": _f(list, None, items=_f(str), help="teacher stages whose features are distilled"),
        "split": _f((str, type(None)), None, help="paste: last teacher stage shared with the student"),
        "combine": _f(str, "product", choices=("product", "sum"), help="how per-layer maps combine"),
        "smoothing_sigma": _f((int, float), 4.0, low=0, help="gaussian sigma of the map (0: off)"),
        "students": _f(int, 3, low=1, help="us: ensemble size"),
        "descriptor_dim": _f(int, 128, low=8, help="us: patch descriptor channels"),
        "student_width": _f((int, float), 1.0, low=0.1, help="rd/us: student width multiplier"),
    },
    "train": {
        "epochs": _f(int, 10, low=1),
        "batch_size": _f(int, 16, low=1),
        "optimizer": _f(str, "adam", choices=("adam", "sgd")),
        "lr": _f((int, float), 1e-3, low=0),
        "weight_decay": _f((int, float), 0.0, low=0),
        "momentum": _f((int, float), 0.9, low=0),
        "schedule": _f(str, "cosine", choices=("cosine", "constant")),
        "warmup_epochs": _f(int, 0, low=0),
        "cache_teacher": _f(bool, True, help="precompute frozen teacher features once"),
        "threads": _f((int, type(None)), None, low=1, help="torch intra-op threads (default: all cores)"),
    },
    "eval": {
        "batch_size": _f(int, 16, low=1),
    },
    "compile": {
        "target": _f(str, "ort-cpu-int8"),
        "passes": _f((list, type(None)), None, items=_f(str), help="override the target's pass list"),
        "calibrator": _f((str, type(None)), None, help="default: the target's (entropy for TensorRT)"),
        "calib_data": _f(str, "random-normal", choices=CALIB_DATA),
        "calib_samples": _f(int, 64, low=1),
        "quantize": _f(list, ["student"], items=_f(str, choices=PARTITIONS)),
        "per_channel": _f((bool, type(None)), None, help="per-channel weight scales (default: target's)"),
    },
    "qat": {
        "epochs": _f(int, 2, low=1),
        "lr": _f((int, float), 1e-4, low=0),
        "batch_size": _f(int, 16, low=1),
    },
}


@dataclass
class Recipe:
    """A validated recipe: ``cfg`` holds every key with defaults filled in."""

    cfg: dict
    path: Path | None

    @property
    def name(self) -> str:
        return self.cfg["name"]

    @property
    def hash(self) -> str:
        return self.section_hash(tuple(self.cfg))

    def section_hash(self, sections: tuple[str, ...]) -> str:
        blob = json.dumps({k: self.cfg[k] for k in sections}, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __getitem__(self, key: str) -> Any:
        return self.cfg[key]

    def artifact_dir(self, root: Path | None = None) -> Path:
        return (root or default_artifacts_root()) / self.name

    def with_overrides(self, **sections: dict) -> "Recipe":
        cfg = copy.deepcopy(self.cfg)
        for section, values in sections.items():
            cfg[section].update(values)
        return Recipe(cfg, self.path)


def default_artifacts_root() -> Path:
    return Path.cwd() / "artifacts"


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise UadcError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UadcError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    return recipe_from_dict(raw or {}, path)


def recipe_from_dict(raw: dict, path: Path | None = None) -> Recipe:
    base = path.resolve().parent if path else Path.cwd()
    cfg = _validate(raw, SCHEMA, "", base)
    cfg["name"] = cfg["name"] or (path.stem if path else "recipe")
    _check_semantics(cfg)
    return Recipe(cfg, path)


def _validate(raw: Any, schema: dict, prefix: str, base: Path) -> dict:
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise UadcError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise UadcError(f"{prefix}{unknown[0]}: unknown key; expected one of {', '.join(schema)}")
    out = {}
    for key, spec in schema.items():
        kp = f"{prefix}{key}"
        if isinstance(spec, dict):
            out[key] = _validate(raw.get(key, {}), spec, kp + ".", base)
        else:
            out[key] = _value(raw[key], spec, kp, base) if key in raw else copy.deepcopy(spec.default)
    return out


def _value(value: Any, spec: Field, kp: str, base: Path) -> Any:
    # bool is an int subclass: never accept True for an int field, or 1 for a bool field.
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in spec.types)
        raise UadcError(f"{kp}: expected {names}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise UadcError(f"{kp}: {value!r} is not one of {', '.join(map(str, spec.choices))}")
    if spec.low is not None and isinstance(value, (int, float)) and value < spec.low:
        raise UadcError(f"{kp}: {value!r} is below the minimum {spec.low}")
    if isinstance(value, list) and spec.items is not None:
        return [_item(v, spec.items, f"{kp}[{i}]", base) for i, v in enumerate(value)]
    if spec.path and isinstance(value, str):
        return str((base / value).resolve()) if not Path(value).is_absolute() else value
    return value


def _item(value: Any, spec: Any, kp: str, base: Path) -> Any:
    if isinstance(spec, dict):
        return _validate(value, spec, kp + ".", base)
    return _value(value, spec, kp, base)


def _check_semantics(cfg: dict) -> None:
    """Rules that span keys."""
    sources = cfg["data"]["sources"]
    if not sources:
        raise UadcError("data.sources: at least one {root, categories} entry is required")
    for i, src in enumerate(sources):
        if not src["root"]:
            raise UadcError(f"data.sources[{i}].root: required")
    m = cfg["model"]
    if m["pretrained"] and m["weights"] is None and m["backbone"] != "efficientnet_lite0":
        raise UadcError(f"model.weights: backbone {m['backbone']!r} has no bundled weights; give a "
                        f"torchvision-format state dict path, or set model.pretrained: false")
    if m["method"] == "paste" and not m["split"]:
        raise UadcError("model.split: required for method paste (last teacher stage shared with the student)")
    for i, p in enumerate(cfg["compile"]["quantize"]):
        if p not in PARTITIONS:
            raise UadcError(f"compile.quantize[{i}]: {p!r} is not one of {', '.join(PARTITIONS)}")


def describe_schema(schema: dict | None = None, prefix: str = "") -> list[str]:
    """Human-readable key list (used by `uadc recipe-schema` and the README)."""
    lines = []
    for key, spec in (schema or SCHEMA).items():
        if isinstance(spec, dict):
            lines += describe_schema(spec, f"{prefix}{key}.")
            continue
        types = "|".join("null" if t is type(None) else t.__name__ for t in spec.types)
        extra = f" one of {', '.join(map(str, spec.choices))}" if spec.choices else ""
        lines.append(f"{prefix}{key} ({types}, default {spec.default!r}){extra}: {spec.help}".rstrip(": "))
        if isinstance(spec.items, dict):
            lines += describe_schema(spec.items, f"{prefix}{key}[].")
    return lines
