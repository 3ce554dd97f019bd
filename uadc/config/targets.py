"""Compilation targets: a named profile of pass list, Q/DQ scheme, precision, opset, runtime and
builder settings. ``uadc compile --target NAME`` picks one; recipes may override the pass list.

Scheme choices, measured on this project's models:
- ORT CPU INT8 uses U8 activations / S8 weights (asymmetric activations): ORT's x86 kernels
  run U8S8 convolutions fast, while symmetric S8 activations were slower than FP32. Weights are
  per-channel: per-tensor scales destroyed the pretrained teacher (BN-folded depthwise weights
  span very different ranges per channel) at no latency gain (README, calibration results).
  Weights take 7 bits (``weight_reduce_range``, ORT's ``reduce_range``): on x86 CPUs without VNNI
  (AVX2 only) the U8S8 kernels add pairs of u8 x s8 products in int16 and saturate with 8-bit
  weights, so the same artifact gave other scores there than on a VNNI CPU (and than the
  verified ones); with 7-bit weights no sum can saturate, and every x86 CPU computes the same.
- TensorRT targets use symmetric S8 everywhere, per-channel weights on the output axis, zero
  points 0 (TensorRT's explicit-quantization rules), opset >= 13.
- OpenVINO targets run the same ONNX / Q/DQ ONNX as the ORT targets; ``float_precision`` is what
  OpenVINO runs the un-quantized layers in: fp32 (pinned) or bf16 (AMX / AVX-512 BF16 CPUs). The
  report records the precision OpenVINO actually ran in (``latency.runtime``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uadc.core.errors import UadcError

# knn_bank: the image kNN's bank described by the compiled model (uadc.passes.knn): a no-op for an FP32
# teacher on an FP32 runtime, so it matters for bf16 float layers and Q/DQ
FLOAT_PASSES = ["shape_inference", "simplify", "partition_check", "knn_bank", "cleanup"]
INT8_PASSES = ["shape_inference", "simplify", "partition_check", "qdq", "partition_check", "knn_bank", "cleanup"]
# TensorRT targets: ``opset`` brings the graph to Target.opset (17: TensorRT 8.5 / JetPack 5);
# FP16 targets ship an FP16-typed model, which TensorRT 11 (always strongly typed) needs and
# 8.5/10 build with the FP16 flag as before.
TRT_FLOAT_PASSES = ["shape_inference", "simplify", "partition_check", "opset", "cleanup"]
TRT_INT8_PASSES = ["shape_inference", "simplify", "partition_check", "qdq", "partition_check", "opset", "cleanup"]
FP16_PASSES = ["shape_inference", "simplify", "partition_check", "fp16", "opset", "cleanup"]


@dataclass(frozen=True)
class QDQScheme:
    activation_type: str = "uint8"      # "uint8" | "int8"
    activation_symmetric: bool = False
    weight_type: str = "int8"
    weight_symmetric: bool = True
    per_channel: bool = False
    weight_reduce_range: bool = False   # 7-bit weights (see the module docstring)


@dataclass(frozen=True)
class Target:
    name: str
    runtime: str                        # "onnxruntime" | "openvino" | "tensorrt"
    precision: str                      # "fp32" | "fp16" | "int8"
    passes: list[str]
    opset: int = 18
    scheme: QDQScheme | None = None
    default_calibrator: str = "entropy"
    min_trt_version: str | None = None
    device: str = "cpu"                 # "cpu" | "gpu" | "jetson"
    builder: dict = field(default_factory=dict)  # TensorRT builder settings
    description: str = ""
    float_precision: str = "fp32"       # OpenVINO: un-quantized layers in "fp32" or "bf16"

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"

    @property
    def inference_hint(self) -> str:
        """OpenVINO's ``INFERENCE_PRECISION_HINT`` for this target's float layers."""
        return OV_HINTS[self.float_precision]


OV_HINTS = {"fp32": "f32", "bf16": "bf16"}


_CPU_SCHEME = QDQScheme(activation_type="uint8", activation_symmetric=False, per_channel=True,
                        weight_reduce_range=True)
_TRT_SCHEME = QDQScheme(activation_type="int8", activation_symmetric=True, weight_type="int8",
                        weight_symmetric=True, per_channel=True)

TARGETS: dict[str, Target] = {t.name: t for t in [
    Target("ort-cpu-fp32", "onnxruntime", "fp32", FLOAT_PASSES, description="ONNX Runtime CPU, float32"),
    Target("ort-cpu-int8", "onnxruntime", "int8", INT8_PASSES,
           scheme=_CPU_SCHEME,
           default_calibrator="minmax",  # best of `uadc calibrators compare` on our data (README)
           description="ONNX Runtime CPU, QDQ U8 activations / S8 weights"),
    Target("openvino-cpu-fp32", "openvino", "fp32", FLOAT_PASSES,
           description="OpenVINO CPU (reads the ONNX), float32 (inference precision pinned to f32)"),
    Target("openvino-cpu-int8", "openvino", "int8", INT8_PASSES,
           scheme=_CPU_SCHEME,
           default_calibrator="minmax",  # the same Q/DQ ONNX as ort-cpu-int8, run by OpenVINO
           description="OpenVINO CPU (reads the Q/DQ ONNX), U8 activations / S8 weights"),
    Target("openvino-cpu-bf16", "openvino", "bf16", FLOAT_PASSES, float_precision="bf16",
           description="OpenVINO CPU (reads the ONNX), bfloat16 inference on AMX / AVX-512 BF16 CPUs"),
    Target("openvino-cpu-int8-bf16", "openvino", "int8", INT8_PASSES,
           scheme=_CPU_SCHEME,
           default_calibrator="minmax", float_precision="bf16",
           description="OpenVINO CPU (reads the Q/DQ ONNX), INT8 + bfloat16 for the un-quantized layers"),
    Target("trt-fp16", "tensorrt", "fp16", FP16_PASSES, opset=17, min_trt_version="8.5", device="gpu",
           builder={"workspace_mb": 4096}, description="TensorRT GPU, FP16-typed model (float32 I/O)"),
    Target("trt-int8", "tensorrt", "int8", TRT_INT8_PASSES, opset=17, scheme=_TRT_SCHEME, min_trt_version="8.5",
           device="gpu", builder={"workspace_mb": 4096}, description="TensorRT GPU, explicit symmetric Q/DQ"),
    Target("jetson-fp32", "tensorrt", "fp32", TRT_FLOAT_PASSES, opset=17, min_trt_version="8.5", device="jetson",
           builder={"workspace_mb": 1024}, description="Jetson (JetPack 5/6), TensorRT float32"),
    Target("jetson-fp16", "tensorrt", "fp16", FP16_PASSES, opset=17, min_trt_version="8.5", device="jetson",
           builder={"workspace_mb": 1024}, description="Jetson (JetPack 5/6), FP16-typed model (float32 I/O)"),
    Target("jetson-int8", "tensorrt", "int8", TRT_INT8_PASSES, opset=17, scheme=_TRT_SCHEME, min_trt_version="8.5",
           device="jetson", builder={"workspace_mb": 1024},
           description="Jetson (JetPack 5/6), explicit symmetric Q/DQ; other layers FP16 on TensorRT 8, "
                       "FP32 on 10 (strongly typed)"),
]}


# targets a QAT model can be fine-tuned for (uadc qat) and compiled from (uadc compile --from-qat)
QAT_TARGETS = tuple(n for n, t in TARGETS.items() if t.quantized and t.scheme is not None)


def inference_hint_of(target: str | None) -> str:
    """OpenVINO's precision hint for an artifact of target ``target`` (f32 for a name this version
    does not know): the precision its thresholds were set at, so every runner uses it."""
    known = TARGETS.get(target or "")
    return known.inference_hint if known else "f32"


def get_target(name: str) -> Target:
    if not isinstance(name, str):   # compare_calibrators(r, None) said "unknown target 'None'"
        raise UadcError(f"target: expected a target name, one of {', '.join(TARGETS)}; got {type(name).__name__}")
    if name not in TARGETS:
        raise UadcError(f"unknown target {str(name)[:60]!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]
