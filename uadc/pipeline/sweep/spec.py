"""Sweep files: which recipes (plus overrides) to compile over which axes, and how to run a cell.

A sweep file is YAML, validated here with the same strictness as recipes::

    name: default_grid
    recipe: ../recipes/stfpm_effnet_lite0.yaml      # or  recipes: [a.yaml, {path: b.yaml, overrides: {...}}]
    overrides: {compile: {calib_samples: 32}}       # applied to every recipe (before the axes)
    axes:                                           # every axis is optional (omitted: the recipe's value)
      target: [ort-cpu-fp32, ort-cpu-int8]
      calibrator: [minmax, entropy, mse, percentile]
      calib_data: [train, random-normal, mixed]
      calib_samples: [32, 64]
      quantize: [[student], [student, teacher]]
      precision: [target, auto]                     # auto: quantize lists the candidates (null: all)
      image_size: [128]
      seed: [0]
      one_class: [false]
    run: {evaluate: true, latency_runs: 30, threads: 1}

Cells are the cartesian product of the axes; for a float target the calibration axes do not
apply, so its cells collapse into one. Relative recipe paths resolve against the sweep file; a plain
name that is no file there is a built-in recipe (``demo``), as on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from uadc.config.yaml_file import read_yaml_mapping
from uadc.config.packaged import resolve_recipe_path
from uadc.config.validation import first_error, listed_twice
from uadc.core.constants import MAX_THREADS
from uadc.core.errors import UadcError
from uadc.core.images import shown
from uadc.core.names import is_output_name

MAX_SWEEP_BYTES = 1 << 20
MAX_CELLS = 10_000
# combinations of the axes planned (a float target folds its calibration axes into one cell each): past
# this, planning alone ran for minutes before any cell limit was reached
MAX_COMBINATIONS = 100_000


class _Strict(BaseModel):   # as strict as a recipe: `seed: [true]` was seed 1, `evaluate: "off"` False
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_Name = Annotated[str, Field(min_length=1)]


class RecipeEntry(_Strict):
    path: str = Field(min_length=1, description="recipe YAML, relative to the sweep file, or a built-in recipe's name")
    overrides: dict[str, Any] = Field(default_factory=dict, description="{section: {key: value}} for this recipe")


class Axes(_Strict):
    """Each axis: a list of values; a ``null`` value (or an omitted axis) is the recipe's own, except
    ``one_class``: true or false, as a recipe has no such setting (omitted: the unified model)."""

    target: Optional[list[Optional[_Name]]] = Field(None, min_length=1)   # "": null (the recipe's), unsaid
    calibrator: Optional[list[Optional[_Name]]] = Field(None, min_length=1)
    calib_data: Optional[list[Optional[_Name]]] = Field(None, min_length=1)
    calib_samples: Optional[list[Optional[Annotated[int, Field(ge=1, le=4096)]]]] = Field(None, min_length=1)
    quantize: Optional[list[Optional[Annotated[list[_Name], Field(min_length=1)]]]] = Field(None, min_length=1)
    precision: Optional[list[Optional[Literal["target", "auto"]]]] = Field(None, min_length=1)
    image_size: Optional[list[Optional[int]]] = Field(None, min_length=1)
    seed: Optional[list[Optional[int]]] = Field(None, min_length=1)
    one_class: Optional[list[bool]] = Field(None, min_length=1)

    @model_validator(mode="after")
    def _no_value_twice(self) -> "Axes":
        for name in type(self).model_fields:
            twice = listed_twice(name, getattr(self, name) or [])
            if twice:
                raise ValueError(twice)
        for i, partitions in enumerate(self.quantize or []):   # one entry's partition twice: a failed cell after the work
            twice = listed_twice(f"quantize[{i}]", partitions or [])
            if twice:
                raise ValueError(twice)
        # [student, teacher] and [teacher, student] are one setting: the same cell compiled and listed twice
        twice = listed_twice("quantize", [sorted(q) if q else q for q in self.quantize or []])
        if twice:
            raise ValueError(f"{twice} (the same partitions in another order)")
        return self

    def values(self, name: str) -> list:
        """An omitted axis is one value: ``None`` (the recipe's own setting)."""
        v = getattr(self, name)
        return list(v) if v else [None]


AXES = tuple(Axes.model_fields)


class RunConfig(_Strict):
    evaluate: bool = Field(True, description="AD metrics per cell (AUROC and drop vs FP32)")
    latency_runs: int = Field(30, ge=1, le=10_000, description="batch-1 latency runs per cell")
    threads: int = Field(1, ge=1, le=MAX_THREADS, description="ORT/torch threads of one cell (its declared CPUs)")
    train: bool = Field(True, description="train a model whose checkpoint is missing (else: the cell fails)")
    train_cpus: Optional[int] = Field(None, ge=1, le=1024, description="CPUs a training task declares "
                                      "(default: all the cluster's, at most recipe train.threads)")
    gpus: float = Field(0, ge=0, le=64, description="GPUs each cell declares (TensorRT engines)")
    max_retries: int = Field(2, ge=0, le=20, description="retries of a cell whose worker died")


class SweepSpec(_Strict):
    name: Optional[str] = Field(None, min_length=1, description="output folder name (default: the sweep file's stem)")
    recipe: Optional[str] = Field(None, min_length=1)   # "" was the sweep file's folder: "a folder, not a YAML file"
    recipes: Optional[list[RecipeEntry | Annotated[str, Field(min_length=1)]]] = Field(None, min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict)
    axes: Axes = Axes()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _one_recipe_key(self) -> "SweepSpec":
        if (self.recipe is None) == (self.recipes is None):
            raise ValueError("give exactly one of 'recipe' or 'recipes'")
        return self

    def recipe_entries(self, base: Path) -> list[RecipeEntry]:
        raw = [self.recipe] if self.recipe is not None else list(self.recipes or [])
        out = []
        for e in raw:
            e = RecipeEntry(path=e) if isinstance(e, str) else e
            path = resolve_recipe_path(e.path, base)       # a file beside the sweep file, or a built-in name
            entry = RecipeEntry(path=str(path.resolve()), overrides=e.overrides)
            if entry in out:   # merged into one cell silently, while an axis value given twice is an error
                raise UadcError(f"recipes: {e.path} is listed twice (with the same overrides)")
            out.append(entry)
        return out


def load_sweep(source: "str | Path | dict | SweepSpec") -> tuple[SweepSpec, Path, str]:
    """(spec, base folder for relative paths, sweep name) from a YAML file, a dict or a spec."""
    if isinstance(source, (SweepSpec, dict)):
        spec, base, where, stem = (source if isinstance(source, SweepSpec) else _validate(source, "sweep"),
                                   Path.cwd(), "sweep", "sweep")
    else:
        path = Path(source)
        where = shown(path)   # a newline in its name is \x0a, as elsewhere (it read as a space)
        spec = _validate(read_yaml_mapping(path, "sweep file", MAX_SWEEP_BYTES), where)
        base, stem = path.resolve().parent, path.stem
    name = spec.name or stem   # the folder under <artifacts>/sweeps/: a newline in it broke every listing
    if not is_output_name(name):
        raise UadcError(f"{where}: name {name!r} is not a plain folder name (no '/', '..', leading '.', space at "
                        f"either end or control character, valid UTF-8, at most 128 bytes)")
    return spec, base, name


def _validate(raw: dict, where: str) -> SweepSpec:
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        raise UadcError(f"{where}: {first_error(exc, root='(top level)', model=SweepSpec)}") from None
