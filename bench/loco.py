"""``python -m bench.loco``: choose the post-hoc scoring settings without peeking, leave-one-category-out.

One unified model is trained (or reused from ``--artifacts``) with the default recipe's settings over
every category under ``--data`` (``../shared/data``). The unsmoothed anomaly map of every test image is
computed once (torch FP32); then every setting of a small grid that needs no retraining is scored:

* ``model.smoothing_sigma`` in ``--sigmas`` (the map smoothed after the fact, exactly as the head does);
* ``model.score_reduction``: ``max``, or ``topk_mean`` with ``model.score_topk`` in ``--topk``.

Leave-one-category-out: for each category, the setting with the best mean image AUROC over the OTHER
categories is chosen (ties: the recipe's own setting, then grid order) and reported on the held-out
category next to the recipe's own setting. No held-out label takes part in choosing its setting.
Writes ``loco.md`` and ``loco.json`` (same numbers) to ``--out``.
"""

from __future__ import annotations

from bench import as_script, positive

import datetime as _dt
import shlex
import sys
from pathlib import Path
from typing import Callable

import click
import numpy as np

from uadc.config.recipe import Recipe, load_recipe
from uadc.core.errors import UadcError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "stfpm_effnet_lite0.yaml"
DATA = ROOT.parent / "shared" / "data"
RESULT_JSON, RESULT_MD = "loco.json", "loco.md"
TOPK = (0.001, 0.005, 0.01, 0.05)
SIGMAS = (1.0, 2.0, 4.0)


def _log(msg: str) -> None:
    print(f"[loco] {msg}", file=sys.stderr, flush=True)


def loco_recipe(base: Path, data_root: Path, epochs: int | None = None, threads: int | None = None) -> Recipe:
    """The base recipe's settings, unified over every MVTec-layout category under ``data_root``'s datasets."""
    from uadc.data.sources import list_categories
    if not data_root.is_dir():
        raise UadcError(f"--data {data_root}: not a folder")
    recipe = load_recipe(base)
    sources = []
    for d in sorted(p for p in data_root.iterdir() if p.is_dir()):
        if any((c / "train" / "good").is_dir() for c in d.iterdir()):
            sources.append({"root": str(d.resolve()), "categories": list_categories(d)})
    if not sources:
        raise UadcError(f"--data {data_root}: no dataset folder with MVTec-layout categories")
    over: dict = {"name": f"{recipe.name}_loco{f'_e{epochs}' if epochs else ''}", "data": {"sources": sources}}
    train = ({"epochs": epochs} if epochs else {}) | ({"threads": threads} if threads else {})
    if train:
        over["train"] = train
    return recipe.with_overrides(**over)


def map_only_note(recipe: Recipe, exact_layers: bool = False) -> str | None:
    """What a study that scores the anomaly map alone leaves out of the recipe's detector (its 'recipe'
    figures are then not `uadc eval`'s); ``exact_layers``: per-tap maps upsampled as the exact head does."""
    m = recipe.config.model
    left = [f"the image kNN term (weight {m.image_knn.weight:g})"] if m.image_knn.weight else []
    if exact_layers and m.head != "exact":
        left.insert(0, f"model.head {m.head} (maps upsampled as the exact head does)")
    if exact_layers and m.patch_knn.weight:
        left.append(f"the patch kNN term (weight {m.patch_knn.weight:g})")
    return None if not left else (f"scores the anomaly map alone, without {' and '.join(left)} of recipe "
                                  f"{recipe.name}: its 'recipe' figures are not `uadc eval`'s")


def ensure_model(recipe: Recipe, artifacts: Path, log: Callable[[str], None]) -> dict:
    """The unified checkpoint of ``recipe`` under ``artifacts``: reused when its settings match, else trained."""
    from bench.unified_table import _reusable, train_in_child
    from uadc.training.checkpoint import checkpoint_path
    path = checkpoint_path(recipe, artifacts)
    blob = _reusable(path, recipe)
    reused = blob is not None
    if reused:
        log(f"reusing {path}")
    else:
        log(f"training {recipe.name} ({recipe.train.epochs} epochs) into {path.parent}")
        train_in_child(recipe, artifacts, one_class=False)
        blob = _reusable(path, recipe)
        if blob is None:
            raise UadcError(f"{recipe.name}: training finished but its checkpoint does not match the recipe")
    return {"path": str(path), "reused": reused, "epochs": len(blob.get("history", [])),
            "train_seconds": blob.get("train_seconds")}


def raw_maps(recipe: Recipe, checkpoint: Path, log: Callable[[str], None], threads: int | None) -> dict:
    """``{category: (maps (N,H,W) unsmoothed, masks, labels)}``; checks that smoothing them with the
    recipe's sigma and taking the max gives the head's own outputs."""
    import torch

    from uadc.core.scoped import torch_threads
    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import predict, test_arrays, torch_predictor
    from uadc.models.heads import GaussianBlur
    from uadc.training.checkpoint import load_checkpoint
    arrays = test_arrays(prepare_data(recipe))
    model, _ = load_checkpoint(checkpoint, recipe)
    out = {}
    with torch_threads(threads):
        head_blur = model.head.blur
        ref = torch_predictor(model)(next(iter(arrays.values()))[0][:4])
        model.head.blur = GaussianBlur(0)
        for cat, (images, masks, labels) in arrays.items():
            log(f"maps: {cat} ({len(images)} test images)")
            out[cat] = (predict(torch_predictor(model), images, recipe.eval.batch_size, cat)[0], masks, labels)
        first = next(iter(out.values()))[0][:4]
        smoothed = head_blur(torch.from_numpy(first)[:, None])
    if not np.allclose(smoothed[:, 0].numpy(), ref[0], atol=1e-5, rtol=1e-4):
        raise UadcError("post-hoc smoothing does not reproduce the head's maps (a head that smooths elsewhere?)")
    return out


def grid_metrics(maps: dict, sigmas: tuple[float, ...], topk: tuple[float, ...],
                 log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The settings and ``{setting key: {category: {"image_auroc", "pixel_auroc"}}}``."""
    import torch

    from uadc.evaluation import metrics
    from uadc.models.heads import GaussianBlur, reduce_score
    reductions = [("max", None)] + [("topk_mean", k) for k in topk]
    settings = [{"smoothing_sigma": s, "score_reduction": r, "score_topk": k} for s in sigmas for r, k in reductions]
    res: dict[str, dict] = {key(s): {} for s in settings}
    for sigma in sigmas:
        log(f"metrics: sigma {sigma:g}")
        blur = GaussianBlur(sigma)
        for cat, (raw, masks, labels) in maps.items():
            with torch.no_grad():
                m = blur(torch.from_numpy(raw)[:, None])
            pix = metrics.pixel_auroc(masks, m[:, 0].numpy())
            for r, k in reductions:
                img = metrics.image_auroc(labels, reduce_score(m, r, k or 0.01).numpy())
                res[key({"smoothing_sigma": sigma, "score_reduction": r, "score_topk": k})][cat] = \
                    {"image_auroc": img, "pixel_auroc": pix}
    return settings, res


def key(s: dict) -> str:
    red = "max" if s["score_reduction"] == "max" else f"top{s['score_topk'] * 100:g}%"
    return f"sigma={s['smoothing_sigma']:g},{red}"


def trained_checkpoint(recipe_path: str | Path, artifacts: Path, checkpoint: Path | None = None) -> tuple[Recipe, Path]:
    """The recipe and its trained checkpoint (``checkpoint`` or the recipe's own); UadcError if none."""
    from uadc.training.checkpoint import checkpoint_path
    recipe = load_recipe(recipe_path)
    ckpt = Path(checkpoint) if checkpoint else checkpoint_path(recipe, artifacts)
    if not ckpt.is_file():
        raise UadcError(f"no checkpoint at {ckpt}: train the recipe first")
    return recipe, ckpt


def add_checkpoint_args(ap, stem: str) -> None:
    """The arguments of a head-only study of one trained checkpoint (``bench.loco_*_knn`` and the like)."""
    ap.add_argument("--recipe", default="recipes/stfpm_effnet_lite0.yaml")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the recipe's")
    ap.add_argument("--out", type=Path, default=None, help=f"default <artifacts>/<recipe>/{stem}")
    ap.add_argument("--threads", type=positive, default=2)


def loco_summary(settings: list[dict], res: dict, default: dict, key: Callable[[dict], str],
                 criterion: tuple[str, ...]) -> dict:
    """Folds, their means (chosen and ``default``), and the setting best over every category."""
    folds = leave_one_out(settings, res, default, key=key, criterion=criterion)
    cats = list(res[key(default)])
    best = max(settings, key=lambda s: float(np.mean([res[key(s)][c][m] for c in cats for m in criterion])))
    return {"grid": [key(s) for s in settings], "folds": folds,
            "mean": {w: {m: float(np.mean([f[f"{w}_metrics"][m] for f in folds])) for m in criterion}
                     for w in ("chosen", "default")},
            "best": best, "best_key": key(best), "best_per_category": res[key(best)],
            "off_per_category": res[key(default)], "all_settings": res}


def write_outputs(out: Path, stem: str, result: dict, markdown: str) -> None:
    """``<out>/<stem>.json`` and ``<out>/<stem>.md``, each written atomically."""
    from uadc.core.io import atomic_write_json, atomic_write_text, ensure_dir
    ensure_dir(out)
    atomic_write_json(out / f"{stem}.json", result)
    atomic_write_text(out / f"{stem}.md", markdown)


def fold_table(r: dict, reference: str) -> list[str]:
    """Markdown rows of ``r["folds"]`` and ``r["mean"]``: image and pixel AUROC, chosen / ``reference``."""
    f = "{:.4f}".format
    lines = [f"| held out | chosen without it | image AUROC chosen / {reference} | pixel AUROC chosen / {reference} |",
             "|---|---|---|---|"]
    for x in r["folds"]:
        c, d = x["chosen_metrics"], x["default_metrics"]
        lines.append(f"| {x['held_out']} | `{x['chosen_key']}` | {f(c['image_auroc'])} / {f(d['image_auroc'])} | "
                     f"{f(c['pixel_auroc'])} / {f(d['pixel_auroc'])} |")
    mc, md = r["mean"]["chosen"], r["mean"]["default"]
    lines.append(f"| **mean** | | **{f(mc['image_auroc'])} / {f(md['image_auroc'])}** | "
                 f"**{f(mc['pixel_auroc'])} / {f(md['pixel_auroc'])}** |")
    return lines


def leave_one_out(settings: list[dict], res: dict, default: dict, key: Callable[[dict], str] = key,
                  criterion: tuple[str, ...] = ("image_auroc",)) -> list[dict]:
    """Per held-out category: the setting with the best mean ``criterion`` (image AUROC by default) on the
    other categories; ``inner_criterion`` is that mean (of every metric in ``criterion``)."""
    cats = list(next(iter(res.values())))
    order = [default] + [s for s in settings if key(s) != key(default)]  # ties go to the recipe's own
    folds = []
    for held in cats:
        others = [c for c in cats if c != held]
        inner = {key(s): float(np.mean([res[key(s)][c][m] for c in others for m in criterion])) for s in order}
        chosen = max(order, key=lambda s: inner[key(s)])  # first maximum in ``order``
        folds.append({"held_out": held, "chosen": chosen, "chosen_key": key(chosen), "criterion": list(criterion),
                      "inner_criterion": inner[key(chosen)],
                      "inner_default_criterion": inner[key(default)],
                      "chosen_metrics": res[key(chosen)][held], "default_metrics": res[key(default)][held]})
    return folds


def run_loco(recipe_path: Path, data: Path, artifacts: Path, out: Path, epochs: int | None = None,
             threads: int | None = None, sigmas: tuple[float, ...] = SIGMAS, topk: tuple[float, ...] = TOPK,
             log: Callable[[str], None] = _log, command: str = "") -> dict:
    """Everything above; returns the dict written to ``<out>/loco.json``."""
    from uadc.core.io import atomic_write_json, atomic_write_text, check_writable, ensure_dir
    if out.exists() and not out.is_dir():
        raise UadcError(f"--out {out}: a file is in the way")
    recipe = loco_recipe(recipe_path, data, epochs, threads)
    m = recipe.cfg["model"]
    default = {"smoothing_sigma": float(m["smoothing_sigma"]), "score_reduction": m["score_reduction"],
               "score_topk": m["score_topk"] if m["score_reduction"] == "topk_mean" else None}
    if float(m["smoothing_sigma"]) not in sigmas:
        sigmas = tuple(sorted({*sigmas, float(m["smoothing_sigma"])}))
    if default["score_topk"] is not None and default["score_topk"] not in topk:
        topk = tuple(sorted({*topk, default["score_topk"]}))
    ensure_dir(out)
    check_writable(out)
    if note := map_only_note(recipe):
        log(f"note: this study {note}")
    model = ensure_model(recipe, artifacts, log)
    maps = raw_maps(recipe, Path(model["path"]), log, threads)
    settings, res = grid_metrics(maps, sigmas, topk, log)
    folds = leave_one_out(settings, res, default)
    chosen_keys = {f["chosen_key"] for f in folds}
    mean = {w: {k: float(np.mean([f[f"{w}_metrics"][k] for f in folds])) for k in ("image_auroc", "pixel_auroc")}
            for w in ("chosen", "default")}
    result = {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "recipe": recipe.name, "base_recipe": str(recipe_path), "categories": list(maps),
              "epochs": recipe.train.epochs, "seed": recipe.seed, "model": model, "default": default,
              "default_key": key(default), "grid": [key(s) for s in settings], "folds": folds, "mean": mean,
              "unanimous": next(iter(chosen_keys)) if len(chosen_keys) == 1 else None, "all_settings": res,
              "note": note}
    atomic_write_json(out / RESULT_JSON, result)
    atomic_write_text(out / RESULT_MD, render_markdown(result))
    log(f"written: {out / RESULT_MD}, {out / RESULT_JSON}")
    return result


def render_markdown(r: dict) -> str:
    f = "{:.3f}".format
    lines = [f"# Leave-one-category-out choice of the scoring settings ({r['date']})", "",
             f"`{r['command']}`" if r["command"] else "", "",
             f"One unified model `{r['recipe']}` ({r['epochs']} epochs, seed {r['seed']}, "
             f"{'reused' if r['model']['reused'] else 'trained'}: `{r['model']['path']}`) over "
             f"{', '.join(r['categories'])}; grid: {', '.join(r['grid'])}. For each held-out category the "
             f"setting with the best mean image AUROC on the other categories is chosen and evaluated on it; "
             f"recipe setting: `{r['default_key']}`." + (f" This study {r['note']}." if r.get("note") else ""), "",
             "| held out | chosen (without it) | inner mean image AUROC chosen / recipe | image AUROC chosen | "
             "image AUROC recipe | pixel AUROC chosen | pixel AUROC recipe |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for x in r["folds"]:
        c, d = x["chosen_metrics"], x["default_metrics"]
        lines.append(f"| {x['held_out']} | `{x['chosen_key']}` | {f(x['inner_criterion'])} / "
                     f"{f(x['inner_default_criterion'])} | {f(c['image_auroc'])} | {f(d['image_auroc'])} | "
                     f"{f(c['pixel_auroc'])} | {f(d['pixel_auroc'])} |")
    mc, md = r["mean"]["chosen"], r["mean"]["default"]
    lines.append(f"| **mean** | | | **{f(mc['image_auroc'])}** | **{f(md['image_auroc'])}** | "
                 f"**{f(mc['pixel_auroc'])}** | **{f(md['pixel_auroc'])}** |")
    lines += ["", (f"Every fold chose `{r['unanimous']}`." if r["unanimous"] else
                   "The folds chose different settings: no setting is unanimous."), "",
              "All settings, image AUROC per category (pixel AUROC depends on sigma only):", "",
              "| setting | " + " | ".join(r["categories"]) + " | mean |", "|---|" + "---:|" * (len(r["categories"]) + 1)]
    for k, per in r["all_settings"].items():
        vals = [per[c]["image_auroc"] for c in r["categories"]]
        lines.append(f"| `{k}` | " + " | ".join(map(f, vals)) + f" | {f(float(np.mean(vals)))} |")
    return "\n".join(lines) + "\n"


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated finite numbers of 0 or more, none twice (a sigma of nan or -1 was scored and could be chosen)."""
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not vals:
        raise click.BadParameter("empty list")
    if any(not 0 <= v < float("inf") for v in vals):
        raise click.BadParameter(f"expected finite numbers of 0 or more, got {text!r}")
    if len(set(vals)) < len(vals):
        raise click.BadParameter(f"a number is listed twice in {text!r}")
    return vals


def topk_fractions(text: str) -> tuple[float, ...]:
    """``--topk``: fractions of the map in (0, 1] (0 was labelled top0% and scored as top 1%)."""
    ks = _floats(text)
    if any(not 0 < k <= 1 for k in ks):
        raise click.BadParameter("top-k fractions must be in (0, 1]", param_hint="--topk")
    return ks


def number_list(text: str, option: str) -> list[float]:
    """:func:`_floats` for an argparse script: its refusal as a one-line UadcError naming ``option``."""
    try:
        return list(_floats(text))
    except click.BadParameter as exc:
        raise UadcError(f"{option}: {exc.message}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Path(path_type=Path), default=RECIPE, show_default=True,
              help="settings of the unified model (its data.sources are replaced by every category in --data)")
@click.option("--data", type=click.Path(path_type=Path), default=DATA, show_default=True,
              help="a folder of datasets, each holding MVTec-layout category folders")
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: <artifacts>/bench_loco")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=None, help="override train.epochs")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads")
@click.option("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS), show_default=True)
@click.option("--topk", default=",".join(f"{k:g}" for k in TOPK), show_default=True,
              help="top-k fractions of the map for topk_mean")
def main(recipe: Path, data: Path, artifacts: Path, out: Path | None, epochs: int | None, threads: int | None,
         sigmas: str, topk: str) -> None:
    """Leave-one-category-out choice of smoothing and image-score reduction for the unified default."""
    ks = topk_fractions(topk)
    command = "python -m bench.loco " + shlex.join(sys.argv[1:])
    try:
        run_loco(recipe, data, artifacts, out or artifacts / "bench_loco", epochs, threads, _floats(sigmas), ks,
                 command=command.strip())
    except UadcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    as_script(main)
