"""``python -m bench.loco_head``: leave-one-category-out over head-only settings of a trained model.

The scoring head needs no retraining to change which taps it compares, how it combines the
per-layer distance maps, how much it smooths and how it reduces the map to an image score. On a
trained unified checkpoint (default: the default recipe's) every per-layer map of every test
image is computed once (torch FP32, upsampled to the input size as the exact head does), then
every setting of the grid is scored:

* tap subsets: every subset of at least two of the recipe's taps;
* ``model.combine``: product or sum;
* ``model.smoothing_sigma`` in ``--sigmas``; image score: max, or the mean of the top ``--topk``.

Leave-one-category-out as in ``bench.loco_train``: per held-out category, the setting with the
best mean of image and pixel AUROC over the other categories (ties: the recipe's own setting). The
recipe's setting must be in the grid (checked). Writes ``loco_head.json`` / ``loco_head.md``.

    python -m bench.loco_head --artifacts artifacts --out artifacts/bench_loco_head
"""

from __future__ import annotations

from bench import as_script, out_folder, positive, summary

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from bench.loco import fold_table, leave_one_out, map_only_note, number_list, trained_checkpoint, write_outputs

CRITERION = ("image_auroc", "pixel_auroc")


def layer_maps(recipe, checkpoint: Path, batch: int = 32) -> dict:
    """``{category: (maps (N, taps, H, W), masks, labels)}``, each tap's distance map upsampled."""
    import torch
    import torch.nn.functional as F

    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import test_arrays
    from uadc.training.checkpoint import load_checkpoint
    model, _ = load_checkpoint(checkpoint, recipe)
    model.eval()
    size = (recipe.data.image_size, recipe.data.image_size)
    out = {}
    with torch.no_grad():
        for cat, (images, masks, labels) in test_arrays(prepare_data(recipe)).items():
            parts = []
            for i in range(0, len(images), batch):
                x = torch.from_numpy(images[i:i + batch])
                t = model.teacher(x)
                maps = model.head.layer_maps(t, model.student(x, t))
                parts.append(torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                        for m in maps], 1))
            out[cat] = (torch.cat(parts), masks, labels)
    return out


def key(s: dict) -> str:
    red = "max" if s["topk"] is None else f"top{s['topk'] * 100:g}%"
    return f"taps={'+'.join(map(str, s['taps']))},{s['combine']},sigma={s['sigma']:g},{red}"


def grid(maps: dict, sigmas: list[float], topk: list[float], log) -> tuple[list[dict], dict]:
    import torch

    from uadc.evaluation import metrics
    from uadc.models.heads import GaussianBlur, reduce_score
    n = next(iter(maps.values()))[0].shape[1]
    settings, res = [], {}
    for taps in (c for k in range(2, n + 1) for c in itertools.combinations(range(n), k)):
        log(f"taps {taps}")
        for combine, sigma in itertools.product(("product", "sum"), sigmas):
            blur = GaussianBlur(sigma)
            smoothed = {}
            with torch.no_grad():
                for cat, (m, _, _) in maps.items():
                    sel = m[:, list(taps)]
                    combined = sel.prod(1, keepdim=True) if combine == "product" else sel.sum(1, keepdim=True)
                    smoothed[cat] = blur(combined)
            pix = {cat: metrics.pixel_auroc(masks, smoothed[cat][:, 0].numpy())
                   for cat, (_, masks, _) in maps.items()}
            for k in [None, *topk]:
                s = {"taps": list(taps), "combine": combine, "sigma": sigma, "topk": k}
                settings.append(s)
                res[key(s)] = {cat: {"image_auroc": metrics.image_auroc(
                    labels, reduce_score(smoothed[cat], "max" if k is None else "topk_mean", k or 0.01).numpy()),
                    "pixel_auroc": pix[cat]} for cat, (_, _, labels) in maps.items()}
    return settings, res


def recipe_setting(recipe) -> dict:
    m = recipe.cfg["model"]
    return {"taps": list(range(len(m["taps"]))), "combine": m["combine"], "sigma": float(m["smoothing_sigma"]),
            "topk": m["score_topk"] if m.get("score_reduction") == "topk_mean" else None}


def markdown(r: dict) -> str:
    lines = [f"# Leave-one-category-out over head-only settings: {r['recipe']}", "",
             f"Checkpoint `{r['checkpoint']}`; taps {', '.join(f'{i}={t}' for i, t in enumerate(r['taps']))}; "
             f"{len(r['grid'])} settings; criterion: mean of image and pixel AUROC on the other categories.", "",
             *fold_table(r, "recipe"), "",
             (f"This study {r['note']}. " if r.get("note") else "") + f"Recipe setting: `{r['default_key']}`. "
             + (f"Every fold chose `{r['unanimous']}`." if r["unanimous"] else "The folds chose different settings."),
             ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--recipe", default="recipes/stfpm_effnet_lite0.yaml")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=out_folder, default=None, help="default <artifacts>/<recipe>/loco_head")
    ap.add_argument("--sigmas", default="2,4")
    ap.add_argument("--topk", default="0.01,0.05")
    ap.add_argument("--threads", type=positive, default=2)
    a = ap.parse_args(argv)
    from uadc.core.errors import UadcError
    from uadc.core.scoped import torch_threads
    log = lambda m: print(f"[loco_head] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        recipe, ckpt = trained_checkpoint(a.recipe, a.artifacts)
        sigmas, topk = number_list(a.sigmas, "--sigmas"), number_list(a.topk, "--topk")
        if any(not 0 < k <= 1 for k in topk):   # 0 was labelled top0% and scored as top 1%
            raise UadcError(f"--topk: fractions of the map in (0, 1], got {a.topk!r}")
        if note := map_only_note(recipe, exact_layers=True):
            log(f"note: this study {note}")
        default = recipe_setting(recipe)   # the recipe's own setting is always in the grid, as in bench.loco
        sigmas += [default["sigma"]] * (default["sigma"] not in sigmas)
        topk += [default["topk"]] * (default["topk"] is not None and default["topk"] not in topk)
        with torch_threads(a.threads):
            maps = layer_maps(recipe, ckpt)
            settings, res = grid(maps, sigmas, topk, log)
        if key(default) not in res:
            raise UadcError(f"the recipe's setting {key(default)} is not in the grid (add its sigma / top-k)")
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folds = leave_one_out(settings, res, default, key=key, criterion=CRITERION)
    chosen = {f["chosen_key"] for f in folds}
    r = {"recipe": recipe.name, "checkpoint": str(ckpt), "taps": recipe.cfg["model"]["taps"],
         "grid": [key(s) for s in settings], "default_key": key(default), "folds": folds,
         "mean": {w: {k: float(np.mean([f[f"{w}_metrics"][k] for f in folds])) for k in CRITERION}
                  for w in ("chosen", "default")},
         "unanimous": next(iter(chosen)) if len(chosen) == 1 else None, "all_settings": res,
         "note": map_only_note(recipe, exact_layers=True)}
    write_outputs(a.out or a.artifacts / recipe.name / "loco_head", "loco_head", r, markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    as_script(main)
