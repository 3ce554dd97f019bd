"""``python -m bench.head_equivalence``: is ``model.head: fast`` the same detector as ``exact``?

The fast head runs with the recipe's ``model.score_pool`` (the score read from the average-pooled
map), the exact reference with none (``score_pool: 1``), so the check covers both shortcuts.
On a trained checkpoint (default: the default recipe's) both heads score the same test images
(torch FP32, same weights): per category image / pixel AUROC, Pearson correlation of the anomaly
maps, Spearman correlation of the image scores. Pass = |image AUROC diff| <= 0.1 point and map
correlation >= 0.999 on every category. Then both models are exported (the compile pipeline's
export + simplify) and timed with ONNX Runtime, whole model and head alone, each timing in its
own process, A/B alternating rounds; the speed-up is the median of the per-round ratios.

    python -m bench.head_equivalence --artifacts /tmp/art          # <artifacts>/<recipe>/checkpoint.pt
    python -m bench.head_equivalence --recipe recipes/stfpm_effnet_lite0_256.yaml --threads 2 --rounds 5

Writes ``head_equivalence.json`` and ``head_equivalence.md`` to ``--out`` (default
``<artifacts>/<recipe>/head_equivalence``) and prints the Markdown.
"""

from __future__ import annotations

from bench import as_script, out_folder, positive, positives, summary

import argparse
import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

IMAGE_AUROC_TOL = 0.001   # 0.1 point
MAP_CORR_MIN = 0.999


def _time_onnx(path: str, batch: int, threads: int, runs: int) -> dict:
    """Child process: p50 of one ONNX model at ``batch`` on random inputs of its own shapes."""
    import onnx

    from uadc.backends.ort import latency_ms, make_session
    model = onnx.load(path)
    rng = np.random.default_rng(0)
    feeds = {}
    for i in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else batch for d in i.type.tensor_type.shape.dim]
        feeds[i.name] = rng.standard_normal(dims).astype(np.float32)
    sess = make_session(model, threads)
    return latency_ms(lambda: sess.run(None, feeds), runs, warmup=max(5, runs // 10))


def _ab_rounds(paths: dict[str, Path], batch: int, threads: int, runs: int, rounds: int) -> dict:
    """exact and fast in turn (A B, B A, ...) in fresh processes; per-round ratio exact/fast."""
    p50 = {k: [] for k in paths}
    for r in range(rounds):
        order = list(paths) if r % 2 == 0 else list(paths)[::-1]
        for k in order:
            out = subprocess.run([sys.executable, "-m", "bench.head_equivalence", "--time", str(paths[k]),
                                  "--batch", str(batch), "--threads", str(threads), "--runs", str(runs)],
                                 check=True, capture_output=True, text=True)
            p50[k].append(json.loads(out.stdout.strip().splitlines()[-1])["p50"])
    ratios = [e / f for e, f in zip(p50["exact"], p50["fast"])]
    return {"p50_ms": {k: float(np.median(v)) for k, v in p50.items()}, "rounds": p50,
            "speedup": round(float(np.median(ratios)), 3), "speedup_min": round(min(ratios), 3),
            "speedup_max": round(max(ratios), 3)}


def fast_copy(model, score_pool: int = 1):
    """The same trained model with the fast head (heads hold no weights), its score read from the
    map average-pooled ``score_pool`` x ``score_pool``."""
    from uadc.models.heads import fast_like
    fast = copy.deepcopy(model)
    fast.head = fast_like(model.head)
    fast.head.score_pool = score_pool
    return fast.eval()


def equivalence(model, fast, arrays: dict, batch_size: int) -> dict:
    from scipy.stats import spearmanr

    from uadc.evaluation import metrics
    from uadc.evaluation.run import predict, torch_predictor
    out = {}
    for cat, (images, masks, labels) in arrays.items():
        m_e, s_e = predict(torch_predictor(model), images, batch_size, f"exact {cat}")
        m_f, s_f = predict(torch_predictor(fast), images, batch_size, f"fast {cat}")
        e, f = metrics.compute_all(labels, s_e, masks, m_e), metrics.compute_all(labels, s_f, masks, m_f)
        corr = float(np.corrcoef(m_e.ravel(), m_f.ravel())[0, 1])
        out[cat] = {"exact": e, "fast": f, "map_corr": round(corr, 6),
                    "score_spearman": round(float(spearmanr(s_e, s_f)[0]), 6),
                    "image_auroc_diff": round(f["image_auroc"] - e["image_auroc"], 6),
                    "pixel_auroc_diff": round(f["pixel_auroc"] - e["pixel_auroc"], 6),
                    "passed": bool(abs(f["image_auroc"] - e["image_auroc"]) <= IMAGE_AUROC_TOL and corr >= MAP_CORR_MIN)}
    return out


def run(recipe_path: str, artifacts: Path, threads: int, rounds: int, runs: int, batches: list[int]) -> dict:
    from uadc.config.recipe import load_recipe
    from uadc.export.onnx_export import split_partitions
    from uadc.pipeline.baseline import Baseline, ModelSource
    from uadc.training.checkpoint import checkpoint_path, load_checkpoint

    pool = load_recipe(recipe_path).model.score_pool
    # the reference, whatever the recipe says: exact head, score from the full map
    recipe = load_recipe(recipe_path).with_overrides(model={"head": "exact", "score_pool": 1})
    ckpt = checkpoint_path(recipe, artifacts)
    model, blob = load_checkpoint(ckpt, recipe)
    fast = fast_copy(model, pool)
    base = Baseline(recipe, ModelSource(model, ckpt, blob), threads)
    checks = equivalence(model, fast, base.test_arrays, recipe.eval.batch_size)
    timing: dict = {}
    with tempfile.TemporaryDirectory(prefix="head_eq_") as tmp:
        paths: dict[str, dict[str, Path]] = {"model": {}, "head": {}}
        for name, m in (("exact", model), ("fast", fast)):
            b = base if name == "exact" else Baseline(recipe, ModelSource(m, ckpt, blob), threads)
            d = Path(tmp) / name
            d.mkdir()
            import onnx
            onnx.save(b.fp32, d / "model.onnx")
            paths["model"][name] = d / "model.onnx"
            paths["head"][name] = split_partitions(b.fp32, d)["head"]
            timing.setdefault("head_nodes", {})[name] = sum(
                1 for n in onnx.load(paths["head"][name]).graph.node)
        for part in ("model", "head"):
            for bs in batches:
                timing[f"{part}_b{bs}"] = _ab_rounds(paths[part], bs, threads, runs, rounds)
    return {"recipe": recipe.name, "checkpoint": str(ckpt), "image_size": recipe.data.image_size, "score_pool": pool,
            "threads": threads, "rounds": rounds, "runs": runs, "categories": checks,
            "passed": all(c["passed"] for c in checks.values()), "timing": timing,
            "criteria": {"image_auroc_tol": IMAGE_AUROC_TOL, "map_corr_min": MAP_CORR_MIN}}


def markdown(r: dict) -> str:
    lines = [f"# Fast head equivalence: {r['recipe']} ({r['image_size']} px, fast head's score_pool "
             f"{r.get('score_pool', 1)})", "",
             f"checkpoint `{r['checkpoint']}`; pass = |image AUROC diff| <= 0.1 point and map correlation "
             f">= {MAP_CORR_MIN} on every category: **{'PASS' if r['passed'] else 'FAIL'}**", "",
             "| category | image AUROC exact | fast | pixel AUROC exact | fast | map corr | score Spearman | pass |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c, v in r["categories"].items():
        lines.append(f"| {c} | {v['exact']['image_auroc']:.4f} | {v['fast']['image_auroc']:.4f} | "
                     f"{v['exact']['pixel_auroc']:.4f} | {v['fast']['pixel_auroc']:.4f} | {v['map_corr']:.6f} | "
                     f"{v['score_spearman']:.4f} | {'yes' if v['passed'] else 'no'} |")
    lines += ["", f"ONNX Runtime CPU, {r['threads']} threads, {r['rounds']} alternating rounds of {r['runs']} runs, "
              f"each timing in its own process; head nodes exact {r['timing']['head_nodes']['exact']}, "
              f"fast {r['timing']['head_nodes']['fast']}", "",
              "| what | p50 exact ms | p50 fast ms | speed-up (median, min-max of rounds) |", "|---|---:|---:|---|"]
    for k, t in r["timing"].items():
        if k == "head_nodes":
            continue
        lines.append(f"| {k} | {t['p50_ms']['exact']:.3f} | {t['p50_ms']['fast']:.3f} | "
                     f"{t['speedup']:.2f}x ({t['speedup_min']:.2f}-{t['speedup_max']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--recipe", default="recipes/stfpm_effnet_lite0.yaml")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=out_folder, default=None)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--runs", type=positive, default=100)
    ap.add_argument("--batches", type=positives, default=[1, 8])
    ap.add_argument("--time", default=None, help=argparse.SUPPRESS)  # child process: time one ONNX
    ap.add_argument("--batch", type=positive, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.time:
        print(json.dumps(_time_onnx(a.time, a.batch, a.threads, a.runs)))
        return 0
    from uadc.core.io import atomic_write_json, atomic_write_text
    r = run(a.recipe, a.artifacts, a.threads, a.rounds, a.runs, a.batches)
    out = a.out or a.artifacts / r["recipe"] / "head_equivalence"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "head_equivalence.json", r)
    md = markdown(r)
    atomic_write_text(out / "head_equivalence.md", md)
    print(md)
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    as_script(main)
