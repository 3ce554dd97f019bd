"""TensorRT backend: engine builder, ``trtexec`` build scripts, runner and ORT comparison.

Targets TensorRT 8.5 (JetPack 5), 10.x (JetPack 6, desktop) and 11. What changes
between them (TensorRT Python API docs and the 10.x -> 11.x migration guide):

- 8.x: networks need ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH``; precision
  comes from ``BuilderFlag.FP16`` / ``BuilderFlag.INT8`` (weak typing); INT8 is
  either explicit (Q/DQ nodes in the ONNX) or implicit (a calibrator; here one
  that only replays a calibration cache).
- 10.x: EXPLICIT_BATCH is deprecated and ignored (always explicit batch);
  ``STRONGLY_TYPED`` networks take every tensor type from the model, so the
  precision flags must not be set; the INT8 flag still works for Q/DQ models;
  implicit calibration (``IInt8*Calibrator``) is deprecated since 10.1.
- 11: ``BuilderFlag.FP16/INT8``, ``int8_calibrator`` and the calibration
  profile are removed; networks are always strongly typed. INT8 needs Q/DQ
  nodes, FP16 needs an FP16-typed model.

``strongly_typed=None`` (auto) picks: always on TensorRT >= 11; on 10.x for
INT8 models with Q/DQ nodes on the GPU, following NVIDIA's advice to use
explicit quantization with strong typing, so TensorRT keeps exactly the
quantization the model was calibrated with; weak typing otherwise (FP16 flag,
DLA targets, which cannot run the FP32 layers a strongly typed FP32 Q/DQ model
keeps, and everything on 8.x). With strong typing the layers between Q/DQ pairs
run in the model's float type (FP32 for an FP32 export); set
``strongly_typed=False`` on 10.x to let TensorRT pick FP16 for them instead.
A precision auto build (``fp32_layers`` set) is strongly typed on 10.x and 11 when its model
types the chosen FP16 layers (``uadc.passes.simulate.type_fp16``), so TensorRT runs exactly the
chosen assignment; on 8.x and DLA it is weakly typed with those layers' precisions obeyed.

``tensorrt`` and Polygraphy's TensorRT parts are imported lazily: this module
imports and writes build scripts on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from uadc.backends.tensorrt.cache import (
    parse_trt_version,
)
from uadc.core.constants import INPUT_NAME
from uadc.core.errors import UadcError


LOG = logging.getLogger(__name__)

IMAGE_INPUT = INPUT_NAME
PRECISIONS = ("fp32", "fp16", "int8")
MIN_TRT = (8, 4)  # IBuilderConfig.set_memory_pool_limit and trtexec --memPoolSize arrived in 8.4
# Calibrator base class per cache header name (CalibrationAlgoType).
CALIBRATOR_BASES = {
    "EntropyCalibration2": "IInt8EntropyCalibrator2",
    "EntropyCalibration": "IInt8EntropyCalibrator",
    "MinMaxCalibration": "IInt8MinMaxCalibrator",
}


# --------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=1)
def trt_available() -> tuple[bool, str]:
    """Whether engines can be built here, and why not (or what was found)."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError when libnvinfer is missing
        return False, f"tensorrt not importable: {exc}"
    if not isinstance(getattr(trt, "__version__", None), str):   # an empty tensorrt/ folder on the path imports
        where = next(iter(getattr(trt, "__path__", [])), "?")
        return False, f"tensorrt imports from {where} but is no TensorRT (no __version__)"
    count, reason = cuda_device_count()
    if count <= 0:
        return False, reason
    return True, f"TensorRT {trt.__version__} with {count} CUDA device(s)"


def cuda_device_count() -> tuple[int, str]:
    """Ask the CUDA driver directly (ctypes), so no CUDA Python package is needed."""
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no CUDA GPU visible: CUDA driver library (libcuda) not found"
    status = lib.cuInit(0)
    if status != 0:
        return 0, f"no CUDA GPU visible: cuInit failed with CUresult {status}"
    count = ctypes.c_int(0)
    status = lib.cuDeviceGetCount(ctypes.byref(count))
    if status != 0 or count.value == 0:
        return 0, "no CUDA GPU visible"
    return count.value, ""


def import_tensorrt() -> Any:
    ok, reason = trt_available()
    if not ok:
        raise UadcError(f"cannot build TensorRT engines here ({reason}); use write_build_script() for the device")
    import tensorrt as trt

    return trt


# --------------------------------------------------------------------------- settings and plan


@dataclass
class BuildSettings:
    """How to build an engine for the ``image`` input (N, C, H, W) with a dynamic batch.

    ``strongly_typed``: None = auto (see module docstring), True/False to force.
    ``int8_fp16_fallback``: with weak typing, also enable FP16 so layers outside
    Q/DQ pairs (or not calibrated) may run in FP16 instead of FP32.
    ``timing_cache``: file loaded before and saved after the build (speeds up
    rebuilds on the same GPU/TensorRT); relative to the bundle in build scripts.
    ``precision="fp32"`` also switches TF32 off, so the engine matches ONNX Runtime.
    ``fp32_layers``: a mixed-precision build (``precision: auto``): INT8 from the Q/DQ nodes, these
    layers FP32 and every other float layer FP16. With an FP16-typed model on TensorRT >= 10 (not
    DLA) the build is strongly typed and the model's types say it; otherwise weak typing with these
    layer precisions obeyed (an FP32-typed model on TensorRT 11 runs its FP16 choices in FP32).
    ``model_typed``: with ``fp32_layers``, the model types the whole assignment (precision auto's shipped
    model: its FP16 layers FP16-typed, so an FP32-typed one has none): strongly typed from TensorRT 10 on
    too, which runs it exactly, where layer pins name ONNX nodes that TensorRT may split into several layers.
    """

    precision: str = "fp32"
    workspace_mb: int = 1024
    dla_core: int | None = None
    gpu_fallback: bool = True
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 8
    timing_cache: str | os.PathLike | None = None
    strongly_typed: bool | None = None
    builder_optimization_level: int | None = None
    int8_fp16_fallback: bool = True
    fp32_layers: tuple[str, ...] | None = None
    model_typed: bool = False

    def __post_init__(self) -> None:
        if self.fp32_layers is not None:
            _check_layer_names(self)
        if self.precision not in PRECISIONS:
            raise UadcError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.workspace_mb, int) or self.workspace_mb <= 0:
            raise UadcError(f"workspace_mb must be a positive integer (MiB), got {self.workspace_mb!r}")
        if self.dla_core is not None and (not isinstance(self.dla_core, int) or self.dla_core < 0):
            raise UadcError(f"dla_core must be None or a DLA core index >= 0, got {self.dla_core!r}")
        if self.dla_core is not None and self.precision == "fp32":
            raise UadcError("DLA runs only FP16 and INT8 layers; use precision='fp16' or 'int8' with dla_core")
        if not all(isinstance(b, int) for b in (self.min_batch, self.opt_batch, self.max_batch)) or not (
            1 <= self.min_batch <= self.opt_batch <= self.max_batch
        ):
            raise UadcError(
                "batch sizes must satisfy 1 <= min_batch <= opt_batch <= max_batch, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        if self.strongly_typed not in (None, True, False):
            raise UadcError(f"strongly_typed must be None (auto), True or False, got {self.strongly_typed!r}")
        level = self.builder_optimization_level
        if level is not None and (not isinstance(level, int) or not 0 <= level <= 5):
            raise UadcError(f"builder_optimization_level must be None or 0..5, got {level!r}")

    def batch_shapes(self, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """min/opt/max shapes of ``image`` for the optimization profile."""
        chw = check_input_shape(input_shape)
        return {
            "min": (self.min_batch, *chw),
            "opt": (self.opt_batch, *chw),
            "max": (self.max_batch, *chw),
        }


@dataclass(frozen=True)
class BuildPlan:
    """Version-specific decisions for one build (names of TensorRT enum members)."""

    trt_version: tuple[int, int, int]
    network_flags: tuple[str, ...]
    builder_flags: tuple[str, ...]
    strongly_typed: bool
    cleared_flags: tuple[str, ...]
    calibration: bool
    notes: tuple[str, ...] = field(default=())
    fp32_layers: tuple[str, ...] = ()   # layer precisions to set (obeyed); empty: none

    @property
    def major(self) -> int:
        return self.trt_version[0]


def plan_build(
    settings: BuildSettings,
    trt_version: str,
    *,
    has_qdq: bool,
    fp16_model: bool = False,
    calibration: bool = False,
) -> BuildPlan:
    """Decide network/builder flags for a TensorRT version; raises UadcError for impossible requests.

    ``has_qdq``: the model contains QuantizeLinear/DequantizeLinear (explicit INT8).
    ``fp16_model``: the model's weights are already FP16 (strong typing keeps them).
    ``calibration``: implicit INT8 from a calibration cache.
    """
    version = parse_trt_version(trt_version)
    major = version[0]
    if version[:2] < MIN_TRT:
        raise UadcError(f"TensorRT {trt_version} is too old; uadc needs TensorRT >= 8.4 (8.5 on JetPack 5)")
    _check_precision_request(settings, version, has_qdq, calibration)
    strongly = _choose_strong_typing(settings, major, calibration, fp16_model)
    if strongly and settings.precision == "fp16" and not fp16_model:
        raise UadcError(
            "a strongly typed network takes its precision from the model, and the model is not FP16-typed: "
            "convert it to FP16 first (e.g. TensorRT Model Optimizer AutoCast, or onnxconverter-common float16 with "
            "keep_io_types=True)"
            + ("" if major >= 11 else ", or set strongly_typed=False to use the FP16 builder flag")
        )
    notes = []
    if calibration and major >= 10:
        notes.append("implicit INT8 calibration is deprecated since TensorRT 10.1 and removed in 11; prefer Q/DQ")
    if strongly and settings.dla_core is not None:
        notes.append("strongly typed network on DLA: only layers the model types as FP16/INT8 can run on DLA")
    if settings.dla_core is not None and settings.min_batch != settings.max_batch:
        notes.append("DLA is meant for static shapes: set min_batch = opt_batch = max_batch, or layers may fall back")
    if settings.fp32_layers is not None and strongly and not fp16_model and not settings.model_typed:
        notes.append("TensorRT 11 networks are strongly typed: the layers precision auto chose FP16 run in the "
                     "model's FP32 type (slower than modelled, as accurate as FP32)")
    network_flags = (("EXPLICIT_BATCH",) if major < 10 else ()) + (
        ("STRONGLY_TYPED",) if strongly and major < 11 else ()
    )
    return BuildPlan(
        trt_version=version,
        network_flags=network_flags,
        builder_flags=_builder_flags(settings, strongly),
        strongly_typed=strongly,
        # FP32 means IEEE FP32 math so engines match ONNX Runtime; TF32 (on by default on Ampere+) is ~1e-3 relative.
        # precision auto's FP32 layers too: its fidelity was judged with them in IEEE FP32; and a strongly typed
        # INT8 engine's float layers, which the report's figures (and the bundle's README) take as FP32
        cleared_flags=("TF32",) if settings.precision == "fp32" or settings.fp32_layers is not None or
        (settings.precision == "int8" and strongly) else (),
        calibration=calibration,
        notes=tuple(notes),
        fp32_layers=tuple(settings.fp32_layers or ()) if not strongly else (),
    )


def _check_precision_request(
    settings: BuildSettings, version: tuple[int, int, int], has_qdq: bool, calibration: bool
) -> None:
    major = version[0]
    if settings.builder_optimization_level is not None and version[:2] < (8, 6):
        raise UadcError("builder_optimization_level needs TensorRT >= 8.6; drop it or target a newer TensorRT")
    if calibration:
        if settings.precision != "int8":
            raise UadcError("a calibration cache only applies to precision='int8'")
        if major >= 11:
            raise UadcError(
                "TensorRT 11 removed implicit INT8 calibration (calibration caches, IInt8Calibrator): export the "
                "model with Q/DQ nodes (explicit quantization) and build without a calibration cache"
            )
        if has_qdq:
            raise UadcError(
                "the model already has Q/DQ nodes, so TensorRT uses their scales and ignores a calibration "
                "cache; build without the cache"
            )
        if settings.strongly_typed:
            raise UadcError("strongly typed networks cannot use a calibration cache; use Q/DQ nodes instead")
    if settings.precision == "int8" and not calibration and not has_qdq:
        raise UadcError(
            "precision='int8' needs Q/DQ nodes in the model (explicit quantization) or, on TensorRT < 11, "
            "a calibration cache (implicit quantization)"
        )
    if settings.precision != "int8" and has_qdq:
        raise UadcError(
            f"the model has Q/DQ nodes (explicitly quantized) but precision is {settings.precision!r}; "
            "use precision='int8' or build the float model"
        )


def _choose_strong_typing(settings: BuildSettings, major: int, calibration: bool, fp16_model: bool) -> bool:
    if major >= 11:
        if settings.strongly_typed is False:
            raise UadcError("TensorRT 11 networks are always strongly typed; strongly_typed=False is impossible")
        return True
    if settings.strongly_typed is True:
        if major < 10:
            raise UadcError(
                "strongly typed networks need TensorRT >= 10 (NetworkDefinitionCreationFlag.STRONGLY_TYPED)"
            )
        return True
    if settings.strongly_typed is False:
        return False
    if settings.fp32_layers is not None:  # precision auto: its FP16 layers typed in the model run exactly as chosen
        typed = fp16_model or settings.model_typed
        return typed and major >= 10 and settings.dla_core is None  # else weak typing and layer precisions
    return major >= 10 and settings.precision == "int8" and not calibration and settings.dla_core is None


def _builder_flags(settings: BuildSettings, strongly: bool) -> tuple[str, ...]:
    flags = []
    if not strongly:
        if settings.precision == "fp16":
            flags.append("FP16")
        elif settings.precision == "int8":
            flags.append("INT8")
            if settings.int8_fp16_fallback or settings.dla_core is not None:
                flags.append("FP16")  # DLA cannot run FP32, so non-INT8 layers need FP16
    if settings.dla_core is not None and settings.gpu_fallback:
        flags.append("GPU_FALLBACK")
    return tuple(flags)


def _check_layer_names(settings: BuildSettings) -> None:
    if settings.precision == "fp32" or settings.strongly_typed is True:
        raise UadcError("fp32_layers (a precision auto build) needs precision 'int8' or 'fp16' and weak typing")
    bad = [n for n in settings.fp32_layers if not isinstance(n, str) or not n or any(c in n for c in ",: \n")]
    if bad:
        raise UadcError(f"fp32_layers: {bad[0]!r} is not a layer name trtexec can take (no ',', ':' or spaces)")


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise UadcError(f"input_shape must be (C, H, W) with positive integers, got {input_shape!r}")
    return tuple(int(d) for d in shape)  # type: ignore[return-value]
