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

``tensorrt`` and Polygraphy's TensorRT parts are imported lazily: this module
imports and writes build scripts on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from uadc.backends.trt_cache import (
    atomic_write_bytes,
    parse_trt_version,
    read_calibration_cache,
    read_calibration_header,
    trt_version_code,
)
from uadc.backends.trt_rules import check_trt_rules, format_violations
from uadc.errors import UadcError

__all__ = [
    "IMAGE_INPUT",
    "BuildPlan",
    "BuildSettings",
    "build_engine",
    "compare_onnx_vs_trt",
    "plan_build",
    "run_engine",
    "trt_available",
    "trtexec_command",
    "write_build_script",
]

_LOG = logging.getLogger(__name__)

IMAGE_INPUT = "image"
PRECISIONS = ("fp32", "fp16", "int8")
MIN_TRT = (8, 4)  # IBuilderConfig.set_memory_pool_limit and trtexec --memPoolSize arrived in 8.4
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Calibrator base class per cache header name (CalibrationAlgoType).
_CALIBRATOR_BASES = {
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
    count, reason = _cuda_device_count()
    if count <= 0:
        return False, reason
    return True, f"TensorRT {trt.__version__} with {count} CUDA device(s)"


def _cuda_device_count() -> tuple[int, str]:
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


def _import_tensorrt() -> Any:
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

    def __post_init__(self) -> None:
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
        chw = _check_input_shape(input_shape)
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
    strongly = _choose_strong_typing(settings, major, calibration)
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
    network_flags = (("EXPLICIT_BATCH",) if major < 10 else ()) + (
        ("STRONGLY_TYPED",) if strongly and major < 11 else ()
    )
    return BuildPlan(
        trt_version=version,
        network_flags=network_flags,
        builder_flags=_builder_flags(settings, strongly),
        strongly_typed=strongly,
        # FP32 means IEEE FP32 math so engines match ONNX Runtime; TF32 (on by default on Ampere+) is ~1e-3 relative.
        cleared_flags=("TF32",) if settings.precision == "fp32" else (),
        calibration=calibration,
        notes=tuple(notes),
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


def _choose_strong_typing(settings: BuildSettings, major: int, calibration: bool) -> bool:
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


# --------------------------------------------------------------------------- engine build


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    settings: BuildSettings,
    *,
    input_shape: Sequence[int] | None = None,
    calib_cache: str | os.PathLike | None = None,
    validate: bool = True,
) -> Path:
    """Parse ``onnx_path`` with TensorRT's OnnxParser, build, and write the engine atomically.

    ``input_shape`` (C, H, W) is needed only when H/W are dynamic in the model.
    ``calib_cache``: implicit INT8 from a calibration cache (TensorRT 8.5/10).
    ``validate``: check Q/DQ models against TensorRT's rules before building.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = _load_onnx(onnx_path)
    has_qdq = _has_qdq(model)
    if validate and has_qdq:
        violations = check_trt_rules(model)
        if violations:
            raise UadcError(f"{onnx_path} breaks TensorRT's Q/DQ rules:\n{format_violations(violations)}")
    if calib_cache is not None:
        read_calibration_cache(calib_cache)  # fail on a malformed cache before the slow part
    trt = _import_tensorrt()
    plan = plan_build(
        settings,
        trt.__version__,
        has_qdq=has_qdq,
        fp16_model=_is_fp16_model(model),
        calibration=calib_cache is not None,
    )
    for note in plan.notes:
        _LOG.warning(note)
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_flag_mask(trt.NetworkDefinitionCreationFlag, plan.network_flags))
    parser = trt.OnnxParser(network, logger)
    _parse_onnx(parser, onnx_path)
    chw = _network_input_shape(network, settings, input_shape)
    config = builder.create_builder_config()
    # The calibrator (None unless calib_cache) must stay referenced until the build returns.
    calibrator = _configure(trt, builder, config, plan, settings, chw, calib_cache)
    serialized = builder.build_serialized_network(network, config)
    del calibrator
    if serialized is None:
        details = "\n  ".join(logger.errors[-5:]) or "(see the TensorRT log)"
        raise UadcError(f"TensorRT failed to build an engine from {onnx_path}:\n  {details}")
    if settings.timing_cache is not None:
        _save_timing_cache(config, Path(settings.timing_cache))
    atomic_write_bytes(engine_path, serialized)  # IHostMemory is a buffer
    return engine_path


def _load_onnx(path: Path) -> onnx.ModelProto:
    """The graph without external weights (TensorRT reads those itself), but with Q/DQ scales/zero points."""
    if not path.is_file():
        raise UadcError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        _load_qdq_params(model, path.parent)
    except Exception as exc:
        raise UadcError(f"cannot read ONNX model {path}: {exc}") from exc
    return model


def _load_qdq_params(model: onnx.ModelProto, base_dir: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_tensor

    qdq_nodes = [node for node in model.graph.node if node.op_type in _QDQ_OPS]
    names = {name for node in qdq_nodes for name in node.input[1:3]}
    for init in model.graph.initializer:
        if init.name in names and init.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(init, str(base_dir))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in _QDQ_OPS for node in model.graph.node)


def _is_fp16_model(model: onnx.ModelProto) -> bool:
    """FP16-typed (e.g. AutoCast) models carry FP16/BF16 weights."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(init.data_type in half for init in model.graph.initializer)


def _make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to ``logging`` and keeps errors for the exception text."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            try:  # log() is noexcept on the C++ side
                if severity in (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR):
                    self.errors.append(msg)
                    _LOG.error("TensorRT: %s", msg)
                elif severity == trt.Logger.WARNING:
                    _LOG.warning("TensorRT: %s", msg)
                else:
                    _LOG.debug("TensorRT: %s", msg)
            except Exception:
                pass

    return _Logger()


def _flag_mask(enum: Any, names: Sequence[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << int(getattr(enum, name))
    return mask


def _parse_onnx(parser: Any, onnx_path: Path) -> None:
    # parse_from_file resolves external weight files relative to the model.
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    listing = "\n  ".join(errors) or "(no parser error recorded; see the TensorRT log)"
    raise UadcError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  {listing}")


def _describe_parser_error(error: Any) -> str:
    def call(name: str) -> Any:
        method = getattr(error, name, None)
        try:
            return method() if callable(method) else None
        except Exception:
            return None

    name, op, index = call("node_name"), call("node_operator"), call("node")  # node_name/operator: TRT >= 8.6
    where = f"node '{name}'" if name else (f"node #{index}" if isinstance(index, int) and index >= 0 else "model")
    if op:
        where += f" ({op})"
    return f"{where}: {call('desc') or error} [{call('code')}]"


def _network_input_shape(network: Any, settings: BuildSettings, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if IMAGE_INPUT not in inputs:
        raise UadcError(f"the model has no input named '{IMAGE_INPUT}' (inputs: {', '.join(inputs) or 'none'})")
    others = [name for name, tensor in inputs.items() if name != IMAGE_INPUT and any(d < 0 for d in tensor.shape)]
    if others:
        raise UadcError(f"only '{IMAGE_INPUT}' may have dynamic dimensions; also dynamic: {', '.join(others)}")
    dims = tuple(inputs[IMAGE_INPUT].shape)
    if len(dims) != 4:
        raise UadcError(f"'{IMAGE_INPUT}' must be 4-D (N, C, H, W), the model has shape {dims}")
    if dims[0] >= 0 and not settings.min_batch == settings.max_batch == dims[0]:
        raise UadcError(
            f"the model has a fixed batch of {dims[0]}: re-export it with a dynamic batch, or set "
            f"min_batch = opt_batch = max_batch = {dims[0]}"
        )
    return _merge_chw(dims[1:], input_shape)


def _merge_chw(model_chw: Sequence[int], input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        if any(d < 0 for d in model_chw):
            raise UadcError(f"'{IMAGE_INPUT}' has dynamic C/H/W {tuple(model_chw)}: pass input_shape=(C, H, W)")
        return tuple(int(d) for d in model_chw)
    chw = _check_input_shape(input_shape)
    for got, want in zip(chw, model_chw):
        if want >= 0 and got != want:
            raise UadcError(f"input_shape {chw} does not match the model's (C, H, W) {tuple(model_chw)}")
    return chw


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        raise UadcError(f"input_shape must be (C, H, W) with positive integers, got {input_shape!r}")
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


def _configure(
    trt: Any,
    builder: Any,
    config: Any,
    plan: BuildPlan,
    settings: BuildSettings,
    chw: tuple[int, ...],
    calib_cache: str | os.PathLike | None,
) -> Any:
    """Apply memory, flags, profile, timing cache, DLA and calibrator; returns the calibrator (or None)."""
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = settings.builder_optimization_level
    shapes = settings.batch_shapes(chw)
    profile = builder.create_optimization_profile()
    profile.set_shape(IMAGE_INPUT, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    if settings.timing_cache is not None:
        _load_timing_cache(config, Path(settings.timing_cache))
    if settings.dla_core is not None:
        _configure_dla(trt, builder, config, settings.dla_core)
    if not plan.calibration:
        return None
    calibrator = _cache_calibrator(trt, Path(calib_cache), plan)  # type: ignore[arg-type]
    # Dynamic shapes need a calibration profile; TensorRT calibrates at one fixed shape (like trtexec --optShapesCalib).
    calib_profile = builder.create_optimization_profile()
    calib_profile.set_shape(IMAGE_INPUT, shapes["opt"], shapes["opt"], shapes["opt"])
    config.set_calibration_profile(calib_profile)
    config.int8_calibrator = calibrator
    return calibrator


def _configure_dla(trt: Any, builder: Any, config: Any, core: int) -> None:
    available = builder.num_DLA_cores
    if core >= available:
        raise UadcError(f"DLA core {core} requested but this device has {available} DLA core(s)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = core


def _load_timing_cache(config: Any, path: Path) -> None:
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU or TensorRT version is rejected; start a fresh one.
        _LOG.warning("timing cache %s does not match this GPU/TensorRT; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    atomic_write_bytes(path, cache.serialize())


def _cache_calibrator(trt: Any, cache_path: Path, plan: BuildPlan) -> Any:
    """An IInt8 calibrator that only replays ``cache_path``; TensorRT then never asks for batches."""
    code, algorithm = read_calibration_header(cache_path)
    base_name = _CALIBRATOR_BASES.get(algorithm)
    if base_name is None:
        raise UadcError(
            f"{cache_path}: calibrator {algorithm!r} is not supported; use EntropyCalibration2 or MinMaxCalibration"
        )
    expected = trt_version_code(".".join(str(p) for p in plan.trt_version))
    if code != expected:
        _LOG.warning("calibration cache %s was written for TensorRT code %s, this is %s", cache_path, code, expected)
    blob = cache_path.read_bytes()
    base = getattr(trt, base_name)

    class _CacheOnlyCalibrator(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list[str]) -> None:
            return None  # no data: a cache TensorRT rejects makes the build fail loudly

        def read_calibration_cache(self) -> bytes:
            return blob

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    return _CacheOnlyCalibrator()


# --------------------------------------------------------------------------- trtexec and device bundle


def trtexec_command(
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    engine_name: str = "model.engine",
    calib_cache: str | None = None,
    trt_version: str = "8.5",
    fp16_model: bool = False,
) -> str:
    """The ``trtexec`` command line that builds the same engine on a device with ``trt_version``.

    Without ``calib_cache`` an INT8 build assumes the model carries Q/DQ nodes.
    """
    args = _trtexec_args(onnx_name, settings, input_shape, engine_name, calib_cache, trt_version, fp16_model)
    return shlex.join(["trtexec", *args])


def _trtexec_args(
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    engine_name: str,
    calib_cache: str | None,
    trt_version: str,
    fp16_model: bool,
) -> list[str]:
    calibration = calib_cache is not None
    plan = plan_build(
        settings,
        trt_version,
        has_qdq=settings.precision == "int8" and not calibration,
        fp16_model=fp16_model,
        calibration=calibration,
    )
    shapes = {key: "x".join(str(d) for d in dims) for key, dims in settings.batch_shapes(input_shape).items()}
    args = [
        f"--onnx={onnx_name}",
        f"--saveEngine={engine_name}",
        f"--minShapes={IMAGE_INPUT}:{shapes['min']}",
        f"--optShapes={IMAGE_INPUT}:{shapes['opt']}",
        f"--maxShapes={IMAGE_INPUT}:{shapes['max']}",
        # poolfmt is pool:sizeInMiB in 8.4/8.5; later versions also take unit suffixes and default to MiB.
        f"--memPoolSize=workspace:{settings.workspace_mb}",
    ]
    args += [flag for name, flag in (("FP16", "--fp16"), ("INT8", "--int8")) if name in plan.builder_flags]
    if "TF32" in plan.cleared_flags:
        args.append("--noTF32")
    if plan.strongly_typed and plan.major < 11:
        args.append("--stronglyTyped")  # TensorRT 11 is always strongly typed
    if calibration:
        args += [f"--calib={calib_cache}", f"--optShapesCalib={IMAGE_INPUT}:{shapes['opt']}"]
    if settings.dla_core is not None:
        args.append(f"--useDLACore={settings.dla_core}")
        if "GPU_FALLBACK" in plan.builder_flags:
            args.append("--allowGPUFallback")
    if settings.timing_cache is not None:
        args.append(f"--timingCacheFile={settings.timing_cache}")
    if settings.builder_optimization_level is not None:
        args.append(f"--builderOptimizationLevel={settings.builder_optimization_level}")
    return args


def write_build_script(
    out_dir: str | os.PathLike,
    onnx_name: str,
    settings: BuildSettings,
    input_shape: Sequence[int],
    calib_cache: str | None = None,
    min_trt_version: str = "8.5",
    engine_name: str = "model.engine",
    precision_note: str | None = None,
) -> Path:
    """Write ``build_engine.sh`` and a device ``README.md`` into ``out_dir``; returns the script path.

    The script reads the TensorRT version from trtexec on the device and runs
    the command for that major version (8.x, 10.x or 11+), refusing versions
    below ``min_trt_version``. ``onnx_name`` and ``calib_cache`` are paths
    relative to ``out_dir``. ``precision_note`` is added to the README's
    precision section (e.g. the measured accuracy impact).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chw = _check_input_shape(input_shape)
    min_version = parse_trt_version(min_trt_version)
    if min_version[:2] < MIN_TRT:
        raise UadcError(f"min_trt_version {min_trt_version} is too old; uadc needs TensorRT >= 8.4")
    model = _bundle_model(out_dir / onnx_name)
    if model is not None and settings.precision == "int8" and calib_cache is None and not _has_qdq(model):
        # trtexec --int8 without Q/DQ or a cache silently uses placeholder ranges (for benchmarking only).
        raise UadcError(f"{onnx_name} has no Q/DQ nodes: INT8 needs a Q/DQ model or a calibration cache")
    fp16_model = model is not None and _is_fp16_model(model)
    variants = _script_variants(onnx_name, settings, chw, engine_name, calib_cache, min_trt_version, fp16_model)
    script = out_dir / "build_engine.sh"
    text = _render_script(onnx_name, engine_name, calib_cache, min_version, variants)
    atomic_write_bytes(script, text.encode("utf-8"), mode=0o777)
    readme = _render_readme(
        onnx_name, engine_name, settings, chw, calib_cache, min_trt_version, variants, precision_note
    )
    atomic_write_bytes(out_dir / "README.md", readme.encode("utf-8"))
    return script


def _bundle_model(path: Path) -> onnx.ModelProto | None:
    """The bundle's ONNX graph when it is already there (checks need it; the script can be written first)."""
    if not path.is_file():
        return None
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:
        return None


def _script_variants(
    onnx_name: str,
    settings: BuildSettings,
    chw: tuple[int, ...],
    engine_name: str,
    calib_cache: str | None,
    min_trt_version: str,
    fp16_model: bool,
) -> dict[int, list[str] | str]:
    """trtexec arguments per TensorRT family (8: below 10, 10: 10.x, 11: 11 on), or why it cannot build.

    The family containing ``min_trt_version`` must work; later families may
    refuse (e.g. TensorRT 11 and a calibration cache) and the script says why.
    """
    min_major = parse_trt_version(min_trt_version)[0]
    families = [(8, min_major < 10), (10, min_major <= 10), (11, True)]
    variants: dict[int, list[str] | str] = {}
    for family, wanted in families:
        if not wanted:
            continue
        first = not variants
        version = min_trt_version if first else f"{family}.0"
        try:
            variants[family] = _trtexec_args(onnx_name, settings, chw, engine_name, calib_cache, version, fp16_model)
        except UadcError as exc:
            if first:
                raise UadcError(f"cannot build this engine with TensorRT {min_trt_version}: {exc}") from exc
            variants[family] = str(exc)
    return variants


def _render_script(
    onnx_name: str,
    engine_name: str,
    calib_cache: str | None,
    min_version: tuple[int, int, int],
    variants: dict[int, list[str] | str],
) -> str:
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds the TensorRT engine {engine_name} from {onnx_name} on the target device (generated by uadc).",
        "# Engines only run on the GPU model and TensorRT version they were built with, so build on the device.",
        "# Usage: ./build_engine.sh [extra trtexec options]   (TRTEXEC=/path/to/trtexec overrides the lookup)",
        "set -euo pipefail",
        'cd "$(dirname "${BASH_SOURCE[0]}")"',
        "",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || true)}"',
        'if [[ -z "${TRTEXEC}" && -x /usr/src/tensorrt/bin/trtexec ]]; then',
        "    TRTEXEC=/usr/src/tensorrt/bin/trtexec  # JetPack installs trtexec here, off PATH",
        "fi",
        'if [[ -z "${TRTEXEC}" || ! -x "${TRTEXEC}" ]]; then',
        '    echo "error: trtexec not found; install TensorRT or set TRTEXEC=/path/to/trtexec" >&2',
        "    exit 1",
        "fi",
    ]
    for name in [onnx_name] + ([calib_cache] if calib_cache else []):
        lines += [
            f"if [[ ! -f {q(name)} ]]; then",
            f"    echo {q(f'error: {name} not found next to build_engine.sh')} >&2",
            "    exit 1",
            "fi",
        ]
    lines += _version_lines(min_version) + _dispatch_lines(variants) + [
        "",
        'echo "+ ${cmd[*]} $*"',
        '"${cmd[@]}" "$@"',
        f'echo {q(f"engine written to {engine_name}")}" (TensorRT ${{major}}.${{minor}}.${{patch}}; '
        'only valid on this GPU model and TensorRT version)"',
        "",
    ]
    return "\n".join(lines)


def _version_lines(min_version: tuple[int, int, int]) -> list[str]:
    min_text = f"{min_version[0]}.{min_version[1]}"
    return [
        "",
        "# trtexec's first line reads '&&&& RUNNING TensorRT.trtexec [TensorRT v8502]': NV_TENSORRT_VERSION,",
        "# major*1000+minor*100+patch up to TensorRT 8 (4 digits), major*10000+minor*100+patch later.",
        'banner="$("${TRTEXEC}" --help 2>&1 | head -n 5 || true)"',
        "code=\"$(printf '%s\\n' \"${banner}\" | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1)\"",
        'if [[ -z "${code}" ]]; then',
        '    echo "error: cannot read the TensorRT version from ${TRTEXEC} --help" >&2',
        "    exit 1",
        "fi",
        "if (( code >= 10000 )); then",
        "    major=$(( code / 10000 )); minor=$(( code / 100 % 100 )); patch=$(( code % 100 ))",
        "else",
        "    major=$(( code / 1000 )); minor=$(( code / 100 % 10 )); patch=$(( code % 100 ))",
        "fi",
        'echo "TensorRT version: ${major}.${minor}.${patch} (${TRTEXEC})"',
        f"if (( major * 100 + minor < {min_version[0] * 100 + min_version[1]} )); then",
        f'    echo "error: this bundle needs TensorRT >= {min_text}" >&2',
        "    exit 1",
        "fi",
        "",
    ]


def _dispatch_lines(variants: dict[int, list[str] | str]) -> list[str]:
    families = sorted(variants, reverse=True)  # 11, 10, 8: newest first, the oldest is the fallback
    lines = []
    for position, major in enumerate(families):
        if position == 0:
            lines.append(f"if (( major >= {major} )); then" if len(families) > 1 else "if true; then")
        elif position < len(families) - 1:
            lines.append(f"elif (( major >= {major} )); then")
        else:
            lines.append("else")
        variant = variants[major]
        if isinstance(variant, str):
            message = f"error: TensorRT {major}.x cannot build this engine: {variant}"
            lines += [f"    echo {shlex.quote(message)} >&2", "    exit 3"]
        else:
            lines.append('    cmd=("${TRTEXEC}" ' + " ".join(shlex.quote(a) for a in variant) + ")")
    lines.append("fi")
    return lines


def _render_readme(
    onnx_name: str,
    engine_name: str,
    settings: BuildSettings,
    chw: tuple[int, ...],
    calib_cache: str | None,
    min_trt_version: str,
    variants: dict[int, list[str] | str],
    precision_note: str | None,
) -> str:
    shapes = settings.batch_shapes(chw)
    opt = "x".join(str(d) for d in shapes["opt"])
    commands = []
    for major in sorted(variants):
        variant = variants[major]
        label = "TensorRT 8.x" if major == 8 else f"TensorRT {major}.x" + (" and later" if major == 11 else "")
        body = f"not possible: {variant}" if isinstance(variant, str) else f"`{shlex.join(['trtexec', *variant])}`"
        commands.append(f"- {label}: {body}")
    sections = [
        "# TensorRT engine for the anomaly detector",
        "",
        f"Files: `{onnx_name}` (the model), `build_engine.sh` (builds `{engine_name}`)"
        + (f", `{calib_cache}` (INT8 calibration cache)" if calib_cache else "")
        + ".",
        "",
        "## Build on the device",
        "",
        "```bash",
        "./build_engine.sh            # extra trtexec options are passed through, e.g. --verbose",
        "```",
        "",
        f"The script finds `trtexec` (PATH, then `/usr/src/tensorrt/bin/trtexec` as on JetPack), prints the "
        f"TensorRT version, refuses TensorRT older than {min_trt_version}, and runs the command for that version:",
        "",
        *commands,
        "",
        "## Run",
        "",
        f"Input `{IMAGE_INPUT}`: float32 (N, {chw[0]}, {chw[1]}, {chw[2]}), preprocessed exactly as for the ONNX "
        "model, "
        f"with {settings.min_batch} <= N <= {settings.max_batch} (fastest at N = {settings.opt_batch}). "
        "Outputs: `anomaly_map` (N, 1, H, W) and `score` (N).",
        "",
        "```bash",
        f"trtexec --loadEngine={engine_name} --shapes={IMAGE_INPUT}:{opt}   # latency/throughput benchmark",
        "```",
        "",
        "```python",
        "from polygraphy.backend.common import BytesFromPath",
        "from polygraphy.backend.trt import EngineFromBytes, TrtRunner",
        "",
        f'with TrtRunner(EngineFromBytes(BytesFromPath("{engine_name}"))) as runner:',
        f'    out = runner.infer({{"{IMAGE_INPUT}": images}})  # images: np.float32 array',
        '    anomaly_map, score = out["anomaly_map"], out["score"]',
        "```",
        "",
        "## Precision",
        "",
        _precision_text(settings, calib_cache),
    ]
    if precision_note:
        sections += ["", precision_note]
    sections += [
        "",
        "## Engines are not portable",
        "",
        f"`{engine_name}` only runs on the GPU model (compute capability; on Jetson the module, e.g. Orin NX vs "
        "AGX Orin) and the exact TensorRT version it was built with. Build it on the device itself, and rebuild "
        "after a JetPack or TensorRT upgrade; do not copy engines between machines. The ONNX model is the "
        "portable artifact.",
    ]
    if settings.timing_cache is not None:
        sections += [
            "",
            f"`{settings.timing_cache}` caches kernel timings so rebuilds on the same device are faster; it is "
            "tied to the device and TensorRT version in the same way.",
        ]
    return "\n".join(sections) + "\n"


def _precision_text(settings: BuildSettings, calib_cache: str | None) -> str:
    texts = {
        "fp32": "FP32: full IEEE FP32 math (TF32 switched off with `--noTF32`), the accuracy reference; slowest.",
        "fp16": "FP16: about twice the FP32 throughput on Tensor Cores with anomaly maps close to FP32; "
        "validate scores against the ONNX model before deploying.",
        "int8": "INT8, explicit quantization: the model carries QuantizeLinear/DequantizeLinear nodes whose "
        "scales were calibrated before export, and TensorRT follows them exactly. Layers outside Q/DQ pairs "
        "keep the model's float type where the network is strongly typed (`--stronglyTyped`, TensorRT 11) "
        "and may run in FP16 where `--fp16` is set.",
    }
    text = texts[settings.precision]
    if calib_cache:
        text = (
            f"INT8, implicit quantization from the calibration cache `{calib_cache}` (TensorRT 8.5 and 10.x only; "
            "TensorRT 11 removed calibration). TensorRT picks INT8 where it is faster and FP16/FP32 elsewhere."
        )
    if settings.dla_core is not None:
        fallback = "layers DLA cannot run fall back to the GPU" if settings.gpu_fallback else "no GPU fallback"
        text += f" Runs on DLA core {settings.dla_core} ({fallback}); DLA supports FP16 and INT8 only."
        if settings.min_batch != settings.max_batch:
            text += " DLA is meant for static shapes; a fixed batch (min = opt = max) keeps more layers on it."
    return text


# --------------------------------------------------------------------------- running and comparing


def run_engine(engine_path: str | os.PathLike, images: np.ndarray, batch_size: int = 1) -> dict[str, np.ndarray]:
    """Run ``images`` (N, C, H, W) through the engine in batches; returns outputs concatenated over N.

    The last partial batch is padded with copies of its last image (and the
    padding dropped) so engines with a fixed batch also work.
    """
    images = _check_images(images)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UadcError(f"batch_size must be a positive integer, got {batch_size!r}")
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    collected: dict[str, list[np.ndarray]] = {}
    with TrtRunner(EngineFromBytes(BytesFromPath(str(_existing(engine_path)))), name="tensorrt") as runner:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            real = len(chunk)
            if real < batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
            outputs = runner.infer({IMAGE_INPUT: np.ascontiguousarray(chunk)})
            for name, value in outputs.items():
                collected.setdefault(name, []).append(np.array(value[:real], copy=True))  # runner reuses buffers
    return {name: np.concatenate(parts, axis=0) for name, parts in collected.items()}


def compare_onnx_vs_trt(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    feeds: list[dict[str, np.ndarray]],
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict:
    """Run the same feeds through ONNX Runtime (CPU) and the engine with Polygraphy's Comparator.

    Returns :func:`uadc.verify.compare`'s dict (pass flag, per-output max/mean absolute error).
    """
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runners = [
        OnnxrtRunner(SessionFromOnnx(str(_existing(onnx_path)), providers=["cpu"]), name="onnxruntime"),
        TrtRunner(EngineFromBytes(BytesFromPath(str(_existing(engine_path)))), name="tensorrt"),
    ]
    from uadc.verify import compare
    return compare(runners, feeds, atol, rtol)


def _check_images(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images)
    if array.ndim != 4 or len(array) == 0:
        raise UadcError(f"images must be a non-empty (N, C, H, W) array, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UadcError(f"file not found: {path}")
    return path
