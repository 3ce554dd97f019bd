"""TensorRT backend, by concern: ``plan`` (availability, build settings, the per-version build
plan), ``build`` (engine building), ``bundle`` (trtexec commands, build script, device README),
``run`` (engine runner), ``rules`` (explicit-quantization rule checker), ``check`` (its result for a file or artifact), ``cache`` (INT8
calibration cache). ``tensorrt`` itself is imported lazily: all of this works without it. The names
below load their module when first used: ``uadc doctor`` reads ``plan`` without importing onnx
(``build``), so it still reports when onnx does not import."""

import importlib
from typing import Any

_HOMES = {"build_engine": "build", "has_qdq": "build", "trtexec_command": "bundle", "write_build_script": "bundle",
          "IMAGE_INPUT": "plan", "BuildPlan": "plan", "BuildSettings": "plan", "plan_build": "plan",
          "trt_available": "plan", "run_engine": "run"}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
