"""Typed results of a compile: what ``report.json`` holds, as attributes.

``CompileResult.to_dict()`` *is* report.json (schema ``REPORT_SCHEMA``); the CLI prints from the
object, never by re-reading the file. Every figure names what produced it: ``latency.compiled``
carries ``runtime``, and for TensorRT targets on a machine without TensorRT it says that ONNX
Runtime emulated the artifact on the CPU (``emulated: true``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uadc.core.constants import REPORT_SCHEMA
from uadc.core.errors import one_line
from uadc.core.io import JsonResult, to_json
from uadc.report.markdown import float_counts


@dataclass
class Latency(JsonResult):
    """p50/p90 ms at ``batch``; each entry also names its runtime."""

    torch_fp32: dict
    ort_fp32: dict
    compiled: dict
    batch: int
    threads: int
    runtime: str                 # what ran "compiled"
    emulated: bool               # True: not the target's own runtime (e.g. TensorRT emulated by ORT CPU)
    deployed: dict | None = None  # "compiled" as uadc's runtime runs it (ORT: uadc.backends.parallel, auto)

    @property
    def speedup_vs_ort_fp32(self) -> float:
        return self.ort_fp32["p50"] / self.compiled["p50"]

    def to_dict(self) -> dict:
        return {"torch_fp32": self.torch_fp32, "ort_fp32": self.ort_fp32, "compiled": self.compiled,
                "batch": self.batch, "threads": self.threads, "runtime": self.runtime, "emulated": self.emulated,
                **({"deployed": self.deployed} if self.deployed else {})}


@dataclass
class Metrics(JsonResult):
    """AD metrics, each ``{"mean": {...}, "categories": {...}}``; drop = fp32 - compiled."""

    fp32: dict
    compiled: dict
    drop: dict
    compiled_by: str             # runtime that produced "compiled"
    note: str | None = None
    int8: bool = True            # an emulated FP16 / FP32 TensorRT target's figures are no INT8 prediction
    not_evaluated: dict[str, str] = field(default_factory=dict)   # category -> why `mean` leaves it out

    def to_dict(self) -> dict:
        d = {"fp32": self.fp32, "compiled": self.compiled, "drop": self.drop, "compiled_by": self.compiled_by}
        if self.not_evaluated:
            d["not_evaluated"] = dict(self.not_evaluated)
        if self.note:
            d.update({"emulated_int8": self.compiled} if self.int8 else {}, compiled_note=self.note)
        return d


@dataclass
class CompileResult:
    target: str
    precision: str
    runtime: str
    device: str
    calibrator: str | None
    calib_data: str | None
    quantized_partitions: list[str]
    recipe: str
    recipe_hash: str
    checkpoint: str | None
    nodes: dict[str, int]
    qdq_nodes: dict[str, int]
    bytes: dict[str, int]
    model_bytes: int
    passes: list[dict]
    verification: dict
    compile_seconds: float
    latency: Latency
    environment: dict
    metrics: Metrics | None = None
    engine: dict | None = None
    deploy: dict | None = None   # thresholds (FP32 and compiled) and decisions on the test sets
    path: Path | None = None     # the artifact folder
    extra: dict[str, Any] = field(default_factory=dict)

    # convenience figures
    @property
    def image_auroc(self) -> float | None:
        return self.metrics.compiled["mean"]["image_auroc"] if self.metrics else None

    @property
    def pixel_auroc(self) -> float | None:
        return self.metrics.compiled["mean"].get("pixel_auroc") if self.metrics else None

    @property
    def model_path(self) -> Path | None:
        return self.path / "model.onnx" if self.path else None

    def to_dict(self) -> dict:
        d = {"schema": REPORT_SCHEMA, "target": self.target, "precision": self.precision, "runtime": self.runtime,
             "device": self.device, "calibrator": self.calibrator, "calib_data": self.calib_data,
             "quantized_partitions": list(self.quantized_partitions), "recipe": self.recipe,
             "recipe_hash": self.recipe_hash, "checkpoint": self.checkpoint, "nodes": self.nodes,
             "qdq_nodes": self.qdq_nodes, "bytes": self.bytes, "model_bytes": self.model_bytes,
             "passes": self.passes, "verification": self.verification, "compile_seconds": self.compile_seconds,
             "latency_ms": self.latency.to_dict(), "environment": self.environment}
        if self.metrics is not None:
            d["metrics"] = self.metrics.to_dict()
        if self.engine is not None:
            d["engine"] = self.engine
        if self.deploy is not None:
            d["deploy"] = self.deploy
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        return to_json(self.to_dict())

    def summary_lines(self) -> list[str]:
        """What ``uadc compile`` prints: verification, metrics, latency, precision search, decisions."""
        v = self.verification["torch_vs_ort_fp32"]
        g = self.verification.get("gate")
        gate = "" if g is None else f"; regression gate: {'PASS' if g['passed'] else 'REGRESSION'}"
        lines = [f"torch vs ORT FP32: {'passed' if v['passed'] else 'FAILED'} (max abs {v['max_abs']:.2e}){gate}"]
        if self.metrics is not None:
            f, c = self.metrics.fp32["mean"], self.metrics.compiled["mean"]
            shipped = f"{self.target} (QAT)" if self.calibrator == "qat" else self.target   # not the PTQ artifact's
            lines.append(f"image AUROC fp32 {f['image_auroc']:.4f} -> {shipped} {c['image_auroc']:.4f}" + (
                f"; pixel AUROC {f['pixel_auroc']:.4f} -> {c['pixel_auroc']:.4f}" if "pixel_auroc" in f else ""))
        lat = self.latency
        deployed = (f", {lat.deployed['p50']:.2f} ms as uadc predict runs it ({lat.deployed['schedule']})"
                    if lat.deployed else "")
        lines.append(f"latency p50 (batch 1, {lat.threads} thread{'s' * (lat.threads != 1)}): torch {lat.torch_fp32['p50']:.2f} ms, "
                     f"ORT fp32 {lat.ort_fp32['p50']:.2f} ms, compiled {lat.compiled['p50']:.2f} ms "
                     f"({lat.runtime}){deployed}; compile {self.compile_seconds:.1f} s")
        if self.engine:
            lines.append(self.engine.get("status", ""))
        if (ps := self.extra.get("precision_search")) is not None:
            fs = ps.get("float_stage")  # TensorRT: the float layers' FP16/FP32 stage
            floats = float_counts(ps) + (f" (float layers modelled on {ps['profile']['gpu']})" if fs else "")
            lines.append(f"precision auto: {ps['final']['int8_groups']} groups INT8, {floats}; "
                         f"search {ps['seconds']:.1f} s (report.md lists every decision)")
        if dec := (self.deploy or {}).get("decisions"):
            o, far = dec["overall"], self.deploy["false_alarm_rate"]
            lines.append(f"decisions at false-alarm rate {far:g}: false-reject fp32 "
                         f"{o['fp32']['false_reject_rate']:.3f} -> {o['compiled']['false_reject_rate']:.3f}, escape "
                         f"{o['fp32']['escape_rate']:.3f} -> {o['compiled']['escape_rate']:.3f}, "
                         f"agreement {o['agreement']:.4f}")
        lines.append(one_line(f"artifact written: {self.path}"))   # an --out holding a newline: one line
        return lines
