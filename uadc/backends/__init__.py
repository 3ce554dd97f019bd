"""Runtimes that compiled detectors are lowered to: ``ort`` (ONNX Runtime, the one session
factory) and ``tensorrt`` (plan, engine build through Polygraphy's loaders, Q/DQ rules,
calibration cache, device bundle, runner). Heavy runtimes are imported lazily."""
