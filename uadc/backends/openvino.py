"""OpenVINO CPU backend: OpenVINO reads uadc's ONNX (FP32, or Q/DQ INT8) directly.

``import openvino`` happens on first use only, so uadc works without the optional extra
``uadc[openvino]``; every entry point raises one clear ``UadcError`` when it is missing.

Precision: on CPUs with AMX/AVX-512 BF16, OpenVINO runs float layers in bfloat16 unless told
otherwise. Each uadc target sets ``INFERENCE_PRECISION_HINT`` from its ``float_precision``
(``Target.inference_hint``): ``f32`` for ``openvino-cpu-fp32`` / ``-int8`` (FP32 float layers, as
with ONNX Runtime), ``bf16`` for ``openvino-cpu-bf16`` / ``-int8-bf16``. What OpenVINO actually runs
(on a CPU without bf16 it cannot honour that hint) is read back by ``inference_precision``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from uadc.core.constants import INPUT_NAME, OUTPUT_NAMES
from uadc.core.errors import UadcError

RUNTIME_LABEL = "openvino CPU"


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise UadcError("OpenVINO is not installed: pip install 'uadc[openvino]'") from None
    return openvino


def version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def compile_model(model: Any, threads: int | None = None, precision_hint: str | None = "f32") -> Any:
    """An OpenVINO ``CompiledModel`` on the CPU for an ``onnx.ModelProto``, ONNX bytes or a path
    (``.onnx``, or OpenVINO IR ``.xml``).

    ``threads`` sets OpenVINO's inference threads for this model only; latency hint, one stream;
    ``precision_hint=None`` keeps OpenVINO's own default (bf16 on AMX CPUs)."""
    ov = _ov()
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
        raise UadcError(f"OpenVINO cannot load the model: {str(exc).strip().splitlines()[0][:300]}") from None


def inference_precision(compiled: Any) -> str:
    """The float precision a compiled model runs in ("f32", "bf16", ...), as OpenVINO reports it."""
    used = compiled.get_property("INFERENCE_PRECISION_HINT")
    return used.to_string() if hasattr(used, "to_string") else str(used)


def infer_fn(compiled: Any) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """images (N,3,H,W) float32 -> (anomaly_map (N,1,H,W), score (N,)) with one infer request."""
    request = compiled.create_infer_request()
    outs = [compiled.output(n) for n in OUTPUT_NAMES]

    def run(images: np.ndarray):
        res = request.infer({INPUT_NAME: np.ascontiguousarray(images, dtype=np.float32)})
        return tuple(np.array(res[o]) for o in outs)
    return run


def run_first_output(compiled: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of a compiled model for ``feeds`` (any single-output sub-graph)."""
    res = compiled.create_infer_request().infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
    return np.array(res[compiled.output(0)])


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
