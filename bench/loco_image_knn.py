"""``python -m bench.loco_image_knn``: leave-one-category-out over the image kNN (``model.image_knn``).

A trained checkpoint's student and map head stay as they are; what is chosen is whether (and how) to
add to the image score the distance of the image's pooled teacher features to the nearest training
normals. Per test and validation image the raw map score and each tap's pooled descriptor are
computed once (torch FP32), the bank from the training images, the standardisation from the
validation normals of every category pooled (``uadc.training.fit.fit_image_knn`` does the same at
train time); every setting of the grid is then scored with the head's own ``ImageKNN`` code:

* teacher taps pooled: every non-empty subset of the recipe's taps;
* ``k`` in ``--k``; ``weight`` in ``--weights``, plus 0 (off: the map score alone).

Per held-out category, the setting with the best mean image AUROC over the *other* categories (the
map, hence pixel AUROC, is unchanged); ties go to "off". Also reported: the setting with the best
mean over every category, what a recipe would adopt. Writes ``loco_image_knn.json`` / ``.md``.

    python -m bench.loco_image_knn --artifacts artifacts
"""

from __future__ import annotations

from bench import as_script, positive, positive_floats, positives, summary

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from bench.loco import leave_one_out, trained_checkpoint, write_outputs

CRITERION = ("image_auroc",)
OFF = {"taps": [], "k": 1, "weight": 0.0}


def key(s: dict) -> str:
    if s["weight"] == 0:
        return "off"
    return f"taps={'+'.join(map(str, s['taps']))},k={s['k']},w={s['weight']:g}"


def descriptors(recipe, checkpoint: Path, batch: int = 32) -> dict:
    """Raw map scores and per-tap pooled descriptors: ``train``, ``val`` (pooled), and per test category."""
    import torch
    from torch.utils.data import ConcatDataset

    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import test_arrays
    from uadc.models.heads import ImageKNN
    from uadc.training.checkpoint import load_checkpoint
    from uadc.training.run import load_images
    model, _ = load_checkpoint(checkpoint)   # its own settings: with or without a fitted kNN
    model.head.image_knn = None              # the raw map score; each setting below adds its own
    model.eval()
    data = prepare_data(recipe)
    taps = list(range(len(recipe.cfg["model"]["taps"])))
    skip = getattr(model.head, "skip_teacher", 0)
    per_tap = ImageKNN([skip + i for i in taps], 1.0)

    def run(images) -> dict:
        descs, scores = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.as_tensor(np.ascontiguousarray(images[i:i + batch]))
                t = model.teacher(x)
                scores.append(model.head(t, model.student(x, t))[1])
                descs.append(per_tap.describe(t))
        return {"desc": torch.cat(descs), "score": torch.cat(scores)}

    dims = [f.shape[1] for f in model.teacher(torch.zeros(1, 3, *(2 * [recipe.data.image_size])))[skip:]]
    out = {"train": run(load_images(data.train, "train images")),
           "val": run(load_images(ConcatDataset([d for d in data.val.values() if len(d)]), "validation normals")),
           "tests": {c: (run(images), labels) for c, (images, _, labels) in test_arrays(data).items()},
           "edges": np.cumsum([0] + dims).tolist()}
    return out


def grid(d: dict, ks: list[int], weights: list[float], log) -> tuple[list[dict], dict]:
    import torch

    from uadc.evaluation import metrics
    from uadc.models.heads import ImageKNN
    e = d["edges"]
    n = len(e) - 1
    cats = list(d["tests"])
    res = {"off": {c: {"image_auroc": metrics.image_auroc(lab, r["score"].numpy())} for c, (r, lab) in d["tests"].items()}}
    settings = [OFF]

    def cols(taps):
        return torch.cat([torch.arange(e[i], e[i + 1]) for i in taps])
    for taps in (c for k in range(1, n + 1) for c in itertools.combinations(range(n), k)):
        log(f"taps {taps}")
        idx = cols(taps)
        for k in ks:
            knn = ImageKNN(list(taps), 1.0, k)
            knn.set_bank(d["train"]["desc"][:, idx])
            val_d = knn.distance_from(d["val"]["desc"][:, idx])
            knn.set_stats(d["val"]["score"], val_d)
            test_d = {c: knn.distance_from(r["desc"][:, idx]) for c, (r, _) in d["tests"].items()}
            for w in weights:
                knn.weight = w
                s = {"taps": list(taps), "k": k, "weight": w}
                settings.append(s)
                res[key(s)] = {c: {"image_auroc": metrics.image_auroc(
                    d["tests"][c][1], knn.combine(d["tests"][c][0]["score"], test_d[c]).numpy())} for c in cats}
    return settings, res


def markdown(r: dict) -> str:
    f = "{:.4f}".format
    lines = [f"# Leave-one-category-out over the image kNN: {r['recipe']}", "",
             f"Checkpoint `{r['checkpoint']}`; taps {', '.join(f'{i}={t}' for i, t in enumerate(r['taps']))}; "
             f"{len(r['grid'])} settings; criterion: mean image AUROC on the other categories (the map, hence "
             f"pixel AUROC, does not change).", "",
             "| held out | chosen without it | image AUROC chosen / off |", "|---|---|---|"]
    for x in r["folds"]:
        lines.append(f"| {x['held_out']} | `{x['chosen_key']}` | {f(x['chosen_metrics']['image_auroc'])} / "
                     f"{f(x['default_metrics']['image_auroc'])} |")
    mc, md = r["mean"]["chosen"], r["mean"]["default"]
    lines += [f"| **mean** | | **{f(mc['image_auroc'])} / {f(md['image_auroc'])}** |", "",
              f"Best over every category: `{r['best_key']}` "
              f"({', '.join(f'{c} {f(v)}' for c, v in r['best_per_category'].items())}; "
              f"off: {', '.join(f'{c} {f(v)}' for c, v in r['off_per_category'].items())}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--recipe", default="recipes/stfpm_effnet_lite0.yaml")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the recipe's")
    ap.add_argument("--out", type=Path, default=None, help="default <artifacts>/<recipe>/loco_image_knn")
    ap.add_argument("--k", type=positives, default="1,3")
    ap.add_argument("--weights", type=positive_floats, default="0.25,0.5,1,2")
    ap.add_argument("--threads", type=positive, default=2)
    a = ap.parse_args(argv)
    from uadc.core.errors import UadcError
    from uadc.core.scoped import torch_threads
    log = lambda m: print(f"[loco_image_knn] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        recipe, ckpt = trained_checkpoint(a.recipe, a.artifacts, a.checkpoint)
        ks, weights = a.k, a.weights
        with torch_threads(a.threads):
            d = descriptors(recipe, ckpt)
            settings, res = grid(d, ks, weights, log)
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folds = leave_one_out(settings, res, OFF, key=key, criterion=CRITERION)
    cats = list(res["off"])
    best = max(settings, key=lambda s: float(np.mean([res[key(s)][c]["image_auroc"] for c in cats])))
    r = {"recipe": recipe.name, "checkpoint": str(ckpt), "taps": recipe.cfg["model"]["taps"],
         "grid": [key(s) for s in settings], "folds": folds,
         "mean": {w: {"image_auroc": float(np.mean([f[f"{w}_metrics"]["image_auroc"] for f in folds]))}
                  for w in ("chosen", "default")},
         "best": best, "best_key": key(best),
         "best_per_category": {c: res[key(best)][c]["image_auroc"] for c in cats},
         "off_per_category": {c: res["off"][c]["image_auroc"] for c in cats}, "all_settings": res}
    write_outputs(a.out or a.artifacts / recipe.name / "loco_image_knn", "loco_image_knn", r, markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    as_script(main)
