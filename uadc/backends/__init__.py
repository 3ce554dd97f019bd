"""Inference backends that compiled anomaly detectors are lowered to.

- ``tensorrt``: TensorRT engine builder and runner (Python API and ``trtexec``
  build scripts for devices such as Jetson), plus ORT-vs-TRT comparison through
  Polygraphy. ``tensorrt`` is imported lazily, so the module works without it.
- ``trt_cache``: TensorRT INT8 calibration-cache reader/writer (implicit
  quantization, TensorRT 8.5 and 10.x).
- ``trt_rules``: validator for TensorRT's explicit-quantization (Q/DQ) rules on
  any ONNX model.
- ``onnxruntime``: ONNX Runtime backend.
"""
