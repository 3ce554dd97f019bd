"""``python -m bench.int8_exactness RECIPE --artifacts A``: does an INT8 artifact score the same on every x86 CPU?

ONNX Runtime's U8S8 kernels on CPUs without VNNI (AVX2 only) add pairs of u8 x s8 products in int16
and saturate with 8-bit weights; VNNI CPUs add in int32. ORT's ``session.x64quantprecision=1`` takes
its U8U8 path, which cannot saturate: the exact sums a VNNI CPU computes. For every ONNX Runtime
INT8 artifact under ``<A>/<recipe>/`` this runs the recipe's test images through the artifact's
``model.onnx`` twice, the default session and the exact one, and prints one JSON line each: image /
pixel AUROC both ways, Spearman correlation of the scores with the ``ort-cpu-fp32`` artifact's (when
there is one), the largest score and map differences between the two ways (as a fraction of the
range), and the artifact's ``weight_bits``. On a VNNI CPU both ways agree for every artifact; on an
AVX2-only one an 8-bit artifact differs and a 7-bit one does not. ``--cycles N`` also times both
sessions at ``--batch``, alternating them N times (blocks of runs), and reports the median of the
paired ratios exact / default: what taking the exact path would cost on this CPU.

    python -m bench.int8_exactness recipes/stfpm_effnet_lite0.yaml --artifacts A --cycles 8 --batch 8
"""

from __future__ import annotations

from bench import as_script, non_negative, positive, summary

import argparse
import json
from pathlib import Path

import numpy as np

EXACT = {"session.x64quantprecision": "1"}


def _scores(model: Path, arrays: dict, threads: int, config: dict | None) -> dict:
    from uadc.backends.ort import make_session, ort_predictor
    from uadc.evaluation.run import predict
    pred = ort_predictor(make_session(model, threads, config=config))
    return {c: predict(pred, images, 16, f"{model.parent.name} {c}") for c, (images, _, _) in arrays.items()}


def _auroc(out: dict, arrays: dict) -> list[float]:
    from uadc.evaluation import metrics
    img = [metrics.image_auroc(arrays[c][2], out[c][1]) for c in arrays]
    pix = [metrics.pixel_auroc(arrays[c][1], out[c][0]) for c in arrays]
    return [round(float(np.mean(img)), 4), round(float(np.mean(pix)), 4)]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(float(b.max() - b.min()), 1e-12))


def compare(model: Path, arrays: dict, threads: int, reference: np.ndarray | None) -> dict:
    from scipy.stats import spearmanr
    fast, exact = _scores(model, arrays, threads, None), _scores(model, arrays, threads, EXACT)
    s_fast = np.concatenate([fast[c][1] for c in arrays])
    s_exact = np.concatenate([exact[c][1] for c in arrays])
    m_fast = np.concatenate([fast[c][0].ravel() for c in arrays])
    m_exact = np.concatenate([exact[c][0].ravel() for c in arrays])
    out = {"auroc_this_cpu": _auroc(fast, arrays), "auroc_exact": _auroc(exact, arrays),
           "score_max_diff": round(_max_diff(s_fast, s_exact), 5), "map_max_diff": round(_max_diff(m_fast, m_exact), 5),
           "identical": bool(np.array_equal(s_fast, s_exact) and np.array_equal(m_fast, m_exact))}
    if reference is not None:
        out["spearman_fp32"] = [round(float(spearmanr(s, reference)[0]), 4) for s in (s_fast, s_exact)]
    return out


def paired_latency(model: Path, threads: int, batch: int, size: int, cycles: int) -> dict:
    from uadc.backends.ort import latency_ms, make_session
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    runs = {}
    for name, config in (("default", None), ("exact", EXACT)):
        session = make_session(model, threads, config=config)
        feeds = {session.get_inputs()[0].name: x}
        runs[name] = lambda s=session, f=feeds: s.run(None, f)
    p50 = {name: [] for name in runs}
    for _ in range(cycles):
        for name, fn in runs.items():
            p50[name].append(latency_ms(fn, runs=20 if batch == 1 else 6, warmup=3)["p50"])
    ratio = np.array(p50["exact"]) / np.array(p50["default"])
    return {f"b{batch}_p50_ms": {k: round(float(np.median(v)), 2) for k, v in p50.items()},
            f"b{batch}_exact_over_default": round(float(np.median(ratio)), 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.int8_exactness", description=summary(__doc__))
    ap.add_argument("recipe")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--cycles", type=non_negative, default=0, help="time both sessions, alternating, this many times")
    ap.add_argument("--batch", type=positive, default=1, help="batch of the timing (with --cycles)")
    args = ap.parse_args(argv)
    from uadc.config.recipe import load_recipe
    from uadc.data.prepare import prepare_data
    from uadc.evaluation.run import test_arrays
    from uadc.core.errors import UadcError
    recipe = load_recipe(args.recipe)
    folder = recipe.artifact_dir(args.artifacts)
    reports = [r for r in sorted(folder.glob("*/report.json")) if (r.parent / "model.onnx").is_file()
               and (d := json.loads(r.read_text())).get("runtime") == "onnxruntime" and d.get("precision") == "int8"]
    if not reports:   # it printed nothing and exited 0
        raise UadcError(f"no ONNX Runtime INT8 artifact under {folder} (uadc compile {args.recipe} --target ort-cpu-int8)")
    arrays = test_arrays(prepare_data(recipe))
    fp32 = folder / "ort-cpu-fp32" / "model.onnx"
    reference = None
    if fp32.is_file():
        reference = np.concatenate([v[1] for v in _scores(fp32, arrays, args.threads, None).values()])
    for report in reports:
        model = report.parent / "model.onnx"
        calib = report.parent / "calibration.json"
        bits = json.loads(calib.read_text()).get("weight_bits", 8) if calib.is_file() else None
        row = {"artifact": report.parent.name, "weight_bits": bits}
        row.update(compare(model, arrays, args.threads, reference))
        if args.cycles:
            row.update(paired_latency(model, args.threads, args.batch, recipe.data.image_size, args.cycles))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    as_script(main)
