"""ONNX Runtime CPU backend: sessions with a stated thread count, a predictor for the AD
metrics, and latency measurement."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx


def make_session(model: onnx.ModelProto | Path | bytes, threads: int | None = None, optimize: bool = True):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else (
        str(model) if isinstance(model, Path) else model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


def ort_predictor(session):
    """images (N,3,H,W) -> (maps (N,H,W), scores (N,)) for uadc.evaluate."""
    def run(images: np.ndarray):
        amap, score = session.run(["anomaly_map", "score"], {"image": images.astype(np.float32)})
        return amap[:, 0], score
    return run


def latency_ms(fn, runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """p50/p90 wall time of ``fn()`` in milliseconds after warm-up runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3), "p90": round(float(np.percentile(times, 90)), 3),
            "runs": runs}
