"""TensorRT engine build from an ONNX file and a BuildPlan, through Polygraphy's TensorRT loaders.

``plan_build`` decides the version-specific flags; this module only maps that plan onto
``NetworkFromOnnxPath`` / ``CreateConfig`` / ``Calibrator(cache=...)`` / ``EngineBytesFromNetwork``
and writes the engine atomically. tensorrt and Polygraphy's TensorRT parts are imported lazily."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import onnx

from uadc.backends.tensorrt.cache import cache_header, read_calibration_cache, read_calibration_header, trt_version_code
from uadc.backends.tensorrt.plan import (
    CALIBRATOR_BASES,
    IMAGE_INPUT,
    LOG,
    BuildPlan,
    BuildSettings,
    check_input_shape,
    import_tensorrt,
    plan_build,
)
from uadc.backends.tensorrt.rules import check_trt_rules, format_violations, load_qdq_params
from uadc.core.constants import QDQ_OPS
from uadc.core.errors import UadcError
from uadc.core.io import atomic_write_bytes
from uadc.core.scoped import quiet_third_party


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    settings: BuildSettings,
    *,
    input_shape: Sequence[int] | None = None,
    calib_cache: str | os.PathLike | None = None,
    validate: bool = True,
) -> Path:
    """Parse ``onnx_path``, build with the version's plan, and write the engine atomically.

    ``input_shape`` (C, H, W) is needed only when H/W are dynamic in the model.
    ``calib_cache``: implicit INT8 from a calibration cache (TensorRT 8.5/10).
    ``validate``: check Q/DQ models against TensorRT's rules before building.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if settings.timing_cache is not None and not Path(settings.timing_cache).is_absolute():   # beside the engine,
        # as build_engine.sh keeps it (it was the working folder's, whichever that was)
        settings = dataclasses.replace(settings, timing_cache=engine_path.parent / settings.timing_cache)
    model = _load_onnx(onnx_path)
    qdq = has_qdq(model)
    if validate and qdq:
        violations = check_trt_rules(model)
        if violations:
            raise UadcError(f"{onnx_path} breaks TensorRT's Q/DQ rules:\n{format_violations(violations)}")
    if calib_cache is not None:
        read_calibration_cache(calib_cache)  # fail on a malformed cache before the slow part
    trt = import_tensorrt()
    plan = plan_build(settings, trt.__version__, has_qdq=qdq, fp16_model=is_fp16_model(model),
                      calibration=calib_cache is not None)
    for note in plan.notes:
        LOG.warning(note)
    chw = _merge_chw(_onnx_chw(model, settings), input_shape)
    serialized = _build(trt, onnx_path, plan, settings, chw, calib_cache)
    atomic_write_bytes(engine_path, serialized)
    return engine_path


def _build(trt: Any, onnx_path: Path, plan: BuildPlan, settings: BuildSettings, chw: tuple[int, ...],
           calib_cache: str | os.PathLike | None) -> bytes:
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath, SetLayerPrecisions
    from polygraphy.exception import PolygraphyException

    # TensorRT 11 has no STRONGLY_TYPED flag (every network is); the plan names it only where it exists.
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed="STRONGLY_TYPED" in plan.network_flags or None)
    if plan.fp32_layers:  # precision auto: these layers FP32, the other float layers FP16
        network = SetLayerPrecisions(network, {name: trt.float32 for name in plan.fp32_layers})
    config = _create_config(trt, plan, settings, chw, calib_cache)
    timing = str(settings.timing_cache) if settings.timing_cache is not None else None
    with quiet_third_party() as log:  # Polygraphy's logger prints; keep it for the error text
        try:
            return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=timing)())
        except PolygraphyException as exc:
            tail = "\n  ".join(log.getvalue().strip().splitlines()[-5:]) or "(see the TensorRT log)"
            raise UadcError(f"TensorRT failed to build an engine from {onnx_path}: {exc}\n  {tail}") from exc


def _create_config(trt: Any, plan: BuildPlan, settings: BuildSettings, chw: tuple[int, ...],
                   calib_cache: str | os.PathLike | None) -> Any:
    from polygraphy.backend.trt import CreateConfig, PostprocessConfig, Profile

    shapes = settings.batch_shapes(chw)
    timing = settings.timing_cache
    config = CreateConfig(
        fp16="FP16" in plan.builder_flags,
        int8="INT8" in plan.builder_flags or plan.calibration,
        tf32="TF32" not in plan.cleared_flags,  # FP32 targets switch TF32 off to match ORT
        profiles=[Profile().add(IMAGE_INPUT, min=shapes["min"], opt=shapes["opt"], max=shapes["max"])],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: settings.workspace_mb << 20},
        builder_optimization_level=settings.builder_optimization_level,
        load_timing_cache=str(timing) if timing is not None and Path(timing).is_file() else None,
        calibrator=_cache_calibrator(trt, Path(calib_cache), plan) if plan.calibration else None,
        precision_constraints="obey" if plan.fp32_layers else None,
    )
    if settings.dla_core is None:
        return config
    return PostprocessConfig(config, lambda builder, network, cfg: _use_dla(trt, builder, cfg, settings, plan))


def _use_dla(trt: Any, builder: Any, config: Any, settings: BuildSettings, plan: BuildPlan) -> Any:
    available = builder.num_DLA_cores
    if settings.dla_core >= available:
        raise UadcError(f"DLA core {settings.dla_core} requested but this device has {available} DLA core(s)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = settings.dla_core
    if "GPU_FALLBACK" in plan.builder_flags:
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    return config


def _cache_calibrator(trt: Any, cache_path: Path, plan: BuildPlan) -> Any:
    """A calibrator replaying ``cache_path`` from memory (the file is never rewritten). It has no
    batches: a cache TensorRT rejects fails the build loudly instead of calibrating on nothing.

    Not Polygraphy's Calibrator: it reads a cache only from a file (an in-memory one gave TensorRT
    no cache, so every build from a cache failed)."""
    code, algorithm = read_calibration_header(cache_path)
    base_name = CALIBRATOR_BASES.get(algorithm)
    if base_name is None:
        raise UadcError(f"{cache_path}: calibrator {algorithm!r} is not supported; "
                        "use EntropyCalibration2 or MinMaxCalibration")
    version = ".".join(str(p) for p in plan.trt_version)
    data = cache_path.read_bytes()
    if code != trt_version_code(version):   # TensorRT skips a cache naming another version and calibrates on
        # nothing (build_engine.sh rewrites the header on the device the same way)
        data = cache_header(version, algorithm).encode() + b"\n" + data.partition(b"\n")[2]
    return _replay(getattr(trt, base_name), data)


def _replay(base: type, cache: bytes) -> Any:
    class CacheReplay(base):   # TensorRT's calibrator interface
        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: list, *args: Any) -> None:
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheReplay()


def _load_onnx(path: Path) -> onnx.ModelProto:
    """The graph without external weights (TensorRT reads those itself), but with Q/DQ scales/zero points."""
    if not path.is_file():
        raise UadcError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
        load_qdq_params(model, path.parent)
    except Exception as exc:
        raise UadcError(f"cannot read ONNX model {path}: {exc}") from exc
    return model


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(node.op_type in QDQ_OPS for node in model.graph.node)


def is_fp16_model(model: onnx.ModelProto) -> bool:
    """FP16-typed models (AutoCast, the ``fp16`` pass, precision auto's FP16 layers) carry FP16/BF16
    weights or cast activations to FP16/BF16."""
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return any(init.data_type in half for init in model.graph.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i in half for a in n.attribute) for n in model.graph.node)


def _onnx_chw(model: onnx.ModelProto, settings: BuildSettings) -> tuple[int, ...]:
    """The image input's (C, H, W) from the ONNX graph (-1 where dynamic); checks the batch."""
    inputs = {i.name: i for i in model.graph.input}
    initializers = {init.name for init in model.graph.initializer}
    if IMAGE_INPUT not in inputs:
        names = [n for n in inputs if n not in initializers]
        raise UadcError(f"the model has no input named '{IMAGE_INPUT}' (inputs: {', '.join(names) or 'none'})")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                 for d in inputs[IMAGE_INPUT].type.tensor_type.shape.dim)
    if len(dims) != 4:
        raise UadcError(f"'{IMAGE_INPUT}' must be 4-D (N, C, H, W), the model has shape {dims}")
    if dims[0] >= 0 and not settings.min_batch == settings.max_batch == dims[0]:
        raise UadcError(
            f"the model has a fixed batch of {dims[0]}: re-export it with a dynamic batch, or set "
            f"min_batch = opt_batch = max_batch = {dims[0]}"
        )
    return dims[1:]


def _merge_chw(model_chw: Sequence[int], input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        if any(d < 0 for d in model_chw):
            raise UadcError(f"'{IMAGE_INPUT}' has dynamic C/H/W {tuple(model_chw)}: pass input_shape=(C, H, W)")
        return tuple(int(d) for d in model_chw)
    chw = check_input_shape(input_shape)
    for got, want in zip(chw, model_chw):
        if want >= 0 and got != want:
            raise UadcError(f"input_shape {chw} does not match the model's (C, H, W) {tuple(model_chw)}")
    return chw
