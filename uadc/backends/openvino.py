"""OpenVINO CPU backend: OpenVINO reads uadc's ONNX (FP32, or Q/DQ INT8) directly.

``import openvino`` happens on first use only, so uadc works without the optional extra
``uadc[openvino]``; every entry point raises one clear ``UadcError`` when it is missing.

Precision: on CPUs with AMX/AVX-512 BF16, OpenVINO runs float layers in bfloat16 unless told
otherwise. Each uadc target sets ``INFERENCE_PRECISION_HINT`` from its ``float_precision``
(``Target.inference_hint``): ``f32`` for ``openvino-cpu-fp32`` / ``-int8`` (FP32 float layers, as
with ONNX Runtime), ``bf16`` for ``openvino-cpu-bf16`` / ``-int8-bf16``. What OpenVINO actually runs
(on a CPU without bf16 it cannot honour that hint) is read back by ``inference_precision``.
At a reduced float precision the graph runs in two compiled parts: the teacher, the student and the
anomaly map at that precision, and the nodes the map does not need (the score's reduction, the image
kNN) in f32 (``uadc.export.partitions.float_tail``): the kNN distance subtracts near-equal numbers,
and in bf16 it shrank bottle's normal scores by a third. OpenVINO's per-node "keep f32" marks do not
survive its own fusions, so the cut is made in the graph.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES
from uadc.core.errors import RuntimeFault, UadcError
from uadc.core.process import signal_stack_kept
from uadc.core.scoped import environment_kept

RUNTIME_LABEL = "openvino CPU"


def _ov() -> Any:
    why = import_error()
    if why is not None:
        raise UadcError(why)
    import openvino
    return openvino


def require() -> None:
    """Refuse an OpenVINO target before any work (an export, a calibration, QAT's epochs) when
    openvino does not import here."""
    _ov()


def import_error() -> str | None:
    """Why ``import openvino`` fails here (not installed, or installed and broken: a missing shared
    library, a numpy it was not built for), or None."""
    try:
        _import_openvino()
    except ModuleNotFoundError as exc:
        if exc.name == "openvino":
            return ("OpenVINO is not installed: pip install 'uadc[openvino]' (a runtime-only install: "
                    "pip install openvino)")
        return f"OpenVINO does not import here: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken install raises ImportError, OSError, AttributeError...
        return f"OpenVINO does not import here: {type(exc).__name__}: {exc}"
    return None


def _import_openvino() -> None:
    """``import openvino`` without its import-time telemetry (``openvino.tools.ovc`` sends an event): it
    forked a process from a thread pool it left running, which fixed multiprocessing's start method
    to fork for the caller, and wrote ~/intel/. The telemetry stands down in a CI job, so the import
    runs with ``CI=true``, the caller's environment back after it. (An app that imported OpenVINO
    first keeps its telemetry as it was; one that lets uadc import it first sends none.)"""
    import importlib
    import os
    import sys
    if sys.modules.get("openvino") is not None:   # imported already (None: an import that must fail)
        return
    with environment_kept():
        os.environ["CI"] = "true"
        importlib.import_module("openvino")


def version() -> str | None:
    """The installed OpenVINO's version, or None, without importing it: ``import openvino`` starts its
    telemetry (a thread, and a client ID and counters written to ~/intel/), which a run that records the
    version only has no business starting."""
    from importlib import metadata
    try:
        return metadata.version("openvino")
    except metadata.PackageNotFoundError:
        return None


class TwoPartModel:
    """A graph compiled as two OpenVINO models: ``body`` at the reduced float precision, ``tail`` in f32
    (module docstring). Offers what uadc uses of a ``CompiledModel``: ``input``, ``get_property`` (the
    body's: the precision the network runs in) and, through ``infer_fn`` / ``run_first_output``, the
    outputs by name."""

    def __init__(self, body: Any, tail: Any, output_names: list[str]):
        self.body, self.tail, self.output_names = body, tail, output_names  # the whole graph's outputs

    def input(self, index: int) -> Any:
        return self.body.input(index)

    def get_property(self, name: str) -> Any:
        return self.body.get_property(name)

    def requester(self) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
        body, tail = self.body.create_infer_request(), self.tail.create_infer_request()
        tail_inputs = [i.get_any_name() for i in self.tail.inputs]

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            got = _by_name(body.infer(feeds))
            got.update(_by_name(tail.infer({n: got[n] if n in got else feeds[n] for n in tail_inputs})))
            # the graph's outputs only: a tensor the body hands the tail (an image kNN's Expand takes the
            # batch's Shape, 1 row) is no output, and was taken for one that lost rows at batch 2
            return {n: a for n, a in got.items() if n in self.output_names}
        return run


def _requester(compiled: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """``feeds -> {output name: array}`` with one infer request (two for a ``TwoPartModel``); every
    output holds one row per input image, else ``RuntimeFault`` (OpenVINO 2026.4 at bf16 returned
    zero rows for some mixed INT8 graphs)."""
    if isinstance(compiled, TwoPartModel):
        inner = compiled.requester()
    else:
        request = compiled.create_infer_request()
        inner = lambda feeds: _by_name(request.infer(feeds))  # noqa: E731

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            got = inner(feeds)
        except RuntimeError as exc:
            raise RuntimeFault(f"OpenVINO failed to run the model: {_message(exc)}") from None
        rows = len(next(iter(feeds.values())))
        short = {n: a.shape for n, a in got.items() if a.ndim and a.shape[0] != rows}
        if short:
            raise RuntimeFault(f"OpenVINO returned outputs {short} for {rows} image(s)")
        return got
    return run


def _message(exc: BaseException) -> str:
    """OpenVINO's own words: the last line of its message (the first lines name its source files)."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return (lines[-1] if lines else str(exc))[:300]


def _by_name(results: Any) -> dict[str, np.ndarray]:
    """An infer request's results under every name of each output tensor (OpenVINO may merge names)."""
    return {name: arr for port, v in results.items() for arr in (np.array(v),) for name in port.get_names()}


def _output_names(compiled: Any) -> list[str]:
    if isinstance(compiled, TwoPartModel):
        return compiled.output_names
    return [o.get_any_name() for o in compiled.outputs]


def compile_model(model: Any, threads: int | None = None, precision_hint: str | None = "f32") -> Any:
    """An OpenVINO ``CompiledModel`` on the CPU for an ``onnx.ModelProto``, ONNX bytes or a path
    (``.onnx``, or OpenVINO IR ``.xml``); a ``TwoPartModel`` for an ONNX graph at a float precision
    other than f32 whose score has nodes the map does not need (module docstring).

    ``threads`` sets OpenVINO's inference threads for this model only; latency hint, one stream;
    ``precision_hint=None`` keeps OpenVINO's own default (bf16 on AMX CPUs)."""
    if precision_hint not in (None, "f32") and not str(model).endswith(".xml"):
        from uadc.export.partitions import float_tail
        graph = _onnx_model(model)
        parts = float_tail(graph)
        if parts is not None:
            return TwoPartModel(_compile(parts[0], threads, precision_hint), _compile(parts[1], threads, "f32"),
                                [o.name for o in graph.graph.output])
    return _compile(model, threads, precision_hint)


def _onnx_model(model: Any) -> Any:
    import onnx
    if hasattr(model, "SerializeToString"):
        return model
    try:
        return onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(Path(model)))
    except Exception as exc:  # onnx raises DecodeError / OSError for a damaged or missing file
        raise UadcError(f"OpenVINO cannot load the model: {exc}") from None


def _compile(model: Any, threads: int | None, precision_hint: str | None) -> Any:
    with signal_stack_kept():   # the CPU plugin's own signal stack, freed with it (signal_stack_kept)
        return _compile_here(_ov(), model, threads, precision_hint)


def _compile_here(ov: Any, model: Any, threads: int | None, precision_hint: str | None) -> Any:
    core = ov.Core()
    try:
        if hasattr(model, "SerializeToString"):
            ov_model = core.read_model(model=model.SerializeToString(), weights=b"")
        elif isinstance(model, bytes):
            ov_model = core.read_model(model=model, weights=b"")
        else:
            ov_model = core.read_model(str(Path(model)))
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if precision_hint:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        return core.compile_model(ov_model, "CPU", config)
    except RuntimeError as exc:  # OpenVINO raises RuntimeError with a long multi-line message
        raise RuntimeFault(f"OpenVINO cannot load the model: {_message(exc)}") from None


def inference_precision(compiled: Any) -> str:
    """The float precision a compiled model runs in ("f32", "bf16", ...), as OpenVINO reports it."""
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    return used.to_string() if hasattr(used, "to_string") else str(used)


@functools.lru_cache(maxsize=None)
def precision_here(hint: str) -> str:
    """The float precision OpenVINO runs at on this CPU when asked for ``hint``: a CPU without bf16
    takes the bf16 hint and computes in f32 without a word."""
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.0] * 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w])
    return inference_precision(_compile(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), 1, hint))


def require_precision(hint: str, target: str) -> None:
    """Refuse, before any work, a target whose float precision this CPU does not run: its thresholds
    and kNN bank would be made in f32 under a bf16 label, and a bf16 CPU would score them differently."""
    if hint != "f32" and (used := precision_here(hint)) != hint:
        raise UadcError(f"{target}: this CPU does not run {hint} (OpenVINO computes in {used} here, so the artifact's "
                        f"thresholds and kNN bank would not be {hint} ones): compile it on a CPU with AMX or AVX-512 "
                        f"BF16, or compile an fp32 target here")


def infer_fn(compiled: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """images (N,3,H,W) float32 -> (anomaly_map (N,1,H,W), score (N,)) with one infer request."""
    request = _requester(compiled)

    def run(images: np.ndarray):
        res = request({INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return tuple(res[n] for n in OUTPUT_NAMES)
    return run


def run_first_output(compiled: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of a compiled model for ``feeds`` (any single-output sub-graph)."""
    return _requester(compiled)({k: np.ascontiguousarray(v) for k, v in feeds.items()})[_output_names(compiled)[0]]


def ov_predictor(compiled: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """images (N,3,H,W) -> (maps (N,H,W), scores (N,)) for uadc.evaluation.run."""
    run = infer_fn(compiled)

    def predict(images: np.ndarray):
        amap, score = run(images)
        return amap[:, 0], score
    return predict


def ov_runner(model: Any, name: str, threads: int | None = None, precision_hint: str | None = "f32") -> Any:
    """A Polygraphy runner (Polygraphy has none for OpenVINO) for ``compare``/``compare_stats``."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class OpenVinoRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="openvino-runner")
            self._run = None

        def activate_impl(self) -> None:
            compiled = compile_model(model, threads, precision_hint)
            self._shape = tuple(d if d > 0 else -1 for d in compiled.input(0).get_partial_shape().get_min_shape())
            self._run = infer_fn(compiled)

        def deactivate_impl(self) -> None:
            self._run = None

        def get_input_metadata_impl(self) -> Any:
            return TensorMetadata().add(INPUT_NAME, np.float32, self._shape)

        def infer_impl(self, feed_dict: dict) -> OrderedDict:
            t0 = time.perf_counter()
            outs = self._run(feed_dict[INPUT_NAME])
            self.inference_time = time.perf_counter() - t0  # the Comparator sums these
            return OrderedDict(zip(OUTPUT_NAMES, outs))
    return OpenVinoRunner()
