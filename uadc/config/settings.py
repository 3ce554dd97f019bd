"""PTQ settings resolved in one place: explicit options over the recipe's ``compile`` section
over the target's defaults (used by compile, calibrator comparisons and QAT's PTQ start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from uadc.config.recipe import Recipe, load_recipe
from uadc.config.targets import Target
from uadc.core.constants import CALIBRATION_KINDS, PARTITIONS
from uadc.core.errors import UadcError

MAX_CALIB_SAMPLES = 4096
# Where precision auto applies: ORT's profile prices every group; the OpenVINO targets run the same
# Q/DQ ONNX and take ORT's profile as their speed model (fidelity is checked on OpenVINO itself).
AUTO_PRECISION_TARGETS = ("ort-cpu-int8", "openvino-cpu-int8", "openvino-cpu-int8-bf16")
# Only on request (--precision auto): TensorRT's speed is a model here, not a measurement (uadc.pipeline.precision_trt).
EXPLICIT_AUTO_TARGETS = ("trt-int8", "jetson-int8")


def auto_applies(mode: str, target: Target, explicit: bool, qat: bool = False) -> bool:
    """Whether a compile runs the precision search. Asked for explicitly (``--precision auto``),
    it must apply (the search refuses other targets); the recipe's ``compile.precision: auto`` is
    a default that applies to the PTQ compiles it supports, and every other target or a QAT model
    compiles at the target's precision, so one recipe serves every target."""
    if mode not in ("target", "auto"):
        raise UadcError(f"precision (--precision): {mode!r} is not one of target, auto")
    return mode == "auto" and (explicit or (target.name in AUTO_PRECISION_TARGETS and not qat))


def check_auto_without_qat(precision: str | None, qat: bool) -> None:
    """``--precision auto`` with ``--from-qat``: refused before any work (the CLI loaded the QAT model first,
    so it sent the user off to run ``uadc qat``, whose model it then refused)."""
    if precision == "auto" and qat:
        raise UadcError("precision auto picks what to quantize itself; it does not combine with --from-qat")


@dataclass(frozen=True)
class PtqSettings:
    calibrator: str
    calib_data: str
    calib_samples: int
    quantize: tuple[str, ...]
    per_channel: bool | None  # None: the target's scheme decides
    reduce_range: bool | None = None  # 7-bit weights; None: the target's scheme decides


def resolve_ptq(recipe: Recipe, target: Target, calibrator: str | None = None, calib_data: str | None = None,
                calib_samples: int | None = None, quantize: "list[str] | tuple[str, ...] | None" = None,
                per_channel: bool | None = None) -> PtqSettings:
    cfg = recipe.compile
    if quantize is not None:
        quantize = [p for p in quantize]
        if not quantize or any(not p for p in quantize):
            raise UadcError("quantize (--quantize): give one or more partitions, e.g. student or student,teacher")
        bad = [p for p in quantize if p not in PARTITIONS]
        if bad:
            raise UadcError(f"quantize (--quantize): {bad[0]!r} is not a partition ({', '.join(PARTITIONS)})")
    if calib_data is not None and calib_data not in CALIBRATION_KINDS:
        raise UadcError(f"calib_data (--calib-data): {calib_data!r} is not one of {', '.join(CALIBRATION_KINDS)}")
    if calib_samples is not None and not 1 <= calib_samples <= MAX_CALIB_SAMPLES:
        raise UadcError(f"calib_samples (--calib-samples): {calib_samples} is outside 1..{MAX_CALIB_SAMPLES}")
    data, samples = calib_data or cfg.calib_data, calib_samples or cfg.calib_samples
    if data == "mixed" and samples < 2:   # half of one image is none: it calibrated on N(0,1) alone, recorded "mixed"
        raise UadcError(f"calib_data mixed takes half training images, half N(0,1) noise: calib_samples must be at "
                        f"least 2, got {samples}")
    return PtqSettings(calibrator=calibrator or cfg.calibrator or target.default_calibrator,
                       calib_data=data, calib_samples=samples,
                       quantize=tuple(quantize or cfg.quantize),
                       per_channel=cfg.per_channel if per_channel is None else per_channel,
                       reduce_range=cfg.reduce_range)


def recipe_lines() -> list[str]:
    """`uadc recipes list`: name, what it is, and whether its data (and weights file) is found here."""
    from uadc.config.packaged import packaged_recipes
    return [f"{p.name:<24} {p.summary}  [{recipe_file_state(p.path)}]" for p in packaged_recipes()]


def recipe_file_state(path: Path) -> str:
    """What `uadc recipes list` says of a recipe file: whether its data (and weights file) is here."""
    try:
        r = load_recipe(path)
    except UadcError as exc:
        return f"needs edits: {exc}"
    missing = [f"data.sources[{i}].root" for i, s in enumerate(r.data.sources) if not Path(s.root).is_dir()]
    missing += [f"data.sources[{i}].categories ({c})" for i, s in enumerate(r.data.sources) if Path(s.root).is_dir()
                for c in s.categories or [] if not (Path(s.root) / c).is_dir()]   # "data found" with one gone
    missing += ["model.weights"] if r.model.weights and not Path(r.model.weights).is_file() else []
    return f"files missing: set {', '.join(missing)}" if missing else "data found"
