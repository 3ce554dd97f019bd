"""Per-node time of a model on ONNX Runtime CPU (its own profiler), for the precision search.

ORT profiles the *optimized* graph: nodes are fused (Conv+Clip), renamed (``<tensor>_nchwc``,
``<name>_token_12``) or inserted (layout Transposes, unnamed Q/DQ). ``node_times`` returns the
time of every profiled node under its ORT name; ``source_name`` strips ORT's renaming
so a caller can map a time back to a node or tensor of the model it gave.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session

_SUFFIXES = re.compile(r"(_token_\d+|_nchwc|/duplicated)+$")


@dataclass(frozen=True)
class NodeTime:
    name: str        # ORT's node name in the optimized graph
    op: str          # ORT's op type (QLinearConv, Conv, Transpose, ...)
    us: float        # microseconds per run (the fastest of the profiled runs)
    out_bytes: int = 0  # bytes of its outputs (ORT's ``output_size``)


def source_name(ort_name: str) -> str:
    """The model's node or tensor name behind an optimized-graph node name (ORT appends
    ``_token_N`` to nodes it rewrites, ``_nchwc`` to NCHWc convolutions named after their output
    tensor and ``/duplicated`` to copies of shared Q/DQ nodes)."""
    prev = None
    name = ort_name
    while name != prev:
        prev, name = name, _SUFFIXES.sub("", name)
    return name


def node_times(models: list, feeds: dict[str, np.ndarray], threads: int | None, runs: int = 20,
               warmup: int = 5) -> list[list[NodeTime]]:
    """Per model, each node's fastest time over ``runs`` profiled runs (after ``warmup`` runs).
    The models run in turn, run by run, so a load change on a shared machine hits them alike;
    the minimum is what the node costs when nothing else competes (other jobs only add time)."""
    if runs < 1:
        raise UadcError(f"profiling needs at least one run, got {runs}")
    with tempfile.TemporaryDirectory(prefix="uadc-profile-") as tmp:
        sessions = [make_session(m, threads, profile_prefix=str(Path(tmp) / f"ort{k}")) for k, m in enumerate(models)]
        for _ in range(warmup + runs):
            for sess in sessions:
                sess.run(None, feeds)
        return [_parse(json.loads(Path(sess.end_profiling()).read_text()), warmup) for sess in sessions]


def _parse(events: list[dict], warmup: int) -> list[NodeTime]:
    times: dict[tuple[str, str], list[float]] = {}
    sizes: dict[tuple[str, str], int] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            args = e.get("args") or {}
            key = (e["name"][:-len("_kernel_time")], args.get("op_name", "?"))
            times.setdefault(key, []).append(float(e["dur"]))
            sizes[key] = int(args.get("output_size", 0) or 0)
    return [NodeTime(name, op, float(min(v[warmup:] if len(v) > warmup else v)), sizes[(name, op)])
            for (name, op), v in times.items()]
