"""TensorRT backend, by concern: ``plan`` (availability, build settings, the per-version build
plan), ``build`` (engine building), ``bundle`` (trtexec commands, build script, device README),
``run`` (engine runner), ``rules`` (explicit-quantization rule checker), ``check`` (its result for a file or artifact), ``cache`` (INT8
calibration cache). ``tensorrt`` itself is imported lazily: all of this works without it."""

from uadc.backends.tensorrt.build import build_engine, has_qdq
from uadc.backends.tensorrt.bundle import trtexec_command, write_build_script
from uadc.backends.tensorrt.plan import IMAGE_INPUT, BuildPlan, BuildSettings, plan_build, trt_available
from uadc.backends.tensorrt.run import run_engine

__all__ = ["IMAGE_INPUT", "BuildPlan", "BuildSettings", "build_engine", "has_qdq", "plan_build", "run_engine", "trt_available",
           "trtexec_command", "write_build_script"]
