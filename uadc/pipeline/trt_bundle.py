"""Device bundle for TensorRT targets (GPU and Jetson): the explicit-Q/DQ ONNX goes with a
TensorRT calibration cache (same ranges, for implicit-mode builds on TensorRT <= 10 from the
FP32 ONNX), ``build_engine.sh`` with the exact ``trtexec`` command, and a device README.
Where ``tensorrt`` imports and a GPU exists, ``--build-engine`` builds ``model.engine`` here
and adds Polygraphy's ORT-vs-TensorRT comparison and the AD metrics of the engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from uadc.backends import tensorrt as trt_backend
from uadc.backends.tensorrt.cache import write_calibration_cache
from uadc.backends.tensorrt.rules import check_trt_rules
from uadc.config.targets import Target
from uadc.core.constants import IMPLICIT_ENGINE_FILE, TIMING_CACHE_FILE
from uadc.passes.opset import convert_opset
from uadc.passes.pipeline import PassContext
from uadc.pipeline.precision_trt import fp32_layers as float_layers

PRECISION_NOTES = {
    "fp32": "FP32 everywhere (TF32 off) so the engine matches ONNX Runtime.",
    "fp16": "The ONNX is FP16-typed (float32 inputs/outputs, the `fp16` pass): TensorRT 11 takes the precision "
            "from the model (strong typing); 8.5-10.x build it with BuilderFlag.FP16.",
    "int8": "Explicit quantization: the ONNX carries symmetric INT8 Q/DQ (scales from uadc's calibration, or "
            "learned by QAT). Layers outside Q/DQ pairs (the teacher and the head, unless quantized) run FP32 on "
            "TensorRT 10.x and 11 (strongly typed), as the report's figures assume; 8.x has no strong typing, so "
            "the script builds with --int8 --fp16 and TensorRT may run them in FP16: check the engine with "
            "`uadc verify` there. Works on TensorRT 8.5-10.x (JetPack 5/6) and 11.",
}


AUTO_NOTE = ("Precision auto: INT8 where the ONNX carries Q/DQ, FP16 where it is FP16-typed, FP32 elsewhere. "
             "TensorRT 10.x and 11 build it strongly typed, so the engine runs exactly that assignment; 8.x (and "
             "DLA) build it weakly typed with --fp16 and the FP32 layers named in --layerPrecisions (obeyed).")


def build_settings(target: Target, fp32_layers: list[str] | None = None,
                   qdq: bool = True, precision: str | None = None) -> trt_backend.BuildSettings:
    """``fp32_layers``: precision auto's layers kept FP32 (the build then runs the other float ones FP16);
    where it quantized nothing (no Q/DQ: ``qdq`` False) the build is FP16 with those layers FP32.
    ``precision``: the build's, instead of the one these imply."""
    precision = precision or (target.precision if fp32_layers is None or qdq else "fp16")
    return trt_backend.BuildSettings(precision=precision,
                                     workspace_mb=int(target.builder.get("workspace_mb", 1024)),
                                     max_batch=int(target.builder.get("max_batch", 8)),
                                     timing_cache=TIMING_CACHE_FILE,
                                     fp32_layers=tuple(fp32_layers) if fp32_layers is not None else None,
                                     model_typed=fp32_layers is not None)   # compile types the FP16 layers it chose


def cache_amax(compiled: onnx.ModelProto, ranges: dict) -> dict[str, float]:
    """Each activation the Q/DQ model quantizes, with that model's own scale x 127 as its amax, so an
    implicit build uses the explicit build's ranges (the quantizer gives a Resize's output its input's
    scale, not the output's own calibrated range). Tensors the Q/DQ model keeps float are left out: the
    cache held every calibrated range, `anomaly_map` among them, which an implicit build may quantize.
    A Q/DQ tensor without a calibrated range is left out."""
    consts = {i.name: i for i in compiled.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in compiled.graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    amax = {}
    for node in compiled.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in ranges and node.input[1] in consts:
            scale = numpy_helper.to_array(consts[node.input[1]])
            if scale.size == 1:   # activations are per-tensor (per-channel scales are weights')
                amax[node.input[0]] = float(scale.reshape(())) * 127.0
    return {k: v for k, v in amax.items() if v > 0}


def write_trt_files(out: Path, compiled: onnx.ModelProto, fp32: onnx.ModelProto, target: Target, calib: dict | None,
                    image_size: int, build: bool, run_metrics=None, feeds=None,
                    fp32_layers: list[str] | None = None) -> dict:
    """Writes the bundle into ``out``; returns the report's ``engine`` section."""
    qdq = trt_backend.has_qdq(compiled)
    if fp32_layers is not None and not qdq and set(float_layers(compiled, [], frozenset())) <= set(fp32_layers):
        # precision auto kept every layer FP32: an FP32 build (an FP16 one asked TensorRT 11 for an FP16-typed model)
        settings = build_settings(target, None, qdq, precision="fp32")
    else:
        settings = build_settings(target, fp32_layers, qdq)
    shape = (3, image_size, image_size)
    cache = None
    if calib and calib.get("ranges"):   # implicit-mode builds start from the float graph, at the target's opset
        onnx.save(convert_opset(fp32, PassContext(target, sample_feeds=feeds[0] if feeds else None)),
                  out / "model_fp32.onnx")
        write_calibration_cache(out / "calibration.cache", cache_amax(compiled, calib["ranges"]))
        cache = "calibration.cache"
    # precision auto that kept every layer FP32 builds FP32, and its README says so
    auto = None if fp32_layers is None else AUTO_NOTE if settings.precision != "fp32" else PRECISION_NOTES["fp32"]
    notes = [auto or PRECISION_NOTES[settings.precision],   # both, not either
             _implicit_note(shape, settings.max_batch) if cache else None]
    write_build_script(out, settings, shape, target, "\n\n".join(n for n in notes if n) or None)
    violations = check_trt_rules(compiled)
    oldest = target.min_trt_version or "8.5"
    section = {"status": "engine: not built (no TensorRT here)", "trt_rule_violations": len(violations),
               "build_script": "build_engine.sh", "calibration_cache": cache,
               "trtexec": trt_backend.trtexec_command("model.onnx", settings, shape, trt_version=oldest),
               "trtexec_for": f"TensorRT {oldest} (build_engine.sh runs the command for the device's version)",
               "min_trt_version": target.min_trt_version}
    ok, reason = trt_backend.trt_available()
    if not ok:
        section["status"] = f"engine: not built (no TensorRT here: {reason})"
        return section
    if not build:
        section["status"] = "engine: not built (--build-engine not given; build_engine.sh builds it on the device)"
        return section
    # no timing cache: one build here, and a cache of this GPU shipped in the artifact would meet build_engine.sh's
    # rebuild on the device (which keeps its own beside its engine)
    engine = trt_backend.build_engine(out / "model.onnx", out / "model.engine",
                                      dataclasses.replace(settings, timing_cache=None), input_shape=shape)
    section["status"] = f"engine: built {engine.name}"
    if feeds:
        from uadc.verify.trt import compare_onnx_vs_trt
        section["ort_vs_trt"] = compare_onnx_vs_trt(out / "model.onnx", engine, feeds)
    if run_metrics is not None:
        def predict(images: np.ndarray):
            outs = trt_backend.run_engine(engine, images, batch_size=8)
            return outs["anomaly_map"][:, 0], outs["score"]
        section["metrics"] = run_metrics(predict).to_dict()
    return section


def _implicit_note(shape: tuple[int, int, int], max_batch: int) -> str:
    """The device README's word on ``model_fp32.onnx`` + ``calibration.cache`` (it listed model.onnx and
    build_engine.sh only, and its command built an unsaved batch-1 engine)."""
    chw = "x".join(map(str, shape))
    return (f"Also here: `model_fp32.onnx` (the float model: input `image`, outputs `anomaly_map` and `score` only) "
            f"and `calibration.cache` (the ranges of the Q/DQ nodes in TensorRT's calibration-cache format), for an "
            f"implicit-quantization build on TensorRT 10 or older. The cache's first line, `TRT-8500-...`, names "
            f"the TensorRT version that reads it: put the device's version code there first (`TRT-100300-...` for "
            f"10.3.0, `TRT-8502-...` for 8.5.2), then `trtexec --onnx=model_fp32.onnx --int8 --fp16 "
            f"--calib=calibration.cache --saveEngine={IMPLICIT_ENGINE_FILE} --minShapes=image:1x{chw} "
            f"--optShapes=image:1x{chw} --maxShapes=image:{max_batch}x{chw} --optShapesCalib=image:1x{chw}`. "
            f"`build_engine.sh` builds the explicit Q/DQ `model.onnx`, the model uadc verified.")


def write_build_script(out: Path, settings, shape, target: Target, note: str | None = None) -> Path:
    return trt_backend.write_build_script(out, "model.onnx", settings, shape,
                                          min_trt_version=target.min_trt_version or "8.5",   # as in write_trt_files
                                          precision_note=note or PRECISION_NOTES[target.precision])
