"""ONNX Runtime CPU backend: sessions with a stated thread count, a predictor for the AD
metrics, and latency measurement."""

from __future__ import annotations

import time

import numpy as np

from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES
from uadc.core.ort_session import make_session  # noqa: F401  (the one factory, re-exported)


def ort_predictor(session):
    """images (N,3,H,W) -> (maps (N,H,W), scores (N,)) for uadc.evaluation.run."""
    def run(images: np.ndarray):
        amap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
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
