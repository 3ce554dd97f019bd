"""TensorRT engine build from an ONNX file and a BuildPlan (tensorrt imported lazily)."""

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

from uadc.core.io import atomic_write_bytes
from uadc.backends.tensorrt.cache import (
    parse_trt_version,
    read_calibration_cache,
    read_calibration_header,
    trt_version_code,
)
from uadc.backends.tensorrt.rules import check_trt_rules, format_violations
from uadc.core.errors import UadcError

from uadc.backends.tensorrt.plan import check_input_shape, BuildPlan, BuildSettings, IMAGE_INPUT, _CALIBRATOR_BASES, _LOG, _QDQ_OPS, _import_tensorrt, plan_build  # noqa: F401

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
    chw = check_input_shape(input_shape)
    for got, want in zip(chw, model_chw):
        if want >= 0 and got != want:
            raise UadcError(f"input_shape {chw} does not match the model's (C, H, W) {tuple(model_chw)}")
    return chw


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
