"""The sweep's table: every cell's figures as ``sweep.json``, ``sweep.md`` and ``sweep.csv``, the
best cell per objective and a Pareto plot of image AUROC vs latency (``pareto.png``).

Built only from the cell records, so a rerun that reuses every cell writes the same files."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from uadc.core.constants import LATENCY_WARMUP
from uadc.core.errors import csv_cell, md_cell
from uadc.core.io import atomic_save, atomic_write_json, atomic_write_text, to_json
from uadc.pipeline.sweep.plan import Plan
from uadc.report.markdown import signed

log = logging.getLogger(__name__)
COLUMNS = ("cell", "status", "target", "calibrator", "calib_data", "calib_samples", "quantize", "precision",
           "image_size", "seed", "one_class", "category", "image_auroc", "pixel_auroc", "image_drop", "pixel_drop",
           "decision_agreement", "gate_passed", "latency_ms", "emulated", "ort_fp32_ms", "speedup_vs_fp32", "model_bytes", "compile_seconds",
           "error", "artifact")
# objective -> (column, larger is better)
OBJECTIVES = {"image_auroc": ("image_auroc", True), "pixel_auroc": ("pixel_auroc", True),
              "latency": ("latency_ms", False), "size": ("model_bytes", False),
              "compile_time": ("compile_seconds", False)}


def make_rows(plan: Plan, records: list[dict]) -> list[dict]:
    rows = []
    for cell, rec in zip(plan.cells, records):
        cfg = plan.models[cell.model].cfg
        axes = {**cell.axes, "image_size": cfg["data"]["image_size"], "seed": cfg["seed"]}
        if axes.get("quantize") is not None:
            axes["quantize"] = "+".join(axes["quantize"])
        row = {c: None for c in COLUMNS}
        row.update({k: v for k, v in axes.items() if k in row})
        row.update({k: v for k, v in rec.items() if k in row})
        if rec.get("status") != "ok":   # the precision shipped: a failed cell's axis value (target, auto) read as one
            row["precision"] = None
        if row["precision"] == "fp32":   # auto kept every group FP32 (records written before summarize said so listed their axes)
            row.update(calibrator=None, calib_data=None, calib_samples=None, quantize=None)
        row.update(cell=cell.id, key=rec.get("key"))
        rows.append(row)
    return rows


def best_cells(rows: list[dict]) -> dict[str, str | None]:
    """Per objective, the best cell that passes its own regression gate (one that fails it is no
    recommendation); latency only among latencies measured on the target's runtime (not emulated)."""
    best = {}
    for name, (col, larger) in OBJECTIVES.items():
        ok = [r for r in _eligible(rows) if r.get(col) is not None and not (col == "latency_ms" and r.get("emulated"))]
        if not ok:
            best[name] = None
            continue
        pick = max(ok, key=lambda r: r[col]) if larger else min(ok, key=lambda r: r[col])
        best[name] = pick["cell"]   # ties: the first cell in plan order
    return best


def _eligible(rows: list[dict]) -> list[dict]:
    """Cells ranked against each other: those judged on the same test images. A one-class cell is
    judged on its own category only (its figures beat a unified mean over every category without
    being better): with unified cells in the grid only they are ranked; else the cells of one
    category; one-class cells of several categories are not ranked at all."""
    ok = [r for r in rows if r["status"] == "ok" and r.get("gate_passed") is not False]
    groups = {r.get("category") for r in ok}
    if None not in groups and len(groups) > 1:
        return []
    same = None if None in groups else next(iter(groups), None)
    return [r for r in ok if r.get("category") == same]


def pareto_front(rows: list[dict]) -> list[str]:
    """Cells no other cell beats on both image AUROC (higher) and latency (lower), among those that
    pass their gate and were timed on their target's runtime (an emulated latency is no latency)."""
    pts = [r for r in _eligible(rows) if r.get("image_auroc") is not None and not r.get("emulated")]
    front = []
    for r in pts:
        dominated = any(o["image_auroc"] >= r["image_auroc"] and o["latency_ms"] <= r["latency_ms"] and
                        (o["image_auroc"] > r["image_auroc"] or o["latency_ms"] < r["latency_ms"]) for o in pts)
        if not dominated:
            front.append(r["cell"])
    return front


def write_table(plan: Plan, records: list[dict], out: Path) -> dict:
    """The table files; pareto.png is redrawn unless sweep.json already holds this very table (a
    rerun that reused every cell of the same grid keeps its files byte-identical)."""
    rows = make_rows(plan, records)
    best, front = best_cells(rows), pareto_front(rows)
    timing = {"batch": 1, "threads": plan.run.threads, "runs": plan.run.latency_runs, "warmup": LATENCY_WARMUP}
    md = render_markdown(plan.name, rows, best, front, timing)
    files = {"json": out / "sweep.json", "markdown": out / "sweep.md", "csv": out / "sweep.csv"}
    doc = {"name": plan.name, "latency": timing, "cells": rows, "best": best, "pareto": front,
           "failed": [r["cell"] for r in rows if r["status"] != "ok"]}
    plot = not (out / "pareto.png").is_file() or _previous(files["json"]) != to_json(doc)
    # the plot before sweep.json, which says whether it is current: a run stopped while it was drawn
    # (a second) had written the new sweep.json, and the rerun kept the plot of the grid before
    try:
        png = write_pareto_png(rows, front, out / "pareto.png", plan.name) if plot else out / "pareto.png"
    except Exception:   # the plot failed (matplotlib, the disk): the tables still, no stale plot beside them
        (out / "pareto.png").unlink(missing_ok=True)
        _write_tables(files, doc, md, rows)
        raise
    if png:
        files["pareto"] = png
    elif plot:   # nothing to plot now (no AUROC, every cell failed): the last run's plot showed other cells
        (out / "pareto.png").unlink(missing_ok=True)
    _write_tables(files, doc, md, rows)
    return {"rows": rows, "best": best, "pareto": front, "files": files, "markdown": md, "latency": timing}


def _write_tables(files: dict[str, Path], doc: dict, md: str, rows: list[dict]) -> None:
    atomic_write_json(files["json"], doc)
    atomic_write_text(files["markdown"], md + "\n")
    atomic_write_text(files["csv"], _csv(rows))


def _previous(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "key"], lineterminator="\n")
    w.writeheader()
    w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)   # a recipe named =1+2 ran as a formula
    return buf.getvalue()


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def render_markdown(name: str, rows: list[dict], best: dict, front: list[str], timing: dict | None = None) -> str:
    how = "" if timing is None else (f", {timing['threads']} thread{'s' * (timing['threads'] != 1)}, {timing['runs']} "
                                     f"timed runs after {timing['warmup']} warm-up")
    lines = [f"Sweep {name}: {len(rows)} cells, {sum(r['status'] == 'ok' for r in rows)} ok. AUROC drop = FP32 - "
             f"compiled; latency p50 at batch 1{how}; speed-up = ORT FP32's p50 / the cell's (below 1: slower).", "",
             "| cell | status | image AUROC | pixel AUROC | image drop | pixel drop | test agreement | latency ms | "
             "speed-up vs ORT FP32 | MB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        status = ("ok, REGRESSION" if r.get("gate_passed") is False else "ok") if r["status"] == "ok" else \
            f"failed: {r['error']}"
        mb = None if r["model_bytes"] is None else r["model_bytes"] / 1e6
        lines.append(f"| {md_cell(r['cell'])} | {md_cell(status)} | {_f(r['image_auroc'], '.4f')} | {_f(r['pixel_auroc'], '.4f')} | "
                     f"{signed(r['image_drop'], '')} | {signed(r['pixel_drop'], '')} | "
                     f"{_f(r['decision_agreement'], '.3f')} | {_f(r['latency_ms'], '.2f')}{'*' if r.get('emulated') else ''} | "
                     f"{_f(r['speedup_vs_fp32'], '.2f')} | {_f(mb, '.2f')} | {_f(r['compile_seconds'], '.1f')} |")
    if any(r.get("emulated") for r in rows):
        lines += ["", "*: emulated by ONNX Runtime on this CPU, not the target's runtime: no latency objective, "
                  "not on the Pareto front."]
    if any(r.get("category") for r in rows):
        lines += ["", "One-class cells are judged on their own category only: never ranked against cells judged "
                  "on other images."]
    if any(r.get("gate_passed") is False for r in rows):
        lines += ["", "REGRESSION: the cell fails its own regression gate (`uadc verify`): never a best cell."]
    lines += ["", "Best cell per objective: " + ("; ".join(f"{k}: **{v}**" for k, v in best.items() if v) or "none"),
              "", "Pareto front (image AUROC vs latency): " + (", ".join(front) or "none")]
    return "\n".join(lines)


def write_pareto_png(rows: list[dict], front: list[str], path: Path, title: str) -> Path | None:
    """Image AUROC vs latency, front highlighted; skipped (None) without matplotlib or points."""
    pts = [r for r in rows if r["status"] == "ok" and r.get("image_auroc") is not None and not r.get("emulated")]
    if not pts:
        return None
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("matplotlib is not installed: no pareto.png")
        return None
    fig = Figure(figsize=(7, 4.5))   # no pyplot: no process-wide figure state
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    on = [r for r in pts if r["cell"] in front]
    ax.scatter([r["latency_ms"] for r in pts], [r["image_auroc"] for r in pts], c="tab:gray", s=18, label="cell")
    on.sort(key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in on], [r["image_auroc"] for r in on], "o-", c="tab:red", label="Pareto front")
    for r in on:
        ax.annotate(r["cell"].split("/", 1)[-1], (r["latency_ms"], r["image_auroc"]), fontsize=6,
                    textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("latency p50, batch 1 (ms)")
    ax.set_ylabel("image AUROC")
    ax.set_title(f"sweep {title}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None}))
