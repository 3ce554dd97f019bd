"""ONNX Runtime CPU backend: sessions with a stated thread count, a predictor for the AD
metrics, and latency measurement."""

from __future__ import annotations

import time

import numpy as np

from uadc.core.constants import INPUT_NAME, LATENCY_WARMUP, OUTPUT_NAMES
from uadc.core.ort_session import make_session  # noqa: F401  (the one factory, re-exported)


def ort_predictor(session):
    """images (N,3,H,W) -> (maps (N,H,W), scores (N,)) for uadc.evaluation.run."""
    def run(images: np.ndarray):
        amap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.astype(np.float32)})
        return amap[:, 0], score
    return run


def paired_latency_ms(fns: list, runs: int = 30, warmup: int = LATENCY_WARMUP) -> list[dict[str, float]]:
    """``latency_ms`` of each of ``fns``, their runs interleaved: a ratio of two is measured under the
    same machine load (one timed after the other was not: an FP32 artifact ran 1.48x "faster" than FP32)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append((time.perf_counter() - t0) * 1000)
    return [_summary(t, runs, warmup) for t in times]


def _summary(times: list[float], runs: int, warmup: int) -> dict[str, float]:
    return {"p50": round(float(np.percentile(times, 50)), 3), "p90": round(float(np.percentile(times, 90)), 3),
            "runs": runs, "warmup": warmup}


def latency_ms(fn, runs: int = 30, warmup: int = LATENCY_WARMUP) -> dict[str, float]:
    """p50/p90 wall time of ``fn()`` in milliseconds after warm-up runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return _summary(times, runs, warmup)
