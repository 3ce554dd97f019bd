"""``python -m bench.loco_train``: choose the unified default's *training* settings leave-one-category-out.

``bench.loco`` picks post-hoc scoring settings on one trained model. This bench also varies what needs
retraining: every config of ``--grid`` (``bench/loco_grid.yaml``: named recipe overrides such as taps,
epochs, DCAM, combine) trains one unified model over every category under ``--data``; each model's
unsmoothed test maps are then scored for every smoothing sigma x image-score reduction. The joint
grid (config x scoring) goes through leave-one-category-out: for each category, the setting with the best
mean of image and pixel AUROC over the OTHER categories is chosen and reported on the held-out category
next to the recipe's own setting. Configs marked ``selectable: false`` in the grid (e.g. over the 30-minute
CPU training budget of the default) are reported but never chosen. No held-out test label takes part in
choosing its setting. ``train.device: auto`` trains on a GPU when torch sees one (scores are then not
bit-identical to a CPU run). Writes ``loco_train.json`` / ``loco_train.md`` to ``--out`` after every config,
so an interrupted run keeps what finished.
"""

from __future__ import annotations

from bench import as_script

import datetime as _dt
import shlex
import sys
import time
from pathlib import Path

import click
import numpy as np

from bench.loco import (DATA, RECIPE, SIGMAS, TOPK, _floats, topk_fractions, _log, ensure_model, grid_metrics, key,
                        leave_one_out, loco_recipe, map_only_note, raw_maps)
from uadc.config.recipe import read_yaml_mapping
from uadc.core.errors import UadcError

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "bench" / "loco_grid.yaml"
RESULT_JSON, RESULT_MD = "loco_train.json", "loco_train.md"
CRITERION = ("image_auroc", "pixel_auroc")


def read_grid(path: Path) -> list[dict]:
    """``[{"name", "overrides", "selectable"}]``; the first config must be the recipe itself (``default``)."""
    raw = read_yaml_mapping(path, "--grid")
    configs = raw.get("configs")
    if not isinstance(configs, list) or not configs:
        raise UadcError(f"--grid {path}: expected a non-empty list under 'configs'")
    out, seen = [], set()
    for i, c in enumerate(configs):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not c["name"].isidentifier():
            raise UadcError(f"--grid {path}: configs[{i}] needs a 'name' made of letters, digits and _")
        if c["name"] in seen:
            raise UadcError(f"--grid {path}: config name {c['name']!r} appears twice")
        seen.add(c["name"])
        over = c.get("overrides") or {}
        if not isinstance(over, dict) or not all(isinstance(v, dict) for v in over.values()):
            raise UadcError(f"--grid {path}: configs[{i}].overrides must map recipe sections to mappings")
        out.append({"name": c["name"], "overrides": over, "selectable": bool(c.get("selectable", True)),
                    "why": str(c.get("why", ""))})
    if out[0]["overrides"]:
        raise UadcError(f"--grid {path}: the first config must be the recipe itself (no overrides)")
    return out


def config_key(s: dict) -> str:
    return f"{s['config']}|{key(s)}"


def run_grid(recipe_path: Path, data: Path, grid: Path, artifacts: Path, out: Path, device: str,
             threads: int | None, sigmas: tuple[float, ...] = SIGMAS, topk: tuple[float, ...] = TOPK,
             command: str = "", log=_log) -> dict:
    from uadc.core.io import atomic_write_json, atomic_write_text, check_writable, ensure_dir
    configs = read_grid(grid)
    base = loco_recipe(recipe_path, data, None, threads)
    m = base.cfg["model"]
    default = {"config": configs[0]["name"], "smoothing_sigma": float(m["smoothing_sigma"]),
               "score_reduction": m["score_reduction"],
               "score_topk": m["score_topk"] if m["score_reduction"] == "topk_mean" else None}
    sigmas = tuple(sorted({*sigmas, default["smoothing_sigma"]}))
    if default["score_topk"] is not None:   # as bench.loco: the recipe's own setting is in the grid (no folds before)
        topk = tuple(sorted({*topk, default["score_topk"]}))
    ensure_dir(out)
    check_writable(out)
    result = {"command": command, "recipe": str(recipe_path), "data": str(data), "device": device,
              "categories": None, "configs": [], "all_settings": {}, "criterion": list(CRITERION),
              "note": map_only_note(base)}
    if result["note"]:
        log(f"note: this study {result['note']}")
    settings: list[dict] = []
    for cfg in configs:
        recipe = base.with_overrides(name=f"{base.name}_{cfg['name']}",
                                     **{s: v for s, v in cfg["overrides"].items() if s != "train"},
                                     train={**cfg["overrides"].get("train", {}), "device": device})
        t0 = time.time()
        try:
            model = ensure_model(recipe, artifacts, log)
            maps = raw_maps(recipe, Path(model["path"]), log, threads)
            sets, res = grid_metrics(maps, sigmas, topk, log)
        except UadcError as exc:  # one broken config does not lose the others
            log(f"{cfg['name']}: failed: {exc}")
            result["configs"].append({**cfg, "error": str(exc)})
            continue
        result["categories"] = list(maps)
        result["configs"].append({**cfg, "model": model, "seconds": round(time.time() - t0, 1),
                                  "train_device": _train_device(Path(model["path"]))})
        for s in sets:
            s = {"config": cfg["name"], **s}
            result["all_settings"][config_key(s)] = res[key(s)]
            if cfg["selectable"]:
                settings.append(s)
        _finish(result, settings, default)
        result["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        atomic_write_json(out / RESULT_JSON, result)
        atomic_write_text(out / RESULT_MD, render_markdown(result))
        log(f"{cfg['name']} done in {time.time() - t0:.0f} s; written {out / RESULT_MD}")
    return result


def _train_device(path: Path) -> str | None:
    from uadc.training.checkpoint import read_checkpoint
    return read_checkpoint(path).get("train_device")


def _finish(result: dict, settings: list[dict], default: dict) -> None:
    """Leave-one-category-out over what has finished (needs the default config and two categories)."""
    res = result["all_settings"]
    if config_key(default) not in res or len(result["categories"] or []) < 2:
        return
    folds = leave_one_out(settings, res, default, key=config_key, criterion=CRITERION)
    result["default_key"] = config_key(default)
    result["folds"] = folds
    result["mean"] = {w: {k: float(np.mean([f[f"{w}_metrics"][k] for f in folds])) for k in CRITERION}
                      for w in ("chosen", "default")}
    chosen = {f["chosen_key"] for f in folds}
    result["unanimous"] = next(iter(chosen)) if len(chosen) == 1 else None


def render_markdown(r: dict) -> str:
    f = "{:.3f}".format
    cats = r["categories"] or []
    lines = [f"# Leave-one-category-out choice of the training and scoring settings ({r.get('date', '')})", "",
             f"`{r['command']}`" if r["command"] else "", "",
             f"One unified model per config over {', '.join(cats)} (train.device `{r['device']}`); criterion: mean "
             f"of image and pixel AUROC over the other categories; recipe setting `{r.get('default_key')}`."
             + (f" This study {r['note']}." if r.get("note") else ""), "",
             "| config | overrides | selectable | trained on | train s | " + " | ".join(cats) + " | mean image | "
             "mean pixel |", "|---|---|---|---|---:|" + "---:|" * (len(cats) + 2)]
    for c in r["configs"]:
        if "error" in c:
            lines.append(f"| {c['name']} | `{c['overrides']}` | | failed: {c['error']} |")
            continue
        k = next(k for k in r["all_settings"] if k.startswith(f"{c['name']}|") and k.endswith(
            r.get("default_key", "|").split("|", 1)[1]))
        per = r["all_settings"][k]
        img = [per[x]["image_auroc"] for x in cats]
        pix = [per[x]["pixel_auroc"] for x in cats]
        lines.append(f"| {c['name']} | `{c['overrides'] or 'recipe'}` | {'yes' if c['selectable'] else 'no: ' + c['why']}"
                     f" | {c.get('train_device')} | {c['model'].get('train_seconds')} | "
                     + " | ".join(f"{f(a)} / {f(b)}" for a, b in zip(img, pix))
                     + f" | {f(float(np.mean(img)))} | {f(float(np.mean(pix)))} |")
    lines += ["", "(per category: image / pixel AUROC at the recipe's own scoring setting)", ""]
    if "folds" in r:
        lines += ["| held out | chosen (without it) | inner criterion chosen / recipe | image AUROC chosen / recipe "
                  "| pixel AUROC chosen / recipe |", "|---|---|---:|---:|---:|"]
        for x in r["folds"]:
            c, d = x["chosen_metrics"], x["default_metrics"]
            lines.append(f"| {x['held_out']} | `{x['chosen_key']}` | {f(x['inner_criterion'])} / "
                         f"{f(x['inner_default_criterion'])} | {f(c['image_auroc'])} / {f(d['image_auroc'])} | "
                         f"{f(c['pixel_auroc'])} / {f(d['pixel_auroc'])} |")
        mc, md = r["mean"]["chosen"], r["mean"]["default"]
        lines += [f"| **mean** | | | **{f(mc['image_auroc'])} / {f(md['image_auroc'])}** | "
                  f"**{f(mc['pixel_auroc'])} / {f(md['pixel_auroc'])}** |", "",
                  f"Every fold chose `{r['unanimous']}`." if r["unanimous"] else
                  "The folds chose different settings: no setting is unanimous."]
    return "\n".join(lines) + "\n"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--recipe", type=click.Path(path_type=Path), default=RECIPE, show_default=True)
@click.option("--data", type=click.Path(path_type=Path), default=DATA, show_default=True,
              help="a folder of datasets, each holding MVTec-layout category folders")
@click.option("--grid", type=click.Path(path_type=Path), default=GRID, show_default=True)
@click.option("--artifacts", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: <artifacts>/bench_loco_train")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="train.device of every config")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads")
@click.option("--sigmas", default=",".join(f"{s:g}" for s in SIGMAS), show_default=True)
@click.option("--topk", default=",".join(f"{k:g}" for k in TOPK), show_default=True)
def main(recipe: Path, data: Path, grid: Path, artifacts: Path, out: Path | None, device: str,
         threads: int | None, sigmas: str, topk: str) -> None:
    """Leave-one-category-out choice of training and scoring settings for the unified default."""
    command = "python -m bench.loco_train " + shlex.join(sys.argv[1:])
    try:
        run_grid(recipe, data, grid, artifacts, out or artifacts / "bench_loco_train", device, threads,
                 _floats(sigmas), topk_fractions(topk), command.strip())
    except UadcError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    as_script(main)
