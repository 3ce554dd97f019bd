"""What one sweep task does (a training, a model's FP32 baseline, one cell), as plain functions.

Ray runs them as tasks (``ray_exec``); ``--sequential`` calls them in-process one after another.
Each cell compiles through the public API (``uadc.pipeline.api``) from a ``Baseline`` seeded with
the model's shared FP32 stages, so export, FP32 metrics and FP32 latency run once per model.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from uadc.core.errors import UadcError
from uadc.core.hashing import sha256_file
from uadc.core.io import file_lock
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.sweep.plan import Cell, Model, cell_key
from uadc.pipeline.sweep.spec import RunConfig
from uadc.pipeline.sweep.store import cell_dir, load_record, write_record

log = logging.getLogger(__name__)
_BASELINES: dict[tuple, Baseline] = {}   # per worker process: a model's baseline, reused by its cells
_MAX_CACHED = 2


@dataclass
class ModelInfo:
    key: str
    checkpoint: str
    sha256: str
    trained: bool = False
    train_seconds: float = 0.0


@dataclass
class BaselineState:
    """A model's FP32 stages, shipped to every cell of the model."""

    onnx: bytes = b""
    records: list = field(default_factory=list)
    fp32_metrics: object = None
    torch_vs_ort: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    error: str | None = None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if isinstance(exc, UadcError) else f"{type(exc).__name__}: {msg}"
    return msg[:500]


def ensure_model(model: Model, artifacts: Path, allow_train: bool) -> ModelInfo:
    """The model's checkpoint (trained here when missing and allowed) and its sha256."""
    from uadc.pipeline import api
    from uadc.training.checkpoint import checkpoint_path, other_training
    r = model.recipe()
    ckpt = checkpoint_path(r, artifacts)
    trained, seconds = False, 0.0
    # another sweep (another --out) missing the same model waits, then uses its checkpoint: both trained it, and
    # the second replaced the checkpoint the first's records name
    with file_lock(ckpt.parent):
        differ = other_training(ckpt, r) if ckpt.is_file() else None
        if differ:   # the recipe's train section edited since: its cells ran the old model as if new
            raise UadcError(f"checkpoint {ckpt} was trained with other training settings than {model.name}'s "
                            f"recipe ({differ}); a sweep trains missing models only: retrain it with `uadc train`, "
                            f"or give the recipe another name: key")
        if not ckpt.is_file():
            if not allow_train:
                raise UadcError(f"no checkpoint for {model.name} at {ckpt} (run.train is false)")
            t0 = time.time()
            api.train(r, artifacts=artifacts)
            trained, seconds = True, round(time.time() - t0, 1)
        sha = sha256_file(ckpt)
    return ModelInfo(model.key, str(ckpt), sha, trained, seconds)


def build_baseline(model: Model, info: ModelInfo, run: RunConfig) -> BaselineState:
    """Export + simplify, FP32 metrics, torch-vs-ORT check and FP32 latency of one model."""
    try:
        b = _baseline(model, info, run, None)
        b.fp32_latency(run.latency_runs, run.threads)
        state = BaselineState(b.fp32.SerializeToString(), b.fp32_simplified[1],
                              b.fp32_metrics if run.evaluate else None, b.torch_vs_ort, dict(b._latency))
    except UadcError as exc:
        return BaselineState(error=one_line(exc))
    return state


def _baseline(model: Model, info: ModelInfo, run: RunConfig, state: BaselineState | None) -> Baseline:
    """This process's baseline of the model, seeded with ``state``'s FP32 stages when given."""
    from uadc.pipeline import api
    key = (info.key, info.sha256, run.threads)
    b = _BASELINES.get(key)
    if b is None:
        b = api.baseline(Path(info.checkpoint), model.recipe(), threads=run.threads)
        _check_same_checkpoint(b, info)
        if state is not None:  # computed once per model by its baseline task
            import onnx
            b.__dict__["fp32_simplified"] = (onnx.load_from_string(state.onnx), state.records)
            b.__dict__["torch_vs_ort"] = state.torch_vs_ort
            if state.fp32_metrics is not None:
                b.__dict__["fp32_metrics"] = state.fp32_metrics
            b._latency.update(state.latency)
        while len(_BASELINES) >= _MAX_CACHED:
            _BASELINES.pop(next(iter(_BASELINES)))
        _BASELINES[key] = b
    return b


def _check_same_checkpoint(b: Baseline, info: ModelInfo, again: str = "run the sweep again") -> None:
    """The model read is the one the sweep hashed: a retrain meanwhile was recorded under the old hash."""
    if b.checkpoint_sha256 not in (None, info.sha256):
        raise UadcError(f"checkpoint {info.checkpoint} was trained again since the sweep read it; {again}")


@contextmanager
def given_baseline(info: ModelInfo, run: RunConfig, b: Baseline) -> Iterator[None]:
    """In this process, the model's cells compile from the caller's baseline (already exported)."""
    if b.checkpoint_sha256 is None:   # a KDModel's: its cells were recorded, and reused, as the checkpoint file's
        raise UadcError("baseline: built from a model in memory, not from a checkpoint file, so its results cannot be "
                        "recorded under one; pass uadc.baseline(CHECKPOINT, recipe)")
    _check_same_checkpoint(b, info, "build a new Baseline (uadc.baseline)")
    key = (info.key, info.sha256, run.threads)
    _BASELINES[key] = b
    try:
        yield
    finally:
        _BASELINES.pop(key, None)


def run_cell(cell: Cell, model: Model, info: ModelInfo, state: BaselineState, out: Path, artifacts: Path,
             run: RunConfig) -> dict:
    """Compile one cell (or return its finished record); a user error becomes a failed record."""
    key = cell_key(cell, model, info.sha256, run)
    done = load_record(out, key)
    if done is not None:
        return {**done, "reused": True}
    t0 = time.time()
    try:
        if state.error:
            raise UadcError(state.error)
        res = _compile(cell, key, model, info, state, out, artifacts, run)
        record = {**base_record(cell, key, info), "status": "ok", **summarize(res, out)}
    except Exception as exc:  # a crash inside the cell is this cell's failure; a killed worker is retried by Ray
        log.debug("cell %s failed", cell.id, exc_info=True)
        record = failed_record(cell, key, info, one_line(exc))
    record["seconds"] = round(time.time() - t0, 2)
    write_record(out, record)
    return record


def _compile(cell: Cell, key: str, model: Model, info: ModelInfo, state: BaselineState, out: Path,
             artifacts: Path, run: RunConfig):
    """One folder per key: a cell with other inputs never replaces the artifact a record names."""
    from uadc.pipeline import api
    b = _baseline(model, info, run, state)
    o = cell.options
    folder = out / cell.artifact if cell.artifact else cell_dir(out, f"{cell.folder}-{key[:8]}")
    return api.compile(b, o["target"], calibration=o["calib_data"], calibrator=o["calibrator"],
                       calib_samples=o["calib_samples"], quantize=o["quantize"], precision=o.get("precision"),
                       out=folder, force=True, evaluate=run.evaluate,
                       latency_runs=run.latency_runs, threads=run.threads, artifacts=artifacts)


def base_record(cell: Cell, key: str | None, info: ModelInfo | None) -> dict:
    return {"key": key, "cell": cell.id, "axes": cell.axes, "model": cell.model,
            "checkpoint_sha256": info.sha256 if info else None, "trained": bool(info and info.trained)}


def failed_record(cell: Cell, key: str | None, info: ModelInfo | None, error: str) -> dict:
    return {**base_record(cell, key, info), "status": "failed", "error": error}


def summarize(res, out: Path) -> dict:
    """The table's figures of one compile (the full report stays in the cell's folder)."""
    lat = res.latency
    row = {"artifact": str(Path(res.path).relative_to(out)), "target": res.target, "precision": res.precision,
           "latency_ms": lat.compiled["p50"], "ort_fp32_ms": lat.ort_fp32["p50"],
           "speedup_vs_fp32": round(lat.speedup_vs_ort_fp32, 3), "model_bytes": res.model_bytes,
           "compile_seconds": res.compile_seconds,
           "max_abs_vs_fp32": res.verification["fp32_vs_compiled"]["max_abs"]}
    if not res.calibrator:   # nothing calibrated (precision auto kept FP32, a QAT model): the cell's calibration
        row.update(calibrator=None, calib_data=None, calib_samples=None,   # axes describe no shipped model
                   quantize="+".join(res.quantized_partitions) or None)
    m = res.metrics
    if m is not None:
        row.update(image_auroc=m.compiled["mean"]["image_auroc"], pixel_auroc=m.compiled["mean"].get("pixel_auroc"),
                   fp32_image_auroc=m.fp32["mean"]["image_auroc"],
                   image_drop=m.drop["mean"]["image_auroc"], pixel_drop=m.drop["mean"].get("pixel_auroc"))
    # share of test images with the same accept/reject verdict as FP32 (where the report has it)
    decisions = (getattr(res, "deploy", None) or {}).get("decisions") or {}
    row["decision_agreement"] = (decisions.get("overall") or {}).get("agreement")
    row["gate_passed"] = ((res.verification or {}).get("gate") or {}).get("passed")   # None: TensorRT (no gate here)
    row["emulated"] = bool(lat.emulated)   # TensorRT timed by ONNX Runtime on this CPU: no latency of the target
    return row
