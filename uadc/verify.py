"""Verification through Polygraphy: runners for torch (CPU), ONNX Runtime (and TensorRT in
uadc.backends.tensorrt), compared output by output with Polygraphy's Comparator."""

from __future__ import annotations

import contextlib
import io
import time
from collections import OrderedDict

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc

from uadc.export import INPUT_NAME, OUTPUT_NAMES


class TorchCpuRunner(BaseRunner):
    """Polygraphy runner for an eager torch module on the CPU (Polygraphy's own PytRunner
    moves inputs to CUDA)."""

    def __init__(self, model: torch.nn.Module, image_shape: tuple[int, ...], name: str = "torch-fp32"):
        super().__init__(name=name, prefix="torch-runner")
        self.model = model.eval()
        self.image_shape = image_shape

    def activate_impl(self) -> None:
        pass

    def deactivate_impl(self) -> None:
        pass

    def get_input_metadata_impl(self) -> TensorMetadata:
        return TensorMetadata().add(INPUT_NAME, np.float32, self.image_shape)

    @torch.no_grad()
    def infer_impl(self, feed_dict: dict) -> OrderedDict:
        t0 = time.perf_counter()
        outs = self.model(torch.from_numpy(np.asarray(feed_dict[INPUT_NAME], np.float32)))
        self.inference_time = time.perf_counter() - t0  # the Comparator sums these
        return OrderedDict((n, o.numpy()) for n, o in zip(OUTPUT_NAMES, outs))


def ort_runner(model: onnx.ModelProto, name: str, threads: int | None = None) -> OnnxrtRunner:
    from uadc.backends.onnxruntime import make_session
    return OnnxrtRunner(lambda: make_session(model, threads), name=name)


def compare(runners: list[BaseRunner], feeds: list[dict[str, np.ndarray]], atol: float, rtol: float) -> dict:
    """Run every runner on the same feeds; compare each against the first.

    Returns ``{"passed", "max_abs", "mean_abs", "outputs": {name: {max_abs, mean_abs, max_rel}}}``
    for the first pair (the usual reference-vs-candidate use)."""
    with contextlib.redirect_stdout(io.StringIO()):  # Polygraphy logs every comparison
        results = Comparator.run(runners, data_loader=feeds)
        acc = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    per_out: dict[str, dict] = {}
    for iteration in next(iter(acc[0].values())):
        for name, r in iteration.items():
            d = per_out.setdefault(name, {"max_abs": 0.0, "mean_abs": [], "max_rel": 0.0})
            d["max_abs"] = max(d["max_abs"], float(r.max_absdiff))
            d["max_rel"] = max(d["max_rel"], float(r.max_reldiff))
            d["mean_abs"].append(float(r.mean_absdiff))
    for d in per_out.values():
        d["mean_abs"] = float(np.mean(d["mean_abs"]))
    return {"passed": bool(acc), "atol": atol, "rtol": rtol,
            "max_abs": max(d["max_abs"] for d in per_out.values()),
            "mean_abs": float(np.mean([d["mean_abs"] for d in per_out.values()])),
            "outputs": per_out}
