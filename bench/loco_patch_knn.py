"""``python -m bench.loco_patch_knn``: leave-one-category-out over the patch kNN (``model.patch_knn``).

A trained checkpoint's student, map head and image kNN bank stay as they are; what is chosen is
whether (and how) to add to the map each location's distance to the nearest training patch. The
teacher and student features of the validation normals and test images are computed once (torch
FP32); per setting the bank (greedy coreset of the training patches), the patch scale and the image
kNN's standardisation are fitted as ``uadc train`` fits them (``uadc.training.fit``), and the
head's own code scores every image:

* taps: each of ``--taps`` (``+``-joined teacher taps, among the recipe's);
* bank size in ``--banks``; ``weight`` in ``--weights``, plus 0 (off: the map alone).

Per held-out category, the setting with the best mean of image and pixel AUROC over the *other*
categories; ties go to "off". Also reported: the setting with the best mean over every category,
what a recipe would adopt, and the folds on pixel AUROC alone (as if the term stayed out of the
image score, which would leave image AUROC as it is off). Writes ``loco_patch_knn.json`` / ``.md``.

    python -m bench.loco_patch_knn --artifacts artifacts
"""

from __future__ import annotations

from bench import as_script, positive_floats, positives, summary

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.loco import (add_checkpoint_args, fold_table, leave_one_out, loco_summary, trained_checkpoint,
                        write_outputs)

CRITERION = ("image_auroc", "pixel_auroc")
OFF = {"taps": [], "bank": 0, "weight": 0.0}


def key(s: dict) -> str:
    if s["weight"] == 0:
        return "off"
    return f"taps={'+'.join(s['taps'])},bank={s['bank']},w={s['weight']:g}"


def features(recipe, checkpoint: Path, batch: int = 32) -> dict:
    """The model and the teacher/student features of the training images (teacher only), the
    validation normals and each test category, computed once."""
    import torch
    from torch.utils.data import ConcatDataset

    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import test_arrays
    from uadc.training.checkpoint import load_checkpoint
    from uadc.training.run import load_images
    model, _ = load_checkpoint(checkpoint)
    model.head.patch_knn = None
    model.eval()
    data = prepare_data(recipe)

    def run(images, student: bool = True) -> list:
        out = []
        with torch.no_grad():
            for i in range(0, len(images), batch):
                x = torch.as_tensor(np.ascontiguousarray(images[i:i + batch]))
                t = model.teacher(x)
                out.append((t, model.student(x, t) if student else None))
        return out
    return {"model": model, "train": run(load_images(data.train, "train images"), student=False),
            "val": run(load_images(ConcatDataset([d for d in data.val.values() if len(d)]), "validation normals")),
            "tests": {c: (run(images), masks, labels) for c, (images, masks, labels) in test_arrays(data).items()}}


def score_setting(d: dict, knn) -> dict:
    """Fit the patch kNN's scale (its bank is set) and the image kNN's standardisation on the
    validation normals, as training does; then image and pixel AUROC per test category."""
    import torch

    from uadc.evaluation import metrics
    model = d["model"]
    head = model.head
    head.patch_knn = knn
    with torch.no_grad():
        if knn is not None:
            maps = [head.combined(t, s) for t, s in d["val"]]
            knn.set_stats(torch.cat(maps), torch.cat([knn.resized(t, m.shape[-2:]) for (t, _), m in zip(d["val"], maps)]))
        image_knn, head.image_knn = head.image_knn, None
        raw = torch.cat([head(t, s)[1] for t, s in d["val"]])
        head.image_knn = image_knn
        if image_knn is not None:
            image_knn.set_stats(raw, torch.cat([image_knn.distance(t) for t, _ in d["val"]]))
        res = {}
        for c, (feats, masks, labels) in d["tests"].items():
            out = [head(t, s) for t, s in feats]
            amap = torch.cat([m for m, _ in out])[:, 0].numpy()
            score = torch.cat([s for _, s in out]).numpy()
            res[c] = {"image_auroc": metrics.image_auroc(labels, score), "pixel_auroc": metrics.pixel_auroc(masks, amap)}
    return res


def grid(d: dict, recipe, taps_list: list[list[str]], banks: list[int], weights: list[float], log) -> tuple[list, dict]:
    import torch

    from uadc.models.heads import PatchKNN
    from uadc.training.fit import greedy_coreset
    m = recipe.cfg["model"]
    skip = getattr(d["model"].head, "skip_teacher", 0)
    settings, res = [OFF], {"off": score_setting(d, None)}
    for taps in taps_list:
        knn = PatchKNN([skip + m["taps"].index(t) for t in taps], 1.0)
        with torch.no_grad():
            patches = torch.cat([knn.patches(knn.describe(t)) for t, _ in d["train"]])
        for bank in banks:
            log(f"taps {'+'.join(taps)}, bank {bank}: coreset of {len(patches)} patches")
            knn.set_bank(patches[greedy_coreset(patches, bank, recipe.seed)])
            for w in weights:
                knn.weight = w
                s = {"taps": list(taps), "bank": bank, "weight": w}
                settings.append(s)
                res[key(s)] = score_setting(d, knn)
                log(f"{key(s)}: " + ", ".join(f"{c} {r['image_auroc']:.4f}/{r['pixel_auroc']:.4f}"
                                              for c, r in res[key(s)].items()))
    return settings, res


def markdown(r: dict) -> str:
    f = "{:.4f}".format
    m = r["map_only"]["mean_pixel_auroc"]

    def per_category(res: dict) -> str:
        return ", ".join(f"{c} {f(v['image_auroc'])} / {f(v['pixel_auroc'])}" for c, v in res.items())
    return "\n".join([f"# Leave-one-category-out over the patch kNN: {r['recipe']}", "",
                      f"Checkpoint `{r['checkpoint']}`; {len(r['grid'])} settings; criterion: mean of image and "
                      f"pixel AUROC on the other categories.", "", *fold_table(r, "off"), "",
                      f"Best over every category: `{r['best_key']}`: {per_category(r['best_per_category'])}; "
                      f"off: {per_category(r['off_per_category'])} (image / pixel AUROC).", "",
                      "Map only (the term kept out of the image score; chosen on pixel AUROC alone): "
                      + ", ".join(f"{c} `{k}`" for c, k in r["map_only"]["folds"].items())
                      + f"; held-out mean pixel AUROC {f(m['chosen'])} / off {f(m['default'])}.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    add_checkpoint_args(ap, "loco_patch_knn")
    ap.add_argument("--taps", default="blocks.10,blocks.10+blocks.14,blocks.4+blocks.10",
                    help="comma-separated tap sets, taps in a set joined by +")
    ap.add_argument("--banks", type=positives, default="1024,2048")
    ap.add_argument("--weights", type=positive_floats, default="0.5,1,2,4")
    a = ap.parse_args(argv)
    from uadc.core.errors import UadcError
    from uadc.core.scoped import torch_threads
    log = lambda m: print(f"[loco_patch_knn] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        recipe, ckpt = trained_checkpoint(a.recipe, a.artifacts, a.checkpoint)
        taps_list = [t.split("+") for t in a.taps.split(",")]
        unknown = [t for ts in taps_list for t in ts if t not in recipe.cfg["model"]["taps"]]
        if unknown:
            raise UadcError(f"--taps: {unknown[0]!r} is not one of the recipe's taps")
        banks, weights = a.banks, a.weights
        with torch_threads(a.threads):
            d = features(recipe, ckpt)
            settings, res = grid(d, recipe, taps_list, banks, weights, log)
    except UadcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # were the term kept out of the image score, only the map (pixel AUROC) would change: choose on that alone
    map_only = leave_one_out(settings, res, OFF, key=key, criterion=("pixel_auroc",))
    r = {"recipe": recipe.name, "checkpoint": str(ckpt), **loco_summary(settings, res, OFF, key, CRITERION),
         "map_only": {"folds": {f["held_out"]: f["chosen_key"] for f in map_only},
                      "mean_pixel_auroc": {w: float(np.mean([f[f"{w}_metrics"]["pixel_auroc"] for f in map_only]))
                                           for w in ("chosen", "default")}}}
    write_outputs(a.out or a.artifacts / recipe.name / "loco_patch_knn", "loco_patch_knn", r, markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    as_script(main)
