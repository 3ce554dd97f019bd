"""Run a uadc graph on ONNX Runtime with the cores split across independent work, not inside nodes.

At 128 px a uadc model is a few hundred small nodes: ORT's intra-op threads mostly wait on each
other there (INT8 convolutions on a 8x8 map barely split), so two cores give little over one. The
graph has coarser parallelism of its own:

* ``branches``: the teacher and the student read only the image (STFPM, US; not PaSTe, RD), so their partitions run at the same
  time, each in its own session (half the cores each), then the head and whatever follows it
  (``uadc.export.partitions.branch_models``);
* ``batch``: a batch is split into one chunk per core, each run by its own whole-model session.

Every image goes through the same kernels as in one session, so outputs match a plain session's at
the same batch size (checked in tests); as in any session, an image's score may differ in the last
float bits (~1e-7) with the size of the batch it runs in. ``auto`` picks ``branches`` for a single image and ``batch`` for more. Like a
session, ``run(output_names, feeds)`` returns the outputs; ``close()`` stops its worker threads.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from uadc.core.errors import UadcError
from uadc.core.ort_session import make_session

log = logging.getLogger(__name__)
SCHEDULES = ("auto", "branches", "batch", "sequential")


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cap_threads(threads: int | None) -> int:
    """``threads`` (None or 0: every core), at most the cores this process may run on: more ran slower
    (threads queueing for cores), and a figure timed at N threads would have run on fewer. Said once."""
    cores = available_cores()
    if threads and threads > cores:
        log.warning("threads %d: this process may run on %d core(s); using %d", threads, cores, cores)
    return min(max(1, int(threads or cores)), cores)


class ParallelSession:
    """A session-like runner of one uadc ONNX (ModelProto, bytes or path) on ``threads`` cores."""

    def __init__(self, model: Any, threads: int | None = None, schedule: str = "auto"):
        if schedule not in SCHEDULES:
            raise UadcError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        self.threads = cap_threads(threads)   # each thread past the cores was one more session, model and all
        self.schedule = schedule
        self.whole = make_session(model, self.threads)
        self._inputs = self.whole.get_inputs()
        self.output_names = [o.name for o in self.whole.get_outputs()]
        parallel = self.threads > 1 and schedule != "sequential"
        self._pool = ThreadPoolExecutor(self.threads - 1) if parallel else None
        self._pid = os.getpid()
        # 'branches' on a graph that cannot split is refused whatever the threads (one ran it whole, exit 0)
        parts = _branch_parts(model, schedule == "branches") if (parallel and schedule == "auto") or \
            schedule == "branches" else None
        self._branches = tuple(make_session(p, max(1, self.threads // 2)) for p in parts) \
            if parallel and parts is not None else None
        self._chunks = [make_session(model, 1) for _ in range(self.threads)] \
            if parallel and schedule in ("auto", "batch") else []

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self.whole.get_outputs()

    def plan(self, batch: int) -> str:
        """What ``run`` does for a batch of ``batch`` images."""
        if self._pool is None:
            return "sequential"
        if self.schedule == "branches" or (self.schedule == "auto" and batch == 1 and self._branches):
            return "branches"
        if self._chunks and batch > 1:
            return "batch"
        return "sequential"

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        names = list(output_names or self.output_names)
        batch = len(feeds[self._inputs[0].name])  # the image (a default-valued input may be left out)
        how = self.plan(batch)
        if how == "branches":
            return self._run_branches(names, feeds)
        if how == "batch":
            return self._run_batch(names, feeds, batch)
        return self.whole.run(names, feeds)

    def _workers(self) -> ThreadPoolExecutor:
        """The pool; a forked child (a server's preloaded workers) gets its own: the parent's threads do not
        exist there, and work handed to the copied pool never ran (the child hung)."""
        if self._pid != os.getpid() and self._pool is not None:
            self._pool, self._pid = ThreadPoolExecutor(self.threads - 1), os.getpid()
        return self._pool

    def _run_branches(self, names: list[str], feeds: dict) -> list[np.ndarray]:
        teacher, student, head = self._branches
        later = self._workers().submit(_run_all, student, feeds)
        values = {**feeds, **_run_all(teacher, feeds)}
        values.update(later.result())
        out = dict(zip([o.name for o in head.get_outputs()],  # inputs with a default may be left out
                       head.run(None, {i.name: values[i.name] for i in head.get_inputs() if i.name in values})))
        return [out[n] if n in out else values[n] for n in names]

    def _run_batch(self, names: list[str], feeds: dict, batch: int) -> list[np.ndarray]:
        n = min(len(self._chunks), batch)
        bounds = np.linspace(0, batch, n + 1).astype(int)
        parts = [{k: v[a:b] for k, v in feeds.items()} for a, b in zip(bounds[:-1], bounds[1:])]
        pool = self._workers()
        later = [pool.submit(s.run, names, f) for s, f in zip(self._chunks[1:n], parts[1:])]
        outs = [self._chunks[0].run(names, parts[0])] + [f.result() for f in later]
        return [np.concatenate([o[i] for o in outs]) for i in range(len(names))]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "ParallelSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_all(session, feeds: dict) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {i.name: feeds[i.name] for i in session.get_inputs()})))


def _branch_parts(model: Any, required: bool):
    """(teacher, student, join) models when teacher and student read only the graph's input
    (``uadc.export.partitions.branch_models``); else None (``required``: a one-line error instead)."""
    try:
        import onnx

        from uadc.export.partitions import branch_models
    except ImportError:  # an edge box may carry onnxruntime without onnx: batch splitting still works
        if required:
            raise UadcError("schedule 'branches' needs the onnx package (pip install onnx)") from None
        return None
    proto = model if hasattr(model, "graph") else onnx.load_from_string(model) if isinstance(model, bytes) \
        else onnx.load(str(model), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    parts = None if external else branch_models(proto)   # the parts read external data from the working folder
    if parts is None:
        if required:
            raise UadcError("schedule 'branches': the graph has no independent teacher and student partitions "
                            "(PaSTe's and Reverse Distillation's students read teacher features) or keeps weights in external data "
                            "files; use 'batch' or 'auto'")
        return None
    return parts
