"""The one ONNX Runtime session factory (every layer that runs a model opens it here)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from uadc.core.errors import UadcError
from uadc.core.scoped import check_threads


def ort_quantization(module: str = "") -> Any:
    """``onnxruntime.quantization`` (or its ``module``), imported with ``sys.path`` left as found: its import of
    ``onnxruntime.transformers`` appends that folder to ``sys.path``, whose ``metrics``, ``benchmark``,
    ``models``, ... modules then shadowed an embedding app's own (or answered imports meant to fail)."""
    import importlib
    import sys

    before = set(sys.path)
    try:
        return importlib.import_module("onnxruntime.quantization" + (f".{module}" if module else ""))
    finally:   # the modules it imported through that folder are loaded already
        sys.path[:] = [p for p in sys.path if p in before]


def make_session(model: Any, threads: int | None = None, optimize: bool = True,
                 profile_prefix: str | None = None, config: dict[str, str] | None = None) -> Any:
    """A CPU ``InferenceSession`` for an ``onnx.ModelProto``, serialized bytes or a path.

    ``threads`` sets intra-op threads for this session only (no process-wide state);
    ``optimize=False`` keeps every tensor of the graph (calibration reads intermediate ones);
    ``profile_prefix`` turns on ORT's per-node profiler (``end_profiling()`` returns its file);
    ``config``: session config entries, e.g. ``{"session.x64quantprecision": "1"}``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    threads = check_threads(threads)
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    if hasattr(model, "SerializeToString"):
        src: Any = model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        src = str(model)
        if not src.isascii() and src.encode("utf-8", "surrogateescape") != src.encode("utf-8", "replace"):
            src = _read_model(Path(model))   # a name that is not UTF-8: ORT takes UTF-8 paths only
    else:
        src = model
    try:
        return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise UadcError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}") from None


def _read_model(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UadcError(f"cannot read model {path}: {exc.strerror or exc}") from None
