"""ONNX Runtime vs a TensorRT engine through Polygraphy's Comparator (tensorrt imported lazily)."""

from __future__ import annotations

import os

import numpy as np

from uadc.backends.tensorrt.run import existing_file
from uadc.verify.polygraphy_compare import compare


def compare_onnx_vs_trt(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    feeds: list[dict[str, np.ndarray]],
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> dict:
    """Run the same feeds through ONNX Runtime (CPU) and the engine with Polygraphy's Comparator.

    Returns :func:`uadc.verify.polygraphy_compare.compare`'s dict (pass flag, per-output max/mean absolute error).
    """
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runners = [
        OnnxrtRunner(SessionFromOnnx(str(existing_file(onnx_path)), providers=["cpu"]), name="onnxruntime"),
        TrtRunner(EngineFromBytes(BytesFromPath(str(existing_file(engine_path)))), name="tensorrt"),
    ]
    return compare(runners, feeds, atol, rtol)


