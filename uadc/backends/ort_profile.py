"""Per-node time of a model on ONNX Runtime CPU (its own profiler), for the precision search.

ORT profiles the *optimized* graph: nodes are fused (Conv+Clip), renamed (``<tensor>_nchwc``,
``<name>_token_12``) or inserted (layout Transposes, unnamed Q/DQ). ``node_times`` returns the
time of every profiled node under its ORT name; ``source_name`` strips ORT's renaming
so a caller can map a time back to a node or tensor of the model it gave.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from uadc.core.errors import UadcError
from uadc.core.io import parse_json
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
        return [_parse(json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8")), warmup) for sess in sessions]


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


TIMING_CACHE_DIR = "timing_cache"   # beside a recipe's artifacts: reruns reuse the profiles


def _cache_key(models: list, feeds: dict[str, np.ndarray], threads: int | None, runs: int, warmup: int) -> str:
    """What a profile depends on: the models, the input shapes, the settings, the runtime and the CPU."""
    import hashlib
    import platform

    import onnxruntime as ort
    h = hashlib.sha256()
    for m in models:
        h.update(hashlib.sha256(_graph_bytes(m)).digest())
    cpu = _cpu_name() or platform.processor()
    h.update(json.dumps([{k: list(v.shape) for k, v in sorted(feeds.items())}, threads, runs, warmup,
                         ort.__version__, cpu]).encode())
    return h.hexdigest()


def _graph_bytes(model) -> bytes:
    """What ONNX Runtime runs of a model: its metadata (the recipe's hash, the deploy settings) left out,
    so a recipe edit that does not change the graph (a fidelity budget) keeps its profile; it profiled
    anew, and a changed decision could not be told from timing noise."""
    if not hasattr(model, "SerializeToString"):
        return bytes(model)
    if not model.metadata_props and not model.doc_string:
        return model.SerializeToString()
    bare = type(model)()
    bare.CopyFrom(model)
    del bare.metadata_props[:]
    bare.doc_string = ""
    return bare.SerializeToString()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cached_node_times(cache_dir: Path, models: list, feeds: dict[str, np.ndarray], threads: int | None,
                      runs: int = 20, warmup: int = 5, measure=None) -> tuple[list[list[NodeTime]], dict]:
    """``node_times`` through a timing cache (as TensorRT keeps one): the first profile of these
    exact models, inputs and settings on this CPU is stored in ``cache_dir``, and later calls reuse
    it, so a rerun makes the same speed decisions instead of new ones from a noisy machine. Returns
    the times and ``{"file", "hit"}``; delete the file (or the folder) to profile again."""
    from dataclasses import asdict

    from uadc.core.io import atomic_write_json
    key = _cache_key(models, feeds, threads, runs, warmup)
    path = Path(cache_dir) / f"{key[:24]}.json"
    if path.is_file():
        try:
            data = parse_json(path.read_text(encoding="utf-8"))
            times = [[NodeTime(**t) for t in ts] for ts in data["times"]] if data.get("key") == key else None
            # an entry cut short (`"times": []`, a model without nodes) decided on no profile at all
            if times is not None and len(times) == len(models) and all(times) and \
                    all(isinstance(t.us, (int, float)) and math.isfinite(t.us) and t.us >= 0 for ts in times for t in ts):
                return times, {"file": path.name, "hit": True}
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # a damaged entry is measured again and rewritten
    times = (measure or node_times)(models, feeds, threads, runs, warmup)
    atomic_write_json(path, {"key": key, "times": [[asdict(t) for t in ts] for ts in times]})
    return times, {"file": path.name, "hit": False}
