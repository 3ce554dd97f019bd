"""``uadc calibrators compare``: one compile per calibrator x calibration-data cell on the same
exported model, summarised as a matrix of image / pixel AUROC and their drop vs FP32 (the seed
paper's Table 4 in one command).

The grid is a sweep (``uadc.pipeline.sweep.fixed``): axes calibrator x calib_data, the target,
samples and partitions fixed; in this process by default, on Ray with ``ray``/``address``. Each
cell compiles into ``<out>/<calibrator>_<data>`` as before; its record lets a rerun with the same
inputs reuse it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uadc.config.recipe import Recipe, default_artifacts_root
from uadc.config.settings import resolve_ptq
from uadc.config.targets import TARGETS, get_target
from uadc.core.errors import UadcError, md_cell
from uadc.core.io import atomic_write_json, atomic_write_text, to_json
from uadc.core.names import contained
from uadc.core.numbers import fixed_difference
from uadc.core.scoped import quiet_third_party
from uadc.pipeline.baseline import Baseline
from uadc.pipeline.sweep.fixed import run_fixed_grid
from uadc.pipeline.sweep.run import check_grid_out
from uadc.pipeline.sweep.spec import Axes

log = logging.getLogger(__name__)
LATENCY_RUNS = 10


@dataclass
class CompareResult:
    """The calibrator x calibration-data matrix; ``to_dict()`` is ``compare.json``."""
    target: str
    quantized_partitions: list[str]
    calib_samples: int
    fp32: dict[str, float | None]                # mean image / pixel AUROC of the FP32 model
    cells: dict[str, dict[str, Any]]             # "calibrator/data" -> AUROC, drops, per category
    best: str                                    # the cell with the smallest image-AUROC drop
    out: Path | None = None
    markdown: str = field(repr=False, default="")

    @property
    def failed(self) -> list[str]:
        """Cells that failed (their ``error`` in ``cells``): the others are still compared."""
        return [k for k, c in self.cells.items() if c.get("error")]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0     # as a sweep with failed cells

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "quantized_partitions": list(self.quantized_partitions),
                "calib_samples": self.calib_samples, "fp32": self.fp32, "cells": self.cells, "best": self.best,
                "failed": self.failed}

    def to_json(self) -> str:
        return to_json(self.to_dict())


def compare_calibrators(recipe: Recipe, target: str, calibrators: list[str], sources: list[str],
                        calib_samples: int | None = None, quantize: list[str] | None = None, out: Path | None = None,
                        artifacts: Path | None = None, baseline: Baseline | None = None, *, ray: bool = False,
                        address: str | None = None, reuse: bool = True) -> CompareResult:
    """The matrix (also written as ``compare.json`` / ``compare.md`` under ``out``); ``baseline``: the
    caller's FP32 baseline of the recipe's checkpoint, reused when the grid runs in this process;
    ``reuse=False``: every cell compiled again (not read back from an earlier run's record)."""
    _check_options(recipe, target, calibrators, sources, calib_samples, quantize)
    artifacts = Path(artifacts or default_artifacts_root()).absolute()
    out = Path(out or recipe.artifact_dir(artifacts) / f"calibrators_{target}").absolute()
    check_grid_out(out)
    axes = Axes(target=[target], calibrator=list(calibrators), calib_data=list(sources),
                calib_samples=[calib_samples], quantize=[list(quantize) if quantize else None],
                precision=["target"])  # calibrators compared on fixed partitions, never a search per cell
    # named calibrators and data stay as given (only None takes the recipe's): a cell's axes are the pair
    pair = lambda c: (c.axes["calibrator"], c.axes["calib_data"])  # noqa: E731
    done = run_fixed_grid(recipe, axes, out, artifacts, lambda c: contained(out, "_".join(pair(c)), "calibrator").name,
                          latency_runs=LATENCY_RUNS, what="calibrators compare", baseline=baseline, ray=ray,
                          address=address, reuse=reuse, keep_failed=True)
    return write_matrix(recipe, target, calibrators, sources, calib_samples, quantize, out,
                        {pair(c): report for c, report in done})


def _check_options(recipe: Recipe, target: str, calibrators: list[str], sources: list[str],
                   calib_samples: int | None, quantize: list[str] | None) -> None:
    """A user mistake is the command's one-line error before any cell runs (not a failed cell)."""
    from uadc.calibrators import available_calibrators, get_calibrator
    t = get_target(target)
    if not t.quantized:
        raise UadcError(f"calibrators compare: target {target} is not quantized (nothing to calibrate)")
    known = available_calibrators()
    for cal in calibrators:
        if cal not in known:
            raise UadcError(f"unknown calibrator {cal!r}; expected one of {', '.join(known)}")
        try:   # a plug-in that does not load failed every cell of its row, after the others' work
            with quiet_third_party():   # a plug-in's constructor may print: not on stdout
                get_calibrator(cal)
        except (ValueError, TypeError) as exc:
            raise UadcError(f"calibrator {cal!r}: {exc}") from None
    for src in sources:
        resolve_ptq(recipe, t, calibrators[0] if calibrators else None, src, calib_samples, quantize)


def write_matrix(recipe: Recipe, target: str, calibrators: list[str], sources: list[str], calib_samples: int | None,
                 quantize: list[str] | None, out: Path, reports: dict) -> CompareResult:
    """``compare.json`` / ``compare.md`` from each cell's report (keyed by (calibrator, data))."""
    cells = {}
    for (cal, src), report in reports.items():
        if "error" in report:
            cells[f"{cal}/{src}"] = {"calibrator": cal, "calib_data": src, "error": report["error"]}
            continue
        m = report["metrics"]
        cells[f"{cal}/{src}"] = {
            "calibrator": cal, "calib_data": src,
            "image_auroc": m["compiled"]["mean"]["image_auroc"], "pixel_auroc": m["compiled"]["mean"].get("pixel_auroc"),
            "image_drop": m["drop"]["mean"]["image_auroc"], "pixel_drop": m["drop"]["mean"].get("pixel_auroc"),
            "categories": {c: v["image_auroc"] for c, v in m["compiled"]["categories"].items()},
            "gate_passed": ((report.get("verification") or {}).get("gate") or {}).get("passed")}
    fp32 = next(r for r in reports.values() if "error" not in r)["metrics"]["fp32"]["mean"]
    # a cell failing its own regression gate is no recommendation, whatever its AUROC; None: no masks
    best = min((c for c in cells.values() if "error" not in c),
               key=lambda c: (c["gate_passed"] is False, c["image_drop"], c["pixel_drop"] or 0.0))
    result = CompareResult(target, list(quantize or recipe.compile.quantize),
                           calib_samples or recipe.compile.calib_samples,
                           {"image_auroc": fp32["image_auroc"], "pixel_auroc": fp32.get("pixel_auroc")}, cells,
                           f"{best['calibrator']}/{best['calib_data']}", out)
    atomic_write_json(out / "compare.json", result.to_dict())
    result.markdown = render_matrix(result.to_dict(), calibrators, sources)
    atomic_write_text(out / "compare.md", result.markdown + "\n")
    return result


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)     # pixel figures are None without test masks


def _change(value: float | None, fp32: float | None) -> str:
    return "-" if value is None or fp32 is None else fixed_difference(value, fp32)


def render_matrix(result: dict, calibrators: list[str], sources: list[str]) -> str:
    f = result["fp32"]
    lines = [f"Calibrators on {result['target']} (quantized: {', '.join(result['quantized_partitions'])}; "
             f"{result['calib_samples']} samples). FP32: image AUROC {f['image_auroc']:.4f}, "
             f"pixel AUROC {_num(f['pixel_auroc'], '.4f')}. Cells: image / pixel AUROC (change vs FP32; "
             f"REGRESSION: the cell fails its own regression gate)." + _ungated(result), "",
             "| calibrator | " + " | ".join(map(md_cell, sources)) + " |", "|---|" + "---|" * len(sources)]
    for cal in calibrators:
        row = []
        for src in sources:
            c = result["cells"][f"{cal}/{src}"]
            if c.get("error"):
                row.append(md_cell(f"failed: {c['error']}"))
                continue
            row.append(f"{c['image_auroc']:.4f} / {_num(c['pixel_auroc'], '.4f')} "   # changes of the figures shown
                       f"({_change(c['image_auroc'], f['image_auroc'])} / {_change(c['pixel_auroc'], f['pixel_auroc'])})"
                       + (" REGRESSION" if c.get("gate_passed") is False else ""))
        lines.append(f"| {md_cell(cal)} | " + " | ".join(row) + " |")
    gated = "passing its regression gate where any does" if not _ungated(result) else "no gate ran"
    lines += ["", f"Best cell (smallest image-AUROC drop, {gated}): **{result['best']}**"]
    return "\n".join(lines)


def _ungated(result: dict) -> str:
    """A TensorRT target's compile runs no gate (the engine is built on the device): its matrix read as if
    every cell had passed one."""
    target = TARGETS.get(result["target"])
    return " No regression gate ran at these compiles (TensorRT: `uadc verify CELL` judges one, by ONNX Runtime's " \
        "emulation)." if target is not None and target.runtime == "tensorrt" else ""
