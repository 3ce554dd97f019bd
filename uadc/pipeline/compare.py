"""``uadc calibrators compare``: one compile per calibrator x calibration-data cell on the same
exported model, summarised as a matrix of image / pixel AUROC and their drop vs FP32 (the seed
paper's Table 4 in one command)."""

from __future__ import annotations

import logging
from pathlib import Path

from uadc.config.recipe import Recipe
from uadc.core.io import atomic_write_json, atomic_write_text, contained
from uadc.pipeline.baseline import Baseline, resolve_source
from uadc.pipeline.compile import CompileOptions, compile_target

log = logging.getLogger(__name__)


def compare_calibrators(recipe: Recipe, target: str, calibrators: list[str], sources: list[str],
                        calib_samples: int | None = None, quantize: list[str] | None = None, out: Path | None = None,
                        artifacts: Path | None = None, baseline: Baseline | None = None) -> dict:
    out = out or recipe.artifact_dir(artifacts) / f"calibrators_{target}"
    b = baseline or Baseline(recipe, resolve_source(recipe, recipe, artifacts))
    cells = {}
    for cal in calibrators:
        for src in sources:
            log.info("== %s / %s", cal, src)
            opts = CompileOptions(target=target, calibrator=cal, calib_data=src, calib_samples=calib_samples,
                                  quantize=quantize, out=contained(out, f"{cal}_{src}", "calibrator"), force=True,
                                  latency_runs=10)
            m = compile_target(b, opts).to_dict()["metrics"]
            cells[f"{cal}/{src}"] = {
                "calibrator": cal, "calib_data": src,
                "image_auroc": m["compiled"]["mean"]["image_auroc"], "pixel_auroc": m["compiled"]["mean"]["pixel_auroc"],
                "image_drop": m["drop"]["mean"]["image_auroc"], "pixel_drop": m["drop"]["mean"]["pixel_auroc"],
                "categories": {c: v["image_auroc"] for c, v in m["compiled"]["categories"].items()}}
    fp32 = b.fp32_metrics.mean
    best = min(cells.values(), key=lambda c: (c["image_drop"], c["pixel_drop"]))
    result = {"target": target, "quantized_partitions": quantize or recipe.compile.quantize,
              "calib_samples": calib_samples or recipe.compile.calib_samples,
              "fp32": {"image_auroc": fp32["image_auroc"], "pixel_auroc": fp32["pixel_auroc"]},
              "cells": cells, "best": f"{best['calibrator']}/{best['calib_data']}"}
    atomic_write_json(out / "compare.json", result)
    result["markdown"] = render_matrix(result, calibrators, sources)
    atomic_write_text(out / "compare.md", result["markdown"] + "\n")
    return result


def render_matrix(result: dict, calibrators: list[str], sources: list[str]) -> str:
    f = result["fp32"]
    lines = [f"Calibrators on {result['target']} (quantized: {', '.join(result['quantized_partitions'])}; "
             f"{result['calib_samples']} samples). FP32: image AUROC {f['image_auroc']:.4f}, "
             f"pixel AUROC {f['pixel_auroc']:.4f}. Cells: image / pixel AUROC (drop vs FP32).", "",
             "| calibrator | " + " | ".join(sources) + " |", "|---|" + "---|" * len(sources)]
    for cal in calibrators:
        row = []
        for src in sources:
            c = result["cells"][f"{cal}/{src}"]
            row.append(f"{c['image_auroc']:.4f} / {c['pixel_auroc']:.4f} "
                       f"({-c['image_drop']:+.4f} / {-c['pixel_drop']:+.4f})")
        lines.append(f"| {cal} | " + " | ".join(row) + " |")
    lines += ["", f"Best cell (smallest image-AUROC drop): **{result['best']}**"]
    return "\n".join(lines)
