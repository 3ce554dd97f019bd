"""``python -m bench.unified_table``: the DCAM paper's comparison on our data, in one command.

From one DCAM recipe (default ``recipes/dcam_effnet_lite0.yaml``) three models are derived that
differ only where the comparison says they should (same data, architecture, epochs and seed):

* **one-class**: the recipe without DCAM, one model per category (``<name>_plain/one_class/<cat>``);
* **unified**: the recipe without DCAM, one model for every category (``<name>_plain``);
* **unified + DCAM**: the recipe as written (``<name>_dcam``).

Each training runs in its own ``uadc train`` process, so the peak resident memory stored in its
checkpoint (``stats.train_peak_rss_mb``) is that model's alone; checkpoints whose stored settings
equal the derived recipe's (``train.threads`` aside) are reused. All models are evaluated in torch
FP32 on every category's test set. The unified and DCAM students are exported to ONNX in this
process: the two graphs are compared node by node, and their ONNX Runtime latencies are measured
here, interleaved (plain, DCAM, plain, ...) so load on a shared machine hits both alike.
Writes ``unified_table.md`` and ``unified_table.json`` (same numbers) to ``--out``.
"""

from __future__ import annotations

from bench import as_script

import collections
import datetime as _dt
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import click
import numpy as np

from uadc.config.recipe import Recipe, load_recipe, recipe_from_dict
from uadc.config.yaml_file import dump_yaml
from uadc.core.errors import UadcError

VARIANTS = ("one_class", "unified", "dcam")
TITLES = {"one_class": "one-class", "unified": "unified", "dcam": "unified + DCAM"}
RESULT_JSON, RESULT_MD = "unified_table.json", "unified_table.md"
RECIPES = Path(__file__).resolve().parent.parent / "recipes"  # quickstart.yaml for --quick
PAPER_GAIN = 3.92  # Jena et al.: mean image AUROC, DCAM minus the multi-class STFPM baseline, in points


@dataclass
class TableOptions:
    epochs: int | None = None           # override train.epochs (both variants alike)
    quick: bool = False                 # quickstart.yaml's size/budget keys (bench.paper_tables.quick_overrides)
    one_class: bool = True
    threads: int | None = None          # torch (training, eval) and ORT (latency) intra-op threads
    latency_runs: int = 30
    latency_rounds: int = 3             # interleaved rounds; the reported p50 is the median over rounds
    log: Callable[[str], None] = field(default=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))


# ------------------------------------------------------------------------------------ recipes
def variant_recipes(recipe: Recipe, opts: TableOptions, recipe_dir: Path = RECIPES) -> dict[str, Recipe]:
    """``{"plain": ..., "dcam": ...}``: the recipe with DCAM off and on, every other key equal."""
    if not recipe.train.dcam.enabled:
        raise UadcError(f"{recipe.path or recipe.name}: train.dcam.enabled must be true (the plain variant is "
                        "derived by turning it off)")
    r, tag = recipe, ""
    if opts.quick:
        from bench.paper_tables import quick_overrides
        r, tag = r.with_overrides(**quick_overrides(recipe_dir)), "_quick"
    if opts.epochs:
        r, tag = r.with_overrides(train={"epochs": opts.epochs}), f"{tag}_e{opts.epochs}"   # --quick --epochs: both
    if opts.threads:
        r = r.with_overrides(train={"threads": opts.threads})
    dcam = r.cfg["train"]["dcam"]
    return {"plain": r.with_overrides(name=f"{r.name}_plain{tag}", train={"dcam": {**dcam, "enabled": False}}),
            "dcam": r.with_overrides(name=f"{r.name}_dcam{tag}")}


def _settings(cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    cfg["train"].pop("threads", None)  # how fast and where, not what is trained
    cfg["train"].pop("device", None)
    return cfg


# -------------------------------------------------------------------------------- checkpoints
def _reusable(path: Path, recipe: Recipe) -> dict | None:
    from uadc.training.checkpoint import load_checkpoint
    if not path.is_file():
        return None
    try:
        blob = load_checkpoint(path, recipe)[1]
        stored = recipe_from_dict(blob["recipe"], keep_name=True)
    except UadcError:
        return None
    return blob if _settings(stored.cfg) == _settings(recipe.cfg) else None


def train_in_child(recipe: Recipe, artifacts: Path, one_class: bool) -> None:
    """``uadc -q train`` in a fresh process: its checkpoint's peak RSS is that training's alone."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{recipe.name}.yaml"
        path.write_text(dump_yaml(recipe.cfg))  # data roots are already absolute
        cmd = [sys.executable, "-m", "uadc.cli", "-q", "train", str(path), "--artifacts", str(artifacts)]
        proc = subprocess.run(cmd + (["--one-class"] if one_class else []), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UadcError(f"training {recipe.name}{' (one-class)' if one_class else ''} failed: {tail[0][:300]}")


def ensure_models(variants: dict[str, Recipe], artifacts: Path, opts: TableOptions) -> dict[str, dict]:
    """``{variant: {category | "unified": info}}`` with checkpoint path, epochs, seconds, peak RSS."""
    from uadc.data.sources import resolve_sources
    from uadc.training.checkpoint import checkpoint_path
    plain = variants["plain"]
    cats = [c for _, c in resolve_sources([s.model_dump() for s in plain.data.sources])]
    jobs = [("unified", plain, [None]), ("dcam", variants["dcam"], [None])]
    if opts.one_class:
        jobs.insert(0, ("one_class", plain, cats))
    out = {}
    for variant, recipe, keys in jobs:
        paths = {k: checkpoint_path(recipe, artifacts, k) for k in keys}
        blobs = {k: _reusable(p, recipe) for k, p in paths.items()}
        reused = all(b is not None for b in blobs.values())
        if reused:
            opts.log(f"{TITLES[variant]}: reusing {', '.join(map(str, paths.values()))}")
        else:
            opts.log(f"{TITLES[variant]}: training {recipe.name} ({recipe.train.epochs} epochs)")
            train_in_child(recipe, artifacts, one_class=variant == "one_class")
            blobs = {k: _reusable(p, recipe) for k, p in paths.items()}
            if any(b is None for b in blobs.values()):
                raise UadcError(f"{recipe.name}: training finished but its checkpoint does not match the recipe")
        out[variant] = {k or "unified": {"path": str(paths[k]), "reused": reused,
                                         "epochs": len(blobs[k].get("history", [])),
                                         "train_seconds": blobs[k].get("train_seconds"),
                                         "peak_rss_mb": (blobs[k].get("stats") or {}).get("train_peak_rss_mb"),
                                         "params": (blobs[k].get("stats") or {}).get("params")}
                        for k in keys}
    return out


# ---------------------------------------------------------------------------------- evaluation
def evaluate_models(variants: dict[str, Recipe], models: dict[str, dict], arrays: dict, threads: int | None,
                    log: Callable[[str], None]) -> dict[str, dict]:
    """Torch FP32 metrics: unified models on every category, each one-class model on its own."""
    from uadc.core.scoped import torch_threads
    from uadc.evaluation import metrics
    from uadc.evaluation.run import evaluate, torch_predictor
    from uadc.training.checkpoint import load_checkpoint
    bs = variants["plain"].eval.batch_size
    out = {}
    with torch_threads(threads):
        for variant, infos in models.items():
            recipe = variants["dcam" if variant == "dcam" else "plain"]
            log(f"{TITLES[variant]}: evaluating")
            if variant == "one_class":
                per_cat = {}
                for cat, info in infos.items():
                    model, _ = load_checkpoint(Path(info["path"]), recipe)
                    per_cat[cat] = evaluate(torch_predictor(model), {cat: arrays[cat]}, bs, cat).categories[cat]
                out[variant] = metrics.summarize(per_cat)
            else:
                model, _ = load_checkpoint(Path(infos["unified"]["path"]), recipe)
                out[variant] = evaluate(torch_predictor(model), arrays, bs, variant).to_dict()
    return out


# -------------------------------------------------------------------------------------- export
def graph_signature(proto) -> dict:
    """What "node for node the same graph" means: ops in order with their wiring, initializer names and
    shapes, graph inputs and outputs (weights' values may differ)."""
    g = proto.graph
    return {"nodes": [[n.op_type, list(n.input), list(n.output)] for n in g.node],
            "initializers": sorted([i.name, list(i.dims)] for i in g.initializer),
            "inputs": [i.name for i in g.input], "outputs": [o.name for o in g.output]}


def export_and_time(variants: dict[str, Recipe], models: dict[str, dict], arrays: dict, opts: TableOptions) -> dict:
    """Export the unified and DCAM models, compare their graphs, measure ORT latency (batch 1) interleaved."""
    from uadc.backends.ort import latency_ms, make_session
    from uadc.core.constants import INPUT_NAME
    from uadc.export.onnx_export import export_model
    from uadc.training.checkpoint import load_checkpoint
    protos, sessions = {}, {}
    for variant in ("unified", "dcam"):
        recipe = variants["dcam" if variant == "dcam" else "plain"]
        model, _ = load_checkpoint(Path(models[variant]["unified"]["path"]), recipe)
        opts.log(f"{TITLES[variant]}: ONNX export")
        protos[variant] = export_model(model, recipe.data.image_size, {"recipe": recipe.name})
        sessions[variant] = make_session(protos[variant], opts.threads)
    sig = {v: graph_signature(p) for v, p in protos.items()}
    x = next(iter(arrays.values()))[0][:1].astype(np.float32)
    rounds: dict[str, list[float]] = {v: [] for v in protos}
    opts.log(f"latency: {opts.latency_rounds} interleaved rounds x {opts.latency_runs} runs")
    for _ in range(opts.latency_rounds):
        for v, sess in sessions.items():
            rounds[v].append(latency_ms(lambda s=sess: s.run(None, {INPUT_NAME: x}), opts.latency_runs)["p50"])
    return {"identical_graph": sig["unified"] == sig["dcam"],
            "graphs": {v: {"nodes": len(s["nodes"]), "initializers": len(s["initializers"]),
                           "op_types": dict(sorted(collections.Counter(n[0] for n in s["nodes"]).items())),
                           "bytes": protos[v].ByteSize()} for v, s in sig.items()},
            "latency_p50_ms": {v: float(np.median(r)) for v, r in rounds.items()},
            "latency_rounds_p50_ms": rounds, "latency_runs": opts.latency_runs, "threads": opts.threads}


# ------------------------------------------------------------------------------------ the table
def run_table(recipe_path: Path, artifacts: Path, out: Path, opts: TableOptions | None = None,
              command: str = "run_table(...)", recipe_dir: Path = RECIPES) -> dict:
    """Everything above; returns the dict written to ``<out>/unified_table.json``."""
    from uadc.core.io import atomic_write_json, atomic_write_text, check_writable
    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import test_arrays
    from uadc.pipeline.compile import environment
    opts = opts or TableOptions()
    t0 = time.time()
    variants = variant_recipes(load_recipe(recipe_path), opts, recipe_dir)
    if out.exists() and not out.is_dir():
        raise UadcError(f"--out {out}: a file is in the way")
    check_writable(out if out.is_dir() else out.parent)
    models = ensure_models(variants, artifacts, opts)
    arrays = test_arrays(prepare_data(variants["plain"]))
    auroc = evaluate_models(variants, models, arrays, opts.threads, opts.log)
    export = export_and_time(variants, models, arrays, opts)
    p = variants["plain"]
    result = {"command": command, "finished": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": round(time.time() - t0, 1), "environment": environment(opts.threads),
              "recipe": str(recipe_path), "seed": p.seed, "epochs": p.train.epochs, "image_size": p.data.image_size,
              "method": p.model.method, "backbone": p.model.backbone, "quick": opts.quick,
              "dcam": variants["dcam"].cfg["train"]["dcam"], "categories": list(arrays),
              "models": models, "auroc": auroc, "delta_dcam_vs_unified": _deltas(auroc), "export": export,
              "paper_gain_points": PAPER_GAIN}
    atomic_write_json(out / RESULT_JSON, result)
    atomic_write_text(out / RESULT_MD, render_markdown(result))
    opts.log(f"written: {out / RESULT_MD}, {out / RESULT_JSON}")
    return result


def _deltas(auroc: dict) -> dict:
    """DCAM minus unified per category and mean, in AUROC points x100 (as the paper states +3.92 %)."""
    u, d = auroc["unified"], auroc["dcam"]
    rows = {c: u["categories"][c] for c in u["categories"]} | {"mean": u["mean"]}
    return {c: {k: round(100 * ((d["mean"] if c == "mean" else d["categories"][c])[k] - v[k]), 3)
                for k in ("image_auroc", "pixel_auroc")} for c, v in rows.items()}


def _f(v, fmt: str = ".4f") -> str:
    return "—" if v is None else format(v + 0.0, fmt)


def render_markdown(res: dict) -> str:
    env, auroc, ex = res["environment"], res["auroc"], res["export"]
    cols = [v for v in VARIANTS if v in auroc]
    lines = ["# Unified vs one-class vs DCAM", "",
             f"- generated {res['finished']} by `{res['command']}`; run time {res['seconds']:.0f} s",
             f"- machine: {env['cpu']}, {env['cores']} cores; threads {res['export']['threads'] or 'all'}; "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, uadc {env['uadc']}",
             f"- recipe `{res['recipe']}` ({res['method']} / {res['backbone']}, {res['image_size']} px); every model: "
             f"**{res['epochs']} epochs, seed {res['seed']}**{' (--quick)' if res['quick'] else ''}; DCAM settings "
             f"`{json.dumps({k: v for k, v in res['dcam'].items() if k != 'enabled'})}`",
             "- AUROC in torch FP32 on each category's test set (one-class: each category's own model)", "",
             "## AUROC", "",
             "| category | " + " | ".join(f"image {TITLES[v]}" for v in cols)
             + " | Δ image DCAM − unified (points) | "
             + " | ".join(f"pixel {TITLES[v]}" for v in cols) + " | Δ pixel (points) |",
             "|---|" + "---:|" * (2 * len(cols) + 2)]
    for cat in res["categories"] + ["mean"]:
        def get(v, k):
            return (auroc[v]["mean"] if cat == "mean" else auroc[v]["categories"].get(cat, {})).get(k)
        d = res["delta_dcam_vs_unified"][cat]
        lines.append(f"| {'**mean**' if cat == 'mean' else cat} | "
                     + " | ".join(_f(get(v, "image_auroc")) for v in cols)
                     + f" | {d['image_auroc']:+.2f} | " + " | ".join(_f(get(v, "pixel_auroc")) for v in cols)
                     + f" | {d['pixel_auroc']:+.2f} |")
    dm = res["delta_dcam_vs_unified"]["mean"]["image_auroc"]
    lines += ["", f"Mean image AUROC change with DCAM: **{dm:+.2f} points** (paper, MVTec AD 15 classes: "
              f"+{res['paper_gain_points']:.2f}).", "", "## Training cost per model", "",
              "Peak RSS: the training process's peak resident memory (one `uadc train` process per row; in a "
              "one-class run the figure is the peak so far, so it includes the earlier categories' models).", "",
              "| model | checkpoint | epochs | train s | peak RSS MB | reused |", "|---|---|---:|---:|---:|---|"]
    for v, infos in res["models"].items():
        for k, i in infos.items():
            label = TITLES[v] + (f" {k}" if v == "one_class" else "")
            lines.append(f"| {label} | {i['path']} | {i['epochs']} | {_f(i['train_seconds'], '.1f')} | "
                         f"{_f(i['peak_rss_mb'], '.0f')} | {'yes' if i['reused'] else 'no'} |")
    g, lat = ex["graphs"], ex["latency_p50_ms"]
    lines += ["", "## Export: DCAM adds nothing at inference", "",
              f"Graphs node for node identical (ops, wiring, initializer names/shapes, inputs, outputs): "
              f"**{'yes' if ex['identical_graph'] else 'NO'}**.", "",
              "| model | ONNX nodes | initializers | bytes | latency p50 ms (batch 1, ORT CPU) | p50 per round |",
              "|---|---:|---:|---:|---:|---|"]
    for v in ("unified", "dcam"):
        lines.append(f"| {TITLES[v]} | {g[v]['nodes']} | {g[v]['initializers']} | {g[v]['bytes']} | "
                     f"{lat[v]:.3f} | {', '.join(f'{x:.3f}' for x in ex['latency_rounds_p50_ms'][v])} |")
    lines += ["", f"Latency: median over {len(ex['latency_rounds_p50_ms']['unified'])} interleaved rounds of the p50 "
              f"of {ex['latency_runs']} runs each, measured in this run.", ""]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Path(path_type=Path), default=Path("recipes/dcam_effnet_lite0.yaml"),
              show_default=True, help="a recipe with train.dcam.enabled: true")
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: <artifacts>/bench_unified")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None,
              help="override train.epochs (all models)")
@click.option("--quick", is_flag=True, help="quickstart.yaml's image size / epochs / batch / smoothing")
@click.option("--skip-one-class", is_flag=True, help="only the unified and DCAM models")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch and ORT intra-op threads")
@click.option("--latency-runs", type=click.IntRange(min=1), default=30, show_default=True)
def main(recipe: Path, artifacts: Path, out: Path | None, epochs: int | None, quick: bool, skip_one_class: bool,
         threads: int | None, latency_runs: int) -> None:
    """Unified vs one-class vs unified + DCAM: AUROC, training time, peak RAM, export and latency."""
    command = "python -m bench.unified_table " + shlex.join(sys.argv[1:])
    try:
        opts = TableOptions(epochs=epochs, quick=quick, one_class=not skip_one_class, threads=threads,
                            latency_runs=latency_runs)
        run_table(recipe, artifacts, out or artifacts / "bench_unified", opts, command)
    except UadcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    as_script(main)
