"""Verification through Polygraphy: runners for torch (CPU), ONNX Runtime (and TensorRT in
uadc.backends.tensorrt.build), compared output by output with Polygraphy's Comparator."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import onnx
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator

from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES
from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session
from uadc.core.scoped import quiet_third_party


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
    return OnnxrtRunner(lambda: make_session(model, threads), name=name)


def compare(runners: list[BaseRunner], feeds: list[dict[str, np.ndarray]], atol: float, rtol: float) -> dict:
    """Run every runner on the same feeds with Polygraphy's Comparator; the first is the reference.

    Returns ``{"passed", "atol", "rtol", "iterations", "max_abs", "mean_abs",
    "outputs": {name: {"passed", "max_abs", "mean_abs"}}}``; an output passes when every element
    is within Polygraphy's simple check (absolute or relative difference within atol / rtol)."""
    if not feeds or not all(isinstance(feed, dict) and feed for feed in feeds):
        raise UadcError("feeds must be a non-empty list of {input name: array} dicts")
    if atol < 0 or rtol < 0:
        raise UadcError(f"atol and rtol must be >= 0, got {atol}, {rtol}")
    with quiet_third_party():  # Polygraphy logs every comparison
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=_simple_compare(atol, rtol))
    reference, candidate = (r.name for r in runners[:2])
    outputs = _abs_errors(results[reference], results[candidate])
    for name, passed in _passed_per_output(accuracy).items():
        if name in outputs:
            outputs[name]["passed"] = passed
    return {"passed": bool(accuracy) and all(o.get("passed", False) for o in outputs.values()),
            "atol": atol, "rtol": rtol, "iterations": len(feeds),
            "max_abs": max(o["max_abs"] for o in outputs.values()),
            "mean_abs": float(np.mean([o["mean_abs"] for o in outputs.values()])), "outputs": outputs}


def _simple_compare(atol: float, rtol: float):
    # Polygraphy 0.53 deprecates CompareFunc.simple in favour of SimpleCompareFunc; older ones lack the class.
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        from polygraphy.comparator import CompareFunc
        return CompareFunc.simple(atol=atol, rtol=rtol)
    return SimpleCompareFunc(atol=atol, rtol=rtol)


def _abs_errors(reference: list, candidate: list) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    for ref_iter, cand_iter in zip(reference, candidate):
        for name, ref in ref_iter.items():
            if name not in cand_iter:
                continue
            diff = np.abs(np.asarray(ref, dtype=np.float64) - np.asarray(cand_iter[name], dtype=np.float64))
            entry = stats.setdefault(name, {"max_abs": 0.0, "sum": 0.0, "count": 0})
            entry["max_abs"] = max(entry["max_abs"], float(diff.max(initial=0.0)))
            entry["sum"] += float(diff.sum())
            entry["count"] += diff.size
    return {name: {"max_abs": e["max_abs"], "mean_abs": e["sum"] / max(e["count"], 1)} for name, e in stats.items()}


def _outcomes(accuracy):
    """(output name, its compare result) of every iteration. Polygraphy < 0.50 returns one
    AccuracyResult; newer ones a list with one per compare function."""
    for result in ([accuracy] if hasattr(accuracy, "items") else list(accuracy)):
        for _, iterations in result.items():
            for iteration in iterations:
                yield from iteration.items()


def _passed_per_output(accuracy) -> dict[str, bool]:
    passed: dict[str, bool] = {}
    for name, outcome in _outcomes(accuracy):
        passed[name] = passed.get(name, True) and bool(outcome)
    return passed


def compare_stats(runners: list[BaseRunner], feeds: list[dict[str, np.ndarray]]) -> dict:
    """Difference statistics of the second runner against the first, read from Polygraphy's
    ``OutputCompareResult``s (no pass/fail: an INT8 artifact is expected to differ).

    Returns ``{"max_abs", "mean_abs", "outputs": {name: {"max_abs", "mean_abs", "max_rel",
    "median_abs"}}}``; per output, max over iterations and mean of the per-iteration means."""
    if not feeds:
        raise UadcError("feeds must be a non-empty list of {input name: array} dicts")
    with quiet_third_party():
        results = Comparator.run(runners, data_loader=feeds)
        _check_same_shapes(results)
        accuracy = Comparator.compare_accuracy(results, compare_func=_simple_compare(np.inf, np.inf))
    per: dict[str, dict] = {}
    for name, r in _outcomes(accuracy):
        e = per.setdefault(name, {"max_abs": 0.0, "means": [], "max_rel": 0.0, "medians": []})
        e["max_abs"] = max(e["max_abs"], float(r.max_absdiff))
        e["max_rel"] = max(e["max_rel"], float(r.max_reldiff))
        e["means"].append(float(r.mean_absdiff))
        e["medians"].append(float(r.median_absdiff))
    outputs = {n: {"max_abs": e["max_abs"], "mean_abs": float(np.mean(e["means"])), "max_rel": e["max_rel"],
                   "median_abs": float(np.median(e["medians"]))} for n, e in per.items()}
    return {"max_abs": max(o["max_abs"] for o in outputs.values()),
            "mean_abs": float(np.mean([o["mean_abs"] for o in outputs.values()])), "outputs": outputs}


TENSOR_ATOL, TENSOR_RTOL = 1e-4, 1e-3     # the gate's tensor check (reported, not judged)


def tensor_check(results, atol: float = TENSOR_ATOL, rtol: float = TENSOR_RTOL) -> dict:
    """Polygraphy's comparator on two runners' results: pass flag and per-output errors."""
    _check_same_shapes(results)
    with quiet_third_party():
        acc = Comparator.compare_accuracy(results, compare_func=_simple_compare(atol, rtol))
    per: dict[str, dict] = {}
    for name, r in _outcomes(acc):
        e = per.setdefault(name, {"max_abs": 0.0, "means": []})
        e["max_abs"] = max(e["max_abs"], float(r.max_absdiff))
        e["means"].append(float(r.mean_absdiff))
    passed = _passed_per_output(acc)
    outputs = {n: {"passed": passed.get(n, False), "max_abs": e["max_abs"], "mean_abs": float(np.mean(e["means"]))}
               for n, e in per.items()}
    return {"passed": bool(outputs) and all(o["passed"] for o in outputs.values()), "atol": atol, "rtol": rtol,
            "max_abs": max((o["max_abs"] for o in outputs.values()), default=0.0), "outputs": outputs}


def _check_same_shapes(results) -> None:
    """Outputs of other shapes (a 16x16 map against a 32x32 one) are no model's regression but another
    model: Polygraphy's comparator gives False for them, which was an AttributeError traceback (exit 1)."""
    shapes: dict[str, dict[str, tuple]] = {}
    for runner, iterations in results.items():
        for name, arr in (iterations[0].items() if iterations else ()):
            shapes.setdefault(name, {})[runner] = tuple(np.shape(arr))
    for name, by in shapes.items():
        if len(set(by.values())) > 1:
            raise UadcError(f"output {name} has other shapes ({'; '.join(f'{r} {s}' for r, s in by.items())}): "
                            f"not outputs of one model to compare")
