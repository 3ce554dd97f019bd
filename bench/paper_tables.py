"""``python -m bench.paper_tables``: the seed paper's tables and figures, recomputed on our data.

1. checkpoints: ``<artifacts>/<recipe>/checkpoint.pt`` (and ``one_class/<cat>/checkpoint.pt``) are
   reused when ``load_checkpoint`` accepts them for the recipe, otherwise trained;
2. Table 2: one-class vs unified multi-class AUROC (torch FP32 evaluation of those checkpoints);
3. Table 4: calibrator x calibration data for the default method (``compare_calibrators``);
4. Tables 5-7: FP32 / INT8-PTQ / INT8-QAT compiles per method, every number read back from the
   artifact's ``report.json`` (compiled, evaluated and timed in this process);
5. figures: AUROC vs latency (PaSTe Fig. 1) and FP32-vs-INT8 anomaly-map overlays.

Compile artifacts go to ``<artifacts>/<recipe>/bench/``; tables and figures to ``--out``, written
into a temporary folder and renamed into place only when everything succeeded.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import re
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import numpy as np
from tqdm import tqdm

from uadc.errors import UadcError, exit_on_user_error
from uadc.recipe import Recipe, load_recipe

DEFAULT_METHODS = ("stfpm", "paste", "rd", "us")
DEFAULT_METHOD = "stfpm"  # Table 4 and the overlays use it (the seed paper's default)
FP32_TARGET, INT8_TARGET = "ort-cpu-fp32", "ort-cpu-int8"
CALIBRATORS = ("entropy", "mse")          # KL vs L2, as in the paper's Table 4
CALIB_SOURCES = ("train", "random-normal")
FP16_NOTE = "FP16: no runtime here (TensorRT targets build on the device)"
PARTITIONS = ("teacher", "student", "head")
# quickstart.yaml keys that make a run small; method-specific keys (taps, combine, lr) stay the recipe's.
QUICK_KEYS = {"data": ("image_size",), "model": ("smoothing_sigma",), "train": ("epochs", "batch_size"),
              "compile": ("calib_samples",)}


def default_log(msg: str) -> None:
    tqdm.write(f"[bench] {msg}")  # tqdm.write keeps the training/eval progress bars intact


@dataclass
class BenchOptions:
    epochs_scale: float = 1.0
    one_class: bool = True
    qat: bool = True
    threads: int | None = None
    quick: dict | None = None          # section overrides from quickstart.yaml (--quick)
    latency_runs: int = 30
    overlay_images: int = 3
    log: Callable[[str], None] = default_log


# ------------------------------------------------------------------------------------ recipes

def resolve_recipe_paths(names: list[str], recipe_dir: Path) -> list[Path]:
    """``stfpm`` -> ``<recipe_dir>/stfpm_effnet_lite0.yaml``; a ``.yaml`` name is a path (or a file in recipe_dir)."""
    paths = []
    for n in names:
        if n.endswith((".yaml", ".yml")):
            p = Path(n)
            paths.append(p if p.is_file() or p.is_absolute() else recipe_dir / n)
        else:
            paths.append(recipe_dir / f"{n}_effnet_lite0.yaml")
    return paths


def quick_overrides(recipe_dir: Path) -> dict:
    """The quickstart recipe's size/budget settings, as ``with_overrides`` sections (validated by load_recipe)."""
    cfg = load_recipe(recipe_dir / "quickstart.yaml").cfg
    over = {s: {k: cfg[s][k] for k in keys} for s, keys in QUICK_KEYS.items()}
    over["qat"] = {"epochs": 1}
    return over


def _scaled(epochs: int, scale: float) -> int:
    return max(1, round(epochs * scale))


def prepare_recipe(path: Path, opts: BenchOptions) -> Recipe:
    """Load and apply --quick / --epochs-scale / --threads.

    A reduced budget gets its own artifact folder (``<name>_quick``, ``<name>_x0.5``) so a bench
    run never overwrites, or reports as its own, the full-budget checkpoints."""
    r = load_recipe(path)
    suffix = ""
    if opts.quick:  # never more epochs than the recipe's own (US trains fewer than quickstart)
        quick = {**opts.quick, "train": {**opts.quick["train"],
                                         "epochs": min(opts.quick["train"]["epochs"], r["train"]["epochs"])}}
        r, suffix = r.with_overrides(**quick), suffix + "_quick"
    if opts.epochs_scale != 1:
        r = r.with_overrides(train={"epochs": _scaled(r["train"]["epochs"], opts.epochs_scale)},
                             qat={"epochs": _scaled(r["qat"]["epochs"], opts.epochs_scale)})
        suffix += f"_x{opts.epochs_scale:g}"
    if opts.threads:
        r = r.with_overrides(train={"threads": opts.threads})
    return Recipe({**r.cfg, "name": r.name + suffix}, r.path) if suffix else r


def bench_dir(recipe: Recipe, artifacts: Path) -> Path:
    return recipe.artifact_dir(artifacts) / "bench"


def _label(recipe: Recipe) -> dict:
    m = recipe["model"]
    return {"recipe": recipe.name, "method": m["method"], "backbone": m["backbone"]}


# -------------------------------------------------------------------------------- checkpoints

def _reusable(path: Path, recipe: Recipe, log: Callable[[str], None]) -> dict | None:
    """The checkpoint blob if it exists and ``load_checkpoint`` accepts it for this recipe."""
    from uadc.train import load_checkpoint
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path, recipe)[1]
    except UadcError as exc:
        log(f"not reusing {path}: {exc}")
        return None


def _ckpt_info(path: Path, blob: dict, reused: bool) -> dict:
    return {"path": str(path), "reused": reused, "epochs": len(blob.get("history", [])),
            "train_seconds": blob.get("train_seconds")}


def ensure_checkpoints(recipe: Recipe, artifacts: Path, one_class: bool, log: Callable[[str], None]) -> dict:
    """``{"unified": info, "one_class": {cat: info}}``; trains whatever is missing or stale."""
    from uadc.data import resolve_sources
    from uadc.train import checkpoint_path, load_checkpoint, train_recipe
    out: dict = {}
    for oc in ((False, True) if one_class else (False,)):
        cats = [c for _, c in resolve_sources(recipe["data"]["sources"])] if oc else [None]
        paths = {c: checkpoint_path(recipe, artifacts, c) for c in cats}
        blobs = {c: _reusable(p, recipe, log) for c, p in paths.items()}
        reused = all(b is not None for b in blobs.values())
        kind = "one-class" if oc else "unified"
        if reused:
            log(f"{recipe.name}: reusing {kind} checkpoint(s) {', '.join(map(str, paths.values()))}")
        else:  # train_recipe trains every category of a one-class run, so any gap retrains all
            log(f"{recipe.name}: training {kind} ({recipe['train']['epochs']} epochs)")
            train_recipe(recipe, artifacts, one_class=oc)
            blobs = {c: load_checkpoint(p, recipe)[1] for c, p in paths.items()}
        infos = {c: _ckpt_info(paths[c], blobs[c], reused) for c in cats}
        out["one_class" if oc else "unified"] = infos if oc else infos[None]
    return out


# ------------------------------------------------------------------------------------ Table 2

def table2_entry(recipe: Recipe, arrays: dict, ckpts: dict, log: Callable[[str], None]) -> dict:
    """Unified model on every category vs each category's own model (torch FP32)."""
    from uadc import metrics
    from uadc.evaluate import evaluate, torch_predictor
    from uadc.train import load_checkpoint, set_threads
    set_threads(recipe)
    bs = recipe["eval"]["batch_size"]
    log(f"{recipe.name}: Table 2 evaluation")
    model, _ = load_checkpoint(Path(ckpts["unified"]["path"]), recipe)
    entry = {**_label(recipe), "unified": evaluate(torch_predictor(model), arrays, bs, "unified"),
             "unified_source": ckpts["unified"]["path"], "one_class": None, "one_class_sources": None}
    if "one_class" in ckpts:
        per_cat = {}
        for cat, info in ckpts["one_class"].items():
            m, _ = load_checkpoint(Path(info["path"]), recipe)
            per_cat[cat] = evaluate(torch_predictor(m), {cat: arrays[cat]}, bs, "one-class")["categories"][cat]
        entry["one_class"] = metrics.summarize(per_cat)
        entry["one_class_sources"] = {c: i["path"] for c, i in ckpts["one_class"].items()}
    return entry


# ------------------------------------------------------------------------------------ Table 4

def table4(recipe: Recipe, artifacts: Path, log: Callable[[str], None]) -> dict:
    """Calibrator x calibration data, ORT CPU INT8, student only."""
    from uadc.compare import compare_calibrators
    out = bench_dir(recipe, artifacts) / f"calibrators_{INT8_TARGET}"
    log(f"{recipe.name}: Table 4 ({' x '.join(CALIBRATORS)} by {' x '.join(CALIB_SOURCES)})")
    res = compare_calibrators(recipe, INT8_TARGET, list(CALIBRATORS), list(CALIB_SOURCES), None, ["student"], out,
                              artifacts, log=log)
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


def precision_rows(recipe: Recipe, arrays: dict, best: tuple[str, str], artifacts: Path, opts: BenchOptions
                   ) -> tuple[list[dict], dict[str, Path]]:
    """Rows for Tables 5-7 and the artifact folders they came from (by folder name)."""
    from uadc.compile import CompileOptions, Compiler
    compiler = Compiler(recipe, artifacts, log=opts.log)
    compiler.test_arrays = arrays  # fills the cached_property slot: the test images are loaded once per recipe
    cal, src = best
    rows, dirs = [], {}
    for precision, slug, target, quantize in PTQ_VARIANTS:
        what = f"{precision} {'+'.join(quantize)}" if quantize else precision
        opts.log(f"{recipe.name}: {what} ({target})")
        q = quantize is not None
        o = CompileOptions(target=target, calibrator=cal if q else None, calib_data=src if q else None,
                           quantize=quantize, out=bench_dir(recipe, artifacts) / slug, latency_runs=opts.latency_runs)
        dirs[slug] = compiler.compile(o)
        rows.append(row_from_report(recipe, precision, dirs[slug] / "report.json"))
    rows.append(qat_row(recipe, compiler, best, artifacts, opts))
    rows.append(note_row(recipe, "FP16", [], FP16_NOTE))
    return rows, dirs


def _qat_model(qat, recipe: Recipe, compiler, best: tuple[str, str], out: Path, artifacts: Path, log):
    """(Q/DQ model, quantized partitions) from uadc.qat, initialised from Table 4's best PTQ cell."""
    cal, src = best
    if hasattr(qat, "QatOptions"):
        opts = qat.QatOptions(target=INT8_TARGET, calibrator=cal, calib_data=src, quantize=["student"], out=out)
        res = qat.run_qat(recipe, opts, artifacts, compiler=compiler, log=log)
        return res.model, res.quantize
    # the simpler API announced while uadc.qat was being written
    qat.run_qat(recipe, INT8_TARGET, artifacts, epochs=recipe["qat"]["epochs"])
    return qat.load_qat_model(recipe, INT8_TARGET, artifacts), ["student"]


def qat_row(recipe: Recipe, compiler, best: tuple[str, str], artifacts: Path, opts: BenchOptions) -> dict:
    from uadc.compile import CompileOptions
    if not opts.qat:
        return note_row(recipe, "INT8-QAT", ["student"], "skipped (--skip-qat)")
    try:
        qat = importlib.import_module("uadc.qat")  # lazily: the QAT module is optional and newer than the rest
        qat.run_qat  # noqa: B018  (presence check)
    except (ImportError, AttributeError) as exc:
        return note_row(recipe, "INT8-QAT", ["student"], f"not available: {exc}")
    d = bench_dir(recipe, artifacts)
    opts.log(f"{recipe.name}: INT8-QAT student ({recipe['qat']['epochs']} epochs)")
    try:
        model, quantize = _qat_model(qat, recipe, compiler, best, d / f"qat_{INT8_TARGET}", artifacts, opts.log)
        out = compiler.compile(CompileOptions(target=INT8_TARGET, quantize=quantize, qat_model=model,
                                              out=d / "int8_qat_student", latency_runs=opts.latency_runs))
    except Exception as exc:  # QAT is new: one method failing there must not throw away the whole run
        opts.log(f"{recipe.name}: QAT failed:\n{traceback.format_exc()}")
        return note_row(recipe, "INT8-QAT", ["student"], f"failed: {type(exc).__name__}: {exc}")
    row = row_from_report(recipe, "INT8-QAT", out / "report.json")
    row.update(calibrator=f"qat (init {best[0]})", calib_data=best[1], qat_epochs=recipe["qat"]["epochs"])
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
    ax.set_xlabel("latency p50, batch 1 (ms)")
    ax.set_ylabel("image AUROC (mean over categories)")
    ax.set_title(f"AUROC vs latency; marker area ∝ model bytes (largest {biggest / 1e6:.2f} MB)\n{subtitle}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _variant(r: dict) -> str:
    """FP32, PTQ-S, PTQ-S+T, QAT-S."""
    if r["precision"] == "FP32":
        return "FP32"
    q = "+".join(p[0].upper() for p in r.get("quantized") or [])
    return f"{r['precision'].split('-')[-1]}-{q}"


def defect_indices(labels: np.ndarray, n: int) -> list[int]:
    """n defective test images spread over the set (deterministic)."""
    bad = np.flatnonzero(labels)
    if len(bad) <= n:
        return bad.tolist()
    return bad[np.linspace(0, len(bad) - 1, n).round().astype(int)].tolist()


def plot_overlays(recipe: Recipe, arrays: dict, fp32_dir: Path, int8_dir: Path, out_dir: Path, n: int,
                  threads: int | None) -> dict[str, str]:
    """Per category: image | ground truth | FP32 map | INT8 map, maps from the artifacts' model.onnx (ORT)."""
    from uadc.backends.onnxruntime import make_session, ort_predictor
    from uadc.train import input_normalization
    plt = _mpl()
    fp32 = ort_predictor(make_session(fp32_dir / "model.onnx", threads))
    int8 = ort_predictor(make_session(int8_dir / "model.onnx", threads))
    mean, std = (np.asarray(v, np.float32)[:, None, None] for v in input_normalization(recipe))
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
    p = Path(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


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
            cells = []
            for k in ("image_auroc", "pixel_auroc"):
                d = uv[k] - ov[k] if k in ov else None
                cells += [_f(ov.get(k)), _f(uv[k]), _f(d, "+.4f")]
            lines.append(f"| {'**mean**' if cat == 'mean' else cat} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render_table4(t4: dict) -> list[str]:
    from uadc.compare import render_matrix
    lines = [f"## Table 4: PTQ calibration ({t4['method']} / {t4['backbone']}, {t4['target']}, student only)", "",
             "Calibrators: entropy = KL divergence, mse = L2 error. Calibration data: training images vs "
             "random normal noise.", "", render_matrix(t4, list(CALIBRATORS), list(CALIB_SOURCES)), "",
             f"Sources: {_rel(t4['source'])}; cells: "
             + ", ".join(f"{k} {_rel(c['source'])}" for k, c in t4["cells"].items()), ""]
    return lines


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
                     f"| {_f(r['pixel_auroc'])} | {_f(0.0 - r['image_drop'], '+.4f')} | {_f(r['latency_p50_ms'], '.2f')} | "
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

def _default_recipe(recipes: list[Recipe]) -> Recipe:
    return next((r for r in recipes if r["model"]["method"] == DEFAULT_METHOD), recipes[0])


def run_bench(recipe_paths: list[Path], artifacts: Path, out: Path, opts: BenchOptions | None = None,
              command: str = "run_bench(...)") -> dict:
    """Everything above, in order; returns the data written to ``<out>/paper_tables.json``."""
    from uadc.compile import _atomic_dir, environment
    from uadc.evaluate import test_arrays_for
    opts = opts or BenchOptions()
    t0, log = time.time(), opts.log
    recipes = [prepare_recipe(Path(p), opts) for p in recipe_paths]  # every recipe validated before any training
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise UadcError(f"two recipes share an artifact folder name: {names}")
    ckpts = {r.name: ensure_checkpoints(r, artifacts, opts.one_class, log) for r in recipes}
    default = _default_recipe(recipes)
    t4 = table4(default, artifacts, log)
    best = best_cell(t4)
    t2, rows, overlay_src = [], [], None
    for r in recipes:
        arrays = test_arrays_for(r)
        t2.append(table2_entry(r, arrays, ckpts[r.name], log))
        r_rows, dirs = precision_rows(r, arrays, best, artifacts, opts)
        rows += r_rows
        if r is default:
            overlay_src = (arrays, dirs["fp32"], dirs["int8_ptq_student"])  # kept until the figures are drawn
    used = sorted({r["threads"] for r in rows if r.get("note") is None})  # what the reports measured with
    threads = used[0] if len(used) == 1 else used
    env = environment(threads)
    with _atomic_dir(out) as tmp:
        log(f"figures -> {out}")
        subtitle = f"{env['cpu']}, threads: {threads}, batch 1, ONNX Runtime CPU"
        plot_auroc_vs_latency(rows, tmp / "auroc_vs_latency.png", subtitle)
        overlays = plot_overlays(default, overlay_src[0], overlay_src[1], overlay_src[2], tmp, opts.overlay_images,
                                 opts.threads)
        figures = {"auroc_vs_latency": "auroc_vs_latency.png", "overlays": overlays, "overlays_recipe": default.name,
                   "overlays_fp32": str(overlay_src[1]), "overlays_int8": str(overlay_src[2])}
        meta = {"command": command, "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                "seconds": round(time.time() - t0, 1), "threads": threads, "environment": env,
                "latency_runs": opts.latency_runs, "epochs_scale": opts.epochs_scale, "quick": bool(opts.quick),
                "quick_overrides": opts.quick, "qat": opts.qat, "one_class": opts.one_class,
                "seeds": {r.name: r["seed"] for r in recipes},
                "train_epochs": {r.name: r["train"]["epochs"] for r in recipes},
                "qat_epochs": {r.name: r["qat"]["epochs"] for r in recipes},
                "recipes": {r.name: str(r.path) for r in recipes}, "artifacts": str(artifacts), "cwd": str(Path.cwd()),
                "checkpoints": ckpts}
        result = {"meta": meta, "table2": t2, "table4": t4, "tables5_7": rows, "figures": figures}
        (tmp / "paper_tables.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
        (tmp / "paper_tables.md").write_text(render_markdown(result))
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
    command = "python -m bench.paper_tables " + shlex.join(sys.argv[1:])
    with exit_on_user_error("interrupted; nothing was written to --out (finished checkpoints/artifacts are kept)"):
        opts = BenchOptions(epochs_scale=epochs_scale, one_class=not skip_one_class, qat=not skip_qat,
                            threads=threads, quick=quick_overrides(data_recipe_dir) if quick else None,
                            latency_runs=latency_runs or (10 if quick else 30))
        run_bench(resolve_recipe_paths(names, data_recipe_dir), artifacts, out or artifacts / "bench", opts, command)


if __name__ == "__main__":
    main()
