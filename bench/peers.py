"""``python -m bench.peers``: uadc artifacts against the usual tools, in one run.

Systems, all from the same trained checkpoint and the same calibration images (uadc's
``compile.calib_data`` / ``calib_samples`` of the recipe):
- ``ORT FP32``: the FP32 ONNX uadc exports, in ONNX Runtime;
- ``ORT quantize_static``: ``onnxruntime.quantization.quantize_static`` with its defaults (QDQ,
  S8/S8 per-tensor, MinMax), every op it supports, the head included;
- ``OpenVINO FP32``: OpenVINO reading the same FP32 ONNX with its defaults (on AMX/AVX-512 BF16
  CPUs that means bf16 inference; the JSON records the precision it used);
- ``OpenVINO+NNCF INT8``: ``nncf.quantize`` with its default preset on the OpenVINO model;
- ``uadc <artifact>``: every artifact folder under ``<artifacts>/<recipe>/`` with a
  ``report.json`` and a CPU runtime (onnxruntime or openvino); each ONNX Runtime artifact once
  more as ``uadc predict`` / ``Detector`` run it (``uadc.backends.parallel``, schedule auto:
  teacher and student at once for one image, the batch split across the cores for more).

Latency: p50 at each batch size, every timing in its own fresh process, systems in rotated order
over ``--rounds`` rounds (median of the rounds quoted). Accuracy: image / pixel AUROC (mean over
the recipe's categories) and decision agreement with ORT FP32 (label-free thresholds: each
system's 99th percentile of its scores on the validation normals). Writes ``peers.json``,
``peers.md`` and ``peers.png`` (AUROC vs latency; needs matplotlib) to ``--out``.

    python -m bench.peers --artifacts /tmp/art                         # default recipe, 128 px
    python -m bench.peers --recipes recipes/stfpm_effnet_lite0.yaml,recipes/stfpm_effnet_lite0_256.yaml

NNCF, OpenVINO and matplotlib are bench dependencies (``pip install 'uadc[bench]'``), not core.
"""

from __future__ import annotations

from bench import as_script, out_folder, positive, positives, summary

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from uadc.config.targets import inference_hint_of

SCHEDULED = "onnxruntime-scheduled"
FALSE_ALARM_Q = 99.0  # threshold = this percentile of a system's validation-normal scores


# -- child process: time one system ---------------------------------------------------------------
def _time_child(kind: str, path: str, batch: int, threads: int, runs: int, size: int, hint: str | None) -> dict:
    from uadc.backends.ort import latency_ms
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    if kind == "openvino":
        from uadc.backends import openvino as ov
        compiled = ov.compile_model(path, threads, precision_hint=hint)
        run = ov.infer_fn(compiled)
        fn = lambda: run(x)  # noqa: E731
        used = ov.inference_precision(compiled)
    else:
        sess = _ort_session(kind, path, threads)
        fn = lambda: sess.run(None, {"image": x})  # noqa: E731
        used = None
    lat = latency_ms(fn, runs, warmup=max(5, runs // 5))
    return {**lat, "inference_precision": used}


def _ort_session(kind: str, path, threads: int):
    """A plain session, or uadc's runtime schedule (``onnxruntime-scheduled``)."""
    if kind == SCHEDULED:
        from uadc.backends.parallel import ParallelSession
        return ParallelSession(path, threads, "auto")
    from uadc.backends.ort import make_session
    return make_session(path, threads)


# -- building the peers ---------------------------------------------------------------------------
class _Reader:
    """onnxruntime CalibrationDataReader over calibration images."""

    def __init__(self, images: np.ndarray):
        self._it = iter([{"image": images[i:i + 1]} for i in range(len(images))])

    def get_next(self):
        return next(self._it, None)


def build_peers(base, tmp: Path) -> list[dict]:
    import onnx
    peers = []
    fp32 = tmp / "fp32.onnx"
    onnx.save(base.fp32, fp32)
    peers.append({"name": "ORT FP32", "kind": "onnxruntime", "path": fp32, "origin": "peer"})
    r = base.recipe.compile
    calib = base.calibration_images(r.calib_data, r.calib_samples)
    from onnxruntime.quantization import quantize_static
    qs = tmp / "ort_qs.onnx"
    quantize_static(str(fp32), str(qs), _Reader(calib))
    peers.append({"name": "ORT quantize_static (defaults)", "kind": "onnxruntime", "path": qs, "origin": "peer"})
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        peers.append({"name": "OpenVINO (missing)", "skipped": f"{exc}; pip install 'uadc[bench]'"})
        return peers
    peers.append({"name": "OpenVINO FP32 (defaults)", "kind": "openvino", "path": fp32, "hint": None,
                  "origin": "peer"})
    ov_model = ov.Core().read_model(str(fp32))
    q = nncf.quantize(ov_model, nncf.Dataset([calib[i:i + 1] for i in range(len(calib))]),
                      subset_size=len(calib))
    xml = tmp / "ov_nncf_int8.xml"
    ov.save_model(q, str(xml))
    peers.append({"name": "OpenVINO+NNCF INT8 (defaults)", "kind": "openvino", "path": xml, "hint": None,
                  "origin": "peer"})
    return peers


def uadc_artifacts(base, artifacts: Path) -> list[dict]:
    out = []
    for rep in sorted((base.recipe.artifact_dir(artifacts)).glob("*/report.json")):
        d = json.loads(rep.read_text())
        model = rep.parent / "model.onnx"
        if d.get("runtime") not in ("onnxruntime", "openvino") or not model.is_file():
            continue
        parts = ",".join(d.get("quantized_partitions") or []) or "-"
        # OpenVINO artifacts run at their target's float precision (f32 pinned, or bf16), as uadc deploys them.
        hint = inference_hint_of(d["target"])
        out.append({"name": f"uadc {rep.parent.name} ({d['target']}, int8: {parts})", "kind": d["runtime"],
                    "path": model, "hint": hint, "origin": "uadc", "target": d["target"]})
        if d["runtime"] == "onnxruntime":
            out.append({**out[-1], "name": out[-1]["name"] + ", uadc runtime", "kind": SCHEDULED})
    return out


# -- accuracy -----------------------------------------------------------------------------------
def _predictor(system: dict, threads: int):
    if system["kind"] == "openvino":
        from uadc.backends import openvino as ov
        return ov.ov_predictor(ov.compile_model(system["path"], threads, precision_hint=system.get("hint")))
    from uadc.backends.ort import ort_predictor
    return ort_predictor(_ort_session(system["kind"], system["path"], threads))


def accuracy(system: dict, base, val: dict, threads: int) -> dict:
    from uadc.evaluation import metrics
    from uadc.evaluation.run import predict
    pred = _predictor(system, threads)
    res, decisions = {}, {}
    bs = base.recipe.eval.batch_size
    for cat, (images, masks, labels) in base.test_arrays.items():
        maps, scores = predict(pred, images, bs, f"{system['name']} {cat}")
        _, val_scores = predict(pred, val[cat], bs, f"{system['name']} {cat} val")
        res[cat] = {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": metrics.pixel_auroc(masks, maps)}
        decisions[cat] = (scores > np.percentile(val_scores, FALSE_ALARM_Q)).tolist()
    mean = {k: float(np.mean([v[k] for v in res.values()])) for k in ("image_auroc", "pixel_auroc")}
    return {"categories": res, "mean": mean, "decisions": decisions}


# -- the run ------------------------------------------------------------------------------------
def _time(system: dict, batch: int, threads: int, runs: int, size: int) -> dict:
    cmd = [sys.executable, "-m", "bench.peers", "--time", system["kind"], str(system["path"]), "--batch", str(batch),
           "--threads", str(threads), "--runs", str(runs), "--size", str(size)]
    if system.get("hint"):
        cmd += ["--hint", system["hint"]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_recipe(recipe_path: str, artifacts: Path, threads: int, batches: list[int], rounds: int, runs: int,
               log) -> dict:
    from uadc.config.recipe import load_recipe
    from uadc.pipeline.baseline import Baseline
    from uadc.pipeline.baseline import resolve_source
    recipe = load_recipe(recipe_path)
    base = Baseline(recipe, resolve_source(recipe, recipe, artifacts), threads)
    val = {c: np.stack([ds[i]["image"].numpy() for i in range(len(ds))]) for c, ds in base.data.val.items()}
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        systems = build_peers(base, Path(tmp)) + uadc_artifacts(base, artifacts)
        live = [s for s in systems if "skipped" not in s]
        for s in live:
            log(f"accuracy: {s['name']}")
            s["accuracy"] = accuracy(s, base, val, threads)
        ref = live[0]["accuracy"]["decisions"]
        for s in live:
            d = s["accuracy"].pop("decisions")
            agree = [np.mean(np.array(d[c]) == np.array(ref[c])) for c in ref]
            s["decision_agreement"] = round(float(np.mean(agree)), 4)
        size = recipe.data.image_size
        for bs in batches:
            p50 = {s["name"]: [] for s in live}
            for r in range(rounds):
                order = live[r % len(live):] + live[:r % len(live)]  # rotate who runs first
                for s in order:
                    t = _time(s, bs, threads, runs if bs == 1 else max(10, runs // 4), size)
                    p50[s["name"]].append(t["p50"])
                    s["inference_precision"] = t["inference_precision"]
                log(f"batch {bs} round {r + 1}/{rounds} done")
            fp32 = float(np.median(p50[live[0]["name"]]))
            for s in live:
                med = float(np.median(p50[s["name"]]))
                s.setdefault("latency", {})[f"b{bs}"] = {"p50_ms": round(med, 3), "rounds": p50[s["name"]],
                                                         "x_ort_fp32": round(med / fp32, 3)}
    for s in systems:
        s["path"] = str(s.get("path", ""))
    return {"recipe": recipe.name, "image_size": recipe.data.image_size, "categories": list(base.test_arrays),
            "systems": systems}


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"# Peer benchmark ({env['cpu']}, {env['threads']} threads, load average at start "
             f"{env['loadavg_start']}, at end {env['loadavg_end']})", "",
             f"p50 per batch = median of {env['rounds']} rounds, each timing in its own process; AUROC = mean over "
             "categories; agreement = share of test images with the same decision as ORT FP32 (thresholds: each "
             f"system's {FALSE_ALARM_Q:g}th percentile on validation normals).", ""]
    for r in result["recipes"]:
        batches = sorted({b for s in r["systems"] for b in s.get("latency", {})}, key=lambda b: int(b[1:]))
        lines += [f"## {r['recipe']} ({r['image_size']} px)", "",
                  "| system | " + " | ".join(f"p50 ms {b} | × ORT FP32 {b}" for b in batches) +
                  " | image AUROC | pixel AUROC | agreement |",
                  "|---|" + "---:|---:|" * len(batches) + "---:|---:|---:|"]
        for s in r["systems"]:
            if "skipped" in s:
                lines.append(f"| {s['name']} | skipped: {s['skipped']} |")
                continue
            lat = " | ".join(f"{s['latency'][b]['p50_ms']:.3f} | {s['latency'][b]['x_ort_fp32']:.2f}" for b in batches)
            a = s["accuracy"]["mean"]
            name = s["name"] + (f" [{s['inference_precision']}]" if s.get("inference_precision") else "")
            lines.append(f"| {name} | {lat} | {a['image_auroc']:.4f} | {a['pixel_auroc']:.4f} | "
                         f"{s['decision_agreement']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from uadc.core.io import atomic_save
    fig, ax = plt.subplots(figsize=(7, 4.5))
    batch = min((int(k[1:]) for r in result["recipes"] for s in r["systems"] for k in s.get("latency", {})), default=1)
    for r in result["recipes"]:   # the smallest batch measured (--batches 8: there was no b1, a KeyError)
        for s in r["systems"]:
            if "skipped" in s:
                continue
            x, y = s["latency"][f"b{batch}"]["p50_ms"], s["accuracy"]["mean"]["image_auroc"]
            ax.scatter(x, y, marker="o" if s["origin"] == "uadc" else "s")
            ax.annotate(f"{s['name'][:38]} ({r['image_size']}px)", (x, y), fontsize=6)
    ax.set_xlabel(f"p50 latency, batch {batch} (ms)")
    ax.set_ylabel("mean image AUROC")
    ax.set_title("AUROC vs latency (circles: uadc, squares: peers)")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    import os
    ap = argparse.ArgumentParser(description=summary(__doc__))
    ap.add_argument("--recipes", default="recipes/stfpm_effnet_lite0.yaml",
                    help="comma-separated recipes, one per input size (each needs its checkpoint)")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--out", type=out_folder, default=None, help="default <artifacts>/peers")
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--batches", type=positives, default="1,8")
    ap.add_argument("--rounds", type=positive, default=3)
    ap.add_argument("--runs", type=positive, default=50, help="timed runs per process at batch 1 (batch > 1: a quarter)")
    ap.add_argument("--time", nargs=2, default=None, help=argparse.SUPPRESS)  # child: KIND PATH
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, default=128, help=argparse.SUPPRESS)
    ap.add_argument("--hint", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.time:
        print(json.dumps(_time_child(a.time[0], a.time[1], a.batch, a.threads, a.runs, a.size, a.hint)))
        return 0
    from uadc.core.io import atomic_write_json, atomic_write_text
    from uadc.pipeline.compile import environment
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    load0 = os.getloadavg()
    t0 = time.time()
    recipes = [run_recipe(p, a.artifacts, a.threads, a.batches, a.rounds, a.runs, log)
               for p in a.recipes.split(",")]
    env = environment(a.threads)
    env.update({"loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "rounds": a.rounds, "runs": a.runs, "seconds": round(time.time() - t0, 1)})
    result = {"environment": env, "recipes": recipes}
    out = a.out or a.artifacts / "peers"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "peers.json", result)
    md = markdown(result)
    atomic_write_text(out / "peers.md", md)
    plotted = plot(result, out / "peers.png")
    if not plotted:   # an earlier run's plot beside this run's tables
        (out / "peers.png").unlink(missing_ok=True)
    print(md + ("" if plotted else "\n(no peers.png: matplotlib not installed)\n"))
    return 0


if __name__ == "__main__":
    as_script(main)
