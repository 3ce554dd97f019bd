"""A sweep's plan: the trained models it needs and its cells, each cell keyed by a content hash.

Work that cells share is planned once: one model (one training task) per distinct recipe and
training settings, and per model one FP32 baseline that all of its cells compile from. A cell's
key hashes everything its result depends on (recipe hash, the names and sizes of the data files,
checkpoint sha256, compile options, run settings, uadc version), so a finished cell is found again
by a rerun and a changed input (a retrained checkpoint, another option, a test image removed)
makes a new cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from uadc import __version__
from uadc.calibrators import fingerprint
from uadc.config.recipe import Recipe, load_recipe, recipe_from_dict
from uadc.config.settings import auto_applies, resolve_ptq
from uadc.config.targets import TARGETS
from uadc.core.constants import CALIBRATION_KINDS, CHECKPOINT_FILE, PARTITIONS
from uadc.core.errors import UadcError
from uadc.core.images import shown
from uadc.core.names import is_output_name
from uadc.core.scoped import quiet_third_party
from uadc.data.sources import data_fingerprint
from uadc.pipeline.sweep.spec import AXES, MAX_CELLS, MAX_COMBINATIONS, Axes, RunConfig, SweepSpec

TRAIN_SECTIONS = ("seed", "data", "model", "train")   # what a checkpoint depends on


@dataclass(frozen=True)
class Model:
    """One trained model: the recipe variant it is trained from (one training task)."""

    key: str
    name: str                   # artifact folder under the artifacts root
    cfg: dict = field(compare=False, hash=False)  # the variant recipe (absolute data paths)
    category: str | None = None   # one-class model: its category
    data: str = field(default="", compare=False, hash=False)   # its data files' names and sizes, hashed

    def recipe(self) -> Recipe:
        return recipe_from_dict(self.cfg, keep_name=True)

    def checkpoint(self, artifacts: Path) -> Path:
        """Where training writes it (``training.checkpoint.checkpoint_path``; spelled out here so a
        rerun that only reads records never imports torch; a test keeps the two equal)."""
        return self.recipe().artifact_dir(artifacts) / CHECKPOINT_FILE


@dataclass(frozen=True)
class Cell:
    id: str                     # readable: model/target[/calibrator/data/samples/partitions]
    model: str                  # Model.key
    axes: dict = field(compare=False, hash=False)     # axis values, for the table
    options: dict = field(compare=False, hash=False)  # compile options (None: the recipe's)
    artifact: str | None = field(default=None, compare=False, hash=False)  # fixed folder under the sweep's
    # out (``uadc calibrators compare``'s ``<calibrator>_<data>``); default cells/<id>-<key>

    @property
    def folder(self) -> str:
        return slug(self.id)


@dataclass
class Plan:
    name: str
    models: dict[str, Model]
    cells: list[Cell]
    run: RunConfig


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+=-]+", "_", text.replace("/", "__")).lstrip(".") or "cell"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def train_hash(recipe: Recipe) -> str:
    return recipe.section_hash(TRAIN_SECTIONS)


def cell_key(cell: Cell, model: Model, checkpoint_sha: str, run: RunConfig) -> str:
    """Content hash of a cell's inputs; equal keys mean the same result."""
    return _hash({"recipe": model.recipe().hash, "data": model.data, "checkpoint": checkpoint_sha,
                  "options": cell.options,
                  "run": {"evaluate": run.evaluate, "latency_runs": run.latency_runs, "threads": run.threads},
                  "uadc": __version__, "calibrator": _calibrator_code(cell.options.get("calibrator"))})[:20]


def _calibrator_code(name: str | None) -> str | None:
    """A plug-in calibrator's code (edited since, a cached cell kept the old ranges); its name where
    it does not load here (installed on the workers only: the cell itself says why)."""
    if name is None:
        return None
    try:
        with quiet_third_party():   # a plug-in's constructor may print: not on stdout
            return fingerprint(name)
    except (ValueError, TypeError):
        return name


def make_plan(spec: SweepSpec, base: Path, name: str) -> Plan:
    pairs = []
    try:
        entries = spec.recipe_entries(base)
    except UadcError as exc:   # `recipe not found: nope.yaml` named no sweep file, as the others do
        raise UadcError(f"sweep {name}: {exc}") from None
    for entry in entries:
        try:
            original = load_recipe(entry.path)
        except UadcError as exc:   # which of its recipes: the line named a key, never the file
            named, text = shown(entry.path), str(exc)
            text = f"recipe {text}" if text.startswith(named) else text if named in text else f"recipe {named}: {text}"
            raise UadcError(f"sweep {name}: {text}") from None
        recipe = original
        for overrides, where in ((spec.overrides, f"{name}: overrides"),   # which sweep, as its other errors say
                                 (entry.overrides, f"{name}: overrides of {entry.path}")):
            if overrides:
                recipe = _override(recipe, overrides, where, base)
        pairs.append((original, recipe))
    return plan_recipes(pairs, spec.axes, spec.run, name)


def plan_recipes(pairs: list[tuple[Recipe, Recipe]], axes: Axes, run: RunConfig, name: str) -> Plan:
    """The plan of loaded recipes, each given as (as written, with the sweep's overrides)."""
    _check_names(axes, name)
    combinations = len(pairs) * math.prod(len(axes.values(a)) for a in AXES)
    if combinations > MAX_COMBINATIONS:
        raise UadcError(f"sweep {name}: {combinations} combinations of recipes and axis values (at most "
                        f"{MAX_COMBINATIONS}; at most {MAX_CELLS} distinct cells)")
    models: dict[str, Model] = {}
    cells: dict[tuple, Cell] = {}
    said: set = set()
    for original, recipe in pairs:
        _say_data_layout(recipe, said)
        for size, seed, one_class in itertools.product(*(axes.values(a) for a in ("image_size", "seed",
                                                                                   "one_class"))):
            try:   # an image size or seed the recipe refuses: named as the sweep's (it read as the recipe's own)
                variants = _models(original, recipe, size, seed, bool(one_class))
            except UadcError as exc:   # which recipe too: with several, a missing data root named none
                given = ", ".join(f"axes.{k} {v}" for k, v in (("image_size", size), ("seed", seed)) if v is not None)
                where = f"recipe {shown(original.path) if original.path else original.name}"
                raise UadcError(f"sweep {name}: {where}{', ' + given if given else ''}: {exc}") from None
            for model in variants:
                _check_same_settings(models.setdefault(model.key, model), model, name)
                for cell in _cells(axes, model, {"image_size": size, "seed": seed, "one_class": bool(one_class)}):
                    cells.setdefault((cell.model, json.dumps(cell.options, sort_keys=True)), cell)
                    if len(cells) > MAX_CELLS:
                        raise UadcError(f"sweep {name}: more than {MAX_CELLS} cells")
    _check_distinct_names(models, name)
    return Plan(name, models, list(cells.values()), run)


def _check_same_settings(kept: Model, model: Model, name: str) -> None:
    """Two recipe entries that train one model (one name, one training) but differ elsewhere (compile,
    verify, deploy): the second's cells were dropped as duplicates of the first's, without a word."""
    differ = sorted(k for k in set(kept.cfg) | set(model.cfg) if kept.cfg.get(k) != model.cfg.get(k))
    if differ:
        raise UadcError(f"sweep {name}: two recipe entries train the same model {model.name!r} and differ in "
                        f"{', '.join(differ)} only, so one's cells would run the other's settings: give one its own "
                        f"name: key (it trains its own model), or sweep the setting as an axis")


def _check_distinct_names(models: dict[str, Model], name: str) -> None:
    """Two models of one name train into one folder: the second's cells ran the first's checkpoint."""
    seen: set[str] = set()
    for m in models.values():
        if m.name in seen:
            raise UadcError(f"sweep {name}: two recipes train as {m.name!r} with different settings, into one "
                            f"artifacts folder; give each its own name: key (in the recipe or its overrides)")
        seen.add(m.name)


def _check_names(axes: Axes, name: str) -> None:
    """A misspelt target, calibration source or partition (uadc's own names) is the sweep's one-line
    error before any work, not a cell that fails in every combination. A calibrator is looked up
    where its cell runs (a plug-in may be installed on the workers only), so an unknown one fails
    its cells, as do combinations that do not apply."""
    known = {"target": list(TARGETS), "calib_data": list(CALIBRATION_KINDS), "quantize": list(PARTITIONS)}
    for axis, allowed in known.items():
        for value in axes.values(axis):
            for v in (value if isinstance(value, list) else [value]):
                if v is not None and v not in allowed:
                    raise UadcError(f"sweep {name}: axes.{axis}: unknown {axis} {v!r}; expected one of "
                                    f"{', '.join(allowed)}")


def _override(recipe: Recipe, overrides: dict, where: str, base: Path) -> Recipe:
    """The recipe with a sweep file's overrides (their relative paths from ``base``, the sweep file's
    folder: they read another folder's data); an error names them (it read as the recipe's own)."""
    if not isinstance(overrides, dict):
        raise UadcError(f"sweep {where}: expected {{section: {{key: value}}}}")
    dotted = next((k for k in overrides if isinstance(k, str) and "." in k), None)
    if dotted:   # `compile.calib_samples: 8` said "unknown key" of a key that exists
        section, _, key = dotted.partition(".")
        raise UadcError(f"sweep {where}: {dotted!r}: write it nested, {{{section}: {{{key}: ...}}}}")
    try:
        return recipe.with_overrides(relative_to=base, **overrides)
    except UadcError as exc:
        raise UadcError(f"sweep {where}: {exc}") from None


def _say_data_layout(recipe: Recipe, said: set) -> None:
    """The recipe's category folders laid out otherwise, named here, in the sweep's own process (once a data
    root: ``said``): Ray's cells say it where no terminal reads it, one-class cells list no data root at all."""
    from uadc.data.sources import resolve_sources
    sources = [s.model_dump() for s in recipe.data.sources if str(s.root) not in said]
    said.update(str(s["root"]) for s in sources)
    try:
        resolve_sources(sources, warn=True)
    except UadcError:   # missing data: its cells fail and say why
        pass


def _models(original: Recipe, recipe: Recipe, size: int | None, seed: int | None, one_class: bool) -> list[Model]:
    """The variant(s) trained for one (image size, seed, one-class) point; readable names."""
    parts = []
    if train_hash(recipe) != train_hash(original):
        parts.append(train_hash(recipe)[:8])   # overrides that change training get their own folder
    if size is not None and size != recipe.data.image_size:
        recipe = recipe.with_overrides(data={"image_size": size})
        parts.append(f"{size}px")
    if seed is not None and seed != recipe.seed:
        recipe = recipe.with_overrides(seed=seed)
        parts.append(f"seed{seed}")
    name = _variant_name("-".join([recipe.name, *parts]), "the model of these axis values")
    variants = [(recipe.with_overrides(name=name) if parts else recipe, None)]
    if one_class:
        from uadc.data.sources import resolve_sources
        variants = [(_one_category(recipe, root, cat, _variant_name(f"{name}-oc-{cat}", f"the one-class model of "
                                                                    f"{cat[:60]!r}", " or the category's folder")), cat)
                    for root, cat in resolve_sources([s.model_dump() for s in recipe.data.sources])]
    return [Model(_hash([r.name, train_hash(r)])[:16], r.name, r.cfg, cat, data_fingerprint(r)) for r, cat in variants]


def _variant_name(name: str, what: str, or_: str = "") -> str:
    """A model name the sweep makes (`tiny-64px`, `tiny-oc-<category>`), checked as a recipe's own; the
    error says what made it (it blamed the recipe's `name:`, which `uadc train --one-class` had taken)."""
    if is_output_name(name):
        return name
    size = len(os.fsencode(name))
    shown_name = f"{name[:60]!r}..." if len(name) > 60 else repr(name)
    if is_output_name(name, max_bytes=size):   # plain but long
        raise UadcError(f"{what} trains as {shown_name}, {size} bytes, and a model's folder name takes at most 128: "
                        f"shorten the recipe's name{or_}")
    raise UadcError(f"{what} trains as {shown_name}, no plain folder name (no space at either end, no control "
                    f"character); rename{or_ or ' the recipe'}")


def _one_category(recipe: Recipe, root: Path, category: str, name: str) -> Recipe:
    """The recipe narrowed to one category: its training is that category's one-class model."""
    val = [v.model_dump() for v in recipe.data.val or [] if v.category == category] or None
    return recipe.with_overrides(name=name, data={"sources": [{"root": str(root), "categories": [category]}],
                                                  "val": val})


def _cells(grid: Axes, model: Model, fixed: dict) -> list[Cell]:
    recipe = model.recipe()
    out = []
    names = ("target", "calibrator", "calib_data", "calib_samples", "quantize", "precision")
    for values in itertools.product(*(grid.values(a) for a in names)):
        opts = dict(zip(names, values))
        opts["target"] = opts["target"] or recipe.compile.target
        target = TARGETS.get(opts["target"])
        if target is not None and not target.quantized:
            opts.update(calibrator=None, calib_data=None, calib_samples=None, quantize=None, precision="target")
        elif target is not None:
            try:  # the recipe's defaults filled in, so equal settings are one cell
                explicit = opts["precision"] is not None
                auto = auto_applies(opts["precision"] if explicit else recipe.compile.precision, target, explicit)
                ptq = resolve_ptq(recipe, target, opts["calibrator"], opts["calib_data"], opts["calib_samples"],
                                  opts["quantize"])
                opts.update(calibrator=ptq.calibrator, calib_data=ptq.calib_data, calib_samples=ptq.calib_samples,
                            precision="auto" if auto else "target")
                if not auto:  # auto: quantize names the candidates (None: every partition)
                    opts["quantize"] = list(ptq.quantize)
            except UadcError:
                pass   # left as given: the cell fails with this error, the others run
        cid = f"{model.name}/{opts['target']}"
        if opts["calibrator"] is not None:
            cid += f"/{opts['calibrator']}/{opts['calib_data']}/{opts['calib_samples']}/" \
                   f"{'+'.join(opts['quantize'] or ['all'])}" + ("/auto" if opts["precision"] == "auto" else "")
        axes = {**fixed, "category": model.category, **opts}
        out.append(Cell(cid, model.key, axes, opts))
    return out
