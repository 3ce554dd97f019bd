"""``python -m bench.paper_tables``: the seed paper's tables and figures, recomputed on our data.

1. checkpoints: ``<artifacts>/<recipe>/checkpoint.pt`` (and ``one_class/<cat>/checkpoint.pt``) are
   reused when ``load_checkpoint`` accepts them for the recipe, otherwise trained (``uadc.train``);
2. Table 2: one-class vs unified multi-class AUROC (torch FP32 evaluation of those checkpoints);
3. Table 4: calibrator x calibration data for the default method (``compare_calibrators``);
4. Tables 5-7: FP32 / INT8-PTQ / INT8-QAT compiles per method (``uadc.compile`` from one
   ``uadc.baseline`` per recipe), every number read back from the artifact's ``report.json``;
5. figures: AUROC vs latency (PaSTe Fig. 1) and FP32-vs-INT8 anomaly-map overlays.

Compile artifacts go to ``<artifacts>/<recipe>/bench/``; tables and figures to ``--out``, written
into a temporary folder and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shlex
import shutil
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click
import numpy as np

from uadc.config.recipe import Recipe, load_recipe
from uadc.core.errors import UadcError
from uadc.report.markdown import signed

if TYPE_CHECKING:
    from uadc.pipeline.baseline import Baseline

DEFAULT_METHODS = ("stfpm", "paste", "rd", "us")
DEFAULT_METHOD = "stfpm"  # Table 4 and the overlays use it (the seed paper's default)
FP32_TARGET, INT8_TARGET = "ort-cpu-fp32", "ort-cpu-int8"
CALIBRATORS = ("entropy", "mse")          # KL vs L2, as in the paper's Table 4
CALIB_SOURCES = ("train", "random-normal")
FP16_NOTE = "FP16: no runtime here (TensorRT targets build on the device)"
PARTITIONS = ("teacher", "student", "head")
RESULT_JSON = "paper_tables.json"  # marks --out as a bench output (replaced by the next run)
# quickstart.yaml keys that make a run small; method-specific keys (taps, combine, lr) stay the recipe's.
QUICK_KEYS = {"data": ("image_size",), "model": ("smoothing_sigma",), "train": ("epochs", "batch_size"),
              "compile": ("calib_samples",)}


@dataclass
class BenchOptions:
    epochs_scale: float = 1.0
    one_class: bool = True
    qat: bool = True
    threads: int | None = None
    quick: dict | None = None          # section overrides from quickstart.yaml (--quick)
    latency_runs: int = 30
    overlay_images: int = 3
    log: Callable[[str], None] = lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ recipes
def resolve_recipe_paths(names: list[str], recipe_dir: Path) -> list[Path]:
    """``stfpm`` -> ``<recipe_dir>/stfpm_effnet_lite0.yaml``; a ``.yaml`` name is a path (or a file in recipe_dir)."""
    def one(n: str) -> Path:
        if not n.endswith((".yaml", ".yml")):
            return recipe_dir / f"{n}_effnet_lite0.yaml"
        return Path(n) if Path(n).is_file() or Path(n).is_absolute() else recipe_dir / n
    return [one(n) for n in names]


def quick_overrides(recipe_dir: Path) -> dict:
    """The quickstart recipe's size/budget settings, as ``with_overrides`` sections (validated by load_recipe)."""
    cfg = load_recipe(recipe_dir / "quickstart.yaml").cfg
    return {**{s: {k: cfg[s][k] for k in keys} for s, keys in QUICK_KEYS.items()}, "qat": {"epochs": 1}}


def prepare_recipe(path: Path, opts: BenchOptions) -> Recipe:
    """Load and apply --quick / --epochs-scale / --threads.

    A reduced budget gets its own artifact folder (``<name>_quick``, ``<name>_x0.5``) so a bench
    run never overwrites, or reports as its own, the full-budget checkpoints."""
    r, suffix = load_recipe(path), ""
    scaled = lambda epochs: max(1, round(epochs * opts.epochs_scale))  # noqa: E731
    if opts.quick:  # never more epochs than the recipe's own (US trains fewer than quickstart)
        quick = {**opts.quick, "train": {**opts.quick["train"],
                                         "epochs": min(opts.quick["train"]["epochs"], r.train.epochs)}}
        r, suffix = r.with_overrides(**quick), suffix + "_quick"
    if opts.epochs_scale != 1:
        r = r.with_overrides(train={"epochs": scaled(r.train.epochs)}, qat={"epochs": scaled(r.qat.epochs)})
        suffix += f"_x{opts.epochs_scale:g}"
    if opts.threads:
        r = r.with_overrides(train={"threads": opts.threads})
    return r.with_overrides(name=r.name + suffix) if suffix else r


def bench_dir(recipe: Recipe, artifacts: Path) -> Path:
    return recipe.artifact_dir(artifacts) / "bench"


def _label(recipe: Recipe) -> dict:
    return {"recipe": recipe.name, "method": recipe.model.method, "backbone": recipe.model.backbone}


# -------------------------------------------------------------------------------- checkpoints
def _reusable(path: Path, recipe: Recipe, log: Callable[[str], None]) -> dict | None:
    """The checkpoint blob if it exists and ``load_checkpoint`` accepts it for this recipe."""
    from uadc.training.checkpoint import load_checkpoint
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path, recipe)[1]
    except UadcError as exc:
        log(f"not reusing {path}: {exc}")
        return None


def ensure_checkpoints(recipe: Recipe, artifacts: Path, one_class: bool, log: Callable[[str], None]) -> dict:
    """``{"unified": info, "one_class": {cat: info}}``; trains whatever is missing or stale."""
    from uadc.data.sources import resolve_sources
    from uadc.pipeline import api
    from uadc.training.checkpoint import checkpoint_path, load_checkpoint
    out: dict = {}
    for oc in ((False, True) if one_class else (False,)):
        cats = [c for _, c in resolve_sources([s.model_dump() for s in recipe.data.sources])] if oc else [None]
        paths = {c: checkpoint_path(recipe, artifacts, c) for c in cats}
        blobs = {c: _reusable(p, recipe, log) for c, p in paths.items()}
        reused = all(b is not None for b in blobs.values())
        kind = "one-class" if oc else "unified"
        if reused:
            log(f"{recipe.name}: reusing {kind} checkpoint(s) {', '.join(map(str, paths.values()))}")
        else:  # a one-class run trains every category, so any gap retrains all
            log(f"{recipe.name}: training {kind} ({recipe.train.epochs} epochs)")
            api.train(recipe, one_class=oc, artifacts=artifacts)
            blobs = {c: load_checkpoint(p, recipe)[1] for c, p in paths.items()}
        infos = {c: {"path": str(paths[c]), "reused": reused, "epochs": len(blobs[c].get("history", [])),
                     "train_seconds": blobs[c].get("train_seconds")} for c in cats}
        out[kind.replace("-", "_")] = infos if oc else infos[None]
    return out


# ------------------------------------------------------------------------------------ Table 2
def table2_entry(recipe: Recipe, base: Baseline, ckpts: dict, log: Callable[[str], None]) -> dict:
    """Unified model (the baseline's) on every category vs each category's own model (torch FP32)."""
    from uadc.core.scoped import torch_threads
    from uadc.evaluation import metrics
    from uadc.evaluation.run import evaluate, torch_predictor
    from uadc.training.checkpoint import load_checkpoint
    bs, arrays = recipe.eval.batch_size, base.test_arrays
    log(f"{recipe.name}: Table 2 evaluation")
    with torch_threads(base.threads):
        entry = {**_label(recipe), "unified": evaluate(torch_predictor(base.model), arrays, bs, "unified").to_dict(),
                 "unified_source": ckpts["unified"]["path"], "one_class": None, "one_class_sources": None}
        if "one_class" in ckpts:
            per_cat = {}
            for cat, info in ckpts["one_class"].items():
                m, _ = load_checkpoint(Path(info["path"]), recipe)
                per_cat[cat] = evaluate(torch_predictor(m), {cat: arrays[cat]}, bs, "one-class").categories[cat]
            entry["one_class"] = metrics.summarize(per_cat)
            entry["one_class_sources"] = {c: i["path"] for c, i in ckpts["one_class"].items()}
    return entry


# ------------------------------------------------------------------------------------ Table 4
def table4(recipe: Recipe, base: Baseline, artifacts: Path, log: Callable[[str], None]) -> dict:
    """Calibrator x calibration data, ORT CPU INT8, student only (compiled from ``base``)."""
    from uadc.pipeline.compare import compare_calibrators
    out = bench_dir(recipe, artifacts) / f"calibrators_{INT8_TARGET}"
    log(f"{recipe.name}: Table 4 ({' x '.join(CALIBRATORS)} by {' x '.join(CALIB_SOURCES)})")
    res = compare_calibrators(recipe, INT8_TARGET, list(CALIBRATORS), list(CALIB_SOURCES), None, ["student"], out,
                              artifacts, baseline=base, reuse=False).to_dict()
    for cell in res["cells"].values():
        cell["source"] = str(out / f"{cell['calibrator']}_{cell['calib_data']}" / "report.json")
    return {**_label(recipe), **res, "source": str(out / "compare.json")}


def best_cell(t4: dict) -> tuple[str, str]:
    cell = t4["cells"][t4["best"]]
    return cell["calibrator"], cell["calib_data"]


# -------------------------------------------------------------------------------- Tables 5-7
def row_from_report(recipe: Recipe, precision: str, report_path: Path) -> dict:
    r = json.loads(report_path.read_text())
    m, lat = r["metrics"], r["latency_ms"]
    return {**_label(recipe), "precision": precision, "target": r["target"],
            "quantized": r["quantized_partitions"], "calibrator": r["calibrator"], "calib_data": r["calib_data"],
            "image_auroc": m["compiled"]["mean"]["image_auroc"], "pixel_auroc": m["compiled"]["mean"]["pixel_auroc"],
            "image_drop": m["drop"]["mean"]["image_auroc"], "pixel_drop": m["drop"]["mean"]["pixel_auroc"],
            "categories": {c: {"image_auroc": v["image_auroc"], "pixel_auroc": v["pixel_auroc"]}
                           for c, v in m["compiled"]["categories"].items()},
            "latency_p50_ms": lat["compiled"]["p50"], "latency_p90_ms": lat["compiled"]["p90"],
            "latency_runs": lat["compiled"]["runs"], "threads": lat["threads"], "batch": lat["batch"],
            "bytes": r["bytes"], "model_bytes": r["model_bytes"], "source": str(report_path), "note": None}


def note_row(recipe: Recipe, precision: str, quantized: list[str], note: str) -> dict:
    return {**_label(recipe), "precision": precision, "quantized": quantized, "note": note}


# (precision label, artifact folder, target, quantized partitions); None = float target
PTQ_VARIANTS = [("FP32", "fp32", FP32_TARGET, None),
                ("INT8-PTQ", "int8_ptq_student", INT8_TARGET, ["student"]),
                ("INT8-PTQ", "int8_ptq_student_teacher", INT8_TARGET, ["student", "teacher"])]


def precision_rows(recipe: Recipe, base: Baseline, best: tuple[str, str], artifacts: Path, opts: BenchOptions
                   ) -> tuple[list[dict], dict[str, Path]]:
    """Rows for Tables 5-7 and the artifact folders they came from (by folder name).

    The PTQ variants are one sweep (target x quantized partitions, Table 4's best calibration) from
    the shared baseline, each compiled into its folder again by this run (latencies are this run's)."""
    from uadc.pipeline.sweep.fixed import run_fixed_grid
    from uadc.pipeline.sweep.spec import Axes
    cal, src = best
    out = bench_dir(recipe, artifacts)
    variant = {(target, tuple(q or ())): (precision, slug) for precision, slug, target, q in PTQ_VARIANTS}
    axes = Axes(target=list(dict.fromkeys(v[2] for v in PTQ_VARIANTS)), calibrator=[cal], calib_data=[src],
                quantize=[v[3] for v in PTQ_VARIANTS if v[3] is not None], precision=["target"])
    key = lambda c: (c.axes["target"], tuple(c.axes["quantize"] or ()))  # noqa: E731
    opts.log(f"{recipe.name}: FP32 and INT8-PTQ ({cal} / {src}) compiles")
    run_fixed_grid(recipe, axes, out, artifacts, lambda c: variant[key(c)][1], latency_runs=opts.latency_runs,
                   what="bench Tables 5-7", baseline=base, reuse=False)
    rows, dirs = [], {}
    for precision, slug, _, _ in PTQ_VARIANTS:
        dirs[slug] = out / slug
        rows.append(row_from_report(recipe, precision, out / slug / "report.json"))
    rows.append(qat_row(recipe, base, best, artifacts, opts))
    rows.append(note_row(recipe, "FP16", [], FP16_NOTE))
    return rows, dirs


def qat_row(recipe: Recipe, base: Baseline | None, best: tuple[str, str], artifacts: Path, opts: BenchOptions) -> dict:
    """``uadc.qat`` on the shared baseline, initialised from Table 4's best PTQ cell (student only), then
    compiled like the PTQ rows."""
    if not opts.qat:
        return note_row(recipe, "INT8-QAT", ["student"], "skipped (--skip-qat)")
    try:
        import uadc.quant.qat.run  # noqa: F401  (a missing QAT module is reported, not fatal)
    except ImportError as exc:
        return note_row(recipe, "INT8-QAT", ["student"], f"not available: {exc}")
    import onnx
    from uadc.pipeline import api
    opts.log(f"{recipe.name}: INT8-QAT student ({recipe.qat.epochs} epochs)")
    init = recipe.with_overrides(compile={"calibrator": best[0], "calib_data": best[1], "quantize": ["student"]})
    try:  # the QAT model goes to uadc qat's own folder, <artifacts>/<recipe>/qat_<target>
        q = api.qat(init, INT8_TARGET, compile_after=False, artifacts=artifacts, source=base)
        res = api.compile(base, INT8_TARGET, quantize=["student"], qat_model=onnx.load(str(q.qat_model_path)),
                          out=bench_dir(recipe, artifacts) / "int8_qat_student", force=True,
                          latency_runs=opts.latency_runs, artifacts=artifacts)
    except Exception as exc:  # one method failing in QAT must not throw away the whole run
        opts.log(f"{recipe.name}: QAT failed:\n{traceback.format_exc()}")
        return note_row(recipe, "INT8-QAT", ["student"], f"failed: {type(exc).__name__}: {exc}")
    row = row_from_report(recipe, "INT8-QAT", res.path / "report.json")
    row.update(calibrator=f"qat (init {best[0]})", calib_data=best[1], qat_epochs=recipe.qat.epochs)
    return row


# ------------------------------------------------------------------------------------ figures
def _mpl():
    import matplotlib
    matplotlib.use("Agg")  # headless; must precede pyplot
    import matplotlib.pyplot as plt
    return plt


def plot_auroc_vs_latency(rows: list[dict], path: Path, subtitle: str) -> None:
    """PaSTe Fig. 1 style: image AUROC vs latency p50, marker area proportional to model bytes.

    Colour = method/backbone, marker = precision, short text = precision and quantized partitions."""
    plt = _mpl()
    pts = [r for r in rows if r.get("note") is None]
    biggest = max((r["model_bytes"] for r in pts), default=1)
    models = sorted({f"{r['method']}/{r['backbone']}" for r in pts})
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    markers = {"FP32": "o", "INT8-PTQ": "s", "INT8-QAT": "^"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in pts:
        xy = (r["latency_p50_ms"], r["image_auroc"])
        ax.scatter(*xy, s=30 + 600 * r["model_bytes"] / biggest, color=colors[f"{r['method']}/{r['backbone']}"],
                   marker=markers.get(r["precision"], "D"), alpha=0.6, edgecolors="k")
        ax.annotate(_variant(r), xy, fontsize=7, xytext=(5, 5), textcoords="offset points")
    handles = [ax.scatter([], [], color=colors[m], label=m) for m in models]
    handles += [ax.scatter([], [], color="gray", marker=mk, label=p) for p, mk in markers.items()]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set(xlabel="latency p50, batch 1 (ms)", ylabel="image AUROC (mean over categories)")
    ax.set_title(f"AUROC vs latency; marker area ∝ model bytes (largest {biggest / 1e6:.2f} MB)\n{subtitle}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variant(r: dict) -> str:
    """FP32, PTQ-S, PTQ-S+T, QAT-S."""
    q = "+".join(p[0].upper() for p in r.get("quantized") or [])
    return "FP32" if r["precision"] == "FP32" else f"{r['precision'].split('-')[-1]}-{q}"


def defect_indices(labels: np.ndarray, n: int) -> list[int]:
    """n defective test images spread over the set (deterministic)."""
    bad = np.flatnonzero(labels)
    return (bad if len(bad) <= n else bad[np.linspace(0, len(bad) - 1, n).round().astype(int)]).tolist()


def plot_overlays(recipe: Recipe, arrays: dict, fp32_dir: Path, int8_dir: Path, out_dir: Path, n: int,
                  threads: int | None) -> dict[str, str]:
    """Per category: image | ground truth | FP32 map | INT8 map, maps from the artifacts' model.onnx (ORT)."""
    from uadc.backends.ort import make_session, ort_predictor
    plt = _mpl()
    fp32 = ort_predictor(make_session(fp32_dir / "model.onnx", threads))
    int8 = ort_predictor(make_session(int8_dir / "model.onnx", threads))
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in recipe.normalization())
    files = {}
    for cat, (images, masks, labels) in arrays.items():
        idx = defect_indices(labels, n)
        if not idx:
            continue
        x = images[idx]
        (fm, fs), (qm, qs) = fp32(x), int8(x)
        vmin, vmax = float(min(fm.min(), qm.min())), float(max(fm.max(), qm.max()))  # one scale: maps comparable
        fig, axes = plt.subplots(len(idx), 4, figsize=(10, 2.7 * len(idx)), squeeze=False)
        for row, i in enumerate(idx):
            rgb = np.clip(images[i] * std + mean, 0, 1).transpose(1, 2, 0)
            panels = [("image", None, None), ("ground truth", masks[i], "gray"),
                      (f"FP32 map (score {fs[row]:.3g})", fm[row], "jet"),
                      (f"INT8 map (score {qs[row]:.3g})", qm[row], "jet")]
            for ax, (title, layer, cmap) in zip(axes[row], panels):
                if cmap == "gray":
                    ax.imshow(layer, cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(rgb)
                    if layer is not None:
                        ax.imshow(layer, cmap=cmap, alpha=0.5, vmin=vmin, vmax=vmax)
                ax.set_title(title, fontsize=8)
                ax.axis("off")
        fig.suptitle(f"{recipe.name}: {cat} (test images {idx}); maps share one colour scale", fontsize=9)
        fig.tight_layout()
        name = f"overlays_{re.sub(r'[^A-Za-z0-9_.-]', '_', cat)}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        files[cat] = name
    return files


# ----------------------------------------------------------------------------------- markdown
def _f(v, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v + 0.0, fmt)  # + 0.0 turns -0.0 into 0.0


def _rel(p: str | Path) -> str:
    """Paths in the tables: relative to the working directory when below it."""
    full, cwd = Path(p).resolve(), Path.cwd().resolve()
    return str(full.relative_to(cwd)) if full.is_relative_to(cwd) else str(p)


def render_header(meta: dict) -> list[str]:
    env = meta["environment"]
    lines = ["# Seed-paper tables on our data", "",
             f"- generated {meta['finished']} by `{meta['command']}`; total run time **{meta['seconds']:.0f} s**",
             f"- machine: {env['cpu']}, {env['cores']} cores; threads: **{meta['threads']}** (torch and ONNX Runtime "
             f"intra-op; latencies are batch 1, p50 of {meta['latency_runs']} runs after warm-up, ONNX Runtime CPU, "
             f"measured in this process during this run)",
             f"- versions: torch {env['torch']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, "
             f"uadc {env['uadc']}, python {env['python']}",
             f"- budget: epochs-scale {meta['epochs_scale']:g}; quick (quickstart.yaml settings): "
             f"{'yes' if meta['quick'] else 'no'}; QAT: "
             + (", ".join(f"{k} {v} epochs" for k, v in meta["qat_epochs"].items()) if meta["qat"] else "skipped"),
             f"- paths are relative to the working directory of the run, `{meta['cwd']}`; each number's source "
             "(checkpoint, report.json) is named next to it",
             "", "| recipe | seed | checkpoint | epochs | train s | reused / trained here |", "|---|---:|---|---:|---:|---|"]
    for name, c in meta["checkpoints"].items():
        infos = [("unified", c["unified"])] + [(f"one-class {k}", v) for k, v in (c.get("one_class") or {}).items()]
        for kind, i in infos:
            lines.append(f"| {name} ({kind}) | {meta['seeds'][name]} | {_rel(i['path'])} | {i['epochs']} | "
                         f"{_f(i['train_seconds'], '.0f')} | {'reused' if i['reused'] else 'trained'} |")
    return lines + [""]


def render_table2(t2: list[dict]) -> list[str]:
    lines = ["## Table 2: one-class vs unified multi-class (torch FP32)", "",
             "One model per category (one-class) against one model for all categories (unified), each evaluated "
             "on every category's test set. Δ = unified − one-class.", ""]
    for e in t2:
        u, o = e["unified"], e["one_class"]
        lines += [f"### {e['method']} / {e['backbone']} ({e['recipe']})", "",
                  f"Sources: unified {_rel(e['unified_source'])}; one-class "
                  + (", ".join(_rel(p) for p in e["one_class_sources"].values()) if o else "skipped (--skip-one-class)"),
                  "", "| category | image AUROC one-class | image AUROC unified | Δ image | pixel AUROC one-class "
                  "| pixel AUROC unified | Δ pixel |", "|---|---:|---:|---:|---:|---:|---:|"]
        for cat in list(u["categories"]) + ["mean"]:
            uv = u["mean"] if cat == "mean" else u["categories"][cat]
            ov = (o["mean"] if cat == "mean" else o["categories"][cat]) if o else {}
            cells = [c for k in ("image_auroc", "pixel_auroc")
                     for c in (_f(ov.get(k)), _f(uv[k]), _f(uv[k] - ov[k] if k in ov else None, "+.4f"))]
            lines.append(f"| {'**mean**' if cat == 'mean' else cat} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_table4(t4: dict) -> list[str]:
    from uadc.pipeline.compare import render_matrix
    return [f"## Table 4: PTQ calibration ({t4['method']} / {t4['backbone']}, {t4['target']}, student only)", "",
            "Calibrators: entropy = KL divergence, mse = L2 error. Calibration data: training images vs "
            "random normal noise.", "", render_matrix(t4, list(CALIBRATORS), list(CALIB_SOURCES)), "",
            f"Sources: {_rel(t4['source'])}; cells: "
            + ", ".join(f"{k} {_rel(c['source'])}" for k, c in t4["cells"].items()), ""]


def render_tables5_7(rows: list[dict], best: tuple[str, str]) -> list[str]:
    lines = ["## Tables 5–7: precision vs AUROC, latency and size", "",
             f"INT8-PTQ uses Table 4's best cell ({best[0]} / {best[1]}); quantized: S = student, T = teacher. "
             f"Bytes = initializer bytes per partition (report `bytes`); model = whole ONNX file. {FP16_NOTE}.", "",
             "| method | backbone | precision | quantized | calibration | image AUROC | pixel AUROC | Δ image vs FP32 "
             "| latency p50 ms | teacher bytes | student bytes | head bytes | model bytes | source |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        q = "+".join(r.get("quantized") or []) or "—"
        if r.get("note"):
            lines.append(f"| {r['method']} | {r['backbone']} | {r['precision']} | {q} | — | — | — | — | — | — | — "
                         f"| — | — | {r['note']} |")
            continue
        cal = f"{r['calibrator']} / {r['calib_data']}" if r["calibrator"] else "—"
        b = [f"{r['bytes'].get(p, 0):,}" for p in PARTITIONS]
        lines.append(f"| {r['method']} | {r['backbone']} | {r['precision']} | {q} | {cal} | {_f(r['image_auroc'])} "
                     f"| {_f(r['pixel_auroc'])} | {signed(-r['image_drop'], '—')} | {_f(r['latency_p50_ms'], '.2f')} | "
                     + " | ".join(b) + f" | {r['model_bytes']:,} | {_rel(r['source'])} |")
    return lines + [""]


def render_figures(fig: dict) -> list[str]:
    lines = ["## Figures", "", f"![AUROC vs latency]({fig['auroc_vs_latency']})", "",
             "Image AUROC (y) against latency p50 (x), marker area ∝ model bytes; one point per row of Tables 5–7 "
             "that has numbers.", "",
             f"Anomaly-map overlays ({fig['overlays_recipe']}): FP32 map from {_rel(fig['overlays_fp32'])}/model.onnx, "
             f"INT8 map from {_rel(fig['overlays_int8'])}/model.onnx (both run with ONNX Runtime).", ""]
    return lines + [f"- {cat}: ![{cat}]({name})" for cat, name in fig["overlays"].items()] + [""]


def render_markdown(result: dict) -> str:
    lines = render_header(result["meta"]) + render_table2(result["table2"]) + render_table4(result["table4"])
    lines += render_tables5_7(result["tables5_7"], best_cell(result["table4"]))
    return "\n".join(lines + render_figures(result["figures"]))


# --------------------------------------------------------------------------------------- run
def _check_out(out: Path) -> None:
    """--out may be absent, empty or a previous bench output (checked again before any training)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()) or \
            (out.is_dir() and any(out.iterdir()) and not (out / RESULT_JSON).is_file()):
        raise UadcError(f"--out {out} exists and is not a bench output (no {RESULT_JSON}); choose another --out")


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies inside it (resolved: links and ``..`` followed)."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or b in a.parents


def check_out_place(out: Path, artifacts: Path, names: list[str]) -> None:
    """The finished tables replace --out whole: not --artifacts or a folder above it, nor a recipe's own
    folder (the default, <artifacts>/bench, lies beside those)."""
    if _within(artifacts, out) or any(_within(out, artifacts / n) or _within(artifacts / n, out) for n in names):
        raise UadcError(f"--out {out} holds --artifacts {artifacts} or a recipe's folder there, and the finished "
                        f"tables replace --out whole; choose another --out (default: <artifacts>/bench)")


@contextlib.contextmanager
def _atomic_out(final: Path) -> Iterator[Path]:
    """A temp folder beside ``final``, renamed into place (replacing ``final``) only when the block succeeds."""
    _check_out(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not tempfile.mkdtemp: its 0700 became the output folder's mode (others could not read it)
    tmp, old = (final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}" for _ in range(2))
    tmp.mkdir()
    old.mkdir()
    try:
        yield tmp
        if final.exists():
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    finally:
        for d in (tmp, old):
            shutil.rmtree(d, ignore_errors=True)


def run_bench(recipe_paths: list[Path], artifacts: Path, out: Path, opts: BenchOptions | None = None,
              command: str = "run_bench(...)") -> dict:
    """Everything above, in order; returns the data written to ``<out>/paper_tables.json``."""
    from uadc.core.io import atomic_write_json, atomic_write_text
    from uadc.pipeline import api
    from uadc.pipeline.compile import environment
    opts = opts or BenchOptions()
    t0, log = time.time(), opts.log
    recipes = [prepare_recipe(Path(p), opts) for p in recipe_paths]  # every recipe validated before any training
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UadcError(f"two recipes share an artifact folder name: {names}")
    _check_out(out)
    check_out_place(out, artifacts, names)
    ckpts = {r.name: ensure_checkpoints(r, artifacts, opts.one_class, log) for r in recipes}
    default = next((r for r in recipes if r.model.method == DEFAULT_METHOD), recipes[0])
    bases = {default.name: api.baseline(default, artifacts=artifacts, threads=opts.threads)}  # shared with Table 4
    t4 = table4(default, bases[default.name], artifacts, log)
    best = best_cell(t4)
    t2, rows, overlay_src = [], [], None
    for r in recipes:  # one baseline per recipe: export, test images and FP32 metrics computed once
        base = bases.pop(r.name, None) or api.baseline(r, artifacts=artifacts, threads=opts.threads)
        t2.append(table2_entry(r, base, ckpts[r.name], log))
        r_rows, dirs = precision_rows(r, base, best, artifacts, opts)
        rows += r_rows
        if r is default:
            overlay_src = (base.test_arrays, dirs["fp32"], dirs["int8_ptq_student"])  # kept for the figures
    used = sorted({r["threads"] for r in rows if r.get("note") is None})  # what the reports measured with
    threads = used[0] if len(used) == 1 else used
    env = environment(threads)
    with _atomic_out(out) as tmp:
        log(f"figures -> {out}")
        subtitle = f"{env['cpu']}, threads: {threads}, batch 1, ONNX Runtime CPU"
        plot_auroc_vs_latency(rows, tmp / "auroc_vs_latency.png", subtitle)
        overlays = plot_overlays(default, *overlay_src, tmp, opts.overlay_images, opts.threads)
        figures = {"auroc_vs_latency": "auroc_vs_latency.png", "overlays": overlays, "overlays_recipe": default.name,
                   "overlays_fp32": str(overlay_src[1]), "overlays_int8": str(overlay_src[2])}
        meta = {"command": command, "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 1), "threads": threads, "environment": env,
                "latency_runs": opts.latency_runs, "epochs_scale": opts.epochs_scale, "quick": bool(opts.quick),
                "quick_overrides": opts.quick, "qat": opts.qat, "one_class": opts.one_class,
                "seeds": {r.name: r.seed for r in recipes},
                "train_epochs": {r.name: r.train.epochs for r in recipes},
                "qat_epochs": {r.name: r.qat.epochs for r in recipes},
                "recipes": {r.name: str(r.path) for r in recipes}, "artifacts": str(artifacts), "cwd": str(Path.cwd()),
                "checkpoints": ckpts}
        result = {"meta": meta, "table2": t2, "table4": t4, "tables5_7": rows, "figures": figures}
        atomic_write_json(tmp / RESULT_JSON, result)
        atomic_write_text(tmp / "paper_tables.md", render_markdown(result))
    log(f"written: {out / 'paper_tables.md'} ({time.time() - t0:.0f} s)")
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipes", default=",".join(DEFAULT_METHODS), show_default=True,
              help="methods (-> <dir>/<m>_effnet_lite0.yaml) or recipe .yaml paths, comma-separated")
@click.option("--data-recipe-dir", type=click.Path(path_type=Path), default=Path("recipes"), show_default=True)
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: <artifacts>/bench")
@click.option("--epochs-scale", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="multiply train.epochs and qat.epochs (artifacts then go to <recipe>_x<F>)")
@click.option("--skip-one-class", is_flag=True, help="no one-class models (Table 2 shows unified only)")
@click.option("--skip-qat", is_flag=True, help="no INT8-QAT rows")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch/ORT intra-op threads (default: the recipe's train.threads, else all cores)")
@click.option("--quick", is_flag=True, help="quickstart.yaml size/epochs for every method (artifacts: <recipe>_quick)")
@click.option("--latency-runs", type=click.IntRange(min=1), default=None, help="default 30 (10 with --quick)")
def main(recipes: str, data_recipe_dir: Path, artifacts: Path, out: Path | None, epochs_scale: float,
         skip_one_class: bool, skip_qat: bool, threads: int | None, quick: bool, latency_runs: int | None) -> None:
    """Reproduce the seed paper's Tables 2, 4, 5-7 and figures on this project's data."""
    names = [n.strip() for n in recipes.split(",") if n.strip()]
    if not names:   # an IndexError deep in the run
        raise click.BadParameter("no recipe given", param_hint="--recipes")
    command = "python -m bench.paper_tables " + shlex.join(sys.argv[1:])
    try:
        opts = BenchOptions(epochs_scale=epochs_scale, one_class=not skip_one_class, qat=not skip_qat,
                            threads=threads, quick=quick_overrides(data_recipe_dir) if quick else None,
                            latency_runs=latency_runs or (10 if quick else 30))
        run_bench(resolve_recipe_paths(names, data_recipe_dir), artifacts, out or artifacts / "bench", opts, command)
    except UadcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing was written to --out (finished checkpoints/artifacts are kept)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    # uadc logs (compiles written, calibrator cells, QAT losses) to the "uadc" logger and never prints
    logging.basicConfig(format="[uadc] %(message)s")
    logging.getLogger("uadc").setLevel(logging.INFO)
    main()
