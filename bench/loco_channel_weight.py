"""``python -m bench.loco_channel_weight``: leave-one-category-out over weighting the distance's channels.

The head's per-tap distance is 0.5 ||t/|t| - s/|s| ||^2 over channels (STFPM), every channel weighing the
same. Here channel c of a tap weighs ``w_c ~ (var_c / mean var)^-alpha`` (scaled to mean 1), ``var_c`` the
mean squared normalised residual ``(t/|t| - s/|s|)_c`` over the validation normals of every category pooled
(label-free, never trained on): a channel in which the student copies the teacher closely on normal images
counts more when it departs (alpha 1: a diagonal Mahalanobis distance of the residual; alpha 0: the head as
trained). The teacher and student features of the validation normals and test images are computed once
(torch FP32, ``bench.loco_patch_knn.features``); per alpha the image kNN's standardisation is refitted and the
head's own code scores every image. Per held-out category, the alpha with the best mean of image and pixel
AUROC over the other categories (ties go to 0). A head-only study: no compiled graph weighs channels.
Writes ``loco_channel_weight.json`` / ``.md``.

    python -m bench.loco_channel_weight --artifacts artifacts
"""

from __future__ import annotations

from bench import as_script, summary

import argparse
import sys

import numpy as np

from bench.loco import add_checkpoint_args, fold_table, loco_summary, number_list, trained_checkpoint, write_outputs
from bench.loco_patch_knn import features, score_setting

CRITERION = ("image_auroc", "pixel_auroc")
OFF = {"alpha": 0.0}


def key(s: dict) -> str:
    return "off" if s["alpha"] == 0 else f"alpha={s['alpha']:g}"


def _residual(t, s):
    import torch.nn.functional as F
    return F.normalize(t, dim=1) - F.normalize(s, dim=1)


def channel_variances(d: dict, skip: int) -> list:
    """Per compared tap, each channel's mean squared normalised residual over the validation normals."""
    import torch
    with torch.no_grad():
        n = len(d["val"][0][1])
        return [torch.cat([_residual(t[skip + i], s[i]) for t, s in d["val"]]).pow(2).mean((0, 2, 3))
                for i in range(n)]


def weighted_layer_maps(var: list, alpha: float, skip: int):
    """``head.layer_maps`` with channel weights ``(var / mean var)^-alpha``, scaled to mean 1."""
    weights = [(v / v.mean()).clamp_min(1e-12).pow(-alpha) for v in var]
    weights = [(w / w.mean()).view(1, -1, 1, 1) for w in weights]

    def layer_maps(t_feats, s_feats) -> list:
        return [0.5 * (_residual(t, s).pow(2) * w).sum(1, keepdim=True)
                for t, s, w in zip(t_feats[skip:], s_feats, weights)]
    return layer_maps


def grid(d: dict, alphas: list[float], log) -> tuple[list[dict], dict]:
    head = d["model"].head
    skip = getattr(head, "skip_teacher", 0)
    var = channel_variances(d, skip)
    settings, res = [OFF], {"off": score_setting(d, None)}
    for alpha in alphas:
        s = {"alpha": alpha}
        head.layer_maps = weighted_layer_maps(var, alpha, skip)  # the instance's, over its class's
        try:
            res[key(s)] = score_setting(d, None)
        finally:
            del head.layer_maps
        settings.append(s)
        log(f"{key(s)}: " + ", ".join(f"{c} {r['image_auroc']:.4f}/{r['pixel_auroc']:.4f}"
                                      for c, r in res[key(s)].items()))
    return settings, res


def markdown(r: dict) -> str:
    f = "{:.4f}".format

    def per_category(res: dict) -> str:
        return ", ".join(f"{c} {f(v['image_auroc'])} / {f(v['pixel_auroc'])}" for c, v in res.items())
    rows = [f"| `{k}` | " + " | ".join(f"{f(v['image_auroc'])} / {f(v['pixel_auroc'])}" for v in res.values())
            + f" | {f(np.mean([v['image_auroc'] for v in res.values()]))} / "
              f"{f(np.mean([v['pixel_auroc'] for v in res.values()]))} |" for k, res in r["all_settings"].items()]
    cats = list(r["off_per_category"])
    return "\n".join([f"# Leave-one-category-out over channel weights: {r['recipe']}", "",
                      f"Checkpoint `{r['checkpoint']}`; criterion: mean of image and pixel AUROC on the other "
                      "categories.", "", *fold_table(r, "off"), "",
                      "| setting | " + " | ".join(cats) + " | mean |", "|---|" + "---:|" * (len(cats) + 1), *rows, "",
                      f"Best over every category: `{r['best_key']}`: {per_category(r['best_per_category'])} "
                      "(image / pixel AUROC).", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    add_checkpoint_args(ap, "loco_channel_weight")
    ap.add_argument("--alphas", default="0.5,1,2,3,4", help="comma-separated exponents (0, off, is always in)")
    a = ap.parse_args(argv)
    from uadc.core.errors import UadcError
    from uadc.core.scoped import torch_threads
    log = lambda m: print(f"[loco_channel_weight] {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        recipe, ckpt = trained_checkpoint(a.recipe, a.artifacts, a.checkpoint)
        if recipe.cfg["model"]["method"] == "us":
            raise UadcError("method us has no feature-distance head to weigh")
        alphas = [v for v in number_list(a.alphas, "--alphas") if v != 0]   # nan failed after every feature was made
        with torch_threads(a.threads):
            d = features(recipe, ckpt)
            settings, res = grid(d, alphas, log)
    except (UadcError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    r = {"recipe": recipe.name, "checkpoint": str(ckpt), **loco_summary(settings, res, OFF, key, CRITERION)}
    write_outputs(a.out or a.artifacts / recipe.name / "loco_channel_weight", "loco_channel_weight", r, markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    as_script(main)
